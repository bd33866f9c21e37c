"""Learning-rate schedules as `torch.optim.lr_scheduler.LRScheduler` classes.

    sched = CosineWithWarmup(opt, warmup_steps=100, total_steps=10_000)
    for batch in data:
        loss.backward(); opt.step(); sched.step()

Every class sets each param group's lr to `base_lr * multiplier(last_epoch)` from a closed form, never from the
previous lr, so it works with any optimizer, keeps per-group base LRs, resumes exactly from `state_dict()`, and
`step(epoch)` jumps straight to an epoch. `last_epoch` counts the optimizer steps taken: the lr in force for step s
(from 0) is `base_lr * multiplier(s)`, the convention of transformers' schedules, which these reproduce (linear,
cosine, constant, inverse-sqrt, WSD) together with torch's CosineAnnealingLR. What warmup is for: see the docstring
of reference/schedules.py and the `warmup` conformance check.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from optimized import _validate as check


def _count(name: str, value: Any, minimum: int = 0) -> int:
    return check.integer(name, value, minimum=minimum)


def _ratio(name: str, value: Any) -> float:
    return check.real(name, value, minimum=0.0, maximum=1.0)


def _common(optimizer: Any, last_epoch: Any) -> int:
    """The arguments every schedule takes, checked before LRScheduler touches the optimizer's groups."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise check.fail("optimizer", optimizer, "a torch.optim.Optimizer")
    return check.integer("last_epoch", last_epoch, minimum=-1)


def _warmup_total(warmup_steps: Any, total_steps: Any) -> tuple[int, int]:
    warmup_steps, total_steps = _count("warmup_steps", warmup_steps), _count("total_steps", total_steps, 1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be <= total_steps={total_steps} (warmup longer than "
                         f"training)")
    return warmup_steps, total_steps


class _ClosedForm(LRScheduler):
    """lr of group i at epoch e = base_lrs[i] * self.multiplier(e). Subclasses set their fields, then call this."""

    def multiplier(self, step: int) -> float:
        raise NotImplementedError

    def _ramp(self, step: int) -> float:
        """Linear warmup, step / warmup_steps: 0 at step 0."""
        return float(step) / float(max(1, self.warmup_steps))

    def get_lr(self) -> list[float]:
        factor = self.multiplier(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scheduler and set the optimizer's lr for the restored step, so a resume is exact whether the
        optimizer's state was loaded before or after this scheduler was built."""
        super().load_state_dict(state_dict)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


class ConstantWithWarmup(_ClosedForm):
    """Linear warmup to base_lr over `warmup_steps`, then constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, last_epoch: int = -1) -> None:
        last_epoch = _common(optimizer, last_epoch)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        return self._ramp(step) if step < self.warmup_steps else 1.0


class LinearWarmupDecay(_ClosedForm):
    """Linear warmup, then linear decay to 0 at `total_steps` and 0 after (transformers'
    get_linear_schedule_with_warmup)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1
    ) -> None:
        last_epoch = _common(optimizer, last_epoch)
        self.warmup_steps, self.total_steps = _warmup_total(warmup_steps, total_steps)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return self._ramp(step)
        return max(0.0, float(self.total_steps - step) / float(max(1, self.total_steps - self.warmup_steps)))


class CosineWithWarmup(_ClosedForm):
    """Linear warmup, then a cosine from 1 to `min_lr_ratio` over `num_cycles` periods (0.5: one half-period) by
    `total_steps` (transformers' get_cosine_schedule_with_warmup / ..._with_min_lr). Past total_steps the cosine
    continues, as transformers' does."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        num_cycles: float = 0.5,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        last_epoch = _common(optimizer, last_epoch)
        self.warmup_steps, self.total_steps = _warmup_total(warmup_steps, total_steps)
        self.num_cycles = check.real("num_cycles", num_cycles, minimum=0.0, min_open=True)
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return self._ramp(step)
        progress = float(step - self.warmup_steps) / float(max(1, self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress))
        return max(0.0, cosine * (1.0 - self.min_lr_ratio) + self.min_lr_ratio)


class CosineAnnealing(_ClosedForm):
    """torch's CosineAnnealingLR in closed form, eta_min given as `min_lr_ratio` of each group's base lr (so groups
    with different base LRs each anneal to their own floor). Periodic past t_max, like torch's."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, t_max: int, min_lr_ratio: float = 0.0, last_epoch: int = -1
    ) -> None:
        last_epoch = _common(optimizer, last_epoch)
        self.t_max = _count("t_max", t_max, 1)
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        r = self.min_lr_ratio
        return r + (1.0 - r) * (1.0 + math.cos(math.pi * step / self.t_max)) / 2.0


class InverseSqrt(_ClosedForm):
    """Linear warmup, then sqrt(timescale / (step - warmup_steps + timescale)) (transformers'
    get_inverse_sqrt_schedule; timescale defaults to warmup_steps, or 10000 without warmup)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, timescale: int | None = None, last_epoch: int = -1
    ) -> None:
        last_epoch = _common(optimizer, last_epoch)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.timescale = _count("timescale", timescale if timescale is not None else (warmup_steps or 10_000), 1)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return self._ramp(step)
        return 1.0 / math.sqrt((step - self.warmup_steps + self.timescale) / self.timescale)


_RISE = {
    "linear": lambda x: x,
    "cosine": lambda x: 0.5 * (1.0 - math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(1.0 - x),
}
_FALL = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


class WarmupStableDecay(_ClosedForm):
    """Warmup from min_lr_ratio to 1, Stable at 1, Decay to min_lr_ratio, then min_lr_ratio (transformers'
    get_wsd_schedule; MiniCPM arXiv 2404.06395). Shapes "linear", "cosine" or "1-sqrt" for each ramp."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        stable_steps: int,
        decay_steps: int,
        min_lr_ratio: float = 0.0,
        warmup_type: str = "linear",
        decay_type: str = "cosine",
        last_epoch: int = -1,
    ) -> None:
        last_epoch = _common(optimizer, last_epoch)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.stable_steps = _count("stable_steps", stable_steps)
        self.decay_steps = _count("decay_steps", decay_steps)
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        self.warmup_type = check.one_of("warmup_type", warmup_type, tuple(_RISE))
        self.decay_type = check.one_of("decay_type", decay_type, tuple(_FALL))
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        r, w, s, d = self.min_lr_ratio, self.warmup_steps, self.stable_steps, self.decay_steps
        if step < w:
            return max(0.0, r + (1.0 - r) * _RISE[self.warmup_type](float(step) / float(max(1, w))))
        if step < w + s:
            return 1.0
        if step < w + s + d:
            return max(0.0, r + (1.0 - r) * _FALL[self.decay_type](float(step - w - s) / float(max(1, d))))
        return r


SCHEDULERS: dict[str, type[_ClosedForm]] = {
    "constant_with_warmup": ConstantWithWarmup,
    "linear_warmup_decay": LinearWarmupDecay,
    "cosine_with_warmup": CosineWithWarmup,
    "cosine_annealing": CosineAnnealing,
    "inverse_sqrt": InverseSqrt,
    "warmup_stable_decay": WarmupStableDecay,
}


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, **kwargs: Any) -> LRScheduler:
    """The scheduler `name` (the reference.schedules function names) with its keyword arguments."""
    return SCHEDULERS[check.one_of("name", name, tuple(SCHEDULERS))](optimizer, **kwargs)
