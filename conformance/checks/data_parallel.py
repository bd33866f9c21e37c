"""Check `data_parallel`: optimized.data_parallel against one process on the concatenated batch
(reference.training) and against torch DDP, on ctx.world_size ranks.

Every step is compared from the same state: before each step of the reference's AdamW run, the ranks load its
parameters. (fp32 trajectories cannot be held tighter than their own chaos: the ranks sum in another order, and
Adam's first steps turn gradient entries that are rounding noise into steps of ~lr.) The whole trajectory, with
DataParallel's own AdamW, is compared by its losses.

Rows
1. Bucketed DataParallel vs one process: the loss and every gradient at every AdamW step, the losses of a whole
   run with its own optimizer, all ranks bitwise in sync at the end (claim data_parallel.equivalence); and the bytes
   each rank all-reduces per step against the ring formula 2 (N-1)/N * 4Ψ bytes (Ψ parameters in fp32).
2. The claim's condition: with uneven padding the ranks score different numbers of tokens, and the mean of the
   ranks' mean losses is not the token mean of the batch. The gap is measured; weighting each rank's summed loss by
   N / (scored tokens of the whole batch) restores equality.
3. vs torch DDP: gradients at every step within torch.testing's fp32 defaults, and the step time of DataParallel
   and of the naive version (one blocking all-reduce per parameter) as ratios to DDP, timed in the same run.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist
from torch import nn

from conformance.checks import CheckSpec, Context
from conformance.claims import Verdict, equivalence_verdict
from conformance.launch import spawn
from conformance.measure import CollectiveCounter, time_fn
from conformance.result import Metric, Result
from conformance.tolerance import TRAJECTORY_RTOL, allclose, bitwise, combine, series_close, step_by_step
from optimized.data_parallel import DataParallel, NaiveDataParallel
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig
from reference.training import train_step

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


def _reference(sizes: dict, world_size: int, vary_length: bool) -> tuple[list[dict], list[float], list[dict]]:
    """One process, the whole batch, AdamW: the state before each step, its loss and its gradients."""
    model = GPT(GPTConfig(**sizes["config"]))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    states, losses, grads = [], [], []
    for batch in _batches(sizes, world_size, vary_length):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        loss, _ = train_step(model, opt, batch)
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return states, losses, grads



# --- one rank --------------------------------------------------------------------------------------------------------


def _wrap(kind: str, model: nn.Module, device: torch.device) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return NaiveDataParallel(model) if kind == "naive" else DataParallel(model)


def _local_batches(sizes: dict, vary_length: bool, device: torch.device) -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    return [(idx.chunk(world)[rank].to(device), targets.chunk(world)[rank].to(device))
            for idx, targets in _batches(sizes, world, vary_length)]


def _per_step(kind: str, sizes: dict, device: torch.device, states: list[dict], *, vary_length: bool = False,
              token_weighted: bool = False) -> dict:
    """Each step from the reference's state: the loss (mean over ranks) and every gradient."""
    world = dist.get_world_size()
    model = GPT(GPTConfig(**sizes["config"])).to(device)
    wrapped = _wrap(kind, model, device)
    out: dict = {"loss": [], "grads": []}
    for step, (idx, targets) in enumerate(_local_batches(sizes, vary_length, device)):
        model.load_state_dict(states[step])
        model.zero_grad(set_to_none=True)
        with CollectiveCounter() as counter:
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
        if step == 0:
            out["ring_bytes"] = counter.ring_bytes_sent("all_reduce")
            out["all_reduces"] = counter.count("all_reduce")
        total = loss.detach() / world
        dist.all_reduce(total)
        out["loss"].append(float(total))
        out["grads"].append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
                            if dist.get_rank() == 0 else None)
    return out


def _trajectory(sizes: dict, device: torch.device) -> dict:
    """A whole run with DataParallel and its own AdamW: the losses (mean over ranks), the final parameters."""
    world = dist.get_world_size()
    model = GPT(GPTConfig(**sizes["config"])).to(device)
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
    return {"loss": losses, "final": {n: p.detach().cpu().clone() for n, p in model.named_parameters()}}


def _step_times(sizes: dict, device: torch.device) -> dict[str, float]:
    """Median seconds per optimizer step of each implementation on the same data, the three interleaved rep by rep
    so that a change in the machine's load hits all of them alike."""
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

        time_fn(step, warmup=sizes["warmup"], reps=1, device=device)
        steps[kind] = step
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(sizes["reps"]):
        for kind, step in steps.items():
            times[kind].append(time_fn(step, warmup=0, reps=1, device=device).median_s)
    return {kind: statistics.median(ts) for kind, ts in times.items()}


def _worker(quick: bool, device_type: str, reference_states: tuple[list[dict], list[dict]]) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    sizes = _sizes(quick)
    states, uneven_states = reference_states
    return {
        "bucketed": _per_step("bucketed", sizes, device, states),
        "ddp": _per_step("ddp", sizes, device, states),
        "trajectory": _trajectory(sizes, device),
        "uneven_mean": _per_step("bucketed", sizes, device, uneven_states, vary_length=True),
        "uneven_token_weighted": _per_step("bucketed", sizes, device, uneven_states, vary_length=True,
                                           token_weighted=True),
        "times": _step_times(sizes, device),
        "rank": dist.get_rank(),
    }


