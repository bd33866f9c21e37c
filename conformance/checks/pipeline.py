"""Check `pipeline`: GPipe, 1F1B and interleaved 1F1B on real ranks, held to the single-process model, and the two
claims about pipelines measured rather than recited.

1. Equivalence (per schedule): the tiny GPT split into stages, one step of m micro-batches over p gloo ranks; the
   loss on the last stage and every parameter's gradient on every rank against one process on the whole batch
   (reference.training.accumulate_gradients); the Llama-style workload (RMSNorm, RoPE, SwiGLU, GQA, untied head)
   through 1F1B (quick) or every schedule (full). The claim is algorithmic, so the stages and the reference run in
   float64 and the bound is the reference's own rounding spread, measured beside it (its loss and gradients
   recomputed with the batch in two micro-batches or from weights nudged by one ulp:
   conformance.checks._reference_runs.step_reference), the same on any CPU, thread count or world size. Full mode
   adds 10 AdamW steps in float64, held to the single-process run (reference_run) within its whole-run spread.
2. Bubble (claim pipeline.bubble): the simulator with equal stage costs (backward = 2x forward) against
   (p-1)/(m+p-1), and the real run's bubble from the timestamps of every forward and backward on every rank
   (idle / (p * makespan)), with the simulator rerun on the stage costs measured in that run to tell the
   schedule's bubble apart from the unequal stages and the message latency of a real run.
3. Memory (claim pipeline.memory): on each rank, the peak bytes of the storages allocated during one step and alive
   at once (conformance.measure.PeakLiveBytes, gradients allocated beforehand so only activations, messages and
   temporaries count), divided by the saved-for-backward bytes of one micro-batch through that rank's stage: the
   number of micro-batches whose activations are alive at the peak. Claimed: m for GPipe, p for 1F1B (rank r: p-r);
   it holds when claimed <= measured < claimed + 1.
4. Order: the schedules as data against what the papers fix (each stage's forwards and backwards oldest first,
   GPipe's two phases, 1F1B's min(p - r, m) micro-batches in flight), which the equivalence rows cannot see.
5. Timeline plots (PNG): simulated 1F1B and GPipe, and the measured 1F1B run.

The executor's messages are gloo point-to-point sends matched by tag; on a CUDA machine this check still runs the
ranks on CPU with gloo and says so.
"""

from __future__ import annotations

import os
import statistics

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import one_thread, reference_run, step_reference
from conformance.claims import Verdict
from conformance.figure import Bar, Figure, Panel
from conformance.launch import spawn, under_torchrun
from conformance.measure import PeakLiveBytes, saved_tensor_bytes
from conformance.result import Metric, Result
from conformance.tolerance import Spread, bitwise, combine, within_spread
from optimized.pipeline import (
    PipelineExecutor,
    bubble_fraction,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    simulate,
    split,
)
from reference.data import make_batches
from reference.model import GPT, GPTConfig

OPTIMIZED = "optimized.pipeline.PipelineExecutor"
SPEC = CheckSpec(
    name="pipeline", technique="pipeline parallel", reference="reference.training (one process, whole batch)",
    optimized=OPTIMIZED, order=110, peers=("torch.distributed.pipelining",),
    claims=("pipeline.bubble", "pipeline.memory"),
)
LR, WD = 1e-2, 0.01
"""AdamW of the full mode's run (torch's default weight decay)."""
BUBBLE_TOLERANCE = 0.05
"""Measured bubble within this (absolute fraction) of the formula counts as the formula holding on the real run."""


def _sizes(p: int, quick: bool) -> dict:
    if quick:
        return dict(config=dict(vocab_size=64, block_size=32, n_layer=2 * p, n_head=4, n_embd=32),
                    m=2 * p, rows=2, seq_len=32, timed_steps=2, adam_steps=0)
    return dict(config=dict(vocab_size=64, block_size=64, n_layer=2 * p, n_head=4, n_embd=128),
                m=4 * p, rows=4, seq_len=64, timed_steps=5, adam_steps=10)


