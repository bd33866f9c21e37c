"""Simulated ranks: what each collective computes, written as the plain tensor operation it stands for.

`shards` is a list with one tensor per rank (`shards[r]` lives on rank r). A real collective moves bytes between
processes; here it is the sum or concatenation those bytes add up to, so a reader sees the result without a
process group, and autograd differentiates through it (the backward of a sum is a copy, the backward of a
concatenation is a split: exactly the dual collectives of Megatron-LM's f/g pairs, arXiv 1909.08053, Sec. 3).

Every function returns a new list, one entry per rank, and never changes its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _world(shards: Sequence[Tensor], name: str) -> int:
    if len(shards) == 0:
        raise ValueError(f"{name}: needs one tensor per rank, got an empty list")
    return len(shards)


def all_reduce(shards: Sequence[Tensor], op: str = "sum") -> list[Tensor]:
    """Every rank gets the sum (op="sum") or mean (op="avg") of all ranks' tensors."""
    world = _world(shards, "all_reduce")
    if op not in ("sum", "avg"):
        raise ValueError(f"all_reduce: op must be 'sum' or 'avg', got {op!r}")
    total = torch.stack(list(shards)).sum(dim=0)
    if op == "avg":
        total = total / world
    return [total.clone() for _ in range(world)]


def all_gather(shards: Sequence[Tensor], dim: int = 0) -> list[Tensor]:
    """Every rank gets all ranks' tensors concatenated along `dim` in rank order."""
    world = _world(shards, "all_gather")
    full = torch.cat(list(shards), dim=dim)
    return [full.clone() for _ in range(world)]


def reduce_scatter(shards: Sequence[Tensor], dim: int = 0, op: str = "sum") -> list[Tensor]:
    """Rank r gets chunk r (along `dim`) of the sum (or mean) of all ranks' tensors; `dim` must divide evenly."""
    world = _world(shards, "reduce_scatter")
    total = all_reduce(shards, op)[0]
    if total.shape[dim] % world:
        raise ValueError(f"reduce_scatter: size {total.shape[dim]} of dim {dim} does not divide by {world} ranks")
    return list(total.chunk(world, dim=dim))


def scatter(full: Tensor, world_size: int, dim: int = 0) -> list[Tensor]:
    """Rank r gets chunk r of `full` along `dim` (how a sharded layer is initialised: build the full weight, split
    it by rank, so it matches the unsharded model exactly); `dim` must divide evenly."""
    if world_size < 1 or full.shape[dim] % world_size:
        raise ValueError(f"scatter: size {full.shape[dim]} of dim {dim} does not divide by {world_size} ranks")
    return [c.clone() for c in full.chunk(world_size, dim=dim)]


def broadcast(tensor: Tensor, world_size: int) -> list[Tensor]:
    """Every rank gets a copy of `tensor` (sent from one rank)."""
    if world_size < 1:
        raise ValueError(f"broadcast: world_size must be >= 1, got {world_size}")
    return [tensor.clone() for _ in range(world_size)]


def all_to_all(sends: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
    """`sends[src][dst]` is what rank src sends to rank dst; rank dst receives `[sends[0][dst], sends[1][dst], ...]`
    (the transpose of the send matrix: expert parallelism's dispatch and combine)."""
    world = _world(sends, "all_to_all")
    for src, row in enumerate(sends):
        if len(row) != world:
            raise ValueError(f"all_to_all: rank {src} sends {len(row)} tensors, needs one per rank ({world})")
    return [[sends[src][dst] for src in range(world)] for dst in range(world)]


def ring_shift(shards: Sequence[Tensor], shift: int = 1) -> list[Tensor]:
    """Rank r sends its tensor to rank (r + shift) mod P and receives the one of rank (r - shift) mod P: one hop of a
    ring of point-to-point sends (how ring attention passes K/V blocks on). Tensors may differ in shape by rank."""
    world = _world(shards, "ring_shift")
    return [shards[(r - shift) % world].clone() for r in range(world)]
