"""The loss scale S (Micikevicius et al. 2018, arXiv 1710.03740, Sec. 3.2): fp16's 5-bit exponent flushes small
gradients to zero, so backward runs on S * loss and the gradients are divided by S before the update.

Two owners of S, one rule (torch.amp.GradScaler's: back off on an inf/NaN step, grow after `growth_interval` clean
steps):
- `make_grad_scaler` / `check_grad_scaler`: the torch.amp.GradScaler a dtype needs, for autocast (`amp_step`):
  fp16 needs one, bf16 and fp32 have fp32's exponent range and take none.
- `LossScale` and `unscale_and_check_`: S as a tensor with GradScaler's update kernel, for optimizers that hold
  their own fp32 gradients (`MasterWeightOptimizer`, optimized.zero.ZeroOptimizer) and so cannot hand them to a
  GradScaler.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# ---- torch.amp.GradScaler, for autocast ------------------------------------------------------------------------------


def make_grad_scaler(dtype: torch.dtype, device_type: str = "cuda", **kwargs: Any) -> torch.amp.GradScaler | None:
    """The scaler `dtype` needs: torch.amp.GradScaler(device_type, **kwargs) for fp16, None for bf16 and fp32."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device_type, **kwargs)
    if dtype in (torch.bfloat16, torch.float32):
        if kwargs:
            raise ValueError(f"{dtype} takes no loss scaler, so no scaler arguments; got {sorted(kwargs)}")
        return None
    raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")


def check_grad_scaler(dtype: torch.dtype, scaler: torch.amp.GradScaler | None) -> None:
    """Raise ValueError unless `scaler` is what `dtype` needs: an enabled GradScaler for fp16, None otherwise."""
    if dtype == torch.float16:
        if scaler is None:
            raise ValueError(
                "dtype=torch.float16 needs a torch.amp.GradScaler (fp16 gradients underflow without loss scaling); "
                "pass scaler=make_grad_scaler(torch.float16, device_type)"
            )
        if not scaler.is_enabled():
            raise ValueError(
                "scaler is disabled (torch.amp.GradScaler('cuda') disables itself without CUDA); build it for the "
                "device you train on: torch.amp.GradScaler(device_type)"
            )
    elif scaler is not None:
        raise ValueError(
            f"a GradScaler is for fp16 only; dtype={dtype} has fp32's exponent range and trains without loss "
            f"scaling: pass scaler=None"
        )


# ---- S as a tensor and the overflow check: one piece for MasterWeightOptimizer and optimized.zero -------------------


def unscale_and_check_(grads: list[Tensor], inv_scale: Tensor, found_inf: Tensor) -> Tensor:
    """g *= inv_scale for every gradient, and found_inf (float32, 0-d) += 1 if any element is inf/NaN.

    The kernel GradScaler.unscale_ uses (one pass per device); inv_scale = 1 only checks."""
    for device, device_grads in _by_device(grads).items():
        device_found = found_inf.to(device)
        torch._amp_foreach_non_finite_check_and_unscale_(device_grads, device_found, inv_scale.to(device))
        if device_found is not found_inf:
            found_inf += device_found.to(found_inf.device)
    return found_inf


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


class LossScale:
    """The loss scale S with GradScaler's update rule.

    loss_scale: "dynamic" (back off by `backoff_factor` on an overflow step, grow by `growth_factor` after
    `growth_interval` clean steps in a row), a fixed float S, or None (S = 1)."""

    def __init__(self, loss_scale: str | float | None, *, init_scale: float, growth_factor: float,
                 backoff_factor: float, growth_interval: int, device: torch.device) -> None:
        if isinstance(loss_scale, str):
            if loss_scale != "dynamic":
                raise ValueError(f"loss_scale must be 'dynamic', a float > 0 or None, got {loss_scale!r}")
        elif loss_scale is not None and (isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
                                         or not (math.isfinite(loss_scale) and loss_scale > 0)):
            raise ValueError(f"loss_scale must be 'dynamic', a finite float > 0 or None, got {loss_scale!r}")
        self.dynamic = loss_scale == "dynamic"
        if self.dynamic:
            if not (math.isfinite(init_scale) and init_scale > 0):
                raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
            if not growth_factor > 1.0:
                raise ValueError(f"growth_factor must be > 1.0, got {growth_factor!r}")
            if not 0.0 < backoff_factor < 1.0:
                raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
            if not isinstance(growth_interval, int) or growth_interval < 1:
                raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        start = init_scale if self.dynamic else (1.0 if loss_scale is None else float(loss_scale))
        self.scale = torch.full((), start, dtype=torch.float32, device=device)
        """S, a 0-d float32 tensor."""
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        """Consecutive clean steps since S last changed."""

    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * S: call backward on this."""
        return loss * self.scale.to(loss.device)

    def inv_scale(self) -> Tensor:
        """1 / S, computed in float64 as GradScaler does."""
        return self.scale.double().reciprocal().float()

    def update(self, found_inf: Tensor) -> None:
        """Move S by the GradScaler rule after a step whose gradients had (found_inf > 0) or had no inf/NaN."""
        if self.dynamic:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf.to(self.scale.device),
                                     self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])
