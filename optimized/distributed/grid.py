"""The process grid: the world's ranks laid out as pp x dp x cp x tp, a process group per dimension, and this rank's
coordinates on it.

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank          tp innermost, pp outermost

The order is Megatron-LM's and torchtitan's: a tensor-parallel group is tp consecutive ranks (one node, where its
two all-reduces per layer are cheapest: Narayanan et al. 2021, arXiv 2104.04473, Sec. 3.3), context parallel next
(a ring exchange per attention layer), data parallel across them (one gradient reduction per step) and pipeline
stages outermost (point-to-point activations only). ZeRO shards inside data parallel: dp = dp_replicate x dp_shard,
dp_shard innermost, so a ZeRO group of dp_shard ranks sits on neighbouring ranks and the replicas of a shard
(dp_replicate, HSDP's outer dimension) stride across them; dp_shard = dp (the default) shards over all of dp.

Groups, by name (`ProcessGrid.group(name)`): "tp", "cp", "dp", "pp", "dp_shard", "dp_replicate", and "dp_cp": the
ranks that hold the same parameters (same tp and pp coordinates), over which gradients are averaged; with cp > 1 the
context-parallel ranks see different tokens of the same sequences, so they average gradients too (Megatron's
data-parallel-with-context-parallel group).

Plain `dist.new_group` rather than torch's DeviceMesh: the flattened groups this grid needs ("dp", "dp_cp") are only
reachable through DeviceMesh's private `_flatten`, and every technique here takes a plain ProcessGroup
(`process_group=`), so the mesh would be unwrapped at every call anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist

from optimized.distributed.groups import group_rank_and_size

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""The grid's dimensions, outermost first: rank = the mixed-radix number of its coordinates in this order."""

GROUPS: dict[str, tuple[str, ...]] = {
    "pp": ("pp",),
    "dp": ("dp_replicate", "dp_shard"),
    "dp_replicate": ("dp_replicate",),
    "dp_shard": ("dp_shard",),
    "cp": ("cp",),
    "tp": ("tp",),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}
