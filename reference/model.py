"""A tiny GPT: the shared workload every technique is trained and measured on.

GPT-2 shaped (Radford et al. 2019; nanoGPT): token + learned position embeddings, `n_layer` pre-LayerNorm blocks
(x + attn(ln_1(x)), then x + mlp(ln_2(x))), a final LayerNorm and an output head tied to the token embedding
(Press & Wolf 2017). Attention is causal and grouped-query capable (GQA, Ainslie et al. 2023, arXiv 2305.13245):
`n_head` query heads share `n_kv_head` key/value heads.

The attention kernel is pluggable: `GPT(config, attention=fn)` calls `fn(q, k, v, is_causal=True)` with
q: (B, H, T, d) and k, v: (B, Hkv, T, d), the signature of `reference.attention.attention`. That is how the
optimized FlashAttention is dropped into the same model.

Module names are part of the contract (tensor and pipeline parallel address layers by them):
    wte, wpe, blocks.{i}.ln_1, blocks.{i}.attn.{q_proj,k_proj,v_proj,out_proj}, blocks.{i}.ln_2,
    blocks.{i}.mlp.{fc_in,fc_out}, ln_f, lm_head (its weight is wte.weight when tie_embeddings).
The attention layer reads the number of heads from the width of q_proj's output at run time, so a layer whose
q/k/v projections hold only some heads (tensor parallel) runs those heads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Targets equal to this are not scored (the convention of torch.nn.functional.cross_entropy)."""


@dataclass
class GPTConfig:
    """Shape of the tiny GPT. Defaults give a model of ~0.1M parameters that trains in seconds on a CPU."""

    vocab_size: int = 64
    """Number of token ids."""
    block_size: int = 64
    """Longest sequence the position embedding covers."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of query heads."""
    n_kv_head: int | None = None
    """Number of key/value heads (GQA); None means n_head (multi-head attention), 1 means MQA."""
    n_embd: int = 64
    """Width of the residual stream; must divide by n_head."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of n_embd."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """Share the output head's weight with the token embedding."""
    seed: int = 0
    """Seed of the deterministic initialisation."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head gets n_embd // n_head channels)"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                f"(each key/value head serves n_head // n_kv_head query heads)"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


AttentionFn = Callable[..., Tensor]


def _default_attention() -> AttentionFn:
    from reference.attention import attention

    return attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attention: AttentionFn) -> None:
        super().__init__()
        d = config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(config.n_embd, config.n_head * d, bias=config.bias)
        # No key bias, even with config.bias: q·(k + b) = q·k + q·b adds the same number to every score of a query
        # row, and softmax ignores it, so the bias's gradient is zero in exact arithmetic. In floating point it is
        # rounding noise that Adam normalises into full-size steps: a parameter that only adds noise to comparisons.
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * d, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * d, bias=config.bias)
        self.out_proj = nn.Linear(config.n_head * d, config.n_embd, bias=config.bias)
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        y = self.attention(q, k, v, is_causal=True)  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*d)
        return self.out_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=config.bias)
        self.fc_out = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attention: AttentionFn) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The tiny GPT. `forward(idx, targets)` returns (logits, loss); loss is None without targets."""

    def __init__(self, config: GPTConfig, attention: AttentionFn | None = None) -> None:
        super().__init__()
        self.config = config
        attention = attention if attention is not None else _default_attention()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, attention) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation drawn from a private generator seeded by config.seed, in a fixed order.

        Weights ~ N(0, 0.02); the projections that write into the residual stream (out_proj, fc_out) are scaled by
        1/sqrt(2 * n_layer) so the residual's variance does not grow with depth (GPT-2 paper, Sec. 2.3).
        """
        gen = torch.Generator().manual_seed(self.config.seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.endswith("out_proj.weight") or name.endswith("fc_out.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * residual_std)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif ".ln_" in f".{name}" and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean"):
        """idx, targets: (B, T) int64. reduction "mean": mean cross-entropy over tokens whose target is not
        IGNORE_INDEX; "sum": their sum (for token-weighted accumulation). A batch with no scored token has
        mean loss 0 (not NaN), so it contributes nothing."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) int64 tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length T={T} exceeds GPTConfig.block_size={self.config.block_size}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        return logits, token_loss(logits, targets, reduction)


def token_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (..., V) logits against (...) targets, skipping IGNORE_INDEX.

    "sum" is the sum over scored tokens; "mean" divides it by their count (0 when there is none)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if reduction == "sum":
        return total
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)
