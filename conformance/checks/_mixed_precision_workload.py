"""The workload of the `mixed_precision` check: the tiny GPT, its sizes per purpose and its batches, and the
numbers every part of the check shares (the learning rate, each half dtype's unit roundoff, dtype short names)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conformance.checks import Context
from reference.data import make_batches
from reference.model import GPT, GPTConfig

LR = 3e-3
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Sizes:
    """A model and how it is fed: its config, the batch shape and the number of training steps."""

    config: GPTConfig
    batch_size: int
    seq_len: int
    steps: int


def sizes(ctx: Context, purpose: str) -> Sizes:
    """Small for equivalence and memory; for speed on CUDA a model large enough to be compute bound."""
    if purpose == "speed" and ctx.device.type == "cuda":
        width, layers, seq = (512, 4, 256) if ctx.quick else (1024, 8, 512)
        cfg = GPTConfig(vocab_size=8192, block_size=seq, n_layer=layers, n_head=width // 64, n_embd=width)
        return Sizes(cfg, 8, seq, 0)
    if purpose == "speed" and not ctx.quick:  # CPU: one GPT-2-like layer, enough work to time the matmuls
        return Sizes(GPTConfig(vocab_size=64, block_size=128, n_layer=1, n_head=4, n_embd=256), 8, 128, 0)
    cfg = GPTConfig(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32 if ctx.quick else 64)
    return Sizes(cfg, 4 if ctx.quick else 8, 13 if ctx.quick else 32, 8 if ctx.quick else 30)


def batches(s: Sizes, device: torch.device, n: int = 3):
    return [(i.to(device), t.to(device)) for i, t in make_batches(
        n, batch_size=s.batch_size, seq_len=s.seq_len, vocab_size=s.config.vocab_size, task="copy", seed=3)]


def gpt(s: Sizes, device: torch.device, dtype: torch.dtype = torch.float32) -> GPT:
    return GPT(s.config).to(device=device, dtype=dtype)
