"""The seed's claims as data (../shared/SEED.md), each with its source and the conditions it was made under.

A check names the claim it tests (`Result.claim`) and gives a `Verdict`. The seed's numbers are claims, not facts:
"FlashAttention 7.6x" sits in the seed's memory column, while the paper reports 7.6x as an attention speed-up.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class Verdict(str, enum.Enum):
    HOLDS = "holds"
    HOLDS_UNDER_CONDITIONS = "holds only under stated conditions"
    DOES_NOT_HOLD = "does not hold"
    NOT_MEASURABLE = "not measurable here"


@dataclass(frozen=True)
class Claim:
    id: str
    """Stable key, e.g. "zero1.memory"."""
    technique: str
    statement: str
    """The claim as the seed (or the paper it leans on) makes it."""
    claimed: str
    """The number claimed, as written."""
    source: str
    conditions: str
    """Under what the number was obtained (hardware, model, accounting)."""

    def to_dict(self) -> dict:
        return asdict(self)


_SEED = "seed table (../shared/SEED.md)"

CLAIMS: dict[str, Claim] = {
    c.id: c
    for c in [
        Claim("mixed_precision.memory", "mixed precision", "FP16+FP32 mixed precision halves memory", "50%", _SEED,
              "Micikevicius et al. 2018 (arXiv 1710.03740): activations and gradients in half precision; the fp32 "
              "master copy keeps model-state bytes per parameter about the same, so the halving is for activations"),
        Claim("mixed_precision.speed", "mixed precision", "mixed precision trains 1.5-2x faster", "1.5-2x", _SEED,
              "GPUs with half-precision tensor cores (Volta and later) against fp32 without TF32"),
        Claim("zero1.memory", "ZeRO-1", "sharding optimizer state saves 4x model-state memory", "4x", _SEED,
              "ZeRO paper (arXiv 1910.02054) Fig. 1: mixed-precision Adam (K=12), 16Ψ vs 4Ψ+12Ψ/Nd, the limit as "
              "the data-parallel degree Nd grows"),
        Claim("zero2.memory", "ZeRO-2", "sharding gradients too saves 8x model-state memory", "8x", _SEED,
              "ZeRO paper Fig. 1: 16Ψ vs 2Ψ+14Ψ/Nd, the limit as Nd grows"),
        Claim("zero3.memory", "ZeRO-3", "sharding parameters too divides model-state memory by Nd", "Nd x",
              "ZeRO paper (arXiv 1910.02054) Sec. 5", "16Ψ vs 16Ψ/Nd, mixed-precision Adam"),
        Claim("zero.speed", "ZeRO-1/2", "ZeRO-1 and ZeRO-2 cost only a slight speed change", "slight", _SEED,
              "communication volume 2Ψ per step, the same as data parallel (ZeRO paper Sec. 7)"),
        Claim("zero.communication", "ZeRO", "ZeRO-1/2 communicate 2Ψ per step like DP; ZeRO-3 communicates 3Ψ",
              "2Ψ / 3Ψ", "ZeRO paper (arXiv 1910.02054) Sec. 7", "elements per rank per step, ring collectives"),
        Claim("flash.memory_seed", "FlashAttention", "FlashAttention saves 7.6x memory", "7.6x", _SEED,
              "the FlashAttention paper (arXiv 2205.14135) reports 7.6x as the attention SPEED-UP on GPT-2 (A100), "
              "not a memory figure"),
        Claim("flash.memory", "FlashAttention", "FlashAttention's memory is linear in sequence length: 10x less "
              "at N=2K and 20x at N=4K", "10x @2K, 20x @4K", "FlashAttention paper (arXiv 2205.14135) Fig. 3",
              "attention fwd+bwd memory vs a standard PyTorch implementation, A100"),
        Claim("flash.speed", "FlashAttention", "FlashAttention is 2-4x faster", "2-4x", _SEED,
              "attention forward+backward on A100/H100 against a standard implementation; FLOPs per FA2 "
              "(arXiv 2307.08691): 4·N·M·d·H forward, half when causal, backward 2.5x forward"),
        Claim("data_parallel.equivalence", "data parallel", "N ranks on slices of a batch, with averaged gradients, "
              "compute the single-process step", "equal", "Li et al. 2020 (PyTorch DDP, arXiv 2006.15704)",
              "gradients averaged over ranks of equal micro-batch size"),
        Claim("tensor_parallel.communication", "tensor parallel", "a Megatron transformer layer needs two "
              "all-reduces in forward and two in backward", "2 + 2",
              "Megatron-LM (arXiv 1909.08053) Sec. 3, Fig. 4", "column-then-row parallel attention and MLP"),
        Claim("tensor_parallel.memory", "tensor parallel", "parameters per rank fall by the TP degree t", "1/t",
              "Megatron-LM (arXiv 1909.08053)", "the split Linear layers; LayerNorms and biases of row-parallel "
              "layers are replicated"),
        Claim("pipeline.bubble", "pipeline parallel", "the pipeline bubble is (p-1)/(m+p-1) for GPipe and 1F1B",
              "(p-1)/(m+p-1)", "GPipe (arXiv 1811.06965); Narayanan et al. 2021 (arXiv 2104.04473) Sec. 2.2",
              "equal stage costs, backward = 2x forward"),
        Claim("pipeline.memory", "pipeline parallel", "GPipe keeps all m micro-batches' activations alive, 1F1B at "
              "most p", "m vs p", "Narayanan et al. 2021 (arXiv 2104.04473) Sec. 2.2", "per stage, at the peak"),
        Claim("warmup.stability", "LR schedules", "learning-rate warmup stabilises early training at high learning "
              "rates", "fewer spikes / no divergence", "Goyal et al. 2017 (arXiv 1706.02677); Liu et al. 2020 "
              "(arXiv 1908.03265)", "Adam, large learning rate, the same seeds with and without warmup"),
        Claim("checkpointing.memory", "activation checkpointing", "full recomputation keeps only each layer's "
              "input, 2sbh bytes instead of sbh(34 + 5as/h); selective recomputation of the attention core keeps "
              "34sbh", "2sbh / 34sbh", "Korthikanti et al. 2022 (arXiv 2205.05198) Sec. 4-5",
              "per transformer layer, half precision with dropout masks, no tensor parallelism; the check counts "
              "the tiny GPT in fp32 without dropout exactly (reference.memory.activation_bytes_per_layer)"),
        Claim("checkpointing.speed", "activation checkpointing", "full recomputation costs one extra forward pass "
              "(about 33% more compute); selective recomputation costs little", "+33% / small",
              "Chen et al. 2016 (arXiv 1604.06174); Korthikanti et al. 2022 Sec. 5",
              "backward = 2x forward; the overhead in time follows the FLOPs when the step is compute bound"),
        Claim("context_parallel.memory", "context parallelism", "ring attention splits the sequence, so each of P "
              "ranks holds 1/P of the activations and never an N x N matrix", "1/P",
              "Liu et al. 2023 (arXiv 2310.01889) Sec. 3", "activations per rank per layer, blockwise attention"),
        Claim("context_parallel.communication", "context parallelism", "each rank passes its K/V block around the "
              "ring: P-1 sends forward, overlapped with the attention of the block in hand", "(P-1) K/V blocks",
              "Liu et al. 2023 (arXiv 2310.01889) Sec. 3", "per attention layer; backward also sends dK/dV"),
        Claim("context_parallel.balance", "context parallelism", "with a causal mask the zigzag layout (two chunks "
              "per rank, one early and one late) gives every rank the same work", "equal work",
              "Brandon et al. 2023 (Striped Attention, arXiv 2311.09431); zhuzilin/ring-flash-attention",
              "contiguous slices leave rank P-1 about 2P-1 times rank 0's work"),
    ]
}


def equivalence_verdict(passed: bool, *, world_size: int) -> Verdict:
    """The verdict of a claim that N ranks compute what one process does: not measurable on one rank (it splits
    nothing), else holds or does not hold with the equivalence."""
    if world_size == 1:
        return Verdict.NOT_MEASURABLE
    return Verdict.HOLDS if passed else Verdict.DOES_NOT_HOLD


def claim(claim_id: str) -> Claim:
    """The claim with this id; a clear error listing the known ids otherwise."""
    if claim_id not in CLAIMS:
        raise KeyError(f"unknown claim {claim_id!r}; known: {', '.join(sorted(CLAIMS))}")
    return CLAIMS[claim_id]
