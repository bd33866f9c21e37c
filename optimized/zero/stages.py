"""What differs between ZeRO's stages, one strategy object per stage, chosen once when the optimizer is built
(ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 5.1-5.3).

Each stage shards one more model state than the one before, so each strategy is the previous one with one
decision changed:
    Stage1   optimizer state sharded. Parameters stay whole on every rank (the flat buffer is the storage of the
             model's parameters); gradients accumulate whole and are reduced at the end of backward (WholeBuffer);
             after the update each rank's slice is all-gathered. no_sync() is allowed.
    Stage2   + gradients sharded: a rank keeps only the gradient of its slice (none on the device with offload:
             reduced slices go straight to the host), filled bucket by bucket during backward (Buckets); no_sync()
             is refused, there is no unreduced gradient to keep.
    Stage3   + parameters sharded: a rank stores only its slice; modules gather their parameters around forward
             and backward (Gathering), so there is nothing to all-gather after the update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from optimized.zero.comm import Group
from optimized.zero.gather import Gathering
from optimized.zero.partition import FlatBuffers, FlatLayout, Slot
from optimized.zero.reduction import Buckets, WholeBuffer

Where = dict[int, tuple[FlatBuffers, Slot]]
"""id(parameter) -> (its flat buffers, its slot)."""


class Stage1:
    """ZeRO-1: the optimizer state (and the fp32 master) of the owned slice only."""

    number = 1

    def store(self, compute: Tensor, params: list[nn.Parameter], layout: FlatLayout, rank: int) -> Tensor:
        """The parameter values this rank keeps, given the whole padded buffer `compute`: all of it, and the
        model's parameters become views of it."""
        for p, slot in zip(params, layout.slots, strict=True):
            p.data = compute[slot.offset : slot.end].view(slot.shape)
        return compute

    def owned(self, buffer: Tensor, layout: FlatLayout, rank: int) -> Tensor:
        """The owned real elements within what `store` kept."""
        start = layout.shard_start(rank)
        return buffer[start : start + layout.owned_numel(rank)]

    def grad_buffer(self, layout: FlatLayout, device: torch.device, offload: bool) -> Tensor | None:
        """The device gradient buffer: the whole padded buffer, local until reduced."""
        return torch.zeros(layout.padded_numel, dtype=layout.dtype, device=device)

    def reduction(self, flats: list[FlatBuffers], where: Where, group: Group, offload: bool, bucket_bytes: int,
                  device: torch.device) -> WholeBuffer | Buckets:
        return WholeBuffer(flats, where, group, offload)

    def gathering(self, model: nn.Module, flats: list[FlatBuffers], where: Where, group: Group,
                  device: torch.device, names: dict[int, str]) -> Gathering | None:
        """Stages 1-2 keep the parameters whole: nothing to gather."""
        return None

    @torch.no_grad()
    def publish(self, flat: FlatBuffers, group: Group) -> None:
        """After the owned slice is updated: make every rank's copy of the whole buffer current."""
        s, start = flat.layout.shard_numel, flat.layout.shard_start(group.rank)
        group.all_gather_into(flat.buffer, flat.buffer[start : start + s])

    def check_no_sync(self) -> None:
        """Stage 1 accumulates whole local gradients: backwards may skip their reduction."""


class Stage2(Stage1):
    """ZeRO-2: + the gradients of the owned slice only, reduced bucket by bucket during backward."""

    number = 2

    def grad_buffer(self, layout: FlatLayout, device: torch.device, offload: bool) -> Tensor | None:
        """This rank's slice; none with offload (the reduced pieces go straight to the host slice)."""
        return None if offload else torch.zeros(layout.shard_numel, dtype=layout.dtype, device=device)

    def reduction(self, flats: list[FlatBuffers], where: Where, group: Group, offload: bool, bucket_bytes: int,
                  device: torch.device) -> WholeBuffer | Buckets:
        return Buckets(flats, where, group, offload, bucket_bytes, device)

    def check_no_sync(self) -> None:
        raise RuntimeError(f"no_sync() is for stage 1; stage {self.number} reduces each gradient bucket during "
                           f"backward and keeps only this rank's slice (as DeepSpeed does)")


class Stage3(Stage2):
    """ZeRO-3: + the parameters of the owned slice only, gathered around each module's forward and backward."""

    number = 3

    def store(self, compute: Tensor, params: list[nn.Parameter], layout: FlatLayout, rank: int) -> Tensor:
        """This rank's slice only (a copy: the whole buffer is freed); the parameters get storage in gather.py."""
        start = layout.shard_start(rank)
        return compute[start : start + layout.shard_numel].clone()

    def owned(self, buffer: Tensor, layout: FlatLayout, rank: int) -> Tensor:
        return buffer[: layout.owned_numel(rank)]

    def gathering(self, model: nn.Module, flats: list[FlatBuffers], where: Where, group: Group,
                  device: torch.device, names: dict[int, str]) -> Gathering | None:
        return Gathering(model, flats, where, group, device, names)

    def publish(self, flat: FlatBuffers, group: Group) -> None:
        """Nothing: the next gather reads the updated slice."""


STAGES = {1: Stage1(), 2: Stage2(), 3: Stage3()}
"""The strategy of each stage number."""
