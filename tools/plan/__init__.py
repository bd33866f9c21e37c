"""The parallel-strategy planner, `python -m conformance plan`: choose a parallel strategy by calculation.

"How do you choose a parallel strategy?" has an honest answer: list the layouts the cluster allows, and for each
compute what fits in one GPU's memory, what it communicates per step, and how much of the pipeline idles. This
package does that with the formulas of `reference.memory` and `reference.parallelism`; it holds no formula of its
own, only the bookkeeping of which formula applies to which layout. `model` (inputs and the cost of one layout),
`search` (every layout, the recommendation), `render` (the table), `cli` (the flags).

A layout is t-way tensor parallel x c-way context parallel x p-way pipeline parallel x d-way data parallel
(t·c·p·d = GPUs), the data-parallel part plain (ZeRO stage 0) or ZeRO-1/2/3 (over the d·c ranks that hold the same
parameters), with or without optimizer offload. Ranks are ordered tensor-parallel fastest (a TP group is t
consecutive GPUs of one node, where its per-layer all-reduces are cheap), then context, data, pipeline parallel
(Megatron-LM's order; Narayanan et al. 2021, arXiv 2104.04473, Sec. 3.3). Per GPU:
    model states   reference.memory.model_state_bytes(Ψ_gpu, world_size=d, stage, precision, offload), Ψ_gpu the
                   parameters of the most loaded pipeline stage on one TP rank (whole blocks + embeddings, Megatron's
                   split: reference.parallelism.pipeline_stage_parameters on reference.memory.gpt_parameters), or
                   Ψ/(t·p) when only the parameter count is known
    activations    one micro-batch per pipeline slot in flight (1F1B: min(p, m) on the first stage), layers per
                   stage x reference.memory.activation_bytes_per_layer, naive or flash attention, each recomputation
                   policy (none, selective, full: the cheapest that fits is chosen), s/c tokens per rank under
                   context parallelism (ring attention)
    communication  DP/ZeRO: 2Ψ or 3Ψ (ZeRO Sec. 7) with m accumulated micro-batches; TP: Megatron's 2 + 2
                   all-reduces per layer per micro-batch; PP: activations and their gradients per micro-batch;
                   CP: ring attention's K/V and dK/dV per layer per micro-batch
    bubble         (p - 1) / (m + p - 1)
    step time      an estimate for ranking only: training FLOPs / achieved FLOP/s, divided by (1 - bubble), plus
                   every byte sent over the link it crosses, assuming no overlap (an upper bound)
The recommendation is the simplest fitting layout whose estimated step time is within 10% (--prefer-simple-within)
of the fastest: the estimate is for ranking, and a simpler layout is easier to run.
"""

from tools.plan.model import (
    ACTIVATION_VARIANTS,
    GB,
    PRECISIONS,
    PRESETS,
    ZERO_NAMES,
    Cluster,
    Estimate,
    Layout,
    PlanError,
    Workload,
    estimate,
    workload,
)
from tools.plan.render import render
from tools.plan.search import Plan, candidate_layouts, plan

__all__ = ["ACTIVATION_VARIANTS", "GB", "PRECISIONS", "PRESETS", "ZERO_NAMES", "Cluster", "Estimate", "Layout", "Plan",
           "PlanError", "Workload", "candidate_layouts", "estimate", "plan", "render", "workload"]
