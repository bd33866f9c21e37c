"""The single-process AdamW run that the parallel checks (data_parallel, tensor_parallel) are held to, in float64,
with its own rounding spread measured beside it.

The claim those checks test is algorithmic (N ranks compute what one process computes), so the reference and the
ranks run in float64: what remains between them is the rounding of another reduction order, ~1e-15 on any CPU or GPU,
and a real bug stands ~1e6 times further out. How far "another reduction order" may move a result is measured here,
not assumed (conformance.tolerance.within_spread):

- per step (teacher-forced: the ranks start each step from the reference's parameters, so errors cannot compound):
  the loss and gradients at each reference state recomputed with the batch split into micro-batches (another order
  of the batch sum, as data parallelism sums it) and from the state nudged by one ulp (the rounding of every
  product that follows);
- for the whole run (the ranks' own AdamW): the run repeated from initial weights nudged by one ulp.

For techniques checked on one forward and backward (pipeline, context parallelism), `step_reference` and
`input_spread` give the same yardstick for a single step: the float64 result and its spread under another batch order
or a one-ulp nudge of the weights or inputs.

Everything here is the reference's own code (reference.training) and torch.optim; nothing of optimized/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from conformance.tolerance import NUDGE_SEEDS, Spread, nudge_, rounding_spread
from reference.training import Batch, accumulate_gradients, split_batch, train_step


@dataclass(frozen=True)
class ReferenceRun:
    """What one process computes on the whole batches, and how far its own rounding moves it."""

    states: list[dict[str, torch.Tensor]]
    """The parameters before each step (the teacher-forced ranks load them)."""
    losses: list[float]
    """Each step's token-mean loss."""
    grads: list[dict[str, torch.Tensor]]
    """Each step's gradients, before the update."""
    final: dict[str, torch.Tensor]
    """The parameters after the last step, and the per-step losses as tensor "loss"."""
    step_spread: Spread
    """Per-step yardstick: the losses and gradients, recomputed in another batch order and from nudged states."""
    run_spread: Spread
    """Whole-run yardstick: the final parameters and losses of the run from nudged initial weights."""


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load_parameters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (parameter name -> tensor) into the model's parameters, in place (buffers and tied names aside)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


def _step_quantities(model: nn.Module, micro_batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """The loss (tensor "loss") and every gradient at the model's current parameters, without an update."""
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, micro_batches)
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    out["loss"] = loss.detach().reshape(1).to(torch.float64)
    model.zero_grad(set_to_none=True)
    return out


def _train(model: nn.Module, batches: Sequence[Batch], lr: float, weight_decay: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    states, losses, grads = [], [], []
    for batch in batches:
        states.append(_params(model))
        loss, _ = train_step(model, opt, batch)
        losses.append(loss)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    final = _params(model)
    final["loss"] = torch.tensor(losses, dtype=torch.float64)
    return states, losses, grads, final


def reference_run(make_model: Callable[[], nn.Module], batches: Sequence[Batch], *, lr: float, weight_decay: float,
                  micro_batches: int = 2) -> ReferenceRun:
    """AdamW on the whole batches in float64, one process, and the two spreads (see the module docstring).
    `micro_batches`: how many parts the batch sum is split into for the per-step spread (must divide the rows)."""
    model = make_model().to(torch.float64)
    states, losses, grads, final = _train(model, batches, lr, weight_decay)

    probe = make_model().to(torch.float64)
    step_ref, step_variants = {}, [{} for _ in range(1 + len(NUDGE_SEEDS))]
    for step, (state, batch) in enumerate(zip(states, batches, strict=True)):
        load_parameters(probe, state)
        whole = _step_quantities(probe, [batch])
        step_ref.update({f"step {step} {k}": v for k, v in whole.items()})
        split = _step_quantities(probe, split_batch(batch, micro_batches))
        step_variants[0].update({f"step {step} {k}": v for k, v in split.items()})
        for variant, seed in zip(step_variants[1:], NUDGE_SEEDS, strict=True):
            load_parameters(probe, state)
            nudge_(probe.parameters(), seed=seed + step)
            variant.update({f"step {step} {k}": v for k, v in _step_quantities(probe, [batch]).items()})
    step_spread = rounding_spread(step_ref, step_variants, origin=f"float64 loss and gradients at each reference "
                                  f"state, batch in {micro_batches} micro-batches or state nudged by one ulp")

    runs = []
    for seed in NUDGE_SEEDS:
        nudged = make_model().to(torch.float64)
        nudge_(nudged.parameters(), seed=seed)
        runs.append(_train(nudged, batches, lr, weight_decay)[3])
    run_spread = rounding_spread(final, runs, origin=f"AdamW x{len(batches)} in float64 from initial weights nudged "
                                 f"by one ulp, {len(NUDGE_SEEDS)} seeds")
    return ReferenceRun(states, losses, grads, final, step_spread, run_spread)


def step_reference(make_model: Callable[[], nn.Module], batch: Batch, *,
                   micro_batches: int = 2) -> tuple[dict[str, torch.Tensor], Spread]:
    """One forward and backward in float64, without an update (what a pipeline or any other single-step parallel
    technique computes): the whole batch's token-mean loss (tensor "loss") and every gradient, and their rounding
    spread: the same quantities recomputed with the batch in `micro_batches` parts (another order of the batch sum)
    and from the initial weights nudged by one ulp (`NUDGE_SEEDS`)."""
    model = make_model().to(torch.float64)
    whole = _step_quantities(model, [batch])
    variants = [_step_quantities(model, split_batch(batch, micro_batches))]
    for seed in NUDGE_SEEDS:
        nudged = make_model().to(torch.float64)
        nudge_(nudged.parameters(), seed=seed)
        variants.append(_step_quantities(nudged, [batch]))
    return whole, rounding_spread(whole, variants, origin=f"float64 loss and gradients, batch in {micro_batches} "
                                  "micro-batches or initial weights nudged by one ulp")


def input_spread(compute: Callable[..., Mapping[str, torch.Tensor]], inputs: Sequence[torch.Tensor], *,
                 origin: str) -> tuple[dict[str, torch.Tensor], Spread]:
    """`compute(*inputs)` (a one-process reference, e.g. attention and its gradients, in float64) and its rounding
    spread: the same computed on copies of `inputs` nudged by one ulp (`NUDGE_SEEDS`); `origin` says what was
    computed, for the record."""
    ref = dict(compute(*inputs))
    variants = []
    for seed in NUDGE_SEEDS:
        nudged = [t.detach().clone() for t in inputs]
        nudge_(nudged, seed=seed)
        variants.append(compute(*nudged))
    return ref, rounding_spread(ref, variants, origin=f"{origin} on inputs nudged by one ulp, "
                                f"{len(NUDGE_SEEDS)} seeds")


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside the block, as every rank runs (conformance.launch): the reference's tiny models gain
    nothing from threads, and on a machine whose cores are busy a second thread that waits at every op's barrier made
    a float64 reference run 100x slower (14 s instead of 0.14 s, 2 cores shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
