"""`python -m conformance plan`: choose a parallel strategy by calculation.

"How do you choose a parallel strategy?" has an honest answer: list the layouts the cluster allows, and for each
compute what fits in one GPU's memory, what it communicates per step, and how much of the pipeline idles. This
module does that with the formulas of `reference.memory` and `reference.parallelism`; it holds no formula of its
own, only the bookkeeping of which formula applies to which layout.

A layout is t-way tensor parallel x p-way pipeline parallel x d-way data parallel (t·p·d = GPUs), the data-parallel
part plain (ZeRO stage 0) or ZeRO-1/2/3, with or without optimizer offload. Ranks are ordered tensor-parallel
fastest (a TP group is t consecutive GPUs of one node, where its per-layer all-reduces are cheap), then data
parallel, then pipeline (Megatron-LM's order; Narayanan et al. 2021, arXiv 2104.04473, Sec. 3.3). Per GPU:
    model states   reference.memory.model_state_bytes(Ψ_gpu, world_size=d, stage, precision, offload), Ψ_gpu the
                   parameters of the most loaded pipeline stage on one TP rank (whole blocks + embeddings, Megatron's
                   split: reference.parallelism.pipeline_stage_parameters on reference.memory.gpt_parameters), or
                   Ψ/(t·p) when only the parameter count is known
    activations    one micro-batch per pipeline slot in flight (1F1B: min(p, m) on the first stage), layers per
                   stage x reference.memory.activation_bytes_per_layer, naive or flash attention, with and without
                   full activation checkpointing
    communication  DP/ZeRO: 2Ψ or 3Ψ (ZeRO Sec. 7) with m accumulated micro-batches; TP: Megatron's 2 + 2
                   all-reduces per layer per micro-batch; PP: activations and their gradients per micro-batch
    bubble         (p - 1) / (m + p - 1)
    step time      an estimate for ranking only: training FLOPs / achieved FLOP/s, divided by (1 - bubble), plus
                   every byte sent over the link it crosses, assuming no overlap (an upper bound)
The recommendation is the simplest fitting layout whose estimated step time is within 10% (--prefer-simple-within)
of the fastest: the estimate is for ranking, and a simpler layout is easier to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reference.memory import (
    FP32,
    MIXED,
    ModelStateBytes,
    Precision,
    gpt_parameters,
    layers_per_stage,
    model_state_bytes,
    params_per_model_parallel_rank,
)
from reference.model import GPTConfig
from reference.parallelism import (
    activation_bytes_per_rank,
    in_flight_microbatches,
    offload_transfer_bytes,
    pipeline_bubble_fraction,
    pipeline_communication_bytes,
    pipeline_stage_parameters,
    tensor_parallel_communication_bytes,
    training_flops,
    zero_communication_elements,
)

GB = 1e9
"""Decimal gigabytes, as the ZeRO paper writes them (16Ψ for 7.5B = 120 GB)."""

PRECISIONS: dict[str, tuple[Precision, int]] = {
    "bf16": (MIXED, 2),
    "fp32": (FP32, 4),
}
"""name -> (model-state bytes per parameter, bytes per activation element)."""

PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(),
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-xl": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    "7b": GPTConfig(vocab_size=32000, block_size=2048, n_layer=32, n_head=32, n_embd=4096),
    "13b": GPTConfig(vocab_size=32000, block_size=2048, n_layer=40, n_head=40, n_embd=5120),
    "30b": GPTConfig(vocab_size=32000, block_size=2048, n_layer=60, n_head=52, n_embd=6656),
    "65b": GPTConfig(vocab_size=32000, block_size=2048, n_layer=80, n_head=64, n_embd=8192),
    "gpt3-175b": GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
}
"""GPT-shaped models (reference.model: learned positions, GELU MLP of 4h, tied embeddings). The LLaMA-sized names
give the layer/width/head shapes of those models; their parameter counts here are those of this GPT shape."""

ZERO_NAMES = {0: "DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
ACTIVATION_VARIANTS = ("naive", "flash", "naive+ckpt", "flash+ckpt")


# --- inputs ------------------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive_int(name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name} must be a positive integer, got {value!r}")


def _positive_number(name: str, value: object) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
             f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, the batch and the precision."""

    config: GPTConfig | None
    """The model's shape (its block_size is the sequence length); None when only the parameter count is known,
    and then activations, tensor- and pipeline-parallel traffic cannot be computed."""
    num_params: int
    """Ψ: parameters of the whole model."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch: int
    """Sequences per micro-batch on one model replica (one forward/backward)."""
    global_batch: int
    """Sequences per optimizer step, over all data-parallel replicas and accumulated micro-batches."""
    precision: str = "bf16"
    """"bf16": bf16 compute with fp32 master weights and Adam (2 + 2 + 12 bytes per parameter); "fp32": 4 + 4 + 8."""

    def __post_init__(self) -> None:
        _positive_int("num_params", self.num_params)
        _positive_int("seq_len", self.seq_len)
        _positive_int("micro_batch", self.micro_batch)
        _positive_int("global_batch", self.global_batch)
        _require(self.precision in PRECISIONS, f"precision must be one of {sorted(PRECISIONS)}, got "
                 f"{self.precision!r}")
        if self.config is not None:
            _require(self.config.block_size == self.seq_len, f"config.block_size={self.config.block_size} must "
                     f"equal seq_len={self.seq_len} (the planner sizes the position embedding to the sequence)")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def workload(
    config: GPTConfig | None = None,
    *,
    num_params: int | None = None,
    seq_len: int | None = None,
    micro_batch: int = 1,
    global_batch: int,
    precision: str = "bf16",
) -> Workload:
    """A Workload from a shape (its parameter count from reference.memory.gpt_parameters unless `num_params` is
    given) or from a parameter count alone. `seq_len` defaults to config.block_size."""
    _require(config is not None or num_params is not None, "give the model's shape (config) or num_params, or both")
    if config is not None:
        seq_len = config.block_size if seq_len is None else seq_len
        _positive_int("seq_len", seq_len)
        config = dataclasses.replace(config, block_size=seq_len)
        num_params = gpt_parameters(config) if num_params is None else num_params
    _require(seq_len is not None, "seq_len is needed when the model is given by num_params alone")
    return Workload(config, num_params, seq_len, micro_batch, global_batch, precision)


@dataclass(frozen=True)
class Cluster:
    """The machines: how many GPUs, how they are connected, how much memory and speed each has."""

    gpus: int
    gpus_per_node: int = 8
    """GPUs that share a fast intra-node link (NVLink); tensor parallelism stays within them."""
    gpu_memory: float = 80 * GB
    """Bytes of memory per GPU."""
    cpu_memory: float = 1024 * GB
    """Bytes of host memory per node (what optimizer offload fills)."""
    tflops: float = 200.0
    """Achieved (not peak) dense TFLOP/s per GPU in the workload's precision."""
    intra_node_bandwidth: float = 150 * GB
    """Bytes/s one GPU sends to the others of its node."""
    inter_node_bandwidth: float = 25 * GB
    """Bytes/s one GPU sends to other nodes (its share of the node's network)."""
    pcie_bandwidth: float = 25 * GB
    """Bytes/s between one GPU and host memory (offload)."""
    cpu_memory_bandwidth: float = 100 * GB
    """Bytes/s of one node's host memory, which bounds the CPU optimizer step of offload (it streams the state)."""
    headroom: float = 0.1
    """Fraction of each GPU's (and node's host) memory kept free for what the model does not count: the CUDA
    context, temporary buffers, logits and loss, ZeRO-3's gathered layer, fragmentation."""

    def __post_init__(self) -> None:
        _positive_int("gpus", self.gpus)
        _positive_int("gpus_per_node", self.gpus_per_node)
        _require(self.gpus <= self.gpus_per_node or self.gpus % self.gpus_per_node == 0,
                 f"gpus={self.gpus} must be a multiple of gpus_per_node={self.gpus_per_node} (whole nodes) or at "
                 f"most one node")
        for name in ("gpu_memory", "cpu_memory", "tflops", "intra_node_bandwidth", "inter_node_bandwidth",
                     "pcie_bandwidth", "cpu_memory_bandwidth"):
            _positive_number(name, getattr(self, name))
        _require(isinstance(self.headroom, (int, float)) and 0 <= self.headroom < 1,
                 f"headroom must be in [0, 1), got {self.headroom!r}")

    @property
    def node_size(self) -> int:
        """GPUs in one node as used here (a single partial node counts its GPUs)."""
        return min(self.gpus, self.gpus_per_node)

    @property
    def usable_gpu_memory(self) -> float:
        return self.gpu_memory * (1 - self.headroom)

    @property
    def usable_cpu_memory(self) -> float:
        return self.cpu_memory * (1 - self.headroom)


