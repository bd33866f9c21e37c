"""The planner's data model and cost model: what is trained (Workload), on what (Cluster), how it is spread
(Layout), and what one layout costs per GPU (estimate -> Estimate), from the formulas of `reference.memory` and
`reference.parallelism`. The layouts and the recommendation are in `search`, the table in `render`, the flags in
`cli`; the package docstring says what is computed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from reference import parallelism
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
RECOMPUTE_SUFFIX = {"none": "", "selective": "+selective", "full": "+ckpt"}
"""Activation recomputation policy -> the suffix of its activation variant ("+ckpt": full checkpointing)."""
ACTIVATION_VARIANTS = tuple(f"{attn}{suffix}" for suffix in RECOMPUTE_SUFFIX.values() for attn in ("naive", "flash"))
CHECKPOINTING = ("auto", "never", "selective", "always")
"""auto: the first of none, selective, full that fits; never: none; selective; always: full."""


# --- inputs ------------------------------------------------------------------------------------------------------


class PlanError(ValueError):
    """Bad planner input; `argument` names the input at fault (a Workload/Cluster field or a keyword of
    candidate_layouts/estimate/plan), so the command line can name its flag."""

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


def _require(condition: bool, message: str, argument: str | None = None) -> None:
    if not condition:
        raise PlanError(message, argument)


def _positive_int(name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name} must be a positive integer, got {value!r}", name)


def _positive_number(name: str, value: object) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
             f"{name} must be a positive number, got {value!r}", name)


def decimal_bytes(x: float) -> str:
    """Decimal units, GB down to kB, by magnitude."""
    for scale, name in ((GB, "GB"), (1e6, "MB")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {name}"
    return f"{x / 1e3:.4g} kB"


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
                 f"{self.precision!r}", "precision")
        if self.config is not None:
            _require(self.config.block_size == self.seq_len, f"config.block_size={self.config.block_size} must "
                     f"equal seq_len={self.seq_len} (the planner sizes the position embedding to the sequence)",
                     "seq_len")

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
    _require(config is not None or num_params is not None, "give the model's shape (config) or num_params, or both",
             "num_params")
    if config is not None:
        seq_len = config.block_size if seq_len is None else seq_len
        _positive_int("seq_len", seq_len)
        config = dataclasses.replace(config, block_size=seq_len)
        num_params = gpt_parameters(config) if num_params is None else num_params
    _require(seq_len is not None, "seq_len is needed when the model is given by num_params alone", "seq_len")
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
                 f"most one node", "gpus")
        for name in ("gpu_memory", "cpu_memory", "tflops", "intra_node_bandwidth", "inter_node_bandwidth",
                     "pcie_bandwidth", "cpu_memory_bandwidth"):
            _positive_number(name, getattr(self, name))
        _require(isinstance(self.headroom, (int, float)) and 0 <= self.headroom < 1,
                 f"headroom must be in [0, 1), got {self.headroom!r}", "headroom")

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
    """One way to spread the model: t·c·p·d = GPUs."""

    tp: int
    pp: int
    dp: int
    zero: int
    """0: plain data parallel; 1, 2, 3: ZeRO stage over the d·c ranks that hold the same parameters."""
    offload: bool = False
    """Optimizer state and step on the CPU (ZeRO-Offload)."""
    cp: int = 1
    """Context parallel: each sequence split over c ranks (ring attention). 1 means disabled."""

    @property
    def name(self) -> str:
        parts = [f"TP{self.tp}"] if self.tp > 1 else []
        parts += [f"CP{self.cp}"] if self.cp > 1 else []
        parts += [f"PP{self.pp}"] if self.pp > 1 else []
        parts.append(f"DP{self.dp}")
        strategy = ZERO_NAMES[self.zero] + ("+offload" if self.offload else "")
        return f"{'·'.join(parts)} {strategy}" if self.zero or self.offload else "·".join(parts)

    @property
    def complexity(self) -> tuple[int, int, int, int]:
        """Simpler first: no offload (it ties the step to the host's CPUs and memory), fewer model-parallel
        dimensions (TP, CP, PP change the model or its attention; ZeRO only wraps the optimizer), fewer
        model-parallel GPUs, a lower ZeRO stage."""
        return (int(self.offload), int(self.tp > 1) + int(self.pp > 1) + int(self.cp > 1), self.tp * self.pp * self.cp,
                self.zero)


# --- one layout: its cost -----------------------------------------------------------------------------------------


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
    recompute: str
    """The recomputation policy chosen ("none", "selective", "full"): the first that fits, unless forced."""
    activation_bytes: float
    gpu_bytes: float
    """model_states.device + activation_bytes."""
    host_bytes_per_node: float
    fits_gpu: bool
    fits_host: bool
    communication: dict[str, float | None]
    """Bytes each GPU sends per step: dp (DP/ZeRO collectives), tp, pp, cp (ring attention), offload (PCIe).
    None: unknown."""
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
    def checkpoint(self) -> bool:
        """Full activation checkpointing (the whole forward recomputed)."""
        return self.recompute == "full"

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


def _link_bandwidths(layout: Layout, cluster: Cluster) -> tuple[float, float, float]:
    """(bandwidth of the DP group's link, of the pipeline's stage-to-stage link, of the CP ring's link). Ranks are
    ordered TP fastest, then CP, DP, PP (Megatron-Core's order)."""
    node, span = cluster.node_size, layout.tp * layout.cp * layout.dp
    dp_bw = cluster.inter_node_bandwidth if span > node else cluster.intra_node_bandwidth
    pp_bw = cluster.inter_node_bandwidth if span >= node and cluster.gpus > node else cluster.intra_node_bandwidth
    cp_bw = cluster.inter_node_bandwidth if layout.tp * layout.cp > node else cluster.intra_node_bandwidth
    return dp_bw, pp_bw, cp_bw


def estimate(
    work: Workload, cluster: Cluster, layout: Layout, *, attention: str = "flash", checkpointing: str = "auto"
) -> Estimate:
    """Memory, traffic, bubble and an estimated step time of `layout` (see the module docstring)."""
    _require(attention in ("flash", "naive"), f"attention must be 'flash' or 'naive', got {attention!r}",
             "attention")
    _require(checkpointing in CHECKPOINTING, f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}",
             "checkpointing")
    t, c, p, d = layout.tp, layout.cp, layout.pp, layout.dp
    _require(t * c * p * d == cluster.gpus,
             f"tp x cp x pp x dp = {t} x {c} x {p} x {d} must equal gpus={cluster.gpus}", "gpus")
    _require(c == 1 or work.config is not None, "cp > 1 needs the model's shape (ring attention splits its layers)",
             "cp")
    _require(work.seq_len % (2 * c) == 0 or c == 1,
             f"seq_len={work.seq_len} must be a multiple of 2 x cp = {2 * c} (zigzag ring attention: two chunks "
             f"per rank)", "cp")
    per_replica = d * work.micro_batch
    _require(work.global_batch % per_replica == 0,
             f"global_batch={work.global_batch} must be divisible by dp x micro_batch = {d} x {work.micro_batch}",
             "global_batch")
    m = work.global_batch // per_replica
    precision, element = PRECISIONS[work.precision]
    cfg = work.config
    notes: list[str] = []

    if cfg is not None and work.num_params == gpt_parameters(cfg):
        psi_gpu = float(parallelism.pipeline_stage_parameters(cfg, pp=p, tp=t))
    else:  # only the count is known (or it overrides the shape's): ZeRO Sec. 8's ideal split Ψ/(t·p)
        psi_gpu = params_per_model_parallel_rank(work.num_params, tp=t, pp=p)
    # The c context-parallel ranks hold the same parameters: gradients are reduced, and ZeRO shards, over d·c ranks.
    states = model_state_bytes(psi_gpu, world_size=d * c, stage=layout.zero, precision=precision,
                               offload=layout.offload)

    activations: dict[str, float] | None = None
    recompute = {"auto": "none", "never": "none", "selective": "selective", "always": "full"}[checkpointing]
    act = 0.0
    budget = cluster.usable_gpu_memory - states.device
    if c > 1 and attention != "flash":
        notes.append("context parallel: ring attention is blockwise (flash) whatever --attention says")
    if cfg is not None:
        layers = layers_per_stage(cfg.n_layer, p)
        in_flight = parallelism.in_flight_microbatches(p, m)
        activations = {
            f"{attn}{suffix}": float(parallelism.activation_bytes_per_rank(
                cfg, work.micro_batch, work.seq_len, num_layers=layers, in_flight=in_flight, attention=attn, tp=t,
                cp=c, element_bytes=element, recompute=policy))
            for policy, suffix in RECOMPUTE_SUFFIX.items() for attn in ("naive", "flash")
        }
        if checkpointing == "auto":  # the cheapest policy that fits: selective recomputes little, full a forward
            recompute = next((r for r in RECOMPUTE_SUFFIX if activations[attention + RECOMPUTE_SUFFIX[r]] <= budget),
                             "full")
        act = activations[attention + RECOMPUTE_SUFFIX[recompute]]
    else:
        notes.append("activations not counted: the model's shape is unknown (give layers/hidden/heads)")

    host_per_node = states.host * cluster.node_size
    fits_gpu = states.device + act <= cluster.usable_gpu_memory
    fits_host = host_per_node <= cluster.usable_cpu_memory

    comm: dict[str, float | None] = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "cp": 0.0, "offload": 0.0}
    if d * c > 1:
        comm["dp"] = parallelism.data_parallel_communication_bytes(
            psi_gpu, layout.zero, d * c, accumulation_steps=m, element_bytes=precision.grad)
    if cfg is not None:
        local_seq = work.seq_len // c  # every per-token tensor of a rank is s/c long
        if t > 1:
            comm["tp"] = parallelism.tensor_parallel_communication_bytes(
                work.micro_batch, local_seq, cfg.n_embd, tp=t, num_layers=layers_per_stage(cfg.n_layer, p),
                num_microbatches=m, element_bytes=element, recompute=recompute == "full")
        comm["pp"] = parallelism.pipeline_communication_bytes(work.micro_batch, local_seq, cfg.n_embd, pp=p,
                                                              num_microbatches=m, element_bytes=element)
        if c > 1:
            comm["cp"] = parallelism.context_parallel_communication_bytes(
                cfg, work.micro_batch, work.seq_len, cp=c, num_layers=layers_per_stage(cfg.n_layer, p),
                num_microbatches=m, tp=t, element_bytes=element, recompute=recompute == "full")
    else:
        comm["tp"] = None if t > 1 else 0.0
        comm["pp"] = None if p > 1 else 0.0
    offload_step_s = 0.0
    if layout.offload:
        comm["offload"] = parallelism.offload_transfer_bytes(psi_gpu, d, precision)
        # The CPU step streams the host state: reads the gradient slice, reads and writes master and moments; the
        # node's GPUs share its memory bandwidth.
        offload_step_s = parallelism.offload_step_seconds(states.host_grads + 2 * states.host_optimizer,
                                                          ranks_per_node=cluster.node_size,
                                                          host_memory_bandwidth=cluster.cpu_memory_bandwidth)

    dp_bw, pp_bw, cp_bw = _link_bandwidths(layout, cluster)
    comm_s = ((comm["dp"] or 0.0) / dp_bw + (comm["tp"] or 0.0) / cluster.intra_node_bandwidth
              + (comm["pp"] or 0.0) / pp_bw + (comm["cp"] or 0.0) / cp_bw
              + (comm["offload"] or 0.0) / cluster.pcie_bandwidth)
    shape = dict(n_layer=cfg.n_layer, seq_len=work.seq_len, n_embd=cfg.n_embd) if cfg is not None else {}
    flops = parallelism.training_flops(work.num_params, work.tokens_per_step, recompute=recompute, **shape)
    bubble = parallelism.pipeline_bubble_fraction(p, m)
    compute_s, step_s = parallelism.step_seconds(flops, gpus=cluster.gpus, flops_per_second=cluster.tflops * 1e12,
                                                 bubble=bubble, communication_s=comm_s, offload_step_s=offload_step_s)
    return Estimate(layout=layout, microbatches=m, params_per_gpu=psi_gpu, model_states=states,
                    activations=activations, attention="flash" if c > 1 else attention, recompute=recompute,
                    activation_bytes=act,
                    gpu_bytes=states.device + act, host_bytes_per_node=host_per_node, fits_gpu=fits_gpu,
                    fits_host=fits_host, communication=comm, bubble=bubble, compute_s=compute_s,
                    communication_s=comm_s, offload_step_s=offload_step_s, step_s=step_s, notes=notes)
