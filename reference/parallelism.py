"""Choosing a parallel strategy, as formulas: what a layout keeps alive, communicates, idles and computes.

The memory of model states is `reference.memory`; this file adds what a planner needs beside it, each formula built
on `reference.memory` where one applies, so no formula exists twice (tools/plan/ is the planner):
    activation_bytes_per_rank         a rank's live activations: layers x micro-batches in flight, recomputation, CP
    pipeline_stage_parameters         parameters of the most loaded pipeline stage (whole blocks + embeddings)
    in_flight_microbatches            micro-batches whose activations the first pipeline stage holds at its peak
    pipeline_bubble_fraction          (p - 1) / (m + p - 1), GPipe and 1F1B
    zero_communication_elements       ZeRO's 2Ψ / 3Ψ per step with m accumulated micro-batches
    data_parallel_communication_bytes  those elements in bytes, as a ring of Nd ranks sends them
    tensor_parallel_communication_bytes   Megatron's 2 + 2 all-reduces per layer per micro-batch
    pipeline_communication_bytes      activations forward, their gradients backward, per micro-batch
    context_parallel_communication_bytes  ring attention's K/V and dK/dV per layer per micro-batch
    offload_transfer_bytes            ZeRO-Offload's PCIe traffic per step
    training_flops                    6Ψ per token plus attention (Kaplan et al. 2020)
    offload_step_seconds              ZeRO-Offload's CPU optimizer step, bounded by host-memory bandwidth
    step_seconds                      compute / (1 - bubble) + communication + offload's CPU step (no overlap)
    largest_module_parameters         DeepSpeed's largest_layer_params for reference.model.GPT
"""

from __future__ import annotations

import dataclasses

import torch

from reference.memory import (
    RECOMPUTE_POLICIES,
    Precision,
    activation_bytes_per_layer,
    communication_elements,
    gpt_parameters,
    layers_per_stage,
    ring_attention_bytes_sent,
)
from reference.model import Block, GPTConfig

SCHEDULES = ("1f1b", "gpipe")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def activation_bytes_per_rank(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    num_layers: int,
    in_flight: int = 1,
    attention: str = "naive",
    tp: int = 1,
    cp: int = 1,
    element_bytes: int = 4,
    recompute: str = "none",
) -> int:
    """Peak bytes of activations one rank holds for backward: `num_layers` blocks, `in_flight` micro-batches.

    Without recomputation every block keeps what `reference.memory.activation_bytes_per_layer` counts, for every
    micro-batch whose backward has not run yet:
        in_flight * num_layers * A                  A = activation_bytes_per_layer(config, b, s, ...)
    With recomputation (Chen et al. 2016, arXiv 1604.06174; Korthikanti et al. 2022, arXiv 2205.05198, Sec. 5) each
    block keeps A_r = activation_bytes_per_layer(..., recompute=r) and, while one block recomputes in backward, what
    it recomputes lives once more:
        in_flight * num_layers * A_r + (A - A_r)    "full": A_r = e·b·s·h, the block's input; "selective": the
                                                    attention core's inputs instead of its N x N probabilities
    Context parallelism over cp ranks (ring attention, reference.memory.context_parallel_activation_bytes_per_layer)
    gives every rank s/cp tokens and needs the blockwise (flash) attention: A is counted at s/cp with it.
    Embeddings, the output head, the logits and the loss are not counted (they are outside the blocks)."""
    _positive(num_layers=num_layers, in_flight=in_flight, cp=cp)
    if cp > 1:
        if seq_len % cp:
            raise ValueError(f"seq_len={seq_len} must be a multiple of cp={cp} (each rank holds s/cp tokens)")
        seq_len, attention = seq_len // cp, "flash"
    per_layer = {r: activation_bytes_per_layer(config, batch_size, seq_len, attention=attention, tp=tp,
                                               element_bytes=element_bytes, recompute=r)
                 for r in {"none", recompute}}
    return in_flight * num_layers * per_layer[recompute] + per_layer["none"] - per_layer[recompute]