@dataclass(frozen=True)
class Layout:
    """One way to spread the model: t·p·d = GPUs."""

    tp: int
    pp: int
    dp: int
    zero: int
    """0: plain data parallel; 1, 2, 3: ZeRO stage over the d data-parallel ranks."""
    offload: bool = False
    """Optimizer state and step on the CPU (ZeRO-Offload)."""

    @property
    def name(self) -> str:
        parts = [f"TP{self.tp}"] if self.tp > 1 else []
        parts += [f"PP{self.pp}"] if self.pp > 1 else []
        parts.append(f"DP{self.dp}")
        strategy = ZERO_NAMES[self.zero] + ("+offload" if self.offload else "")
        return f"{'·'.join(parts)} {strategy}" if self.zero or self.offload else "·".join(parts)

    @property
    def complexity(self) -> tuple[int, int, int, int]:
        """Simpler first: no offload (it ties the step to the host's CPUs and memory), fewer model-parallel
        dimensions (TP, PP change the model; ZeRO only wraps the optimizer), fewer model-parallel GPUs, a lower ZeRO
        stage."""
        return (int(self.offload), int(self.tp > 1) + int(self.pp > 1), self.tp * self.pp, self.zero)


# --- one layout ----------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """What one layout costs, per GPU."""

    layout: Layout
    microbatches: int
    """m: micro-batches per optimizer step on each model replica (gradient accumulation steps; the pipeline's m)."""
    params_per_gpu: float
    """Parameters of one GPU's model-parallel slice: the most loaded pipeline stage on one tensor-parallel rank
    (reference.parallelism.pipeline_stage_parameters), or Ψ/(t·p) when only the count is known."""
    model_states: ModelStateBytes
    activations: dict[str, float] | None
    """Peak activation bytes per GPU for each of ACTIVATION_VARIANTS; None when the shape is unknown."""
    attention: str
    checkpoint: bool
    """The activation variant chosen: the first that fits, unless the checkpointing policy forces it."""
    activation_bytes: float
    gpu_bytes: float
    """model_states.device + activation_bytes."""
    host_bytes_per_node: float
    fits_gpu: bool
    fits_host: bool
    communication: dict[str, float | None]
    """Bytes each GPU sends per step: dp (DP/ZeRO collectives), tp, pp, offload (PCIe). None: unknown."""
    bubble: float
    compute_s: float
    communication_s: float
    offload_step_s: float
    """The CPU optimizer step of offload, bounded by the node's host-memory bandwidth (0 without offload)."""
    step_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def name(self) -> str:
        return self.layout.name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["name"] = self.name
        d["fits"] = self.fits
        d["model_states"]["device"] = self.model_states.device
        d["model_states"]["host"] = self.model_states.host
        return d


