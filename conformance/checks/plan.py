"""Check `plan`: is the planner's arithmetic what the ranks really hold?

1. Predicted vs measured, for every layout that runs here (the tiny GPT, 4 blocks, world sizes up to 4): one real
   training step of the implementation (`optimized.data_parallel`, `optimized.zero`, `optimized.tensor_parallel`,
   `optimized.pipeline`; plain DP also with `optimized.checkpointing`'s selective and full recomputation), then
   the model-state bytes of each rank counted tensor by tensor (`conformance.measure`), beside
   `tools.plan.estimate` for the same layout; for the layouts without a pipeline also the bytes the
   transformer blocks save for backward beside the planner's activations. The most
   loaded rank is compared (it is the one that must fit), with the relative error and a stated tolerance. On CUDA
   also `torch.cuda.memory_allocated` after the step and the step's `max_memory_allocated`. A layout whose
   implementation is not in this build is a row saying so.
2. The planner's ZeRO-2/ZeRO-3 figures beside DeepSpeed's own estimators
   (`estimate_zero2_model_states_mem_needs_all_cold`, `estimate_zero3_model_states_mem_needs_all_cold`) for the same
   inputs, and the difference in accounting explained term by term: the row passes when DeepSpeed's figure equals
   the planner's plus the named terms (checks/_plan_deepspeed.py).
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._plan_deepspeed import deepspeed_rows
from conformance.figure import Figure, Panel, Series
from conformance.launch import spawn, under_torchrun
from conformance.measure import SavedTensorBytes, tensor_bytes
from conformance.result import Metric, Result
from conformance.tolerance import Equivalence
from reference.data import make_batches
from reference.memory import activation_bytes_per_layer, gpt_parameters
from reference.model import GPT, GPTConfig
from reference.parallelism import largest_module_parameters
from tools.plan import PRESETS, Cluster, Layout, estimate, workload

SPEC = CheckSpec(
    name="plan", technique="parallel-strategy planner", reference="tools.plan.estimate (reference.memory)",
    optimized="tools.plan.estimate", order=130, peers=("deepspeed",),
)
CONFIG = dict(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=64, seed=0)
"""The tiny GPT with 4 blocks, so that 2- and 4-stage pipelines and 2- and 4-way tensor parallelism all apply."""
MICRO_BATCH = 2
SEQ_LEN = 32

TOLERANCE = {
    "zero": (0.01, "padding of each flat buffer to a multiple of Nd and Adam's 4-byte step counters, < 1%"),
    "tp": (0.01, "the planner counts Megatron's plan as optimized.tensor_parallel.megatron_plan applies it "
           "(reference.memory.gpt_parameters with tp=t); Adam's 4-byte step counters, < 1%"),
    "pp": (0.10, "the planner bounds the most loaded stage by ceil(L/p) blocks plus every parameter outside the "
           "blocks; the split balances blocks and embeddings, so a real stage holds at most that"),
    "activations": (0.02, "reference.memory.activation_bytes_per_layer counts the block's saved tensors one by "
                    "one; only rounding of unique storages can differ"),
}

@dataclass(frozen=True)
class LayoutRun:
    """One layout to run: the planner's Layout, the parameter dtype and the recomputation policy."""

    layout: Layout
    """The planner's layout, run as it says: tp x pp x dp = world size, ZeRO stage, offload."""
    bf16: bool = False
    """bf16 parameters with fp32 master weights (else fp32 throughout)."""
    recompute: str = "none"
    """Activation checkpointing policy (optimized.checkpointing): "none", "selective" or "full"."""

    @property
    def label(self) -> str:
        policy = "" if self.recompute == "none" else f", {self.recompute} recomputation"
        return f"{self.layout.name}{', bf16 + fp32 master' if self.bf16 else ', fp32'}{policy}"

    @property
    def world_size(self) -> int:
        return self.layout.tp * self.layout.pp * self.layout.dp

    @property
    def family(self) -> str:
        return "pp" if self.layout.pp > 1 else "tp" if self.layout.tp > 1 else "zero"


