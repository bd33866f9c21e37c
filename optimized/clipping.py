"""Gradient clipping for real training code: foreach kernels, and a global norm that is right when gradients are
sharded across ranks (ZeRO, tensor and pipeline parallel).

The global p-norm of all gradients is ||g||_p = (sum_i |g_i|^p)^(1/p). When the gradient is split into disjoint
shards over a process group, each rank computes the sum of |g|^p over its shards, the sums are all-reduced (SUM),
and the p-th root is taken; for p = inf the local maxima are all-reduced with MAX. Gradients every rank holds in
full (replicated: a LayerNorm weight under tensor parallel) are added once, not once per rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def _validate(max_norm: float | None, norm_type: float) -> float:
    norm_type = float(norm_type)
    if not (norm_type >= 1.0 or norm_type == math.inf):
        raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type}")
    if max_norm is not None and (not max_norm > 0 or math.isnan(max_norm)):
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    return norm_type


def _local_power_sum(grads: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """sum |g|^p over `grads` (max |g| for p = inf), in fp32 on `device`."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, norm_type)
    norms = torch.stack([n.float().to(device) for n in norms])
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
    """The p-norm of the full gradient from this rank's pieces.

    sharded: gradient shards this rank owns (disjoint across the group; summed over ranks).
    replicated: gradients every rank of the group holds in full (counted once).
    Without an initialised process group this is the plain norm of all given gradients."""
    norm_type = _validate(None, norm_type)
    sharded = [g.detach() for g in sharded if g is not None]
    replicated = [g.detach() for g in replicated if g is not None]
    device = (sharded or replicated or [torch.zeros(())])[0].device
    local = _local_power_sum(sharded, norm_type, device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if distributed:
        op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
        dist.all_reduce(local, op=op, group=process_group)
    shared = _local_power_sum(replicated, norm_type, device)
    if norm_type == math.inf:
        return torch.maximum(local, shared)
    return (local + shared).pow(1.0 / norm_type)


def clip_grads_with_norm_(grads: Iterable[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Scale `grads` in place by min(1, max_norm / (total_norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does."""
    _validate(max_norm, 2.0)
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))


def clip_grad_norm_(
    parameters: Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_ on one process: returns the total norm before clipping."""
    norm_type = _validate(max_norm, norm_type)
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if foreach is False:
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type) for g in grads])
        total = torch.linalg.vector_norm(norms, norm_type)
    else:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, norm_type)), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    clip_grads_with_norm_(grads, max_norm, total)
    return total