# --- comparison ------------------------------------------------------------------------------------------------------




def _first_step_gap(run: dict, ref_losses: list[float], ref_grads: list[dict]) -> tuple[float, float]:
    """At the first step (same parameters in both runs): |loss gap| / loss, and the largest gradient gap over the
    largest gradient entry."""
    loss_gap = abs(run["loss"][0] - ref_losses[0]) / abs(ref_losses[0])
    ref = ref_grads[0]
    grad_gap = max(float((run["grads"][0][n] - g).abs().max()) for n, g in ref.items())
    return loss_gap, grad_gap / max(float(g.abs().max()) for g in ref.values())


def run(ctx: Context) -> list[Result]:
    ws = ctx.world_size
    sizes = _sizes(ctx.quick)
    states, ref_losses, ref_grads = _reference(sizes, ws, False)
    uneven_states, uneven_losses, uneven_grads = _reference(sizes, ws, True)
    per_rank = spawn(_worker, ws, ctx.quick, ctx.device.type, (states, uneven_states),
                     device=ctx.device.type, timeout=ctx.timeout)
    first = per_rank[0]
    n_params = GPT(GPTConfig(**sizes["config"])).num_parameters()
    steps = sizes["steps"]
    common = dict(world_size=ws)
    rows = []

    # 1. vs one process, and the bytes on the wire.
    in_sync = [bitwise(r["trajectory"]["final"][n], p, name=f"rank {r['rank']} {n}")
               for r in per_rank[1:] for n, p in first["trajectory"]["final"].items()]
    bucketed = first["bucketed"]
    eq = combine(f"DataParallel on {ws} ranks vs one process",
                 step_by_step(bucketed["loss"], bucketed["grads"], ref_losses, ref_grads, name="per step")
                 + series_close(first["trajectory"]["loss"], ref_losses, name="own AdamW loss", rtol=TRAJECTORY_RTOL)
                 + in_sync)
    formula = 2 * (ws - 1) / ws * 4 * n_params
    rows.append(SPEC.row(
        ctx, f"bucketed all-reduce vs one process, {ws} ranks", equivalence=eq,
        metrics=[Metric("all-reduce bytes sent per rank per step (ring)", first["bucketed"]["ring_bytes"], "bytes",
                       claimed=f"2(N-1)/N x 4Ψ = {formula:.0f} (Ψ = {n_params})"),
                 Metric("all-reduces per step (buckets)", first["bucketed"]["all_reduces"], "count")],
        claim="data_parallel.equivalence", verdict=equivalence_verdict(eq.passed, world_size=ws),
        notes=f"{steps} AdamW steps, each rank {sizes['rows']} of the {sizes['rows'] * ws} rows, equal scored tokens "
              f"per rank; each step from the reference's state: loss and every gradient (rtol 1e-5, atol 1e-5 x "
              f"the step's largest gradient); a whole run with DataParallel's own AdamW: the losses (rtol 1e-4), "
              f"and every rank's parameters bitwise equal at the end",
        **common,
    ))

    # 2. uneven padding: the condition of the claim.
    loss_gap, grad_gap = _first_step_gap(first["uneven_mean"], uneven_losses, uneven_grads)
    weighted, means = first["uneven_token_weighted"], first["uneven_mean"]
    eq = combine("token-weighted DataParallel vs one process, uneven padding",
                 step_by_step(weighted["loss"], weighted["grads"], uneven_losses, uneven_grads, name="token-weighted"))
    rank_means_equal = all(p.passed for p in step_by_step(means["loss"], means["grads"], uneven_losses, uneven_grads,
                                                          name="mean"))
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
              "losses weights tokens unequally (the gaps above); the token-weighted loss (one extra all-reduce of "
              "the token count) equals the single-process step" + ("" if ws > 1 else "; one rank: no gap possible"),
        **common,
    ))

    # 3. vs torch DDP, and the step time.
    eq = combine("DataParallel vs DDP", [
        allclose(first["bucketed"]["grads"][s][n], g, name=f"{n} step {s}")
        for s in range(steps) for n, g in first["ddp"]["grads"][s].items()
    ])
    times = first["times"]
    off_gpu = ctx.device.type != "cuda"
    rows.append(SPEC.row(
        ctx, f"vs torch DDP, {ws} ranks", reference="torch.nn.parallel.DistributedDataParallel",
        optimized="optimized.data_parallel.DataParallel / NaiveDataParallel",
        peer="torch.nn.parallel.DistributedDataParallel", equivalence=eq,
        speed=[Metric("step time DataParallel / DDP", times["bucketed"] / times["ddp"], "x"),
               Metric("step time NaiveDataParallel / DDP", times["naive"] / times["ddp"], "x"),
               Metric("DDP step time (median)", times["ddp"], "s")],
        notes=f"gradients at every step within torch.testing's fp32 defaults; step = zero_grad, forward, backward, "
              f"AdamW; median of {sizes['reps']} after {sizes['warmup']} warm-up, rank 0"
              + ("; gloo on CPU, not the NCCL/GPU setting DDP is tuned for" if off_gpu else ""),
        **common,
    ))
    return rows
