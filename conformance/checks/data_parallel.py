"""Check `data_parallel`: optimized.data_parallel against one process on the concatenated batch
(reference.training) and against torch DDP, on ctx.world_size ranks.

The claim is algorithmic (N ranks compute what one process computes), so the ranks and the reference run in float64
(conformance.checks._reference_runs.reference_run): what remains between them is the rounding of another summation
order, ~1e-15 on any CPU, thread count or world size, and the bound is the reference's own rounding spread measured
beside it (conformance.tolerance.within_spread), never a constant. Every step is compared from the same state: before
each step of the reference's AdamW run, the ranks load its parameters (teacher-forced, within the per-step spread:
the reference's loss and gradients recomputed with the batch in two micro-batches or from a state nudged by one ulp).
A whole run with DataParallel's own AdamW is held to the reference's run within the whole-run spread (the reference
repeated from initial weights nudged by one ulp).

Rows
1. Bucketed DataParallel vs one process: the loss and every gradient at every AdamW step, the losses and every final
   parameter of a whole run with its own optimizer, all ranks bitwise in sync at the end (claim
   data_parallel.equivalence); and the bytes each rank all-reduces in an fp32 step against the ring formula
   2 (N-1)/N * 4Ψ bytes (Ψ parameters in fp32).
2. The claim's condition: with uneven padding the ranks score different numbers of tokens, and the mean of the
   ranks' mean losses is not the token mean of the batch. The gap is measured (and is far outside the spread);
   weighting each rank's summed loss by N / (scored tokens of the whole batch) restores equality.
3. vs torch DDP (float64 too, gloo): the loss and every gradient at every step within the per-step spread; the
   naive version (one blocking all-reduce per parameter) against one process the same way; and the fp32 step time
   of DataParallel and of the naive version as ratios to DDP, timed in the same run.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist
from torch import nn

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import ReferenceRun, load_parameters, one_thread, reference_run
from conformance.claims import Verdict, equivalence_verdict
from conformance.launch import spawn
from conformance.measure import CollectiveCounter, time_fn
from conformance.result import Metric, Result
from conformance.tolerance import bitwise, combine, step_by_step, within_spread
from optimized.data_parallel import DataParallel, NaiveDataParallel
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig

SPEC = CheckSpec(
    name="data_parallel", technique="data parallel", reference="reference.training.train_step",
    optimized="optimized.data_parallel.DataParallel", order=90,
    peers=("torch.nn.parallel.DistributedDataParallel",), claims=("data_parallel.equivalence",),
)
LR, WD = 1e-2, 0.1


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(config=dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32), rows=4, seq=16,
                    steps=3, warmup=1, reps=3)
    return dict(config=dict(vocab_size=128, block_size=64, n_layer=4, n_head=8, n_embd=128), rows=4, seq=64,
                steps=10, warmup=2, reps=10)


def _batches(sizes: dict, world_size: int, vary_length: bool) -> list:
    return make_batches(sizes["steps"], batch_size=sizes["rows"] * world_size, seq_len=sizes["seq"],
                        vocab_size=sizes["config"]["vocab_size"], seed=3, vary_length=vary_length)


def _reference(sizes: dict, world_size: int, vary_length: bool) -> ReferenceRun:
    """One process, the whole batch, AdamW in float64: the state before each step, its loss and gradients, and the
    reference's own rounding spread."""
    with one_thread():
        return reference_run(lambda: GPT(GPTConfig(**sizes["config"])), _batches(sizes, world_size, vary_length),
                             lr=LR, weight_decay=WD)


# --- one rank --------------------------------------------------------------------------------------------------------


def _wrap(kind: str, model: nn.Module, device: torch.device) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return NaiveDataParallel(model) if kind == "naive" else DataParallel(model)


def _local_batches(sizes: dict, vary_length: bool, device: torch.device) -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    return [(idx.chunk(world)[rank].to(device), targets.chunk(world)[rank].to(device))
            for idx, targets in _batches(sizes, world, vary_length)]


def _model(sizes: dict, device: torch.device) -> nn.Module:
    """The tiny GPT in float64, as the reference runs it."""
    return GPT(GPTConfig(**sizes["config"])).to(device, torch.float64)


def _per_step(kind: str, sizes: dict, device: torch.device, states: list[dict], *, vary_length: bool = False,
              token_weighted: bool = False) -> dict:
    """Each step from the reference's state: the loss (mean over ranks) and every gradient, in float64."""
    world = dist.get_world_size()
    model = _model(sizes, device)
    wrapped = _wrap(kind, model, device)
    out: dict = {"loss": [], "grads": []}
    for step, (idx, targets) in enumerate(_local_batches(sizes, vary_length, device)):
        load_parameters(model, states[step])
        model.zero_grad(set_to_none=True)
        if token_weighted:
            # Weight every token by 1 / (scored tokens of the whole batch); DataParallel's mean over N ranks
            # then gives exactly the single-process gradient.
            n_global = (targets != IGNORE_INDEX).sum()
            dist.all_reduce(n_global)
            _, loss_sum = wrapped(idx, targets, reduction="sum")
            loss = loss_sum * world / n_global.clamp(min=1)
        else:
            _, loss = wrapped(idx, targets)
        loss.backward()
        if kind == "naive":
            wrapped.sync_gradients()  # one blocking all-reduce per parameter, after backward
        total = loss.detach() / world
        dist.all_reduce(total)
        out["loss"].append(float(total))
        out["grads"].append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
                            if dist.get_rank() == 0 else None)
    return out