def _link_bandwidths(layout: Layout, cluster: Cluster) -> tuple[float, float]:
    """(bandwidth of the DP group's link, of the pipeline's stage-to-stage link)."""
    node, span = cluster.node_size, layout.tp * layout.dp
    dp_bw = cluster.inter_node_bandwidth if span > node else cluster.intra_node_bandwidth
    pp_bw = cluster.inter_node_bandwidth if span >= node and cluster.gpus > node else cluster.intra_node_bandwidth
    return dp_bw, pp_bw


def estimate(
    work: Workload, cluster: Cluster, layout: Layout, *, attention: str = "flash", checkpointing: str = "auto"
) -> Estimate:
    """Memory, traffic, bubble and an estimated step time of `layout` (see the module docstring)."""
    _require(attention in ("flash", "naive"), f"attention must be 'flash' or 'naive', got {attention!r}")
    _require(checkpointing in ("auto", "never", "always"),
             f"checkpointing must be 'auto', 'never' or 'always', got {checkpointing!r}")
    t, p, d = layout.tp, layout.pp, layout.dp
    _require(t * p * d == cluster.gpus, f"tp x pp x dp = {t} x {p} x {d} must equal gpus={cluster.gpus}")
    per_replica = d * work.micro_batch
    _require(work.global_batch % per_replica == 0,
             f"global_batch={work.global_batch} must be divisible by dp x micro_batch = {d} x {work.micro_batch}")
    m = work.global_batch // per_replica
    precision, element = PRECISIONS[work.precision]
    cfg = work.config
    notes: list[str] = []

    if cfg is not None and work.num_params == gpt_parameters(cfg):
        psi_gpu = float(pipeline_stage_parameters(cfg, pp=p, tp=t))
    else:  # only the count is known (or it overrides the shape's): ZeRO Sec. 8's ideal split Ψ/(t·p)
        psi_gpu = params_per_model_parallel_rank(work.num_params, tp=t, pp=p)
    states = model_state_bytes(psi_gpu, world_size=d, stage=layout.zero, precision=precision, offload=layout.offload)

    activations: dict[str, float] | None = None
    chosen_ckpt = checkpointing == "always"
    act = 0.0
    budget = cluster.usable_gpu_memory - states.device
    if cfg is not None:
        layers = layers_per_stage(cfg.n_layer, p)
        in_flight = in_flight_microbatches(p, m)
        activations = {
            f"{attn}{'+ckpt' if ckpt else ''}": float(activation_bytes_per_rank(
                cfg, work.micro_batch, work.seq_len, num_layers=layers, in_flight=in_flight, attention=attn, tp=t,
                element_bytes=element, checkpoint=ckpt))
            for ckpt in (False, True) for attn in ("naive", "flash")
        }
        if checkpointing == "auto":
            chosen_ckpt = activations[attention] > budget
        act = activations[f"{attention}+ckpt" if chosen_ckpt else attention]
    else:
        notes.append("activations not counted: the model's shape is unknown (give layers/hidden/heads)")

    host_per_node = states.host * cluster.node_size
    fits_gpu = states.device + act <= cluster.usable_gpu_memory
    fits_host = host_per_node <= cluster.usable_cpu_memory

    comm: dict[str, float | None] = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "offload": 0.0}
    if d > 1:
        ring = (d - 1) / d
        comm["dp"] = zero_communication_elements(psi_gpu, layout.zero, m) * precision.grad * ring
    if cfg is not None:
        if t > 1:
            comm["tp"] = tensor_parallel_communication_bytes(
                work.micro_batch, work.seq_len, cfg.n_embd, tp=t, num_layers=layers_per_stage(cfg.n_layer, p),
                num_microbatches=m, element_bytes=element, recompute=chosen_ckpt)
        comm["pp"] = pipeline_communication_bytes(work.micro_batch, work.seq_len, cfg.n_embd, pp=p,
                                                  num_microbatches=m, element_bytes=element)
    else:
        comm["tp"] = None if t > 1 else 0.0
        comm["pp"] = None if p > 1 else 0.0
    offload_step_s = 0.0
    if layout.offload:
        comm["offload"] = offload_transfer_bytes(psi_gpu, d, precision)
        # The CPU step streams the host state: reads the gradient slice, reads and writes master and moments; the
        # node's GPUs share its memory bandwidth.
        streamed = states.host_grads + 2 * states.host_optimizer
        offload_step_s = streamed * cluster.node_size / cluster.cpu_memory_bandwidth

    dp_bw, pp_bw = _link_bandwidths(layout, cluster)
    comm_s = ((comm["dp"] or 0.0) / dp_bw + (comm["tp"] or 0.0) / cluster.intra_node_bandwidth
              + (comm["pp"] or 0.0) / pp_bw + (comm["offload"] or 0.0) / cluster.pcie_bandwidth)
    shape = dict(n_layer=cfg.n_layer, seq_len=work.seq_len, n_embd=cfg.n_embd) if cfg is not None else {}
    flops = training_flops(work.num_params, work.tokens_per_step, recompute=chosen_ckpt, **shape)
    compute_s = flops / cluster.gpus / (cluster.tflops * 1e12)
    bubble = pipeline_bubble_fraction(p, m)
    step_s = compute_s / (1 - bubble) + comm_s + offload_step_s
    return Estimate(layout=layout, microbatches=m, params_per_gpu=psi_gpu, model_states=states,
                    activations=activations, attention=attention, checkpoint=chosen_ckpt, activation_bytes=act,
                    gpu_bytes=states.device + act, host_bytes_per_node=host_per_node, fits_gpu=fits_gpu,
                    fits_host=fits_host, communication=comm, bubble=bubble, compute_s=compute_s,
                    communication_s=comm_s, offload_step_s=offload_step_s, step_s=step_s, notes=notes)


