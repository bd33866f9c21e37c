"""Process groups, the parallel grid, shared collectives and gradient hooks: what every parallel technique imports.

Read in this order:
    groups.py       this rank and the group's size, and whether a module is ready to be spread over a group
    grid.py         the pp x dp x cp x tp grid (tp innermost), a named process group per dimension
    collectives.py  Group (collectives that are no-ops on one rank) and broadcast_state
    hooks.py        gradient-ready hooks and the buckets they fill (data parallel and ZeRO)
"""

from optimized.distributed.collectives import Group, broadcast_state
from optimized.distributed.grid import DIMS, GROUPS, ParallelDims, ProcessGrid, make_process_grid
from optimized.distributed.groups import check_replicas_agree, group_rank_and_size, refuse_meta, single_device
from optimized.distributed.hooks import GradReadyHooks, assign_buckets

__all__ = [
    "DIMS",
    "GROUPS",
    "GradReadyHooks",
    "Group",
    "ParallelDims",
    "ProcessGrid",
    "assign_buckets",
    "broadcast_state",
    "check_replicas_agree",
    "group_rank_and_size",
    "make_process_grid",
    "refuse_meta",
    "single_device",
]
