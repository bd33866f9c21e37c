"""Collectives shared by more than one technique.

`Group`: one process group and this process's place in it, with the few collectives the sharded optimizer (ZeRO:
gradient reduction, parameter gathering, the overflow and norm reductions) and its checkpoints need, each a no-op on
a single rank (no initialised process group, or a group of one), so the same code runs everywhere.
`broadcast_state`: every rank takes rank 0's values (data parallel at wrap and, with broadcast_buffers, each forward).

The collectives with a gradient that only tensor parallelism uses (Megatron's f and g) live beside it, in
optimized.tensor_parallel.regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from optimized.distributed.groups import group_rank_and_size


@dataclass(frozen=True)
class Group:
    """One process group and this process's place in it."""

    process_group: dist.ProcessGroup | None
    """The group (None: the default group, or no process group at all when `distributed` is False)."""
    rank: int
    """This process's rank in the group."""
    world_size: int
    """Number of ranks in the group (Nd in the ZeRO paper)."""
    distributed: bool
    """torch.distributed is initialised (False: a single process, every collective is a no-op)."""

    @classmethod
    def resolve(cls, process_group: dist.ProcessGroup | None, argument: str = "process_group") -> Group:
        """The group `process_group` names (default: the world), or a group of one without torch.distributed."""
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed:
            if process_group is not None:
                raise ValueError(f"{argument} was given but torch.distributed is not initialised")
            return cls(None, 0, 1, False)
        group = process_group if process_group is not None else dist.group.WORLD
        rank, world_size = group_rank_and_size(group, argument)
        return cls(group, rank, world_size, True)

    @property
    def active(self) -> bool:
        """More than one rank: collectives move data."""
        return self.distributed and self.world_size > 1

    @property
    def backend(self) -> str | None:
        return dist.get_backend(self.process_group) if self.distributed else None

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.process_group, group_rank)

    def broadcast(self, tensor: Tensor, src: int) -> None:
        """Overwrite `tensor` on every rank with rank `src`'s."""
        if self.active:
            dist.broadcast(tensor, src=self._global(src), group=self.process_group)

    def reduce(self, tensor: Tensor, dst: int) -> None:
        """Sum `tensor` over the ranks into rank `dst`'s copy (the others' copies are left undefined)."""
        if self.active:
            dist.reduce(tensor, dst=self._global(dst), group=self.process_group)

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        if self.active:
            dist.all_reduce(tensor, op=op, group=self.process_group)

    def all_gather_into(self, output: Tensor, mine: Tensor) -> None:
        """output = concatenation of every rank's `mine`, in rank order (output is world_size times as long)."""
        if not self.active:
            return
        if hasattr(dist, "all_gather_single"):
            dist.all_gather_single(output, mine, group=self.process_group)
        else:  # torch < 2.10
            dist.all_gather_into_tensor(output, mine, group=self.process_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.process_group)

    def agree(self, error: str | None) -> None:
        """Raise on every rank when any rank has an `error` (a message), naming the first rank that had one.

        Every rank must call it; it is how a decision taken from local facts (a shard read, a file written)
        becomes the same decision everywhere before any state changes."""
        errors = self.all_gather_object(error)
        failed = [r for r, e in enumerate(errors) if e is not None]
        if failed:
            others = f" (rank(s) {', '.join(map(str, failed[1:]))} failed too)" if failed[1:] else ""
            raise RuntimeError(f"rank {failed[0]} of {self.world_size}: {errors[failed[0]]}{others}")


@torch.no_grad()
def broadcast_state(tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None) -> None:
    """Overwrite `tensors` with the values of the group's rank 0: one coalesced broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])  # (sum of numels,)
        dist.broadcast(flat, group=process_group, group_src=0)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