def pipeline_stage_parameters(config: GPTConfig, *, pp: int, tp: int = 1) -> int:
    """Parameters of the most loaded of p pipeline stages, on one of t tensor-parallel ranks: an upper bound.

    A stage holds whole blocks, at most ceil(L/p) of them (`reference.memory.layers_per_stage`); the first stage
    also holds the embeddings, the last the final LayerNorm and the head (with tied embeddings a copy of the token
    embedding: Megatron-LM, arXiv 1909.08053), each at most all the parameters outside the blocks:
        ceil(L/p) * block + outside       block, outside from reference.memory.gpt_parameters at 2 and 1 layers
    with every count on one tensor-parallel rank (`reference.memory.gpt_parameters(config, tp=t)`), which p = 1
    gives exactly.
    ZeRO Sec. 8's Ψ/(t·p) is the ideal this bound approaches when the blocks divide evenly and the embeddings are
    small."""
    _positive(pp=pp, tp=tp)
    if pp == 1:
        return gpt_parameters(config, tp=tp)
    one = gpt_parameters(dataclasses.replace(config, n_layer=1), tp=tp)
    block = gpt_parameters(dataclasses.replace(config, n_layer=2), tp=tp) - one
    return layers_per_stage(config.n_layer, pp) * block + (one - block)


def in_flight_microbatches(num_stages: int, num_microbatches: int, schedule: str = "1f1b") -> int:
    """Micro-batches whose activations the first pipeline stage holds at once, at its peak.

    GPipe (arXiv 1811.06965) runs all m forwards before any backward: m. 1F1B (PipeDream-Flush, Narayanan et al.
    2021, arXiv 2104.04473, Sec. 2.2) lets stage 0 run p warm-up forwards, then alternates one forward with one
    backward: min(p, m). With p = 1, 1F1B is plain gradient accumulation: one micro-batch at a time."""
    _positive(num_stages=num_stages, num_microbatches=num_microbatches)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return num_microbatches if schedule == "gpipe" else min(num_stages, num_microbatches)


