"""Gradient clipping for real training code: foreach kernels, and a global norm that is right when gradients are
sharded across ranks (ZeRO, tensor and pipeline parallel).

The global p-norm of all gradients is ||g||_p = (sum_i |g_i|^p)^(1/p). When the gradient is split into disjoint
shards over a process group, each rank computes the sum of |g|^p over its shards, the sums are all-reduced (SUM),
and the p-th root is taken; for p = inf the local maxima are all-reduced with MAX. Gradients every rank holds in
full (replicated: a LayerNorm weight under tensor parallel) are added once, not once per rank.

    total = global_grad_norm(my_shards, replicated=ln_grads, process_group=pg)   # the same value on every rank
    clip_grads_with_norm_([*my_shards, *ln_grads], max_norm=1.0, total_norm=total)

Differences from torch.nn.utils.clip_grad_norm_, on purpose:
- Norms are accumulated in float32 whatever the gradients' dtype: torch returns an fp16 norm for fp16 gradients,
  which overflows to inf past 65504 (and then zeroes every gradient); here it stays finite and exact to fp32.
- A NaN anywhere gives a NaN norm on every rank for p = inf too (a MAX all-reduce alone can drop a NaN).
For fp32 gradients on one process `clip_grad_norm_` performs torch's operations, so its results are bitwise equal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from optimized import _validate as check


def _norm_type(norm_type: float | str) -> float:
    """norm_type as a float: a number >= 1, inf, or the string "inf" that torch's clip_grad_norm_ also takes."""
    if isinstance(norm_type, str) and norm_type.strip().lower() == "inf":
        norm_type = math.inf
    return check.real("norm_type", norm_type, minimum=1.0, allow_inf=True)


def _max_norm(max_norm: float) -> float:
    """A number > 0; inf measures the norm and never clips."""
    return check.real("max_norm", max_norm, minimum=0.0, min_open=True, allow_inf=True)


def _process_group(process_group: object) -> None:
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise check.fail("process_group", process_group, "a torch.distributed.ProcessGroup or None (the default group)")


def _by_device(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _tensor_norms(grads: list[Tensor], norm_type: float, device: torch.device, foreach: bool | None) -> Tensor:
    """(len(grads),) float32 (float64 if any gradient is) on `device`: the p-norm of each gradient, one foreach
    kernel per (device, dtype)."""
    norms: list[Tensor] = []
    for (_, dtype), group in _by_device(grads).items():
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        if foreach is False:
            norms.extend(torch.linalg.vector_norm(g, norm_type, dtype=acc) for g in group)
        else:
            norms.extend(torch._foreach_norm(group, norm_type, dtype=acc))
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms), torch.float32)
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms])  # (n_grads,)


def _local_power_sum(grads: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """sum |g|^p over `grads` (max |g| for p = inf), in fp32 on `device`."""
    if not grads:
        return torch.zeros((), device=device)
    norms = _tensor_norms(grads, norm_type, device, foreach=None)
    if norm_type == math.inf:
        return norms.max()
    return norms.pow(norm_type).sum()


def global_grad_norm(
    sharded: Iterable[Tensor],
    replicated: Iterable[Tensor] = (),
    *,
    norm_type: float = 2.0,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The p-norm of the full gradient from this rank's pieces (float32, the same on every rank of the group).

    sharded: gradient shards this rank owns (disjoint across the group; summed over ranks).
    replicated: gradients every rank of the group holds in full (counted once).
    Without an initialised process group this is the plain norm of all given gradients."""
    norm_type = _norm_type(norm_type)
    _process_group(process_group)
    sharded = [g.detach() for g in check.tensors("sharded", sharded, allow_none=True) if g is not None]
    replicated = [g.detach() for g in check.tensors("replicated", replicated, allow_none=True) if g is not None]
    device = (sharded or replicated or [torch.zeros(())])[0].device
    local = _local_power_sum(sharded, norm_type, device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if distributed and norm_type == math.inf:
        # MAX over [max with NaN as +inf, saw-a-NaN flag]: one collective that cannot lose a NaN.
        packed = torch.stack([local.nan_to_num(nan=math.inf, posinf=math.inf), local.isnan().to(local.dtype)])  # (2,)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=process_group)
        local = torch.where(packed[1] > 0, torch.full_like(packed[0], math.nan), packed[0])
    elif distributed:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    shared = _local_power_sum(replicated, norm_type, device)
    if norm_type == math.inf:
        return torch.maximum(local, shared)  # propagates NaN
    return (local + shared).pow(1.0 / norm_type)


def clip_grads_with_norm_(grads: Iterable[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Scale `grads` in place by min(1, max_norm / (total_norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does."""
    _max_norm(max_norm)
    check.scalar_tensor("total_norm", total_norm)
    grads = [g for g in check.tensors("grads", grads, allow_none=True) if g is not None]
    if not grads:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for (device, _), group in _by_device(grads).items():
        torch._foreach_mul_(group, coef.to(device))


def clip_grad_norm_(
    parameters: Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_ on one process: returns the total norm before clipping.

    foreach: None or True use one multi-tensor norm kernel per (device, dtype); False a loop of per-tensor norms.
    """
    _max_norm(max_norm)
    norm_type = _norm_type(norm_type)
    check.boolean("error_if_nonfinite", error_if_nonfinite)
    check.boolean("foreach", foreach, optional=True)
    grads = [p.grad for p in check.tensors("parameters", parameters) if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = _tensor_norms([g.detach() for g in grads], norm_type, grads[0].device, foreach)
    total = torch.linalg.vector_norm(norms, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}); "
                           f"pass error_if_nonfinite=False to scale by it anyway")
    clip_grads_with_norm_(grads, max_norm, total)
    return total


def clip_sharded_grad_norm_(
    sharded: Iterable[Tensor],
    replicated: Iterable[Tensor] = (),
    *,
    max_norm: float,
    norm_type: float = 2.0,
    process_group: dist.ProcessGroup | None = None,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """`global_grad_norm` then `clip_grads_with_norm_` on every given gradient: clip a sharded model's gradients by
    the norm of the whole gradient. Returns that norm (before clipping)."""
    _max_norm(max_norm)
    norm_type = _norm_type(norm_type)
    check.boolean("error_if_nonfinite", error_if_nonfinite)
    _process_group(process_group)
    sharded = [g for g in check.tensors("sharded", sharded, allow_none=True) if g is not None]
    replicated = [g for g in check.tensors("replicated", replicated, allow_none=True) if g is not None]
    total = global_grad_norm(sharded, replicated, norm_type=norm_type, process_group=process_group)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the global norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    clip_grads_with_norm_([*sharded, *replicated], max_norm, total)
    return total