# --- all layouts -----------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _tp_problem(work: Workload, cluster: Cluster, t: int) -> str | None:
    if cluster.gpus % t:
        return f"gpus={cluster.gpus} is not divisible by tp={t}"
    if cluster.node_size % t:
        return (f"tp={t} must divide gpus_per_node={cluster.node_size}: a tensor-parallel group stays within a "
                f"node, where its per-layer all-reduces are cheap")
    cfg = work.config
    if cfg is not None:
        if cfg.n_head % t or cfg.n_kv_head % t:
            return (f"tp={t} must divide heads={cfg.n_head} and kv_heads={cfg.n_kv_head} (each tensor-parallel "
                    f"rank takes whole heads)")
        if (cfg.mlp_ratio * cfg.n_embd) % t:
            return f"tp={t} must divide the MLP width {cfg.mlp_ratio * cfg.n_embd}"
    return None


def _pp_problem(work: Workload, cluster: Cluster, p: int) -> str | None:
    if cluster.gpus % p:
        return f"gpus={cluster.gpus} is not divisible by pp={p}"
    if work.config is not None and p > work.config.n_layer:
        return f"pp={p} exceeds layers={work.config.n_layer} (each pipeline stage needs at least one layer)"
    return None


def candidate_layouts(
    work: Workload,
    cluster: Cluster,
    *,
    tp: tuple[int, ...] | None = None,
    pp: tuple[int, ...] | None = None,
    zero: tuple[int, ...] = (0, 1, 2, 3),
    offload: str = "consider",
) -> tuple[list[Layout], list[tuple[str, str]]]:
    """(layouts to estimate, [(layout, why it was left out)]).

    tp / pp: the degrees to consider (None: every valid one); an explicitly given degree that the cluster or the
    model cannot take is an error. zero: the stages. offload: "consider" (with and without), "never", "only".
    Pipeline layouts take ZeRO-0/1 only, as DeepSpeed's and Megatron's pipeline engines do: ZeRO-2 reduce-scatters
    and ZeRO-3 gathers every micro-batch, and a pipeline runs many. With d = 1 the stages equal plain DP and are
    listed once; offload still counts (it moves the optimizer to the CPU)."""
    _require(offload in ("consider", "never", "only"), f"offload must be 'consider', 'never' or 'only', got "
             f"{offload!r}")
    for s in zero:
        _require(s in ZERO_NAMES, f"zero stages must be among 0, 1, 2, 3, got {s!r}")
    for name, values in (("tp", tp), ("pp", pp)):
        if values is not None:
            _require(len(values) > 0, f"{name}: give at least one degree")
            for v in values:
                _positive_int(name, v)
    if tp is not None:
        for t in tp:
            problem = _tp_problem(work, cluster, t)
            _require(problem is None, str(problem))
    if pp is not None:
        for p in pp:
            problem = _pp_problem(work, cluster, p)
            _require(problem is None, str(problem))
    if tp is not None and pp is not None:
        for t in tp:
            for p in pp:
                _require(cluster.gpus % (t * p) == 0,
                         f"gpus={cluster.gpus} is not divisible by tp x pp = {t} x {p} = {t * p}")
    tps = tp if tp is not None else [t for t in _divisors(cluster.gpus) if _tp_problem(work, cluster, t) is None]
    pps = pp if pp is not None else [p for p in _divisors(cluster.gpus) if _pp_problem(work, cluster, p) is None]

    layouts: list[Layout] = []
    rejected: list[tuple[str, str]] = []
    for t in tps:
        for p in pps:
            if cluster.gpus % (t * p):
                continue
            d = cluster.gpus // (t * p)
            if work.global_batch % (d * work.micro_batch):
                rejected.append((f"TP{t}·PP{p}·DP{d}", f"global_batch={work.global_batch} is not divisible by "
                                 f"dp x micro_batch = {d} x {work.micro_batch}"))
                continue
            for s in zero:
                for off in (False, True):
                    if (off and (offload == "never" or s == 0)) or (not off and offload == "only"):
                        continue
                    if p > 1 and s > 1:
                        continue
                    if d == 1 and s > 0 and not off:
                        continue
                    layouts.append(Layout(t, p, d, s, off))
    if not layouts and not rejected:
        raise ValueError("no layout left to consider: widen --tp/--pp/--zero/--offload")
    return layouts, rejected


