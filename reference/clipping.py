"""Gradient clipping, spelled out (Pascanu et al. 2013, arXiv 1211.5063, Sec. 3.2).

Global-norm clipping treats every gradient of the model as one long vector g:
    total_norm = ||g||_p = (sum_i |g_i|^p)^(1/p)      (p = inf: max_i |g_i|)
    if total_norm > max_norm:  g <- g * max_norm / (total_norm + 1e-6)
The direction of the update is kept; only its length is capped. torch.nn.utils.clip_grad_norm_ computes the same,
multiplying by clamp(max_norm / (total_norm + 1e-6), max=1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def _grads(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def clip_grad_norm(
    parameters: Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale all gradients in place so their global p-norm is at most max_norm; return the norm before clipping."""
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not max_norm > 0 or math.isnan(max_norm):
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if not (norm_type >= 1.0 or norm_type == math.inf):
        raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type}")
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    flat = torch.cat([g.detach().flatten() for g in grads])  # every gradient as one long vector
    if flat.numel() == 0:
        total = flat.new_zeros(())
    elif norm_type == math.inf:
        total = flat.abs().max()  # a NaN anywhere makes the max NaN
    else:
        total = flat.abs().pow(norm_type).sum() ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef)
    return total


def clip_grad_value(parameters: Iterable[Tensor] | Tensor, clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value] in place."""
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value}")
    for g in _grads(parameters):
        g.clamp_(-clip_value, clip_value)