def specs_for(world_size: int, quick: bool, cuda: bool) -> list[LayoutRun]:
    """The layouts run at this world size (quick: one of each kind)."""
    w = world_size
    specs = [LayoutRun(Layout(1, 1, w, 0))] + [LayoutRun(Layout(1, 1, w, s)) for s in (1, 2, 3)]
    specs += [LayoutRun(Layout(1, 1, w, 0), recompute=r) for r in ("selective", "full")]
    specs += [LayoutRun(Layout(1, 1, w, 2), bf16=True), LayoutRun(Layout(1, 1, w, 2, offload=True))]
    if not quick:
        specs += [LayoutRun(Layout(1, 1, w, 1), bf16=True), LayoutRun(Layout(1, 1, w, 3), bf16=True),
                  LayoutRun(Layout(1, 1, w, 1, offload=True)), LayoutRun(Layout(1, 1, w, 3, offload=True))]
    heads = CONFIG["n_head"]
    for t in (2, 4):
        if w % t == 0 and heads % t == 0 and (not quick or t == w):
            specs.append(LayoutRun(Layout(t, 1, w // t, 0)))
            if not quick and w // t > 1:
                specs.append(LayoutRun(Layout(t, 1, w // t, 1)))
    if not cuda:  # the pipeline executor speaks gloo (tagged point-to-point), not NCCL
        for p in (2, 3, 4):
            if p == w and p <= CONFIG["n_layer"] and (not quick or p == 2):
                specs.append(LayoutRun(Layout(1, p, 1, 0)))
    return specs


# --- on every rank ---------------------------------------------------------------------------------------------------


def _groups(spec: LayoutRun) -> tuple[dict[str, dist.ProcessGroup | None], tuple[int, int, int]]:
    """Process groups of each axis (TP fastest, then DP, then PP) and this rank's (pp, dp, tp) coordinates.
    Every rank creates every group, in the same order (dist.new_group is collective over the world)."""
    rank = dist.get_rank()
    t, d = spec.layout.tp, spec.layout.dp

    def coords(r: int) -> tuple[int, int, int]:
        return r // (t * d), (r // t) % d, r % t

    mine: dict[str, dist.ProcessGroup | None] = {}
    for axis, size in (("tp", spec.layout.tp), ("dp", spec.layout.dp), ("pp", spec.layout.pp)):
        members: dict[tuple, list[int]] = defaultdict(list)
        for r in range(spec.world_size):
            pp_r, dp_r, tp_r = coords(r)
            key = {"tp": (pp_r, dp_r), "dp": (pp_r, tp_r), "pp": (dp_r, tp_r)}[axis]
            members[key].append(r)
        for key in sorted(members):
            group = dist.new_group(members[key]) if size > 1 else None
            if rank in members[key]:
                mine[axis] = group
    return mine, coords(rank)


def _blocks_saved_bytes(blocks, params) -> tuple[list[SavedTensorBytes], list]:
    """Count what each block saves for backward (parameters excluded), one counter per block's forward."""
    counters: list[SavedTensorBytes] = []

    def pre(module, args):
        counters.append(SavedTensorBytes(exclude=params).__enter__())

    def post(module, args, output):
        counters[-1].__exit__(None, None, None)

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    return counters, handles


def _measure(spec: LayoutRun, device: torch.device) -> dict:
    groups, (pp_rank, dp_rank, _) = _groups(spec)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = GPT(GPTConfig(**CONFIG)).to(device)
    if spec.recompute != "none":
        from optimized.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, spec.recompute)
    rows = MICRO_BATCH * spec.layout.pp
    idx, targets = make_batches(1, batch_size=rows, seq_len=SEQ_LEN, vocab_size=CONFIG["vocab_size"],
                                seed=1 + dp_rank)[0]
    idx, targets = idx.to(device), targets.to(device)
    out: dict = {"host": 0, "blocks_saved": None, "whole_saved": None, "buffers": 0}
    if spec.layout.tp > 1:
        from optimized.tensor_parallel import megatron_plan, parallelize

        parallelize(model, megatron_plan(model), process_group=groups["tp"])
    if spec.layout.pp > 1:
        from optimized.pipeline import PipelineExecutor, one_f_one_b, split

        stage = split(model, spec.layout.pp)[pp_rank].to(device)
        del model
        executor = PipelineExecutor(stage, one_f_one_b(spec.layout.pp, spec.layout.pp), process_group=groups["pp"])
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)
        executor.step(idx, targets)
        opt.step()
        params = list(stage.parameters())
        state = {"params": params, "grads": [p.grad for p in params], "optimizer": _optimizer_tensors(opt)}
    elif spec.layout.zero:
        from optimized.zero import ZeroOptimizer

        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=spec.layout.zero, process_group=groups["dp"],
                            offload=spec.layout.offload, param_dtype=torch.bfloat16 if spec.bf16 else None, lr=1e-3)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        state = opt.model_state_tensors()
        out["host"] = tensor_bytes(state["host_grads"] + state["host_optimizer"])
    else:
        net = model
        if spec.layout.dp > 1:
            from optimized.data_parallel import DataParallel

            net = DataParallel(model, process_group=groups["dp"])
        params = list(model.parameters())
        with SavedTensorBytes(exclude=params) as outside:
            counters, handles = _blocks_saved_bytes(model.blocks, params)
            _, loss = net(idx, targets)
        for h in handles:
            h.remove()
        out["blocks_saved"] = sum(c.bytes for c in counters)
        out["whole_saved"] = out["blocks_saved"] + outside.bytes
        loss.backward()
        opt = torch.optim.AdamW(params, lr=1e-3)
        opt.step()
        state = {"params": params, "grads": [p.grad for p in params], "optimizer": _optimizer_tensors(opt)}
        # DataParallel copies gradients into flat buckets (DDP's layout without gradient_as_bucket_view)
        out["buffers"] = tensor_bytes(b.buffer for b in getattr(net, "_buckets", []))
    out.update(params=tensor_bytes(state["params"]), grads=tensor_bytes(state["grads"]),
               optimizer=tensor_bytes(state["optimizer"]))
    out["device"] = out["params"] + out["grads"] + out["optimizer"]
    if cuda:
        torch.cuda.synchronize()
        out["cuda_allocated"] = torch.cuda.memory_allocated() - base
        out["cuda_peak"] = torch.cuda.max_memory_allocated() - base
    return out


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _run_specs(specs: list[LayoutRun], device_type: str) -> list[dict]:
    """On each rank: every layout in turn; a layout that raises becomes an error entry (the others still run)."""
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else \
        torch.device("cpu")
    results = []
    for spec in specs:
        try:
            results.append(_measure(spec, device))
        except Exception:  # noqa: BLE001 - reported as that layout's row
            results.append({"error": traceback.format_exc()})
    return results


# --- rows ------------------------------------------------------------------------------------------------------------


def _prediction(spec: LayoutRun):
    cfg = GPTConfig(**CONFIG)
    work = workload(cfg, micro_batch=MICRO_BATCH, global_batch=MICRO_BATCH * spec.layout.pp * spec.layout.dp,
                    precision="bf16" if spec.bf16 else "fp32")
    cluster = Cluster(gpus=spec.world_size, gpus_per_node=spec.world_size)
    checkpointing = {"none": "never", "selective": "selective", "full": "always"}[spec.recompute]
    return estimate(work, cluster, spec.layout, attention="naive", checkpointing=checkpointing)


def _relative(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured else (0.0 if predicted == 0 else float("inf"))


def _implementation(spec: LayoutRun) -> str:
    parts = []
    if spec.layout.zero:
        parts.append(f"optimized.zero.ZeroOptimizer(stage={spec.layout.zero}, offload={spec.layout.offload}"
                     + (", param_dtype=bf16)" if spec.bf16 else ")"))
    elif spec.layout.dp > 1:
        parts.append("optimized.data_parallel.DataParallel + torch AdamW")
    else:
        parts.append("torch AdamW")
    if spec.recompute != "none":
        parts.append(f"optimized.checkpointing ({spec.recompute})")
    if spec.layout.tp > 1:
        parts.append("optimized.tensor_parallel.parallelize(megatron_plan)")
    if spec.layout.pp > 1:
        parts.append("optimized.pipeline (1F1B)")
    return " + ".join(parts)


def _layout_rows(spec: LayoutRun, per_rank: list[dict], device: str) -> list[Result]:
    base = dict(optimized=_implementation(spec), device=device, world_size=spec.world_size)
    errors = [r["error"] for r in per_rank if "error" in r]
    if errors:
        return [SPEC.row(None, f"model states per rank, {spec.label}", error=errors[0], **base)]
    est = _prediction(spec)
    predicted_device, predicted_host = est.model_states.device, est.model_states.host
    worst = max(per_rank, key=lambda r: r["device"])
    errs = [_relative(predicted_device, r["device"]) for r in per_rank]
    err = _relative(predicted_device, worst["device"])
    host_err = _relative(predicted_host, max(r["host"] for r in per_rank)) if spec.layout.offload else 0.0
    tol, why = TOLERANCE[spec.family]
    worst_err = max(err, host_err)
    memory = [
        Metric("model states per rank, predicted", predicted_device, "bytes"),
        Metric("model states per rank, measured (most loaded rank)", worst["device"], "bytes"),
        Metric("relative error", err, "fraction"),
    ]
    if spec.layout.offload:
        memory += [Metric("host (offloaded) bytes per rank, predicted", predicted_host, "bytes"),
                   Metric("host bytes per rank, measured", max(r["host"] for r in per_rank), "bytes")]
    notes = (f"measured by kind on the most loaded rank: params {worst['params']}, grads {worst['grads']}, "
             f"optimizer {worst['optimizer']} bytes; per rank {[r['device'] for r in per_rank]}. Tolerance "
             f"{tol:.0%}: {why}.")
    if worst["buffers"]:
        notes += (f" Not model state, not predicted: DataParallel's gradient buckets, {worst['buffers']} bytes per "
                  f"rank (one more copy of the gradients).")
    if "cuda_allocated" in worst:
        memory += [Metric("torch.cuda.memory_allocated after the step", worst["cuda_allocated"], "bytes"),
                   Metric("torch.cuda.max_memory_allocated during the step", worst["cuda_peak"], "bytes")]
        notes += (f" CUDA: allocated after the step vs predicted model states: relative error "
                  f"{_relative(predicted_device, worst['cuda_allocated']):.3g} (allocator blocks of 512 B round "
                  f"every tensor up).")
    equivalence = Equivalence(
        name=f"planner vs measured model states, {spec.label}", passed=worst_err <= tol, max_error=worst_err,
        mean_error=sum(errs) / len(errs), bound=tol,
        rule=f"relative error |predicted - measured| / measured on the most loaded rank <= {tol:g}")
    rows = [SPEC.row(None, f"model states per rank, {spec.label}", equivalence=equivalence, memory=memory,
                     notes=notes, **base)]
    if worst["blocks_saved"] is not None and est.activations is not None:
        # The planner's activations are what the blocks keep plus, when recomputing, one block's recomputed
        # activations during its backward (reference.parallelism.activation_bytes_per_rank); saved-for-backward
        # bytes measure the kept part.
        transient = (activation_bytes_per_layer(GPTConfig(**CONFIG), MICRO_BATCH, SEQ_LEN)
                     - activation_bytes_per_layer(GPTConfig(**CONFIG), MICRO_BATCH, SEQ_LEN, recompute=spec.recompute))
        predicted = est.activation_bytes - transient
        measured = max(r["blocks_saved"] for r in per_rank)
        a_err = _relative(predicted, measured)
        a_tol, a_why = TOLERANCE["activations"]
        whole = max(r["whole_saved"] for r in per_rank)
        rows.append(SPEC.row(
            None, f"activations per rank, {spec.label}",
            equivalence=Equivalence(
                name=f"planner vs saved-for-backward bytes of the blocks, {spec.label}", passed=a_err <= a_tol,
                max_error=a_err, mean_error=a_err, bound=a_tol,
                rule=f"relative error of the blocks' saved bytes <= {a_tol:g}"),
            memory=[Metric("activations (blocks), predicted", predicted, "bytes"),
                    Metric("saved for backward by the blocks, measured", measured, "bytes"),
                    Metric("saved for backward by the whole model, measured", whole, "bytes")],
            notes=f"naive attention, fp32, micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens. Tolerance {a_tol:.0%}: "
            f"{a_why}. The whole model also saves the embeddings' output, ln_f, the head and the loss "
            f"({whole - measured} bytes here): the planner leaves those to its headroom."
            + (f" Recomputing, the planner also counts one block's recomputed activations during its backward "
               f"({transient} bytes), which nothing saves: the prediction shown is the kept part."
               if transient else ""),
            **base))
    return rows


def _figure(rows: list[tuple[str, float, float]]) -> Figure:
    """Predicted and measured model-state MB per rank of each layout, side by side."""
    xs = range(len(rows))
    return Figure("plan_predicted_vs_measured", [Panel(
        series=[Series([x - 0.2 for x in xs], [r[1] / 1e6 for r in rows], label="predicted (planner)", kind="bars",
                       width=0.4),
                Series([x + 0.2 for x in xs], [r[2] / 1e6 for r in rows], label="measured (most loaded rank)",
                       kind="bars", width=0.4)],
        xticks=[(x, r[0]) for x, r in zip(xs, rows, strict=True)], xtick_rotation=30,
        ylabel="model-state MB per rank", title="planner vs measured, tiny GPT")],
        size=(max(6, 0.9 * len(rows)), 4))


def run(ctx: Context) -> list[Result]:
    cuda = ctx.device.type == "cuda"
    if under_torchrun() or cuda or ctx.quick:
        world_sizes = [ctx.world_size] if under_torchrun() or cuda else [min(max(ctx.world_size, 1), 4)]
    else:
        world_sizes = [2, 3, 4]
    rows: list[Result] = []
    plotted: list[tuple[str, float, float]] = []
    for w in world_sizes:
        runs = specs_for(w, ctx.quick, cuda)
        per_rank = spawn(_run_specs, w, runs, ctx.device.type, device=ctx.device.type, timeout=ctx.timeout)
        for i, spec in enumerate(runs):
            layout_rows = _layout_rows(spec, [r[i] for r in per_rank], ctx.device.type)
            rows += layout_rows
            first = layout_rows[0]
            if first.error is None:
                plotted.append((f"{spec.layout.name}{' bf16' if spec.bf16 else ''} (w{w})",
                                first.memory[0].measured, first.memory[1].measured))
    if plotted:
        next(r for r in rows if r.error is None and r.equivalence is not None).figures.append(_figure(plotted))

    tiny = GPTConfig(**CONFIG)
    seven = PRESETS["7b"]
    width = 4096  # the paper gives no layer sizes; take the MLP's first Linear of a 4096-wide model as largest
    cases = [("ZeRO paper's 7.5B, 8 x 8 GPUs, largest module 4h x h", 7_500_000_000, 4 * width * width + 4 * width,
              8, 8),
             ("7b preset, 8 x 8 GPUs", gpt_parameters(seven), largest_module_parameters(seven), 8, 8)]
    if not ctx.quick:
        cases.append((f"tiny GPT, 1 x {max(ctx.world_size, 2)} GPUs", gpt_parameters(tiny),
                      largest_module_parameters(tiny), 1, max(ctx.world_size, 2)))
    rows += deepspeed_rows(SPEC, cases)
    return rows