"""Each named group: the dimensions along which its members differ (all other coordinates equal)."""


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """How many ranks each kind of parallelism uses; their product is the world size. 1 means disabled."""

    dp: int = 1
    """Data-parallel degree: model replicas (or ZeRO shards) that read different batches."""
    tp: int = 1
    """Tensor-parallel degree: ranks splitting each layer's weights (Megatron); keep it within a node, where its
    per-layer all-reduces are cheapest."""
    pp: int = 1
    """Pipeline-parallel degree: stages, each holding a contiguous run of layers."""
    cp: int = 1
    """Context-parallel degree: ranks splitting each sequence (ring attention); they hold the same parameters, so
    they average gradients with dp (the "dp_cp" group)."""
    dp_shard: int | None = None
    """Ranks of dp that ZeRO shards the model state over (must divide dp); None: all of dp."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "cp", "dp_shard"):
            value = getattr(self, name)
            if value is None and name == "dp_shard":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dp_shard is not None and self.dp % self.dp_shard:
            raise ValueError(f"dp_shard={self.dp_shard} must divide dp={self.dp} (dp = dp_replicate x dp_shard)")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def sizes(self) -> dict[str, int]:
        """The size of each dimension of DIMS."""
        shard = self.dp if self.dp_shard is None else self.dp_shard
        return {"pp": self.pp, "dp_replicate": self.dp // shard, "dp_shard": shard, "cp": self.cp, "tp": self.tp}

    def coordinates(self, rank: int) -> dict[str, int]:
        """Where global `rank` sits on the grid: a coordinate per dimension of DIMS, plus "dp" (its index among the
        dp = dp_replicate x dp_shard ranks, dp_shard fastest)."""
        sizes = self.sizes
        out: dict[str, int] = {}
        for dim in reversed(DIMS):
            rank, out[dim] = divmod(rank, sizes[dim])
        out["dp"] = out["dp_replicate"] * sizes["dp_shard"] + out["dp_shard"]
        return {k: out[k] for k in ("pp", "dp", "dp_replicate", "dp_shard", "cp", "tp")}

    def members(self, name: str, rank: int) -> list[int]:
        """The global ranks of group `name` (a key of GROUPS) that holds global `rank`, in group-rank order."""
        if name not in GROUPS:
            raise ValueError(f"group must be one of {sorted(GROUPS)}, got {name!r}")
        sizes = self.sizes
        mine = self.coordinates(rank)
        strides = {dim: math.prod(sizes[d] for d in DIMS[i + 1:]) for i, dim in enumerate(DIMS)}
        base = sum(mine[d] * strides[d] for d in DIMS if d not in GROUPS[name])
        ranks = [base]
        for dim in reversed(GROUPS[name]):  # the innermost varying dimension varies fastest
            ranks = [r + i * strides[dim] for i in range(sizes[dim]) for r in ranks]
        return ranks

    def partition(self, name: str) -> list[list[int]]:
        """Every group named `name`, as lists of global ranks, each once, ordered by their first rank."""
        seen: dict[int, list[int]] = {}
        for r in range(self.world_size):
            ranks = self.members(name, r)
            seen.setdefault(ranks[0], ranks)
        return [seen[k] for k in sorted(seen)]


@dataclass(frozen=True)
class ProcessGrid:
    """This rank's place on the grid and the process group of each named dimension (see the module docstring)."""

    dims: ParallelDims
    rank: int
    """This process's global rank."""
    coordinates: dict[str, int]
    """Its coordinate along each dimension ("pp", "dp", "dp_replicate", "dp_shard", "cp", "tp")."""
    groups: dict[str, dist.ProcessGroup] = field(repr=False)
    """The group of each name in GROUPS that holds this rank."""

    def group(self, name: str) -> dist.ProcessGroup:
        """The process group `name` (a key of GROUPS) holding this rank, to pass as `process_group=`."""
        if name not in self.groups:
            raise ValueError(f"group must be one of {sorted(self.groups)}, got {name!r}")
        return self.groups[name]

    def members(self, name: str) -> list[int]:
        """The global ranks of this rank's group `name`."""
        return self.dims.members(name, self.rank)

    def __getattr__(self, attribute: str):
        """`<name>_group`, `<name>_rank` (this rank's place in that group: its coordinate) and `<name>_size` for every
        name in GROUPS: grid.tp_group (parallelize's process_group), grid.dp_group (DataParallel's), grid.dp_rank,
        grid.cp_size, ..."""
        name, _, what = attribute.rpartition("_")
        if name in GROUPS and what in ("group", "rank", "size"):
            if what == "group":
                return self.groups[name]
            members = self.members(name)
            return members.index(self.rank) if what == "rank" else len(members)
        raise AttributeError(f"{type(self).__name__} has no attribute {attribute!r} (groups: {sorted(GROUPS)}, each "
                             f"with _group, _rank and _size)")


def make_process_grid(dims: ParallelDims | None = None, /, **degrees: int | None) -> ProcessGrid:
    """Build every group of the grid over the world: `make_process_grid(ParallelDims(dp=2, tp=2))` or
    `make_process_grid(dp=2, tp=2)`. Every rank must call it (dist.new_group is collective over the world), and every
    rank creates all groups in the same order. The degrees are checked against the world size before any group is
    created."""
    if dims is None:
        dims = ParallelDims(**degrees)
    elif degrees:
        raise ValueError(f"pass either a ParallelDims or degrees as keywords, not both (got {sorted(degrees)} too)")
    elif not isinstance(dims, ParallelDims):
        raise ValueError(f"dims must be a ParallelDims, got {type(dims).__name__}")
    rank, world = group_rank_and_size(None)
    if dims.world_size != world:
        product = " * ".join(f"{n}={getattr(dims, n)}" for n in ("pp", "dp", "cp", "tp"))
        raise ValueError(f"{product} = {dims.world_size} must equal the world size {world}")
    groups: dict[str, dist.ProcessGroup] = {}
    made: dict[tuple[int, ...], dist.ProcessGroup] = {}  # names that coincide (dp and dp_cp with cp=1) share one
    for name in GROUPS:
        for ranks in dims.partition(name):
            if tuple(ranks) not in made:
                made[tuple(ranks)] = dist.new_group(ranks)
            if rank in ranks:
                groups[name] = made[tuple(ranks)]
    return ProcessGrid(dims, rank, dims.coordinates(rank), groups)
