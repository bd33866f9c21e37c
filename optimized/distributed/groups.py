"""Process groups as every parallel technique meets them: which rank am I in this group and how many are we, and is
this module ready to be spread over it (one device, real values, the same model on every rank).

Each answer is a clear error before any collective runs (or, for `check_replicas_agree`, before any collective that
moves weights), so a wrong group or a wrong model fails on every rank with a message, never as a hang.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def group_rank_and_size(process_group: dist.ProcessGroup | None, argument: str = "process_group") -> tuple[int, int]:
    """(rank in the group, group size); a clear error when torch.distributed is not initialised or this process is
    not a member of `process_group`. No collective runs."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group (or launch through "
            "torchrun / conformance.launch.spawn) before wrapping a module"
        )
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{argument}: this process (global rank {dist.get_rank()}) is not a member of the group")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError(f"{argument}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(process_group)


def single_device(tensors: Sequence[Tensor], argument: str) -> torch.device:
    """The one device all `tensors` live on; a ValueError listing the devices otherwise."""
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(f"{argument}: parameters and buffers must all be on one device, found {devices}")
    return tensors[0].device if tensors else torch.device("cpu")


def refuse_meta(module: nn.Module, argument: str) -> None:
    """A ValueError when a parameter or buffer of `module` is on the meta device (shapes without values)."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            raise ValueError(
                f"{argument}: {name!r} is on the meta device (a shape without values); materialise the model first, "
                f"e.g. {argument}.to_empty(device=...) and initialise its weights, then wrap it"
            )


def check_replicas_agree(module: nn.Module, process_group: dist.ProcessGroup | None, argument: str) -> None:
    """Raise on every rank, before any collective that moves weights, unless every rank of the group holds a model
    with the same parameter names, shapes, dtypes and requires_grad (in order), as DDP verifies at wrap. The error
    names the first difference and the ranks that differ from rank 0. One all_gather_object."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return
    mine = [(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad)
            for name, p in module.named_parameters(remove_duplicate=False)]
    every: list = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(every, mine, group=process_group)
    first = every[0]
    for rank, theirs in enumerate(every[1:], start=1):
        if theirs == first:
            continue
        differs = [r for r, other in enumerate(every) if other != first]
        for i, (a, b) in enumerate(zip(first, theirs, strict=False)):
            if a != b:
                what = ("name", "shape", "dtype", "requires_grad")
                field_ = next(k for k, x, y in zip(what, a, b, strict=True) if x != y)
                raise ValueError(
                    f"{argument}: the ranks hold different models: parameter {i} is {a[0]!r} {what[1]} {a[1]} "
                    f"dtype {a[2]} requires_grad {a[3]} on rank 0 but {b[0]!r} {what[1]} {b[1]} dtype {b[2]} "
                    f"requires_grad {b[3]} on rank {rank} (its {field_} differs); rank(s) {differs} differ from "
                    f"rank 0"
                )
        extra = (first if len(first) > len(theirs) else theirs)[min(len(first), len(theirs))][0]
        raise ValueError(
            f"{argument}: the ranks hold different models: rank 0 has {len(first)} parameters, rank {rank} has "
            f"{len(theirs)} (first extra: {extra!r}); rank(s) {differs} differ from rank 0"
        )


