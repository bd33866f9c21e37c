"""Check `warmup`: what does learning-rate warmup do? The experiment behind claim "warmup.stability".

The tiny GPT is trained with Adam on the "reverse" task at several learning rates, each with and without a linear
warmup (reference.schedules.constant_with_warmup: 0 -> base lr over `warmup_steps`, then constant; the run without
warmup is constant from step 0), over several seeds: seed s fixes the initialisation and the data, and the two
arms of a seed see the very same batches in the same order. Nothing else differs.

Per learning rate and arm, over the seeds:
  final loss   mean loss of the last 10% of steps (median over seeds);
  spike        the largest rise of the loss above the best loss seen before it, max_t (L_t - min_{s<t} L_s)
               (median and max over seeds);
  failed       runs whose loss became non-finite or that ended at >= 90% of their first loss (no learning).
Warmup "helps" at an lr if it has fewer failed runs, or as many and a median spike at most 0.8x; it "hurts" if it
has more failed runs, or as many and a median spike at least 1.25x. Verdict: does not hold if it helps at no lr;
holds if it helps at the highest lr, hurts at none, and no run with warmup fails at an lr where it helped; holds
under conditions otherwise (the row says which: e.g. it removes the spike but the runs still fail). The loss curves of
every run are plotted into the report folder, and the raw curves are written beside them as JSON.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from functools import partial

import torch

from conformance.checks import CheckSpec, Context
from conformance.claims import Verdict
from conformance.figure import Figure, Panel, Series
from conformance.result import Result
from optimized.optimizers import build_optimizer
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.schedules import constant_with_warmup
from reference.training import train


@dataclass(frozen=True)
class Setup:
    """Sizes of the experiment."""

    lrs: tuple[float, ...]
    """Base learning rates of Adam."""
    seeds: int
    """Seeds per arm (initialisation and data)."""
    steps: int
    """Optimizer steps per run."""
    warmup_steps: int
    """Length of the linear warmup of the warmup arm."""
    batch_size: int
    seq_len: int


SPEC = CheckSpec(
    name="warmup", technique="LR warmup", reference="constant lr (no warmup)",
    optimized="reference.schedules.constant_with_warmup", order=80, claims=("warmup.stability",),
)
QUICK = Setup(lrs=(1e-1,), seeds=2, steps=20, warmup_steps=8, batch_size=8, seq_len=16)
FULL = Setup(lrs=(3e-3, 1e-2, 3e-2, 1e-1), seeds=4, steps=150, warmup_steps=15, batch_size=16, seq_len=32)
TASK = "reverse"


def _run(setup: Setup, lr: float, warmup: int, seed: int, device: torch.device) -> list[float]:
    config = GPTConfig(seed=seed)
    model = GPT(config).to(device)
    batches = make_batches(16, batch_size=setup.batch_size, seq_len=setup.seq_len, vocab_size=config.vocab_size,
                           seed=1000 + seed, task=TASK)
    batches = [(i.to(device), t.to(device)) for i, t in batches]
    opt = build_optimizer(model, "adam", lr=lr)
    history = train(model, opt, batches, steps=setup.steps, lr_lambda=partial(constant_with_warmup,
                                                                              warmup_steps=warmup))
    return history.loss


def largest_spike(losses: list[float]) -> float:
    """max_t (L_t - min_{s<t} L_s) over the finite losses; inf if a loss is non-finite."""
    if not all(math.isfinite(x) for x in losses):
        return math.inf
    best, spike = math.inf, 0.0
    for x in losses:
        if best < math.inf:
            spike = max(spike, x - best)
        best = min(best, x)
    return spike


def _final(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def _failed(losses: list[float]) -> bool:
    return not all(math.isfinite(x) for x in losses) or _final(losses) >= 0.9 * losses[0]


@dataclass
class Arm:
    curves: list[list[float]]

    @property
    def final(self) -> float:
        return statistics.median(_final(c) for c in self.curves)

    @property
    def spikes(self) -> list[float]:
        return [largest_spike(c) for c in self.curves]

    @property
    def failed(self) -> int:
        return sum(_failed(c) for c in self.curves)

    def finals(self) -> list[float]:
        return [_final(c) for c in self.curves]

    def describe(self) -> str:
        finals = ", ".join(f"{_final(c):.3g}" for c in self.curves)
        spikes = self.spikes
        return (f"final {self.final:.3g} (per seed {finals}), spike median {statistics.median(spikes):.3g} "
                f"max {max(spikes):.3g}, failed {self.failed}/{len(self.curves)}")


def effect(with_warmup: Arm, without: Arm) -> str:
    """"helps: ...", "hurts: ..." or "no clear difference" (the rule of the module docstring)."""
    if with_warmup.failed != without.failed:
        return "helps: fewer failed runs" if with_warmup.failed < without.failed else "hurts: more failed runs"
    s_w, s_0 = statistics.median(with_warmup.spikes), statistics.median(without.spikes)
    if s_w < s_0 and s_w <= 0.8 * s_0:
        return "helps: smaller spikes"
    if s_w > s_0 and s_w >= 1.25 * s_0:
        return "hurts: larger spikes"
    return "no clear difference"


def verdict(effects: dict[float, str], failed_with_warmup: dict[float, int]) -> Verdict:
    """The claim's verdict from the effect at each lr (the rule of the module docstring)."""
    helped = [lr for lr, e in effects.items() if e.startswith("helps")]
    if not helped:
        return Verdict.DOES_NOT_HOLD
    hurt = any(e.startswith("hurts") for e in effects.values())
    still_failing = any(failed_with_warmup[lr] for lr in helped)
    if max(effects) in helped and not hurt and not still_failing:
        return Verdict.HOLDS
    return Verdict.HOLDS_UNDER_CONDITIONS