FAMILIES = {"gpt2": "GPT", "llama": "Llama-style GPT"}
"""reference.model families: GPTConfig(...) (tied head) and GPTConfig.llama(...) (RMSNorm, RoPE, SwiGLU, GQA 4:2,
untied head)."""


def _config(sizes: dict, family: str) -> GPTConfig:
    if family == "llama":
        return GPTConfig.llama(**sizes["config"], n_kv_head=sizes["config"]["n_head"] // 2)
    return GPTConfig(**sizes["config"])


def _llama_names(quick: bool) -> tuple[str, ...]:
    """Schedules the Llama-style workload runs: one in quick mode (it costs a launch's worth of steps), all in full."""
    return ("1f1b",) if quick else ("gpipe", "1f1b", "interleaved-1f1b")


def _schedule(name: str, p: int, m: int):
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    return interleaved_one_f_one_b(p, m, 2)


def _batches(sizes: dict, n: int, seed: int):
    return make_batches(n, batch_size=sizes["rows"] * sizes["m"], seq_len=sizes["seq_len"],
                        vocab_size=sizes["config"]["vocab_size"], seed=seed, vary_length=True)


def _gloo_group():
    """The executor's messages are CPU tensors over gloo: under torchrun with NCCL, a gloo group of all ranks."""
    backend = str(dist.get_backend())
    return None if backend == "gloo" or "cpu:gloo" in backend else dist.new_group(backend="gloo")


def _executor(name: str, sizes: dict, group, family: str = "gpt2", dtype: torch.dtype = torch.float32):
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    model = GPT(_config(sizes, family)).to(dtype)
    schedule = _schedule(name, p, sizes["m"])
    stages = split(model, schedule.num_stages)
    mine = [stages[s] for s in schedule.stages_of(rank)]
    return model, mine, PipelineExecutor(mine, schedule, process_group=group)


def _mine(model, executor) -> dict:
    ids = {id(q) for q in executor.parameters()}
    return {n: q for n, q in model.named_parameters() if id(q) in ids}


def _worker(sizes: dict, names: tuple[str, ...], llama_names: tuple[str, ...]) -> dict:
    """Everything measured on one rank, in one launch."""
    out: dict = {"equivalence": {"gpt2": {}, "llama": {}}, "timelines": {}, "memory": {}, "adam": {}}
    group = _gloo_group()
    idx, targets = _batches(sizes, 1, seed=1)[0]
    for family, family_names in (("gpt2", names), ("llama", llama_names)):
        for name in family_names:
            model, _, executor = _executor(name, sizes, group, family, torch.float64)
            loss = executor.step(idx, targets).loss
            out["equivalence"][family][name] = (loss, {n: q.grad.clone() for n, q in _mine(model, executor).items()})

    for name in ("gpipe", "1f1b"):
        model, stages, executor = _executor(name, sizes, group)
        executor.step(idx, targets)  # warm-up: lazy imports, allocator, gradients allocated
        timelines = []
        for _ in range(sizes["timed_steps"]):
            dist.barrier(group=group)
            timelines.append(executor.step(idx, targets).timeline)
        out["timelines"][name] = timelines
        for q in executor.parameters():
            q.grad.zero_()  # in place: the measured window allocates no gradient storage
        dist.barrier(group=group)
        with PeakLiveBytes() as live:
            executor.step(idx, targets)
        stage = stages[0]
        x = idx[: sizes["rows"]]
        if not stage.is_first:
            x = torch.randn(sizes["rows"], idx.size(1), stage.hidden_size)  # (b, T, C) as received
        args = (x, targets[: sizes["rows"]]) if stage.is_last else (x,)
        _, per_microbatch = saved_tensor_bytes(stage, *args, exclude=list(stage.parameters()))
        out["memory"][name] = (live.peak, per_microbatch)

    if sizes["adam_steps"]:
        model, _, executor = _executor("1f1b", sizes, group, dtype=torch.float64)
        opt = torch.optim.AdamW(executor.parameters(), lr=LR, weight_decay=WD)
        batches = _batches(sizes, 2, seed=2)
        losses = []
        for step in range(sizes["adam_steps"]):
            opt.zero_grad(set_to_none=True)
            losses.append(executor.step(*batches[step % 2]).loss)
            opt.step()
        out["adam"] = (losses, {n: q.detach().clone() for n, q in _mine(model, executor).items()})
    return out


def _equivalence_row(ctx, name, p, sizes, per_rank, ref: dict, spread: Spread, family: str = "gpt2") -> Result:
    schedule = _schedule(name, p, sizes["m"])
    last = schedule.rank_of(schedule.num_stages - 1)
    results = [res["equivalence"][family][name] for res in per_rank]
    parts = [within_spread({"loss": results[last][0].reshape(1)}, {"loss": ref["loss"]}, spread, name="loss")]
    for rank, res in enumerate(results):
        parts.append(within_spread(res[1], {n: ref[n] for n in res[1]}, spread, name=f"rank {rank} gradients"))
    covered = {n for res in results for n in res[1]}
    parts.append(bitwise(torch.tensor(len(covered)), torch.tensor(len(ref) - 1), name="parameters held by some rank"))
    eq = combine(f"{name} p={p} m={sizes['m']} vs one process", parts)
    notes = (f"one step in float64 on both sides, {sizes['m']} micro-batches of {sizes['rows']} rows with uneven "
             f"padding (token-weighted); loss and all {len(covered)} parameters' gradients within 10x the "
             f"reference's own rounding spread {spread.value:.2g} + 1 ulp; " + (
                 "tied wte/lm_head weight on the first and last stage, gradients exchanged between them"
                 if family == "gpt2" else "Llama-style: RMSNorm, RoPE computed inside each stage's attention, "
                 "SwiGLU, GQA 4:2, untied head"))
    if ctx.device.type != "cpu":
        notes += "; ranks ran on CPU with gloo (the executor's tagged messages are not NCCL-ordered)"
    label = "" if family == "gpt2" else f", {FAMILIES[family]}"
    return SPEC.row(None, f"{schedule.name}: loss and gradients{label}", optimized=f"{OPTIMIZED} + {schedule.name}",
                    peer="torch.distributed.pipelining (in tests)", device="cpu", world_size=p, equivalence=eq,
                    notes=notes)


def _stage_costs(timelines, p: int) -> tuple[list[float], list[float]]:
    """Median forward and backward seconds of each stage over every timed step."""
    fwd, bwd = [[] for _ in range(p)], [[] for _ in range(p)]
    for steps in timelines:
        for rank_timeline in steps:
            for iv in rank_timeline:
                (fwd if iv.action.kind == "F" else bwd)[iv.action.stage].append(iv.end - iv.start)
    return [statistics.median(f) for f in fwd], [statistics.median(b) for b in bwd]


def _timeline_figure(name: str, timeline, *, unit: str, title: str) -> Figure:
    """A timeline (simulated or measured) as a Gantt chart: one row per rank, forwards and backwards, each model
    chunk of a rank (interleaved schedules hold several) in its own shade."""
    t0 = min((iv.start for rank in timeline for iv in rank), default=0.0)
    bars = []
    for r, rank in enumerate(timeline):
        chunks = sorted({iv.action.stage for iv in rank})
        bars += [Bar(r, iv.start - t0, iv.end - t0, iv.action.label(), "forward" if iv.action.kind == "F" else
                     "backward", chunks.index(iv.action.stage) % 3) for iv in rank]
    return Figure(name, [Panel(timeline=bars, row_labels=[f"rank {r}" for r in range(len(timeline))], xlabel=unit,
                               title=title)], size=(10, 0.6 * len(timeline) + 1.2))


def _bubble_row(ctx, name, p, sizes, per_rank) -> Result:
    m = sizes["m"]
    schedule = _schedule(name, p, m)
    formula = (p - 1) / (m + p - 1)
    sim = simulate(schedule, 1.0, 2.0)
    simulated = sim.bubble_fraction
    steps = [tuple(res["timelines"][name][k] for res in per_rank) for k in range(sizes["timed_steps"])]
    measured = statistics.median(bubble_fraction(tl) for tl in steps)
    fwd, bwd = _stage_costs(steps, p)
    predicted = simulate(schedule, fwd, bwd).bubble_fraction
    best = min(range(len(steps)), key=lambda k: abs(bubble_fraction(steps[k]) - measured))
    figures = [_timeline_figure(f"pipeline_timeline_{name}_simulated", sim.timeline, unit="time units",
                                title=f"{schedule.name}, p={schedule.num_ranks}, m={schedule.num_microbatches}: "
                                f"bubble {simulated:.1%}")]
    if name == "1f1b":
        figures.append(_timeline_figure(f"pipeline_timeline_{name}_measured", steps[best], unit="s",
                                        title=f"1F1B measured, p={p}, m={m}: bubble {measured:.1%}"))
    exact = abs(simulated - formula) < 1e-12
    if not exact:
        verdict = Verdict.DOES_NOT_HOLD
    elif abs(measured - formula) <= BUBBLE_TOLERANCE:
        verdict = Verdict.HOLDS
    else:
        verdict = Verdict.HOLDS_UNDER_CONDITIONS
    imbalance = max(f + b for f, b in zip(fwd, bwd, strict=True)) / min(f + b for f, b in zip(fwd, bwd, strict=True))
    notes = (f"simulated with equal stage costs (B = 2F): {simulated:.4f} vs formula {formula:.4f}"
             f"{' (exact)' if exact else ''}; measured on the real run (median of {len(steps)} steps): "
             f"{measured:.4f}; the simulator on the measured stage costs predicts {predicted:.4f}. Measured B/F "
             f"per stage {', '.join(f'{b / f:.2f}' for f, b in zip(fwd, bwd, strict=True))}, slowest/fastest stage "
             f"{imbalance:.2f}x: the formula assumes equal stages and free messages")
    if p > (os.cpu_count() or 1):
        notes += f"; {p} ranks shared {os.cpu_count()} cores, which stretches compute unevenly"
    return SPEC.row(
        None, f"{schedule.name}: bubble fraction", reference="(p-1)/(m+p-1)",
        optimized=f"{OPTIMIZED} + {schedule.name}", device="cpu", world_size=p,
        metrics=[
            Metric(f"bubble, formula (p-1)/(m+p-1), p={p} m={m}", formula, "fraction", claimed="(p-1)/(m+p-1)"),
            Metric("bubble, simulated, equal stage costs", simulated, "fraction", claimed="(p-1)/(m+p-1)"),
            Metric("bubble, measured on the real run", measured, "fraction", claimed="(p-1)/(m+p-1)"),
            Metric("bubble, simulated with the measured stage costs", predicted, "fraction"),
        ],
        claim="pipeline.bubble", verdict=verdict, notes=notes, figures=figures)


def _alive_verdict(measured: float, claimed: int) -> bool:
    """The peak holds the claimed number of micro-batches' saved activations, plus less than one micro-batch's worth
    of messages and temporaries (the live bytes of the step are more than its saved-for-backward bytes)."""
    return claimed <= measured < claimed + 1


def _claimed_alive(name: str, p: int, m: int) -> list[int]:
    """Micro-batches whose activations rank r holds at its peak, by the papers (not by simulating the schedule under
    test): GPipe all m; 1F1B min(p - r, m) (Narayanan et al. 2021, Sec. 2.2.1)."""
    return [m if name == "gpipe" else min(p - r, m) for r in range(p)]


def _in_flight_peak(actions, stage: int) -> int:
    """The most micro-batches forwarded through `stage` and not yet backwarded, counted along the action list."""
    alive = peak = 0
    for a in actions:
        if a.stage == stage:
            alive += 1 if a.kind == "F" else -1
            peak = max(peak, alive)
    return peak


def _order_row(p: int, m: int) -> Result:
    """The schedules as data against what the papers fix about their order, independent of how they are built: on
    every rank and stage the forwards and the backwards each take the micro-batches oldest first (0, 1, ..., m-1;
    a backward never overtakes an older micro-batch, as PipeDream-Flush and GPipe both require); GPipe runs every
    forward before any backward; 1F1B keeps at most min(p - r, m) micro-batches in flight on rank r."""
    parts = []
    in_order = torch.arange(m)
    for name in ("gpipe", "1f1b", "interleaved-1f1b"):
        schedule = _schedule(name, p, m)
        for rank in range(p):
            acts = schedule[rank]
            for stage in schedule.stages_of(rank):
                for kind in ("F", "B"):
                    seq = torch.tensor([a.microbatch for a in acts if a.stage == stage and a.kind == kind])
                    parts.append(bitwise(seq, in_order, name=f"{name} rank {rank} stage {stage} {kind} order"))
            if name == "gpipe":
                kinds = [a.kind for a in acts]
                parts.append(bitwise(torch.tensor(kinds.index("B")), torch.tensor(m),
                                     name=f"gpipe rank {rank}: first backward after all m forwards"))
            if name == "1f1b":
                parts.append(bitwise(torch.tensor(_in_flight_peak(acts, rank)), torch.tensor(min(p - rank, m)),
                                     name=f"1f1b rank {rank}: micro-batches in flight"))
    return SPEC.row(None, f"schedule order, p={p} m={m}", reference="GPipe (arXiv 1811.06965), PipeDream-Flush "
                    "1F1B (arXiv 2104.04473 Sec. 2.2.1): oldest micro-batch first, at most min(p - r, m) in flight",
                    optimized=f"{OPTIMIZED} schedules as data", device="cpu", world_size=p,
                    equivalence=combine("schedule order", parts),
                    notes="every rank's action list: forwards and backwards of each stage in micro-batch order, "
                          "GPipe's phases, 1F1B's in-flight bound; the equivalence rows above cannot see an order "
                          "bug (messages are matched by tag, so the gradients come out the same)")


def _memory_rows(p, sizes, per_rank) -> list[Result]:
    m = sizes["m"]
    alive, holds = {}, {}
    rows = []
    for name in ("gpipe", "1f1b"):
        schedule = _schedule(name, p, m)
        claimed = _claimed_alive(name, p, m)
        measured = [res["memory"][name][0] / res["memory"][name][1] for res in per_rank]
        alive[name] = measured
        metrics = []
        for rank, res in enumerate(per_rank):
            peak, per_mb = res["memory"][name]
            metrics.append(Metric(f"rank {rank}: peak live bytes in one step", peak, "bytes"))
            metrics.append(Metric(f"rank {rank}: saved-for-backward bytes of one micro-batch", per_mb, "bytes"))
            metrics.append(Metric(f"rank {rank}: micro-batches alive at the peak (peak / one)", measured[rank],
                                  "micro-batches", claimed=str(claimed[rank])))
        holds[name] = all(_alive_verdict(a, c) for a, c in zip(measured, claimed, strict=True))
        rows.append(SPEC.row(
            None, f"{schedule.name}: activation memory per stage",
            reference=f"{'m' if name == 'gpipe' else 'min(p - r, m)'} micro-batches alive",
            optimized=f"{OPTIMIZED} + {schedule.name}", device="cpu", world_size=p, memory=metrics,
            claim="pipeline.memory", verdict=Verdict.HOLDS if holds[name] else Verdict.DOES_NOT_HOLD,
            notes=f"p={p}, m={m}; claimed micro-batches alive per rank {list(claimed)}, measured "
                  f"{', '.join(f'{a:.2f}' for a in measured)}; holds when claimed <= measured < claimed + 1 (the "
                  "live bytes of a step also hold its messages and the temporaries of one backward)"))
    ratio = [g / o for g, o in zip(alive["gpipe"], alive["1f1b"], strict=True)]
    rows.append(SPEC.row(
        None, "GPipe vs 1F1B: activation memory ratio", reference="m / p on rank 0",
        optimized=f"{OPTIMIZED}: gpipe vs 1f1b", device="cpu", world_size=p,
        memory=[Metric(f"rank {r}: GPipe / 1F1B peak live bytes", x, "x",
                       claimed=f"{m / min(p - r, m):.2f}") for r, x in enumerate(ratio)],
        claim="pipeline.memory",
        verdict=Verdict.HOLDS if holds["gpipe"] and holds["1f1b"] else Verdict.DOES_NOT_HOLD,
        notes=f"claimed m vs p micro-batches = {m}/{p} = {m / p:.2f}x on rank 0 (rank r: m / (p - r)); the bytes "
              "ratio comes out below it by the step's fixed overhead (messages, one backward's temporaries), "
              "which both schedules pay"))
    return rows


def _adam_row(p, sizes, per_rank) -> Result:
    """Whole runs in float64: the pipelined run's losses and every final parameter within 10x the single-process
    run's own whole-run spread (the run repeated from initial weights nudged by one ulp)."""
    steps = sizes["adam_steps"]
    batches = _batches(sizes, 2, seed=2)
    with one_thread():
        ref = reference_run(lambda: GPT(GPTConfig(**sizes["config"])), [batches[s % 2] for s in range(steps)],
                            lr=LR, weight_decay=WD)
    pipe = {n: q for res in per_rank for n, q in res["adam"][1].items()}
    pipe["loss"] = torch.stack(per_rank[-1]["adam"][0]).double()
    parts = [within_spread(pipe, {n: ref.final[n] for n in pipe}, ref.run_spread, name="losses and parameters"),
             bitwise(torch.tensor(len(pipe)), torch.tensor(len(ref.final)), name="parameters held by some rank")]
    return SPEC.row(None, f"1f1b: {steps} AdamW steps",
                    reference="reference.training.train_step in float64 (conformance.checks._reference_runs)",
                    optimized=f"{OPTIMIZED} + 1f1b", device="cpu", world_size=p,
                    equivalence=combine("AdamW run vs one process", parts),
                    notes=f"float64 on both sides: the losses and every parameter after the run within 10x the "
                          f"reference's whole-run rounding spread {ref.run_spread.value:.2g} + 1 ulp (the tied "
                          "weight's two gradient halves are added in another order, which AdamW carries on)")


def run(ctx: Context) -> list[Result]:
    p = ctx.world_size if under_torchrun() else max(ctx.world_size, 2)
    if p < 2:
        return [SPEC.row(ctx, "pipeline rows", world_size=p, notes="a pipeline needs two ranks; torchrun started one")]
    sizes = _sizes(p, ctx.quick)
    names = ("gpipe", "1f1b", "interleaved-1f1b")
    llama_names = _llama_names(ctx.quick)
    per_rank = spawn(_worker, p, sizes, names, llama_names, backend="gloo", device="cpu", timeout=ctx.timeout)
    rows = []
    for family, family_names in (("gpt2", names), ("llama", llama_names)):
        with one_thread():
            ref, spread = step_reference(lambda family=family: GPT(_config(sizes, family)),
                                         _batches(sizes, 1, seed=1)[0])
        rows += [_equivalence_row(ctx, name, p, sizes, per_rank, ref, spread, family) for name in family_names]
    if sizes["adam_steps"]:
        rows.append(_adam_row(p, sizes, per_rank))
    rows.append(_order_row(p, sizes["m"]))
    rows += [_bubble_row(ctx, name, p, sizes, per_rank) for name in ("gpipe", "1f1b")]
    rows += _memory_rows(p, sizes, per_rank)
    if ctx.world_size < 2:
        for row in rows:
            row.notes += f"; run on p={p} ranks (a pipeline needs two; world_size={ctx.world_size} was asked)"
    return rows

