"""The averaged gradient of this rank's master slices, between the end of backward and the update: the inf/NaN
check, the loss scale's unscale and the global norm for clipping, with as few collectives as possible.

At the end of every reduction one all-reduce carries [any inf/NaN in my slice, sum of my squared gradients]:
    found_inf = sum over ranks of the first entry > 0     (every rank skips the step, or none does)
    ||g||_2   = sqrt(sum over ranks of the second)         (cached, reused by clip_grad_norm_(2.0))
The cache is keyed by the gradients' versions, so any in-place change since (GradScaler.unscale_, a user's own
edit) makes the norm be computed again. The unscale divides by the loss scale S once per step and scales a valid
cached norm by 1/S instead of recomputing it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from optimized.clipping import clip_grads_with_norm_, global_grad_norm
from optimized.mixed_precision import LossScale, unscale_and_check_
from optimized.zero.comm import Group
from optimized.zero.offload import Placement
from optimized.zero.partition import FlatBuffers


class MasterGrads:
    """The master slices' gradients of one ZeroOptimizer: attach, check, unscale, measure and clip them."""

    def __init__(self, flats: list[FlatBuffers], scaler: LossScale, group: Group, placement: Placement) -> None:
        self.flats, self.scaler, self.group, self.placement = flats, scaler, group, placement
        self.found_inf = False
        """Some rank's gradients held an inf/NaN at the last reduction: the step is skipped on every rank."""
        self.unscaled = False
        """The gradients were divided by the loss scale since the last reduction."""
        self.norm_cache: tuple[Tensor, list[int]] | None = None
        """(2-norm, versions of the master grads) from the last reduction's all-reduce."""

    def reset(self) -> None:
        """Forget the last reduction (zero_grad): nothing found, nothing unscaled, no norm."""
        self.found_inf = False
        self.unscaled = False
        self.norm_cache = None

    def grads(self) -> list[Tensor]:
        return [flat.master.grad for flat in self.flats]

    @staticmethod
    def _versions(grads: list[Tensor]) -> list[int]:
        return [g._version for g in grads]

    @torch.no_grad()
    def attach(self, owned: list[Tensor]) -> None:
        """Give every master slice its averaged gradient (`owned`, one per flat buffer), then one all-reduce of
        [inf/NaN seen, sum of squares]."""
        for flat, own in zip(self.flats, owned, strict=True):
            flat.master.grad = own if own.dtype == flat.master.dtype and own.device == flat.master.device else (
                own.to(flat.master.device, flat.master.dtype))
        grads = self.grads()
        found = torch.zeros((), dtype=torch.float32, device=self.placement.host)
        unscale_and_check_(grads, torch.ones((), dtype=torch.float32, device=found.device), found)
        squares = self._local_power_sum(grads, 2.0)
        packed = torch.stack([found.to(squares), squares])  # (2,) in the norm's dtype
        packed = self._all_reduce(packed, dist.ReduceOp.SUM)
        self.found_inf = bool(packed[0] > 0)
        if self.found_inf and not found:
            # GradScaler decides from each rank's own gradients: make this rank's slice say what the group saw,
            # so that every rank skips the step and backs off its scale together.
            for g in grads:
                if g.numel():
                    g.view(-1)[0] = math.nan
                    break
        self.norm_cache = (packed[1].sqrt(), self._versions(grads))
        self.unscaled = False

    def _local_power_sum(self, grads: list[Tensor], norm_type: float) -> Tensor:
        """sum |g|^p over this rank's slices (max |g| for p = inf), in float32 or the gradients' wider dtype (a
        float64 run keeps a float64 norm: its clipping coefficient must not round to float32)."""
        nonempty = [g for g in grads if g.numel()]
        if not nonempty:
            return torch.zeros((), dtype=torch.float32, device=self.placement.host)
        norms = torch.stack([n.to(torch.promote_types(n.dtype, torch.float32))
                             for n in torch._foreach_norm(nonempty, norm_type)])
        return norms.max() if norm_type == math.inf else norms.pow(norm_type).sum()

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        """All-reduce a few numbers, on the device the backend needs (NCCL: the GPU, offloaded values included)."""
        if not self.group.active:
            return t
        comm = self.placement.device if self.group.backend == "nccl" else t.device
        moved = t.to(comm)
        self.group.all_reduce(moved, op)
        return moved.to(t.device)

    def unscale(self) -> None:
        """Divide the masters' gradients by the loss scale S, once per step (nothing to do when S = 1)."""
        if self.unscaled:
            return
        self.unscaled = True
        if self.scaler.dynamic or float(self.scaler.scale) != 1.0:
            grads = self.grads()
            in_sync = self.norm_cache is not None and self.norm_cache[1] == self._versions(grads)
            inv = self.scaler.inv_scale()
            host = self.placement.host
            unscale_and_check_(grads, inv.to(host), torch.zeros((), dtype=torch.float32, device=host))
            if in_sync:
                self.norm_cache = (self.norm_cache[0] * inv.to(self.norm_cache[0].device), self._versions(grads))

    def clip(self, max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
        """Scale the (unscaled) gradients so that their global norm is at most max_norm; return the norm before.

        The norm is that of optimized.clipping.global_grad_norm over the slices: sum_ranks sum_slice |g|^p,
        all-reduced, then the p-th root (max for p = inf); the 2-norm comes from the cache when the gradients are
        unchanged since the reduction (no other collective)."""
        grads = self.grads()
        if norm_type == 2.0 and self.norm_cache is not None and self.norm_cache[1] == self._versions(grads):
            total = self.norm_cache[0]
        else:
            total = self._global_norm(grads, norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)})")
        clip_grads_with_norm_(grads, max_norm, total)
        return total

    def _global_norm(self, grads: list[Tensor], norm_type: float) -> Tensor:
        pg = self.group.process_group if self.group.distributed else None
        device = self.placement.device
        if self.group.backend == "nccl" and grads and grads[0].device != device:
            # Offloaded gradients live on the CPU but NCCL reduces on the GPU. ||g||_p is the p-norm of the
            # per-slice norms, so moving those few numbers is enough.
            grads = [torch.stack(torch._foreach_norm(grads, norm_type)).to(device)]
        return global_grad_norm(grads, norm_type=norm_type, process_group=pg)
