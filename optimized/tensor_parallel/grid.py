"""DP x TP: this rank's place on a data-parallel x tensor-parallel grid of process groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from optimized.data_parallel import group_rank_and_size


@dataclass(frozen=True)
class ProcessGrid:
    """This rank's place on a dp_size x tp_size grid: global rank = dp_rank * tp_size + tp_rank, so a tensor-parallel
    group is tp_size consecutive ranks (one node, where its per-layer all-reduces are cheapest: Narayanan et al.
    2021, arXiv 2104.04473, Sec. 3.3) and a data-parallel group strides across them."""

    dp_group: dist.ProcessGroup
    """The ranks holding the same shards: gradients are averaged over it (DataParallel's process_group)."""
    tp_group: dist.ProcessGroup
    """The ranks sharing one model replica: parallelize's process_group."""
    dp_rank: int
    tp_rank: int
    dp_size: int
    tp_size: int


def make_process_grid(dp_size: int, tp_size: int) -> ProcessGrid:
    """Build the groups of a dp_size x tp_size grid over the world. Every rank must call it (new_group is collective
    over the world); every rank creates all groups in the same order."""
    for name, value in (("dp_size", dp_size), ("tp_size", tp_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rank, world = group_rank_and_size(None)
    if dp_size * tp_size != world:
        raise ValueError(f"dp_size * tp_size = {dp_size} * {tp_size} = {dp_size * tp_size} must equal the world size "
                         f"{world}")
    dp_rank, tp_rank = divmod(rank, tp_size)
    tp_group = dp_group = None
    for d in range(dp_size):
        group = dist.new_group([d * tp_size + i for i in range(tp_size)])
        if d == dp_rank:
            tp_group = group
    for i in range(tp_size):
        group = dist.new_group([d * tp_size + i for d in range(dp_size)])
        if i == tp_rank:
            dp_group = group
    return ProcessGrid(dp_group, tp_group, dp_rank, tp_rank, dp_size, tp_size)
