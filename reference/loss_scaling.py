"""Dynamic loss scaling, the algorithm of torch.amp.GradScaler written as a readable state machine.

Why (Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740, Sec. 3.2): fp16 has 5 exponent bits,
so gradient values below 2^-24 flush to zero and the update they carry is lost. Backward is linear in the gradient
of the loss, so multiplying the loss by S multiplies every gradient by S and lifts the small ones into range;
dividing the gradients by S before the optimizer step gives back their true value. Too large an S overflows to inf:
that step is skipped and S shrinks. "Dynamic": S is not chosen by hand but found by trial, always trying to grow.

State
    S                    the scale, an fp32 number (torch keeps it in a 0-d fp32 tensor)
    n                    growth tracker: consecutive steps without inf/NaN since the last change of S
    stage[opt]           per optimizer: READY -> UNSCALED -> STEPPED, back to READY at update()
    found_inf[opt]       per optimizer: did its gradients hold an inf or NaN at unscale_ time (None: no gradient)

One iteration
    scale(loss)          return loss * S                       (the first call creates S = init_scale, n = 0)
    unscale_(opt)        found_inf[opt] = any(!isfinite(g)) over opt's grads, checked BEFORE the division;
                         g <- g * fp32(1 / S) for every grad (done even when an inf was found); READY -> UNSCALED
    step(opt)            unscale_(opt) first if still READY; opt.step() unless found_inf[opt]  -> STEPPED
    update()             found = any found_inf over every optimizer seen this iteration
                           found:     S <- S * backoff_factor;  n <- 0
                           not found: n <- n + 1
                                      if n == growth_interval:  S' = S * growth_factor
                                                                S <- S' only if S' is finite;  n <- 0
                         every optimizer back to READY

Scale 0 (torch's decision, followed here): about 150 backoffs in a row (persistent overflow, e.g. a NaN in the
loss) take S through fp32's subnormals to 0, and nothing brings it back: 0 * growth_factor is 0. Then 1/S = inf,
scaled gradients are 0 (or NaN), unscaled ones NaN, and found_inf only sees the NaN that was there before the
division: a step whose scaled gradients were finite is taken with NaN gradients. A training loop should watch
get_scale() and stop when it reaches 0; the scaler itself keeps going exactly as GradScaler does.

The update rule is torch's `_amp_update_scale_` kernel (aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp): each
product is formed in float64 and rounded once to fp32, so S * 0.3 gives the fp32 nearest the exact product. The
tracker resets to 0 both on an overflow and on a growth (also when a growth is refused because S' would be inf).

Decisions torch makes and this file makes too (each raises before any gradient is touched):
    unscale_ twice for one optimizer in one iteration; unscale_ after step; step twice before update();
    unscale_/step/update before any scale(); step of an optimizer none of whose params has a gradient;
    update() when no optimizer was unscaled or stepped; fp16 gradients (GradScaler refuses to unscale them:
    fp16 parameters need an fp32 master copy, see optimized.precision.MasterWeightOptimizer);
    step(closure=...). `update(new_scale)` sets S and leaves n alone.
Not modelled: optimizers that unscale inside a fused kernel (`_step_supports_amp_scaling`); the skip decision is
the same, only made inside the kernel. Torch keeps one found_inf per device and sums them; one flag is the same.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
from torch import Tensor


def _fp32(x: float) -> float:
    """Round a float64 number to the nearest fp32 (inf when it is beyond fp32's range), as torch stores S."""
    return torch.tensor(x, dtype=torch.float64).to(torch.float32).item()


class Stage(enum.Enum):
    READY = "ready"
    """Gradients are still scaled by S."""
    UNSCALED = "unscaled"
    """unscale_ ran: gradients hold their true values, found_inf is known."""
    STEPPED = "stepped"
    """step ran (or was skipped); only update() may follow."""


class DynamicLossScaler:
    """Loss scaling with a scale found by trial: back off on overflow, grow after `growth_interval` clean steps.

    Drop-in for torch.amp.GradScaler (enabled, one device): the same calls, the same decisions, the same numbers."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        def number(x: Any) -> bool:  # a bool is not a scale: True would silently be 1.0
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (number(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not (number(growth_factor) and growth_factor > 1.0):
            raise ValueError(f"growth_factor must be a finite number > 1.0 (the scale grows), got {growth_factor!r}")
        if not (number(backoff_factor) and 0.0 < backoff_factor < 1.0):
            raise ValueError(f"backoff_factor must be a number in (0, 1) (the scale shrinks), got {backoff_factor!r}")
        if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self._init_scale = float(init_scale)
        self._init_growth_tracker = 0
        # S and n are created by the first scale(), like torch's lazily initialised tensors.
        self._scale: float | None = None
        self._growth_tracker: int | None = None
        self._stage: dict[int, Stage] = {}
        self._found_inf: dict[int, bool | None] = {}

    # ---- the four calls of an iteration -------------------------------------------------------------------------

    def scale(self, outputs: Tensor | list | tuple) -> Tensor | list | tuple:
        """outputs * S (a tensor, or a list/tuple of them, nested). Backward of the result gives S * gradients."""
        if isinstance(outputs, Tensor):
            if self._scale is None:
                self._scale, self._growth_tracker = _fp32(self._init_scale), self._init_growth_tracker
            return outputs * torch.tensor(self._scale, dtype=torch.float32, device=outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise ValueError(f"outputs must be a Tensor or a list/tuple of Tensors, got {type(outputs).__name__}")

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of `optimizer`'s params by S in place and record whether any was inf/NaN.

        Call it before anything that must see true gradients (clipping); step() then does not unscale again."""
        self._require_scale("unscale_")
        stage = self._stage.get(id(optimizer), Stage.READY)
        if stage is Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if stage is Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        grads = self._grads(optimizer)
        # 1/S in fp64, rounded once; S = 0 (reached after persistent overflow) gives 1/S = inf, as torch's
        # reciprocal does: zero gradients become NaN and pass the check above, so that step is taken (see docstring).
        inv_scale = torch.tensor(_fp32(1.0 / self._scale) if self._scale != 0 else math.inf, dtype=torch.float32)
        found_inf = None if not grads else False
        with torch.no_grad():
            for g in grads:
                found_inf = found_inf or not bool(torch.isfinite(g).all())  # checked before dividing
                g.copy_(g.float() * inv_scale.to(g.device))  # in fp32, rounded once to g's dtype
        self._found_inf[id(optimizer)] = found_inf
        self._stage[id(optimizer)] = Stage.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless unscale_ ran), then optimizer.step(*args, **kwargs) unless a gradient was inf/NaN.

        Returns what optimizer.step returned, or None when the step was skipped."""
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._require_scale("step")
        if self._stage.get(id(optimizer), Stage.READY) is Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if self._stage.get(id(optimizer), Stage.READY) is Stage.READY:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)] is None:
            raise RuntimeError("No inf checks were recorded for this optimizer (none of its params has a gradient).")
        result = None if self._found_inf[id(optimizer)] else optimizer.step(*args, **kwargs)
        self._stage[id(optimizer)] = Stage.STEPPED
        return result

    def update(self, new_scale: float | Tensor | None = None) -> None:
        """Move S and n by the rule in the module docstring (or set S = new_scale), and start a new iteration."""
        self._require_scale("update")
        if new_scale is not None:
            if isinstance(new_scale, Tensor) and new_scale.numel() == 1 and not new_scale.requires_grad:
                new_scale = new_scale.item()
            if isinstance(new_scale, bool) or not isinstance(new_scale, (int, float)) or not (
                    math.isfinite(new_scale) and new_scale >= 0):
                raise ValueError(f"new_scale must be a finite number >= 0 (or a 1-element tensor holding one), "
                                 f"got {new_scale!r}")
            self._scale = _fp32(float(new_scale))
        else:
            checks = [f for f in self._found_inf.values() if f is not None]
            if not checks:
                raise RuntimeError("No inf checks were recorded prior to update().")
            if any(checks):
                # Overflow: this S was too large. Shrink it and start counting clean steps again.
                self._scale = _fp32(self._scale * self.backoff_factor)
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self.growth_interval:
                    # growth_interval clean steps in a row: try a larger S, but never let it become inf.
                    grown = _fp32(self._scale * self.growth_factor)
                    if math.isfinite(grown):
                        self._scale = grown
                    self._growth_tracker = 0
        self._stage.clear()
        self._found_inf.clear()

    # ---- inspection and checkpoints -----------------------------------------------------------------------------

    def get_scale(self) -> float:
        """The current S (init_scale before the first scale())."""
        return self._init_scale if self._scale is None else self._scale

    def get_growth_tracker(self) -> int:
        """The current n (consecutive clean steps since S last changed)."""
        return self._init_growth_tracker if self._growth_tracker is None else self._growth_tracker

    def found_inf(self, optimizer: torch.optim.Optimizer) -> bool | None:
        """Whether `optimizer`'s gradients held an inf/NaN this iteration (None before its unscale_)."""
        return self._found_inf.get(id(optimizer))

    def state_dict(self) -> dict[str, Any]:
        """The same five entries as torch.amp.GradScaler.state_dict() (call it after update())."""
        return {
            "scale": self.get_scale(),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.get_growth_tracker(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict() returned (torch.amp.GradScaler's state_dict loads too)."""
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled scaler.")
        self._init_scale = float(state_dict["scale"])
        self.growth_factor = float(state_dict["growth_factor"])
        self.backoff_factor = float(state_dict["backoff_factor"])
        self.growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._scale is not None:
            self._scale = _fp32(self._init_scale)
            self._growth_tracker = self._init_growth_tracker

    # ---- helpers ------------------------------------------------------------------------------------------------

    def _require_scale(self, call: str) -> None:
        if self._scale is None:
            raise RuntimeError(f"{call}() called before scale(): the scale is created by the first scale(loss).")

    @staticmethod
    def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """The gradients unscale_ divides: every param's .grad (a sparse grad's values), fp16 refused."""
        if not isinstance(getattr(optimizer, "param_groups", None), list):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer (an object with param_groups), got "
                             f"{optimizer!r}")
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype == torch.float16:
                    raise ValueError(
                        "Attempting to unscale FP16 gradients: parameters trained under loss scaling must be fp32 "
                        "or bf16; keep an fp32 master copy of fp16 parameters (MasterWeightOptimizer)."
                    )
                grads.append(p.grad._values() if p.grad.is_sparse else p.grad)
        return grads
