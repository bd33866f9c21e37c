"""Learning-rate schedules as closed-form multipliers: lr(step) = base_lr * schedule(step, **kwargs).

Each schedule is a pure function of the integer step (0 for the first optimizer step) with keyword-only arguments,
so it plugs into `reference.training.train(lr_lambda=...)` or `torch.optim.lr_scheduler.LambdaLR` through
`functools.partial`, or through `get_schedule(name, **kwargs)`, which validates the arguments once, up front.

What warmup does and why. At step 0 Adam's update is lr * m̂ / sqrt(v̂) with both moments estimated from a single
gradient: |update| ~ lr on every coordinate, whatever the gradient's scale, and the second moment v has seen too few
gradients to damp the noisy directions (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
arXiv 1908.03265, Sec. 3: the variance of the adaptive rate is unbounded in the first steps). Meanwhile a fresh
network sits where the loss surface is sharpest, so a full-size step can throw it into a region it does not recover
from (a loss spike, or divergence). Linear warmup starts from lr ~ 0 and reaches the base lr after `warmup_steps`,
giving the moments time to settle and the network time to reach flatter ground; with SGD it is what made large-batch
training work at a linearly scaled lr (Goyal et al. 2017, arXiv 1706.02677, Sec. 2.2). The `warmup` conformance check
measures what it does on the tiny GPT.

The warmup phase of every schedule here is transformers' `step / max(1, warmup_steps)`: 0 at step 0 (the first step
makes no update), reaching 1 at step `warmup_steps`. Phases: Warmup [0, warmup_steps), then the schedule's own
Decay (or Stable then Decay), then whatever the formula gives past `total_steps` (stated per schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


def _check_warmup_total(warmup_steps: int, total_steps: int) -> None:
    _check_count("warmup_steps", warmup_steps)
    _check_count("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be <= total_steps={total_steps} (warmup longer than "
                         f"training)")


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup: step / warmup_steps (0 at step 0)."""
    return float(step) / float(max(1, warmup_steps))


