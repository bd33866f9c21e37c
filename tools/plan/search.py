"""The search: every layout the cluster and the model allow (candidate_layouts), each estimated, and the
recommendation with its reasons (plan -> Plan)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tools.plan.model import GB, PRECISIONS, ZERO_NAMES, Layout, PlanError, _positive_int, _require, estimate
from tools.plan.model import decimal_bytes as _gb

if TYPE_CHECKING:  # only in annotations
    from tools.plan.model import Cluster, Estimate, Workload

# --- all layouts -----------------------------------------------------------------------------------------------------


MAX_LAYOUTS = 20_000
"""The most layouts one plan estimates (about 0.2 ms each): a GPU count with hundreds of divisors and a model that
allows them all would otherwise take hours."""


def _divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, in O(sqrt n) steps (a planner input of 10**12 GPUs must not hang)."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return small + [n // k for k in reversed(small) if k * k != n]


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


def _cp_problem(work: Workload, cluster: Cluster, c: int) -> str | None:
    if cluster.gpus % c:
        return f"gpus={cluster.gpus} is not divisible by cp={c}"
    if c > 1 and work.config is None:
        return "cp > 1 needs the model's shape (give layers/hidden/heads)"
    if c > 1 and work.seq_len % (2 * c):
        return (f"cp={c}: seq_len={work.seq_len} must be a multiple of 2 x cp = {2 * c} (zigzag ring attention, "
                f"two chunks per rank)")
    return None


def candidate_layouts(
    work: Workload,
    cluster: Cluster,
    *,
    tp: tuple[int, ...] | None = None,
    pp: tuple[int, ...] | None = None,
    cp: tuple[int, ...] | None = None,
    zero: tuple[int, ...] = (0, 1, 2, 3),
    offload: str = "consider",
) -> tuple[list[Layout], list[tuple[str, str]]]:
    """(layouts to estimate, [(layout, why it was left out)]).

    tp / pp / cp: the degrees to consider (None: every valid one); an explicitly given degree that the cluster or
    the model cannot take is an error. zero: the stages. offload: "consider" (with and without), "never", "only".
    Pipeline layouts take ZeRO-0/1 only, as DeepSpeed's and Megatron's pipeline engines do: ZeRO-2 reduce-scatters
    and ZeRO-3 gathers every micro-batch, and a pipeline runs many. With d = 1 the stages equal plain DP and are
    listed once; offload still counts (it moves the optimizer to the CPU)."""
    _require(offload in ("consider", "never", "only"), f"offload must be 'consider', 'never' or 'only', got "
             f"{offload!r}", "offload")
    for s in zero:
        _require(s in ZERO_NAMES, f"zero stages must be among 0, 1, 2, 3, got {s!r}", "zero")
    for name, values in (("tp", tp), ("pp", pp), ("cp", cp)):
        if values is not None:
            _require(len(values) > 0, f"{name}: give at least one degree", name)
            for v in values:
                _positive_int(name, v)
    if tp is not None:
        for t in tp:
            problem = _tp_problem(work, cluster, t)
            _require(problem is None, str(problem), "tp")
    if pp is not None:
        for p in pp:
            problem = _pp_problem(work, cluster, p)
            _require(problem is None, str(problem), "pp")
    if cp is not None:
        for c in cp:
            problem = _cp_problem(work, cluster, c)
            _require(problem is None, str(problem), "cp")
    if tp is not None and pp is not None:
        for t in tp:
            for p in pp:
                _require(cluster.gpus % (t * p) == 0,
                         f"gpus={cluster.gpus} is not divisible by tp x pp = {t} x {p} = {t * p}", "pp")
    tps = tp if tp is not None else [t for t in _divisors(cluster.gpus) if _tp_problem(work, cluster, t) is None]
    pps = pp if pp is not None else [p for p in _divisors(cluster.gpus) if _pp_problem(work, cluster, p) is None]
    cps = cp if cp is not None else [c for c in _divisors(cluster.gpus) if _cp_problem(work, cluster, c) is None]

    layouts: list[Layout] = []
    rejected: list[tuple[str, str]] = []
    for t in tps:
        for c in cps:
            for p in pps:
                if cluster.gpus % (t * c * p):
                    continue
                d = cluster.gpus // (t * c * p)
                if work.global_batch % (d * work.micro_batch):
                    rejected.append((Layout(t, p, d, 0, cp=c).name, f"global_batch={work.global_batch} is not "
                                     f"divisible by dp x micro_batch = {d} x {work.micro_batch}"))
                    continue
                for s in zero:
                    for off in (False, True):
                        if (off and (offload == "never" or s == 0)) or (not off and offload == "only"):
                            continue
                        if p > 1 and s > 1:
                            continue
                        if d * c == 1 and s > 0 and not off:  # ZeRO shards over the d·c ranks of a replica
                            continue
                        layouts.append(Layout(t, p, d, s, off, cp=c))
    if not layouts and not rejected:
        raise PlanError("no layout left to consider: widen tp, pp, zero or offload", "zero")
    _require(len(layouts) <= MAX_LAYOUTS, f"{len(layouts)} layouts to estimate, more than the {MAX_LAYOUTS} a plan "
             f"estimates (seconds, not hours): narrow tp, pp or cp, or choose gpus with fewer divisors", "tp")
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


def _reasons(best: Estimate, fastest: Estimate, estimates: list[Estimate], work: Workload, cluster: Cluster,
             within: float) -> list[str]:
    policy = {"none": "", "selective": " and selective recomputation of the attention core",
              "full": " and full activation checkpointing"}[best.recompute]
    act = (f"activations {_gb(best.activation_bytes)} with {best.attention} attention{policy}"
           if best.activations else "activations not counted")
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
    if best.recompute == "full":
        out.append("checkpointing recomputes the forward (8Ψ instead of 6Ψ FLOPs per token): needed to fit")
    elif best.recompute == "selective":
        out.append("selective recomputation reruns only the attention core (+2·L·s·h FLOPs per token, Korthikanti "
                   "et al. 2022): the blocks keep its inputs instead of the N x N probabilities")
    if best.layout.cp > 1:
        out.append(f"context parallel over {best.layout.cp} ranks: each holds s/{best.layout.cp} tokens; ring "
                   f"attention passes K/V around ({_gb(best.communication['cp'] or 0.0)} per GPU per step)")
    if best.layout.pp > 1:
        out.append(f"pipeline: m = {best.microbatches} micro-batches per step, bubble (p-1)/(m+p-1) = "
                   f"{best.bubble:.1%}")
    return out


def plan(
    work: Workload,
    cluster: Cluster,
    *,
    attention: str = "flash",
    checkpointing: str = "auto",
    prefer_simple_within: float = 0.1,
    **space,
) -> Plan:
    """Estimate every candidate layout and recommend one. `space`: the search space, candidate_layouts' keywords (tp,
    pp, cp, zero, offload); attention and checkpointing: estimate's options.

    The step-time estimate is rough (no overlap, no kernel efficiency), so every fitting layout within
    `prefer_simple_within` (a fraction) of the fastest estimate counts as equally fast, and the simplest of them
    (Layout.complexity) is recommended: it is the one that is easiest to run, debug and change."""
    _require(isinstance(prefer_simple_within, (int, float)) and 0 <= prefer_simple_within < 10,
             f"prefer_simple_within must be a fraction in [0, 10), got {prefer_simple_within!r}",
             "prefer_simple_within")
    layouts, rejected = candidate_layouts(work, cluster, **space)
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
        "logits, loss and temporary buffers are left to the headroom; recomputation: the cheapest policy that fits "
        "(none, selective, full); context parallel: ring attention, zigzag layout",
        f"headroom {cluster.headroom:.0%} of GPU memory left free; GB = 1e9 bytes",
        f"step time: {cluster.tflops:g} TFLOP/s achieved per GPU; links {cluster.intra_node_bandwidth / GB:g} GB/s in "
        f"a node, {cluster.inter_node_bandwidth / GB:g} GB/s between nodes, {cluster.pcie_bandwidth / GB:g} GB/s "
        f"PCIe, {cluster.cpu_memory_bandwidth / GB:g} GB/s host memory per node (offload's CPU step); "
        f"communication not overlapped with compute (an upper bound, used only to rank)",
    ]
    return Plan(work, cluster, estimates, rejected, best, reasons, assumptions)