def pipeline_bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction of a GPipe or 1F1B pipeline with equal stage costs: (p - 1) / (m + p - 1).

    Each of the p stages is busy m·(t_f + t_b) and the step lasts (m + p - 1)·(t_f + t_b): the first micro-batch
    needs p - 1 forward slots to reach the last stage, and its gradient p - 1 backward slots to come back
    (GPipe, arXiv 1811.06965; Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2)."""
    _positive(num_stages=num_stages, num_microbatches=num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def zero_communication_elements(num_params: float, stage: int, accumulation_steps: int = 1) -> float:
    """Elements a data-parallel rank sends per optimizer step with m = accumulation_steps micro-batches, ring
    collectives, to leading order (exactly, a ring sends (Nd-1)/Nd of this).

    `reference.memory.communication_elements` is the step with one micro-batch (ZeRO Sec. 7: 2Ψ, ZeRO-3 3Ψ). With m:
        DP, ZeRO-1   the full gradient accumulates locally; it is reduced once per step     2Ψ
        ZeRO-2       a rank keeps only its gradient shard, so every micro-batch's gradient must be
                     reduce-scattered before the next backward (Ψ each), parameters gathered once   (m + 1)Ψ
        ZeRO-3       every micro-batch gathers the parameters for forward and for backward and
                     reduce-scatters its gradient                                              3mΨ"""
    _positive(accumulation_steps=accumulation_steps)
    one = communication_elements(num_params, stage)
    extra_per_microbatch = {0: 0.0, 1: 0.0, 2: num_params, 3: one}[stage]
    return one + (accumulation_steps - 1) * extra_per_microbatch


def data_parallel_communication_bytes(
    num_params: float, stage: int, world_size: int, *, accumulation_steps: int = 1, element_bytes: int = 4
) -> float:
    """Bytes a data-parallel rank sends per step: `zero_communication_elements` x element_bytes x (Nd-1)/Nd.

    A ring reduce-scatter or all-gather of n elements over Nd ranks sends (Nd-1)/Nd·n per rank (an all-reduce is
    one of each: 2(Nd-1)/Nd·n); one rank sends nothing."""
    _positive(world_size=world_size, element_bytes=element_bytes)
    ring = (world_size - 1) / world_size
    return zero_communication_elements(num_params, stage, accumulation_steps) * element_bytes * ring


def _ring_all_reduce_factor(group_size: int) -> float:
    return 2 * (group_size - 1) / group_size


def tensor_parallel_communication_bytes(
    batch_size: int,
    seq_len: int,
    n_embd: int,
    *,
    tp: int,
    num_layers: int,
    num_microbatches: int = 1,
    element_bytes: int = 4,
    recompute: bool = False,
) -> float:
    """Bytes one tensor-parallel rank sends per step for the transformer blocks' all-reduces, ring algorithm.

    Megatron-LM (arXiv 1909.08053, Sec. 3, Fig. 4): each block all-reduces its (b, s, h) output twice in forward
    (after the attention's out_proj and the MLP's fc_out: g) and twice in backward (at the attention's and the MLP's
    input: f). Recomputation (checkpointing) runs the forward again: 2 more. A ring all-reduce of n bytes sends
    2(t-1)/t·n per rank. The embedding's and the vocabulary-parallel loss's collectives are not counted."""
    _positive(batch_size=batch_size, seq_len=seq_len, n_embd=n_embd, tp=tp, num_layers=num_layers,
              num_microbatches=num_microbatches, element_bytes=element_bytes)
    per_layer = 6 if recompute else 4
    payload = element_bytes * batch_size * seq_len * n_embd
    return num_microbatches * num_layers * per_layer * payload * _ring_all_reduce_factor(tp)


def context_parallel_communication_bytes(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    *,
    cp: int,
    num_layers: int,
    num_microbatches: int = 1,
    tp: int = 1,
    element_bytes: int = 4,
    recompute: bool = False,
) -> float:
    """Bytes one context-parallel rank sends per step for ring attention (`reference.memory.ring_attention_bytes_sent`
    per layer: K/V P-1 hops forward, again backward, dK/dV P hops), for every layer and micro-batch. Tensor
    parallelism splits the K/V heads by t; full recomputation runs the forward's ring once more."""
    _positive(cp=cp, num_layers=num_layers, num_microbatches=num_microbatches, tp=tp)
    forward, backward = ring_attention_bytes_sent(config, batch_size, seq_len, cp=cp, element_bytes=element_bytes)
    per_layer = (2 * forward if recompute else forward) + backward
    return num_microbatches * num_layers * per_layer / tp


def pipeline_communication_bytes(
    batch_size: int, seq_len: int, n_embd: int, *, pp: int, num_microbatches: int = 1, element_bytes: int = 4
) -> float:
    """Bytes a middle pipeline stage sends per step: for every micro-batch its output activations (b, s, h) to the
    next stage in forward and the gradient of its input (b, s, h) to the previous stage in backward (point to point;
    GPipe, arXiv 1811.06965). The first and the last stage send half of it; p = 1 sends nothing."""
    _positive(batch_size=batch_size, seq_len=seq_len, n_embd=n_embd, pp=pp, num_microbatches=num_microbatches,
              element_bytes=element_bytes)
    if pp == 1:
        return 0.0
    return 2.0 * num_microbatches * element_bytes * batch_size * seq_len * n_embd


def offload_transfer_bytes(num_params: float, world_size: int, precision: Precision) -> float:
    """Bytes crossing PCIe per step with ZeRO-Offload, per GPU: the gradient slice of its Ψ/Nd parameters goes to
    the CPU, the updated parameter slice comes back (Ren et al. 2021, arXiv 2101.06840, Sec. 4.1)."""
    _positive(world_size=world_size)
    if not num_params >= 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    return (precision.grad + precision.param) * num_params / world_size