def constant_with_warmup(step: int, *, warmup_steps: int) -> float:
    """Warmup, then 1 forever (transformers.get_constant_schedule_with_warmup)."""
    _check_step(step)
    _check_count("warmup_steps", warmup_steps)
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Warmup, then linear decay from 1 to 0 at `total_steps`; 0 past it (transformers.get_linear_schedule_with_warmup,
    the seed's example).

        (total_steps - step) / (total_steps - warmup_steps)   for warmup_steps <= step, clamped at 0
    """
    _check_step(step)
    _check_warmup_total(warmup_steps, total_steps)
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def cosine_with_warmup(
    step: int, *, warmup_steps: int, total_steps: int, num_cycles: float = 0.5, min_lr_ratio: float = 0.0
) -> float:
    """Warmup, then cosine from 1 down to `min_lr_ratio` (transformers.get_cosine_schedule_with_warmup; with
    min_lr_ratio > 0, get_cosine_with_min_lr_schedule_with_warmup's `min_lr_rate`).

        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        r + (1 - r) * (1 + cos(2π * num_cycles * progress)) / 2

    num_cycles = 0.5 is half a period: 1 at the end of warmup, r at total_steps. Past total_steps the formula keeps
    going, as transformers' does: with num_cycles = 0.5 the multiplier climbs back towards 1. Set total_steps to the
    real length of training.
    """
    _check_step(step)
    _check_warmup_total(warmup_steps, total_steps)
    _check_ratio("min_lr_ratio", min_lr_ratio)
    if not (math.isfinite(num_cycles) and num_cycles > 0):
        raise ValueError(f"num_cycles must be a finite float > 0, got {num_cycles!r}")
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0.0, cosine * (1.0 - min_lr_ratio) + min_lr_ratio)


def cosine_annealing(step: int, *, t_max: int, min_lr_ratio: float = 0.0) -> float:
    """Cosine annealing without warmup or restarts (Loshchilov & Hutter 2017, SGDR, arXiv 1608.03983, Eq. 5): the
    closed form of torch.optim.lr_scheduler.CosineAnnealingLR with eta_min = min_lr_ratio * base_lr.

        r + (1 - r) * (1 + cos(π * step / t_max)) / 2

    1 at step 0, r at step t_max. Past t_max the cosine continues, with period 2 t_max: it climbs back to 1 at
    2 t_max (torch's chainable form follows it up too; see tests/reference/test_schedules.py).
    """
    _check_step(step)
    _check_count("t_max", t_max, minimum=1)
    _check_ratio("min_lr_ratio", min_lr_ratio)
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * step / t_max)) / 2.0


def inverse_sqrt(step: int, *, warmup_steps: int, timescale: int | None = None) -> float:
    """Warmup, then 1 / sqrt(step / warmup_steps) (Vaswani et al. 2017, arXiv 1706.03762, Sec. 5.3, normalised to
    peak 1; transformers.get_inverse_sqrt_schedule).

        1 / sqrt((step - warmup_steps + timescale) / timescale)   for step >= warmup_steps

    timescale defaults to warmup_steps (10000 when warmup_steps is 0), which gives exactly sqrt(warmup / step).
    """
    _check_step(step)
    _check_count("warmup_steps", warmup_steps)
    if timescale is None:
        timescale = warmup_steps or 10_000
    _check_count("timescale", timescale, minimum=1)
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return 1.0 / math.sqrt((step - warmup_steps + timescale) / timescale)


_WARMUP_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "cosine": lambda x: 0.5 * (1.0 - math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(1.0 - x),
}
"""Rising shapes of the warmup, progress x in [0, 1] -> [0, 1]."""

_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}
"""Falling shapes of the decay, progress x in [0, 1] -> [1, 0]."""


def warmup_stable_decay(
    step: int,
    *,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.0,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
) -> float:
    """Warmup-Stable-Decay, "trapezoidal" (Hu et al. 2024, MiniCPM, arXiv 2404.06395, Sec. 4; Hägele et al. 2024,
    arXiv 2405.18392): transformers.get_wsd_schedule with num_cycles = 0.5.

        Warmup  [0, W):          r + (1 - r) * rising_shape(step / W)  (starts at r, not 0)
        Stable  [W, W + S):      1
        Decay   [W + S, W+S+D):  r + (1 - r) * falling_shape((step - W - S) / D)
        after:                   r

    The stable phase can run as long as wanted and a short decay from any checkpoint gives a finished model.
    Shapes: "linear", "cosine", "1-sqrt" (1-sqrt decay is Hägele et al.'s best).
    """
    _check_step(step)
    for name, value in (("warmup_steps", warmup_steps), ("stable_steps", stable_steps), ("decay_steps", decay_steps)):
        _check_count(name, value)
    _check_ratio("min_lr_ratio", min_lr_ratio)
    for name, kind in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if kind not in _WARMUP_SHAPES:
            raise ValueError(f"{name} must be one of {sorted(_WARMUP_SHAPES)}, got {kind!r}")
    r = min_lr_ratio
    if step < warmup_steps:
        return max(0.0, r + (1.0 - r) * _WARMUP_SHAPES[warmup_type](float(step) / float(max(1, warmup_steps))))
    if step < warmup_steps + stable_steps:
        return 1.0
    if step < warmup_steps + stable_steps + decay_steps:
        progress = float(step - warmup_steps - stable_steps) / float(max(1, decay_steps))
        return max(0.0, r + (1.0 - r) * _DECAY_SHAPES[decay_type](progress))
    return r


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant_with_warmup": constant_with_warmup,
    "linear_warmup_decay": linear_warmup_decay,
    "cosine_with_warmup": cosine_with_warmup,
    "cosine_annealing": cosine_annealing,
    "inverse_sqrt": inverse_sqrt,
    "warmup_stable_decay": warmup_stable_decay,
}


def get_schedule(name: str, **kwargs) -> Callable[[int], float]:
    """`step -> multiplier` for the schedule `name`, its arguments checked now (an error before training starts)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    fn = partial(SCHEDULES[name], **kwargs)
    fn(0)  # raises ValueError on a bad argument, TypeError on a missing or unknown one
    return fn
