"""The conjugate operators of tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053, Sec. 3, Fig. 3).

Each is a tiny autograd.Function whose docstring says what it does forward and backward:
    f  copy_to_region      identity forward, all-reduce backward   (before a column-parallel layer)
    g  reduce_from_region  all-reduce forward, identity backward   (after a row-parallel layer)
    scatter_to_region      keep this rank's slice of the last dim forward, all-gather backward
    gather_from_region     all-gather the last dim forward, keep this rank's slice backward
With a group of one rank each is the identity and no collective is issued.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from optimized.distributed.groups import group_rank_and_size


def _all_reduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """A reduced copy of x (never in place: x may be read elsewhere in the graph)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _slice_last_dim(x: Tensor, group) -> Tensor:
    rank, t = group_rank_and_size(group)
    if x.size(-1) % t:
        raise ValueError(f"last dimension {x.size(-1)} must be divisible by the group size {t}")
    return x.chunk(t, dim=-1)[rank].contiguous()  # (..., n / t)


def _gather_last_dim(x: Tensor, group) -> Tensor:
    _, t = group_rank_and_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(t)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)  # (..., n * t)


class CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward (Megatron-LM, arXiv 1909.08053, Sec. 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward (Megatron-LM, arXiv 1909.08053, Sec. 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ScatterToRegion(torch.autograd.Function):
    """Split the last dim and keep this rank's slice forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _slice_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gather_last_dim(grad, ctx.group), None


class GatherFromRegion(torch.autograd.Function):
    """All-gather the last dim forward, keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _slice_last_dim(grad, ctx.group), None


def group_size(group) -> int:
    return group_rank_and_size(group)[1]


def copy_to_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """f: identity forward, all-reduce backward."""
    return x if group_size(group) == 1 else CopyToRegion.apply(x, group)


def reduce_from_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """g: all-reduce forward, identity backward."""
    return x if group_size(group) == 1 else ReduceFromRegion.apply(x, group)


def scatter_to_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's slice of the last dim forward, all-gather backward."""
    return x if group_size(group) == 1 else ScatterToRegion.apply(x, group)


def gather_from_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All-gather of the last dim forward, this rank's slice backward."""
    return x if group_size(group) == 1 else GatherFromRegion.apply(x, group)