def _trajectory(sizes: dict, device: torch.device) -> dict:
    """A whole run with DataParallel and its own AdamW, in float64: the final parameters and the losses (mean over
    ranks) as tensor "loss"."""
    world = dist.get_world_size()
    model = _model(sizes, device)
    wrapped = DataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for idx, targets in _local_batches(sizes, False, device):
        opt.zero_grad(set_to_none=True)
        _, loss = wrapped(idx, targets)
        loss.backward()
        opt.step()
        total = loss.detach() / world
        dist.all_reduce(total)
        losses.append(float(total))
    final = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    final["loss"] = torch.tensor(losses, dtype=torch.float64)
    return final


def _step_times(sizes: dict, device: torch.device) -> dict:
    """Median seconds per optimizer step of each implementation on the same data (fp32, the dtype of training), the
    three interleaved rep by rep so that a change in the machine's load hits all of them alike; and the all-reduces
    of DataParallel's first (warm-up) step: ring bytes sent and count."""
    rank, world = dist.get_rank(), dist.get_world_size()
    idx, targets = _batches(sizes, world, False)[0]
    idx, targets = idx.chunk(world)[rank].to(device), targets.chunk(world)[rank].to(device)
    steps = {}
    for kind in ("ddp", "bucketed", "naive"):
        model = GPT(GPTConfig(**sizes["config"])).to(device)
        wrapped = _wrap(kind, model, device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

        def step(wrapped=wrapped, opt=opt, kind=kind) -> None:
            opt.zero_grad(set_to_none=True)
            wrapped(idx, targets)[1].backward()
            if kind == "naive":
                wrapped.sync_gradients()
            opt.step()

        with CollectiveCounter() as counter:
            step()
        if kind == "bucketed":
            comm = {"ring_bytes": counter.ring_bytes_sent("all_reduce"), "all_reduces": counter.count("all_reduce")}
        time_fn(step, warmup=sizes["warmup"], reps=1, device=device)
        steps[kind] = step
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(sizes["reps"]):
        for kind, step in steps.items():
            times[kind].append(time_fn(step, warmup=0, reps=1, device=device).median_s)
    return {**{kind: statistics.median(ts) for kind, ts in times.items()}, **comm}


def _worker(quick: bool, device_type: str, reference_states: tuple[list[dict], list[dict]]) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    sizes = _sizes(quick)
    states, uneven_states = reference_states
    return {
        "bucketed": _per_step("bucketed", sizes, device, states),
        "ddp": _per_step("ddp", sizes, device, states),
        "naive": _per_step("naive", sizes, device, states),
        "trajectory": _trajectory(sizes, device),
        "uneven_mean": _per_step("bucketed", sizes, device, uneven_states, vary_length=True),
        "uneven_token_weighted": _per_step("bucketed", sizes, device, uneven_states, vary_length=True,
                                           token_weighted=True),
        "times": _step_times(sizes, device),
        "rank": dist.get_rank(),
    }


# --- comparison ------------------------------------------------------------------------------------------------------


def _first_step_gap(run: dict, ref: ReferenceRun) -> tuple[float, float]:
    """At the first step (same parameters in both runs): |loss gap| / loss, and the largest gradient gap over the
    largest gradient entry."""
    loss_gap = abs(run["loss"][0] - ref.losses[0]) / abs(ref.losses[0])
    grad_gap = max(float((run["grads"][0][n] - g).abs().max()) for n, g in ref.grads[0].items())
    return loss_gap, grad_gap / max(float(g.abs().max()) for g in ref.grads[0].values())


def _per_step_vs(run: dict, ref: ReferenceRun, name: str) -> list:
    return step_by_step(run["loss"], run["grads"], ref.losses, ref.grads, name=name, spread=ref.step_spread)


def run(ctx: Context) -> list[Result]:
    ws = ctx.world_size
    sizes = _sizes(ctx.quick)
    ref = _reference(sizes, ws, False)
    uneven = _reference(sizes, ws, True)
    per_rank = spawn(_worker, ws, ctx.quick, ctx.device.type, (ref.states, uneven.states),
                     device=ctx.device.type, timeout=ctx.timeout)
    first = per_rank[0]
    n_params = GPT(GPTConfig(**sizes["config"])).num_parameters()
    steps = sizes["steps"]
    times = first["times"]
    common = dict(world_size=ws)
    rows = []

    # 1. vs one process, and the bytes on the wire.
    in_sync = [bitwise(r["trajectory"][n], p, name=f"rank {r['rank']} {n}")
               for r in per_rank[1:] for n, p in first["trajectory"].items()]
    eq = combine(f"DataParallel on {ws} ranks vs one process",
                 _per_step_vs(first["bucketed"], ref, "per step")
                 + [within_spread(first["trajectory"], ref.final, ref.run_spread, name="own AdamW run")]
                 + in_sync)
    formula = 2 * (ws - 1) / ws * 4 * n_params
    rows.append(SPEC.row(
        ctx, f"bucketed all-reduce vs one process, {ws} ranks", equivalence=eq,
        metrics=[Metric("all-reduce bytes sent per rank per step (ring, fp32)", times["ring_bytes"], "bytes",
                        claimed=f"2(N-1)/N x 4Ψ = {formula:.0f} (Ψ = {n_params})"),
                 Metric("all-reduces per step (buckets, fp32)", times["all_reduces"], "count")],
        claim="data_parallel.equivalence", verdict=equivalence_verdict(eq.passed, world_size=ws),
        notes=f"{steps} AdamW steps in float64 on both sides, each rank {sizes['rows']} of the {sizes['rows'] * ws} "
              f"rows, equal scored tokens per rank; each step from the reference's state: loss and every gradient "
              f"within 10x the reference's per-step rounding spread {ref.step_spread.value:.2g} + 1 ulp; a whole "
              f"run with DataParallel's own AdamW: the losses and every final parameter within 10x the reference's "
              f"whole-run spread {ref.run_spread.value:.2g} + 1 ulp; every rank's parameters bitwise equal at the "
              f"end; bytes counted in an fp32 step",
        **common,
    ))

    # 2. uneven padding: the condition of the claim.
    loss_gap, grad_gap = _first_step_gap(first["uneven_mean"], uneven)
    eq = combine("token-weighted DataParallel vs one process, uneven padding",
                 _per_step_vs(first["uneven_token_weighted"], uneven, "token-weighted"))
    means = combine("mean of rank means vs one process", _per_step_vs(first["uneven_mean"], uneven, "mean"))
    rank_means_equal = means.passed
    verdict = equivalence_verdict(eq.passed, world_size=ws)
    if verdict is Verdict.HOLDS and not rank_means_equal:
        verdict = Verdict.HOLDS_UNDER_CONDITIONS
    rows.append(SPEC.row(
        ctx, f"uneven tokens per rank, {ws} ranks", reference="reference.training.train_step (token mean)",
        optimized="DataParallel with each rank's loss sum x N / (scored tokens of the whole batch)", equivalence=eq,
        metrics=[Metric("first step: relative loss gap, mean of rank means vs token mean", loss_gap, "fraction"),
                 Metric("first step: largest gradient gap / largest gradient entry", grad_gap, "fraction")],
        claim="data_parallel.equivalence", verdict=verdict,
        notes="variable-length sequences: ranks score different numbers of tokens, so averaging the ranks' mean "
              f"losses weights tokens unequally (the gaps above; {means.max_error:.2g} vs the spread bound "
              f"{means.bound:.2g}: {'within' if means.passed else 'outside'} it); the token-weighted loss (one "
              "extra all-reduce of the token count) equals the single-process step, float64 on both sides, each "
              "step within 10x the reference's per-step rounding spread"
              + ("" if ws > 1 else "; one rank: no gap possible"),
        **common,
    ))

    # 3. vs torch DDP, and the step time.
    ddp = first["ddp"]
    eq = combine("DataParallel vs DDP, NaiveDataParallel vs one process",
                 step_by_step(first["bucketed"]["loss"], first["bucketed"]["grads"], ddp["loss"], ddp["grads"],
                              name="DataParallel vs DDP", spread=ref.step_spread)
                 + _per_step_vs(first["naive"], ref, "NaiveDataParallel"))
    off_gpu = ctx.device.type != "cuda"
    rows.append(SPEC.row(
        ctx, f"vs torch DDP, {ws} ranks", reference="torch.nn.parallel.DistributedDataParallel",
        optimized="optimized.data_parallel.DataParallel / NaiveDataParallel",
        peer="torch.nn.parallel.DistributedDataParallel", equivalence=eq,
        speed=[Metric("step time DataParallel / DDP", times["bucketed"] / times["ddp"], "x"),
               Metric("step time NaiveDataParallel / DDP", times["naive"] / times["ddp"], "x"),
               Metric("DDP step time (median)", times["ddp"], "s")],
        notes=f"float64 on both sides, each from the reference's state: the loss and every gradient at every step "
              f"of DataParallel vs DDP, and of NaiveDataParallel vs one process, within 10x the reference's "
              f"per-step rounding spread {ref.step_spread.value:.2g} + 1 ulp; timed in "
              f"fp32, step = zero_grad, forward, backward, AdamW; median of {sizes['reps']} after "
              f"{sizes['warmup']} warm-up, rank 0"
              + ("; gloo on CPU, not the NCCL/GPU setting DDP is tuned for" if off_gpu else ""),
        **common,
    ))
    return rows