def training_flops(
    num_params: float, tokens: float, *, n_layer: int = 0, seq_len: int = 0, n_embd: int = 0, recompute: str = "none"
) -> float:
    """Floating-point operations of one training step over `tokens` tokens (Kaplan et al. 2020, arXiv 2001.08361,
    Sec. 2.1): a forward costs 2Ψ + 2·n_layer·seq_len·n_embd per token (the matmuls, and attention's scores and
    weighted sum), a backward twice the forward: 6·(Ψ + n_layer·seq_len·n_embd) per token. Full recomputation runs
    the forward once more (8x); selective recomputation only the attention core's scores and weighted sum
    (+2·n_layer·seq_len·n_embd; Korthikanti et al. 2022, arXiv 2205.05198, Sec. 5). Embedding lookups are free (Ψ
    then overcounts by the embedding, as Kaplan's count of non-embedding parameters avoids; a few percent for large
    models). With the shape unknown (n_layer = seq_len = n_embd = 0) the attention term is left out: 6Ψ (8Ψ)."""
    for name, value in (("n_layer", n_layer), ("seq_len", seq_len), ("n_embd", n_embd)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not (num_params >= 0 and tokens >= 0):
        raise ValueError(f"num_params and tokens must be >= 0, got {num_params} and {tokens}")
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")
    attention = n_layer * seq_len * n_embd
    passes = 8 if recompute == "full" else 6
    return (passes * (num_params + attention) + (2 * attention if recompute == "selective" else 0)) * tokens


def offload_step_seconds(streamed_bytes: float, *, ranks_per_node: int, host_memory_bandwidth: float) -> float:
    """Seconds of ZeRO-Offload's CPU optimizer step (Ren et al. 2021, arXiv 2101.06840, Sec. 4.1), bounded by the
    node's host memory: the step streams each rank's `streamed_bytes` (its gradient slice read, master weights and
    moments read and written) and the `ranks_per_node` ranks of a node share its bandwidth (bytes/s)."""
    _positive(ranks_per_node=ranks_per_node)
    if not (streamed_bytes >= 0 and host_memory_bandwidth > 0):
        raise ValueError(f"streamed_bytes must be >= 0 and host_memory_bandwidth > 0, got {streamed_bytes} and "
                         f"{host_memory_bandwidth}")
    return streamed_bytes * ranks_per_node / host_memory_bandwidth


def step_seconds(
    flops: float, *, gpus: int, flops_per_second: float, bubble: float = 0.0, communication_s: float = 0.0,
    offload_step_s: float = 0.0,
) -> tuple[float, float]:
    """(compute seconds, step seconds) of one training step: the FLOPs spread evenly over `gpus` at the achieved
    `flops_per_second` each, stretched by the pipeline's idle fraction, plus communication and offload's CPU step
    with no overlap. An upper bound, good for ranking layouts rather than predicting a clock:
        compute = flops / (gpus · flops_per_second)        step = compute / (1 - bubble) + comm + offload"""
    _positive(gpus=gpus)
    if not (flops >= 0 and flops_per_second > 0 and 0 <= bubble < 1 and communication_s >= 0 and offload_step_s >= 0):
        raise ValueError(f"need flops >= 0, flops_per_second > 0, 0 <= bubble < 1, times >= 0; got {flops}, "
                         f"{flops_per_second}, {bubble}, {communication_s}, {offload_step_s}")
    compute = flops / gpus / flops_per_second
    return compute, compute / (1 - bubble) + communication_s + offload_step_s


def largest_module_parameters(config: GPTConfig) -> int:
    """DeepSpeed's `largest_layer_params` for reference.model.GPT: the most parameters any one module registers
    itself (deepspeed.runtime.zero.stage3.model_to_params counts `m.parameters(recurse=False)` over all modules).

    Counted from the modules themselves: one block built on the meta device (no memory, no initialisation cost,
    so a 70B shape is free), the embeddings and the head (V x h; a tied head registers the embedding's weight too)."""
    with torch.device("meta"):
        block = Block(config, attention=None)
    in_block = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in block.modules())
    c = config.n_embd
    return max(in_block, config.vocab_size * c, config.block_size * c)