def _figure(results: dict, setup: Setup) -> Figure:
    """The loss curve of every run, one panel per learning rate, with and without warmup."""
    panels = []
    for i, lr in enumerate(setup.lrs):
        series = [Series(list(range(len(curve))), curve, color=color, alpha=0.7, linewidth=1.0,
                         label=((f"warmup {warm} steps" if warm else "no warmup") if j == 0 else None))
                  for warm, color in ((0, "tab:red"), (setup.warmup_steps, "tab:blue"))
                  for j, curve in enumerate(results[lr][warm].curves)]
        panels.append(Panel(series=series, title=f"Adam lr={lr:g}", xlabel="step", yscale="log",
                            ylabel=f"training loss ({TASK} task)" if i == 0 else "", vlines=[setup.warmup_steps],
                            legend=i == 0))
    return Figure("warmup_loss_curves", panels, title=f"tiny GPT, {setup.seeds} seeds per arm, same data per seed",
                  sharey=True)


def run(ctx: Context) -> list[Result]:
    setup = QUICK if ctx.quick else FULL
    device = ctx.device
    results: dict[float, dict[int, Arm]] = {}
    for lr in setup.lrs:
        results[lr] = {warm: Arm([_run(setup, lr, warm, seed, device) for seed in range(setup.seeds)])
                       for warm in (0, setup.warmup_steps)}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    figure, data_name = _figure(results, setup), "warmup_loss_curves.json"
    (ctx.out_dir / data_name).write_text(json.dumps(
        {"setup": setup.__dict__, "task": TASK,
         "curves": {f"{lr:g}": {("warmup" if w else "none"): arm.curves for w, arm in arms.items()}
                    for lr, arms in results.items()}}))

    rows, effects = [], {}
    desc = (f"Adam, constant lr after a {setup.warmup_steps}-step linear warmup vs constant from step 0; "
            f"{setup.seeds} seeds, {setup.steps} steps, batch {setup.batch_size}x{setup.seq_len}, task {TASK}")
    for lr in setup.lrs:
        with_w, without = results[lr][setup.warmup_steps], results[lr][0]
        effects[lr] = effect(with_w, without)
        lower = sum(a < b for a, b in zip(with_w.finals(), without.finals(), strict=True))
        rows.append(SPEC.row(
            ctx, f"lr={lr:g}: warmup {effects[lr]}", device=device.type, figures=[figure],
            notes=f"with warmup: {with_w.describe()}; without: {without.describe()}; final loss lower with warmup "
                  f"in {lower}/{setup.seeds} seeds"))
    failed_w = {lr: results[lr][setup.warmup_steps].failed for lr in setup.lrs}
    summary = "; ".join(f"lr={lr:g}: {e} (failed with warmup {failed_w[lr]}/{setup.seeds}, without "
                        f"{results[lr][0].failed}/{setup.seeds})" for lr, e in effects.items())
    rows.append(SPEC.row(
        ctx, "warmup stabilises high-lr Adam", device=device.type, claim="warmup.stability",
        verdict=verdict(effects, failed_w), figures=[figure],
        notes=f"{desc}. Effect by lr: {summary}. Raw curves: {data_name}."
              + (" Quick mode: too few steps to learn the task, so 'failed' counts are not informative; only "
                 "the early spikes are." if ctx.quick else "")))
    return rows
