"""Check `training`: the baseline every parallel technique is held to.

1. The fp32 reference loop is reproducible: two runs from the same seed are bitwise equal.
2. N ranks that each take a slice of every batch, weight their token losses by the WHOLE batch's token count and
   all-reduce (sum) the gradients by hand, reproduce the single-process run: the simplest data parallelism,
   written out so that every optimized parallel technique has a baseline to be compared with. The claim is
   algorithmic, so both sides train in float64 and the bound is the reference's own rounding spread (the run
   repeated with its initial weights nudged by one ulp: conformance.tolerance.within_spread), the same on any CPU,
   thread count or world size; a bug (a missing weight, a rank's slice counted twice) is ~1e6 times further out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import one_thread
from conformance.claims import equivalence_verdict
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import NUDGE_SEEDS, bitwise, combine, nudge_, rounding_spread, within_spread
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig
from reference.training import train

SPEC = CheckSpec(
    name="training", technique="fp32 training", reference="reference.training.train",
    optimized="reference.training.train (second run)", order=10, claims=("data_parallel.equivalence",),
)
CONFIG = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, seed=0)


def _setup(world_size: int, quick: bool):
    steps = 3 if quick else 10
    batches = make_batches(
        steps, batch_size=4 * world_size, seq_len=32, vocab_size=32, seed=1, task="copy", vary_length=True
    )
    return steps, batches


def _state(model: torch.nn.Module, losses: list[float]) -> dict[str, torch.Tensor]:
    """Every parameter after the run, and the per-step losses as one more tensor ("loss")."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["loss"] = torch.tensor(losses, dtype=torch.float64)
    return state


def _reference_run(world_size: int, quick: bool, device: torch.device, dtype: torch.dtype = torch.float32,
                   nudge_seed: int | None = None) -> dict[str, torch.Tensor]:
    steps, batches = _setup(world_size, quick)
    batches = [(i.to(device), t.to(device)) for i, t in batches]
    model = GPT(GPTConfig(**CONFIG)).to(device, dtype)
    if nudge_seed is not None:
        nudge_(model.parameters(), seed=nudge_seed)
    history = train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches, steps=steps, max_grad_norm=1.0)
    return _state(model, history.loss)


def _by_hand_data_parallel(world_size: int, quick: bool, device: str) -> dict[str, torch.Tensor]:
    """One rank, in float64: its slice of each batch, token-weighted by the whole batch, gradients summed by
    all-reduce."""
    rank = dist.get_rank()
    steps, batches = _setup(world_size, quick)
    model = GPT(GPTConfig(**CONFIG)).to(device, torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        idx, targets = batches[step]
        n_tokens = max(int((targets != IGNORE_INDEX).sum()), 1)  # of the whole batch, known to every rank
        idx, targets = idx.chunk(world_size)[rank].to(device), targets.chunk(world_size)[rank].to(device)
        opt.zero_grad(set_to_none=True)
        _, loss_sum = model(idx, targets, reduction="sum")
        (loss_sum / n_tokens).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        total = loss_sum.detach() / n_tokens
        dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(total))
    return _state(model, losses)


def run(ctx: Context) -> list[Result]:
    ws = ctx.world_size
    cpu = torch.device("cpu")
    state_a = _reference_run(ws, ctx.quick, cpu)
    state_b = _reference_run(ws, ctx.quick, cpu)
    repro = combine("two reference runs", [bitwise(state_a[k], state_b[k], name=k) for k in state_a])
    steps = len(state_a["loss"])
    rows = [
        SPEC.row(
            None,
            "reference loop is reproducible",
            equivalence=repro,
            notes=f"{steps} AdamW steps, clipping 1.0, uneven padding; bitwise over the losses and every parameter",
        )
    ]
    per_rank = spawn(_by_hand_data_parallel, ws, ws, ctx.quick, ctx.device.type, device=ctx.device.type,
                     timeout=ctx.timeout)
    state = per_rank[0]
    with one_thread():
        ref = _reference_run(ws, ctx.quick, ctx.device, torch.float64)
        variants = [_reference_run(ws, ctx.quick, ctx.device, torch.float64, seed) for seed in NUDGE_SEEDS]
    spread = rounding_spread(ref, variants, origin=f"AdamW x{steps}, float64, initial weights nudged by one ulp, "
                             f"{len(NUDGE_SEEDS)} seeds")
    parts = [within_spread(state, ref, spread, name=f"{ws} ranks vs one process")]
    parts += [bitwise(s[k], state[k], name=f"rank {r} {k}") for r, s in enumerate(per_rank) for k in state]
    equivalence = combine(f"{ws} ranks vs one process", parts)
    rows.append(
        SPEC.row(
            ctx,
            f"{ws} ranks, gradients all-reduced by hand",
            technique="data parallel (by hand)",
            optimized="slice per rank + all_reduce(SUM) of token-weighted gradients",
            world_size=ws,
            equivalence=equivalence,
            claim="data_parallel.equivalence",
            verdict=equivalence_verdict(equivalence.passed, world_size=ws),
            notes="float64 on both sides: the losses and every parameter after the run within 10x the reference's "
            "own rounding spread; all ranks bitwise equal to each other",
        )
    )
    return rows