@dataclass
class Plan:
    """Every layout estimated, best first, and the recommendation with its reasons."""

    workload: Workload
    cluster: Cluster
    estimates: list[Estimate]
    """Fitting layouts by estimated step time (ties: the simpler), then the others by memory per GPU."""
    rejected: list[tuple[str, str]]
    recommended: Estimate | None
    reasons: list[str]
    assumptions: list[str]

    def to_dict(self) -> dict:
        work = dataclasses.asdict(self.workload)
        work["tokens_per_step"] = self.workload.tokens_per_step
        return {
            "workload": work,
            "cluster": dataclasses.asdict(self.cluster),
            "recommended": self.recommended.name if self.recommended else None,
            "reasons": self.reasons,
            "assumptions": self.assumptions,
            "layouts": [e.to_dict() for e in self.estimates],
            "rejected": [{"layout": name, "reason": why} for name, why in self.rejected],
        }


def _gb(x: float) -> str:
    """Decimal units, GB down to kB, by magnitude."""
    for scale, name in ((GB, "GB"), (1e6, "MB")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {name}"
    return f"{x / 1e3:.4g} kB"


def _reasons(best: Estimate, fastest: Estimate, estimates: list[Estimate], work: Workload, cluster: Cluster,
             within: float) -> list[str]:
    act = (f"activations {_gb(best.activation_bytes)} with {best.attention} attention"
           + (" and full activation checkpointing" if best.checkpoint else "")) if best.activations else \
        "activations not counted"
    out = [f"fits: {_gb(best.gpu_bytes)} of {_gb(cluster.usable_gpu_memory)} usable per GPU (model states "
           f"{_gb(best.model_states.device)}, {act})"]
    traffic = ", ".join(f"{k.upper() if k != 'offload' else 'offload (PCIe)'} {_gb(v)}"
                        for k, v in best.communication.items() if v)
    out.append(f"estimated step {best.step_s:.3g} s: compute {best.compute_s:.3g} s"
               + (f" / (1 - bubble {best.bubble:.1%})" if best.bubble else "")
               + f", communication {best.communication_s:.3g} s" + (f" ({traffic} per GPU)" if traffic else "")
               + (f", offload's CPU step {best.offload_step_s:.3g} s" if best.layout.offload else ""))
    dp = next((e for e in estimates if e.layout == Layout(1, 1, cluster.gpus, 0)), None)
    if dp is not None and dp is not best:
        states = dp.model_states.device
        if states > cluster.usable_gpu_memory:
            out.append(f"plain data parallelism does not fit: its model states alone are {_gb(states)} per GPU "
                       f"({PRECISIONS[work.precision][0].name})")
        elif not dp.fits_gpu:
            out.append(f"plain data parallelism does not fit: {_gb(states)} of model states + "
                       f"{_gb(dp.activation_bytes)} of activations per GPU")
        else:
            out.append(f"plain data parallelism fits but its step is {dp.step_s / best.step_s:.2f}x as long "
                       f"({dp.step_s:.3g} s)")
    if fastest is not best:
        out.append(f"the fastest estimate, {fastest.name} ({fastest.step_s:.3g} s), is within {within:.0%}: the "
                   f"simpler layout is preferred")
    else:
        nxt = next((e for e in estimates if e.fits and e is not best), None)
        if nxt is not None:
            out.append(f"next best: {nxt.name}, step {nxt.step_s:.3g} s ({nxt.step_s / best.step_s - 1:+.1%})")
    if best.layout.offload:
        out.append(f"offload keeps {_gb(best.model_states.host)} per GPU in host memory "
                   f"({_gb(best.host_bytes_per_node)} of {_gb(cluster.usable_cpu_memory)} usable per node): the "
                   f"optimizer state and step move to the CPU (ZeRO-Offload)")
    sharded = best.layout.dp > 1
    if sharded and best.layout.zero in (1, 2):
        out.append("ZeRO-1/2 send what DP sends per step (2Ψ, ZeRO Sec. 7) and shard the optimizer state"
                   + (" and the gradients" if best.layout.zero == 2 else ""))
    elif sharded and best.layout.zero == 3:
        out.append("ZeRO-3 sends 3Ψ per micro-batch (parameters gathered for forward and backward): chosen because "
                   "less sharding does not fit")
    if best.checkpoint:
        out.append("checkpointing recomputes the forward (8Ψ instead of 6Ψ FLOPs per token): needed to fit")
    if best.layout.pp > 1:
        out.append(f"pipeline: m = {best.microbatches} micro-batches per step, bubble (p-1)/(m+p-1) = "
                   f"{best.bubble:.1%}")
    return out


def plan(
    work: Workload,
    cluster: Cluster,
    *,
    tp: tuple[int, ...] | None = None,
    pp: tuple[int, ...] | None = None,
    zero: tuple[int, ...] = (0, 1, 2, 3),
    offload: str = "consider",
    attention: str = "flash",
    checkpointing: str = "auto",
    prefer_simple_within: float = 0.1,
) -> Plan:
    """Estimate every candidate layout and recommend one (see candidate_layouts and estimate for the options).

    The step-time estimate is rough (no overlap, no kernel efficiency), so every fitting layout within
    `prefer_simple_within` (a fraction) of the fastest estimate counts as equally fast, and the simplest of them
    (Layout.complexity) is recommended: it is the one that is easiest to run, debug and change."""
    _require(isinstance(prefer_simple_within, (int, float)) and 0 <= prefer_simple_within < 10,
             f"prefer_simple_within must be a fraction in [0, 10), got {prefer_simple_within!r}")
    layouts, rejected = candidate_layouts(work, cluster, tp=tp, pp=pp, zero=zero, offload=offload)
    estimates = [estimate(work, cluster, lay, attention=attention, checkpointing=checkpointing) for lay in layouts]
    estimates.sort(key=lambda e: (not e.fits, e.step_s if e.fits else e.gpu_bytes, e.layout.complexity))
    fitting = [e for e in estimates if e.fits]
    best = None
    if fitting:
        fastest = fitting[0]
        close = [e for e in fitting if e.step_s <= fastest.step_s * (1 + prefer_simple_within)]
        best = min(close, key=lambda e: (e.layout.complexity, e.step_s))
        estimates.remove(best)
        estimates.insert(0, best)
        reasons = _reasons(best, fastest, estimates, work, cluster, prefer_simple_within)
    elif estimates:
        smallest = min(estimates, key=lambda e: e.gpu_bytes)
        reasons = [f"nothing fits: the smallest footprint is {smallest.name} with {_gb(smallest.gpu_bytes)} per GPU "
                   f"(+ {_gb(smallest.host_bytes_per_node)} host per node) against {_gb(cluster.usable_gpu_memory)} "
                   f"usable; add GPUs, shorten the sequence or the micro-batch, or allow checkpointing/offload"]
    else:
        reasons = ["no layout divides the global batch: change --global-batch or --micro-batch"]
    precision = PRECISIONS[work.precision][0]
    assumptions = [
        f"model states per parameter: {precision.param} + {precision.grad} + {precision.optimizer} bytes "
        f"({precision.name})",
        "activations: transformer blocks only (reference.memory.activation_bytes_per_layer); 1F1B schedule; "
        "logits, loss and temporary buffers are left to the headroom",
        f"headroom {cluster.headroom:.0%} of GPU memory left free; GB = 1e9 bytes",
        f"step time: {cluster.tflops:g} TFLOP/s achieved per GPU; links {cluster.intra_node_bandwidth / GB:g} GB/s in "
        f"a node, {cluster.inter_node_bandwidth / GB:g} GB/s between nodes, {cluster.pcie_bandwidth / GB:g} GB/s "
        f"PCIe, {cluster.cpu_memory_bandwidth / GB:g} GB/s host memory per node (offload's CPU step); "
        f"communication not overlapped with compute (an upper bound, used only to rank)",
    ]
    return Plan(work, cluster, estimates, rejected, best, reasons, assumptions)


# --- terminal and JSON ----------------------------------------------------------------------------------------------


def _count_text(n: float) -> str:
    """6.58B, 124M, 108K."""
    return next(f"{n / k:.3g}{u}" for k, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= k or k == 1)


def _fits_cell(e: Estimate) -> str:
    if not e.fits_gpu:
        return "[red]no[/red]"
    if not e.fits_host:
        return "[red]host no[/red]"
    return "[green]yes + ckpt[/green]" if e.checkpoint else "[green]yes[/green]"


def _unit(cluster: Cluster) -> tuple[float, str]:
    """GB for real GPUs; MB or kB when the memory given is that small (the tiny GPT's plans)."""
    for scale, name in ((GB, "GB"), (1e6, "MB")):
        if cluster.gpu_memory >= scale:
            return scale, name
    return 1e3, "kB"


def _num(x: float | None, scale: float) -> str:
    return "?" if x is None else f"{x / scale:.3g}"


def render(result: Plan, console: Console, *, top: int | None = 15) -> None:
    """Print the plan: inputs, a table of layouts (best first), the recommendation and the assumptions."""
    w, c = result.workload, result.cluster
    shape = (f"{w.config.n_layer} layers, hidden {w.config.n_embd}, {w.config.n_head} heads"
             + (f" ({w.config.n_kv_head} kv)" if w.config.n_kv_head != w.config.n_head else "")
             + f", vocab {w.config.vocab_size}") if w.config else "shape unknown"
    console.print(f"[bold]model[/bold] Ψ = {_count_text(w.num_params)} parameters ({shape}); seq {w.seq_len}, "
                  f"micro-batch {w.micro_batch}, global batch {w.global_batch} sequences "
                  f"({w.tokens_per_step:,} tokens), {w.precision}")
    console.print(f"[bold]cluster[/bold] {c.gpus} GPUs, {c.node_size} per node, {_gb(c.gpu_memory)} each "
                  f"({_gb(c.usable_gpu_memory)} usable), {_gb(c.cpu_memory)} host per node")
    scale, unit = _unit(c)
    table = Table(title=f"layouts, best first (memory in {unit} per GPU; communication in {unit} sent per GPU per "
                  f"step)")
    for col, justify in (("#", "right"), ("layout", "left"), ("m", "right"), ("model states", "right"),
                         ("act. naive", "right"), ("act. flash", "right"), ("act. flash+ckpt", "right"),
                         ("total", "right"), ("fits", "left"), ("comm DP/TP/PP", "right"), ("bubble", "right"),
                         ("step s", "right")):
        table.add_column(col, justify=justify)
    shown = result.estimates if top is None else result.estimates[:top]
    for i, e in enumerate(shown, 1):
        a = e.activations
        comm = "/".join(_num(e.communication[k], scale) for k in ("dp", "tp", "pp"))
        if e.layout.offload:
            comm += f" +PCIe {_num(e.communication['offload'], scale)}"
        style = "bold" if e is result.recommended else None
        table.add_row(str(i), e.name, str(e.microbatches), _num(e.model_states.device, scale),
                      _num(a["naive"], scale) if a else "?", _num(a["flash"], scale) if a else "?",
                      _num(a["flash+ckpt"], scale) if a else "?", _num(e.gpu_bytes, scale), _fits_cell(e), comm,
                      f"{e.bubble:.1%}", f"{e.step_s:.3g}", style=style)
    console.print(table)
    if top is not None and len(result.estimates) > top:
        console.print(f"({len(result.estimates) - top} more layouts: --all shows them, --json writes them)")
    if result.recommended:
        console.print(f"[bold green]recommended: {result.recommended.name}[/bold green]")
    else:
        console.print("[bold red]no layout fits[/bold red]")
    for r in result.reasons:
        console.print(f"  - {r}")
    console.print("[dim]assumptions: " + "; ".join(result.assumptions) + "[/dim]")


# --- command line ----------------------------------------------------------------------------------------------------


def _count(text: str) -> int:
    """'7e9', '7B', '350M', '1.5b', '124000000' -> an integer parameter count."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
    s = text.strip().lower()
    try:
        value = float(s[:-1]) * scale[s[-1]] if s and s[-1] in scale else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 7e9, 7B, 350M)") from None
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"the parameter count must be >= 1, got {text!r}")
    return int(round(value))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    presets = ", ".join(f"{k} ({_count_text(gpt_parameters(v))}: {v.n_layer}x{v.n_embd}, {v.n_head} heads)"
                        for k, v in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m conformance plan",
        description="Plan a parallel layout: for every way to split the model over the GPUs (tensor x pipeline x "
        "data parallel, ZeRO-0/1/2/3, optimizer offload), the bytes per GPU of model states and activations (naive "
        "and flash attention, with and without activation checkpointing), whether it fits, the bytes communicated "
        "per step, the pipeline bubble and an estimated step time, computed from reference/memory.py; then a "
        "recommendation with its reasons.",
        epilog="Examples: python -m conformance plan --model 7b --gpus 64 --gpu-memory 80 | "
        "python -m conformance plan --params 7.5e9 --seq-len 1024 --gpus 64 --zero 0,1,2,3 --json plan.json",
    )
    m = parser.add_argument_group("model (a preset, a parameter count, or a shape; shape flags override a preset)")
    m.add_argument("--model", choices=sorted(PRESETS), default=None, metavar="NAME",
                   help=f"a GPT-shaped preset: {presets}")
    m.add_argument("--params", type=_count, default=None, metavar="N",
                   help="total parameters Ψ (7e9, 7B, 350M); alone it gives model states only (no activations, no "
                   "TP/PP traffic); with a shape it overrides the shape's count")
    m.add_argument("--layers", type=int, default=None, help="transformer blocks")
    m.add_argument("--hidden", type=int, default=None, help="model width h (n_embd)")
    m.add_argument("--heads", type=int, default=None, help="attention (query) heads")
    m.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    m.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 50257 for a new shape)")
    m.add_argument("--mlp-ratio", type=int, default=None, help="MLP width as a multiple of --hidden (default 4)")
    b = parser.add_argument_group("batch and precision")
    b.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the preset's context, else 2048)")
    b.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per micro-batch per model replica (default: 1)")
    b.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: 16 x GPUs x micro-batch)")
    b.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="bf16 (default): bf16 compute, fp32 master weights and Adam (2+2+12 bytes per "
                   "parameter); fp32: 4+4+8")
    h = parser.add_argument_group("hardware")
    h.add_argument("--gpus", type=int, default=8, help="number of GPUs (default: 8)")
    h.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: min(8, --gpus))")
    h.add_argument("--gpu-memory", type=float, default=80.0, help="GB (1e9 bytes) of memory per GPU (default: 80)")
    h.add_argument("--cpu-memory", type=float, default=1024.0,
                   help="GB of host memory per node, for offload (default: 1024)")
    h.add_argument("--tflops", type=float, default=200.0,
                   help="achieved (not peak) TFLOP/s per GPU in the chosen precision, for the step-time estimate "
                   "(default: 200)")
    h.add_argument("--intra-node-gbps", type=float, default=150.0,
                   help="GB/s each GPU sends within a node (default: 150)")
    h.add_argument("--inter-node-gbps", type=float, default=25.0, help="GB/s each GPU sends across nodes (default: 25)")
    h.add_argument("--pcie-gbps", type=float, default=25.0, help="GB/s between a GPU and host memory (default: 25)")
    h.add_argument("--cpu-memory-gbps", type=float, default=100.0,
                   help="GB/s of a node's host memory, which bounds offload's CPU optimizer step (default: 100)")
    h.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of memory kept free for what the model does not count (CUDA context, buffers, "
                   "logits, fragmentation; default: 0.1)")
    s = parser.add_argument_group("search space")
    s.add_argument("--tp", type=_int_list, default=None, metavar="T[,T...]",
                   help="tensor-parallel degrees to consider (default: every divisor of the node that divides the "
                   "heads)")
    s.add_argument("--pp", type=_int_list, default=None, metavar="P[,P...]",
                   help="pipeline-parallel degrees to consider (default: every divisor of --gpus up to --layers)")
    s.add_argument("--zero", type=_int_list, default=(0, 1, 2, 3), metavar="S[,S...]",
                   help="data-parallel strategies: 0 plain DP, 1/2/3 ZeRO stages (default: 0,1,2,3)")
    s.add_argument("--offload", choices=("consider", "never", "only"), default="consider",
                   help="optimizer offload to CPU (ZeRO-Offload): consider both (default), never, or only offloaded "
                   "layouts")
    s.add_argument("--attention", choices=("flash", "naive"), default="flash",
                   help="the attention whose activations decide the fit (default: flash; both are shown)")
    s.add_argument("--checkpointing", choices=("auto", "never", "always"), default="auto",
                   help="full activation checkpointing: only where needed to fit (auto, the default), never, or "
                   "always")
    s.add_argument("--prefer-simple-within", type=float, default=0.1, metavar="FRACTION",
                   help="layouts whose estimated step time is within this fraction of the fastest count as equally "
                   "fast, and the simplest of them is recommended (no offload, fewest model-parallel dimensions, "
                   "lowest ZeRO stage; default: 0.1)")
    o = parser.add_argument_group("output")
    o.add_argument("--top", type=int, default=15, help="layouts shown in the table (default: 15)")
    o.add_argument("--all", action="store_true", help="show every layout")
    o.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the whole plan as JSON to PATH ('-': JSON on stdout instead of the table)")
    return parser


def _build(args: argparse.Namespace) -> tuple[Workload, Cluster]:
    shape_flags = {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads, "n_kv_head": args.kv_heads,
                   "vocab_size": args.vocab, "mlp_ratio": args.mlp_ratio}
    flag_of = {"n_layer": "--layers", "n_embd": "--hidden", "n_head": "--heads", "n_kv_head": "--kv-heads",
               "vocab_size": "--vocab", "mlp_ratio": "--mlp-ratio"}
    for key, value in shape_flags.items():
        _require(value is None or value >= 1, f"{flag_of[key]} must be a positive integer, got {value}")
    given = {k: v for k, v in shape_flags.items() if v is not None}
    config = None
    if args.model is not None:
        base = PRESETS[args.model]
        if "n_head" in given and "n_kv_head" not in given:
            given["n_kv_head"] = given["n_head"]
        config = dataclasses.replace(base, **given)
    elif given:
        missing = [flag_of[k] for k in ("n_layer", "n_embd", "n_head") if k not in given]
        _require(not missing, f"a model shape needs {', '.join(missing)} too (or use --model, or --params alone)")
        config = GPTConfig(**{"vocab_size": 50257, **given})
    _require(config is not None or args.params is not None,
             "give the model: --model NAME, --params N, or --layers/--hidden/--heads")
    seq_len = args.seq_len if args.seq_len is not None else (
        config.block_size if args.model is not None else 2048)
    _require(seq_len >= 1, f"--seq-len must be a positive integer, got {seq_len}")
    _require(args.micro_batch >= 1, f"--micro-batch must be a positive integer, got {args.micro_batch}")
    _require(args.gpus >= 1, f"--gpus must be a positive integer, got {args.gpus}")
    global_batch = args.global_batch if args.global_batch is not None else 16 * args.gpus * args.micro_batch
    _require(global_batch >= 1, f"--global-batch must be a positive integer, got {global_batch}")
    work = workload(config, num_params=args.params, seq_len=seq_len, micro_batch=args.micro_batch,
                    global_batch=global_batch, precision=args.precision)
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory),
                        ("--tflops", args.tflops), ("--intra-node-gbps", args.intra_node_gbps),
                        ("--inter-node-gbps", args.inter_node_gbps), ("--pcie-gbps", args.pcie_gbps),
                        ("--cpu-memory-gbps", args.cpu_memory_gbps)):
        _require(math.isfinite(value) and value > 0, f"{flag} must be a positive number, got {value:g}")
    _require(0 <= args.headroom < 1, f"--headroom must be in [0, 1), got {args.headroom:g}")
    gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None else min(8, args.gpus)
    _require(gpus_per_node >= 1, f"--gpus-per-node must be a positive integer, got {gpus_per_node}")
    cluster = Cluster(args.gpus, gpus_per_node, args.gpu_memory * GB, args.cpu_memory * GB, args.tflops,
                      args.intra_node_gbps * GB, args.inter_node_gbps * GB, args.pcie_gbps * GB,
                      args.cpu_memory_gbps * GB, args.headroom)
    return work, cluster


_FLAG_NAMES = {"gpus": "gpus", "gpus_per_node": "gpus-per-node", "tp": "tp", "pp": "pp",
               "global_batch": "global-batch", "micro_batch": "micro-batch", "heads": "heads", "kv_heads": "kv-heads",
               "layers": "layers", "n_layer": "layers", "n_embd": "hidden", "n_head": "heads", "n_kv_head": "kv-heads",
               "vocab_size": "vocab", "mlp_ratio": "mlp-ratio", "seq_len": "seq-len", "block_size": "seq-len"}


def _cli_words(message: str) -> str:
    """Library messages name arguments (gpus=64, GPTConfig.n_head=30); on the command line say the flags."""
    return re.sub(r"\b(?:GPTConfig\.)?([a-z_]+)=",
                  lambda m: f"--{_FLAG_NAMES[m.group(1)]} " if m.group(1) in _FLAG_NAMES else m.group(0), message)


def main(argv: list[str] | None = None) -> int:
    """`python -m conformance plan ...`: print (and optionally write as JSON) a plan. 0 on success, 2 on bad input."""
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.top < 1:
        print(f"python -m conformance plan: error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    try:
        work, cluster = _build(args)
        result = plan(work, cluster, tp=args.tp, pp=args.pp, zero=args.zero, offload=args.offload,
                      attention=args.attention, checkpointing=args.checkpointing,
                      prefer_simple_within=args.prefer_simple_within)
    except ValueError as error:
        print(f"python -m conformance plan: error: {_cli_words(str(error))}", file=sys.stderr)
        return 2
    data = json.dumps(result.to_dict(), indent=2)
    if args.json is not None and str(args.json) == "-":
        print(data)
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)
    render(result, console, top=None if args.all else args.top)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(data + "\n")
        console.print(f"plan written to {args.json}")
    return 0
