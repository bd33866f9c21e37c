"""Gradient reduction for ZeRO, one strategy per stage, chosen once (ZeRO, Rajbhandari et al. 2020, arXiv
1910.02054, Sec. 5.1-5.2).

Both strategies receive each parameter's gradient from a post-accumulate-grad hook the moment autograd has
accumulated it (`add`), take it out of `p.grad`, and at the end of every synchronised backward (`finish`) leave
this rank's owned slice holding the gradient averaged over the Nd ranks, summed over the backwards since `zero()`:

    WholeBuffer (stage 1)   gradients accumulate, unreduced, in a whole padded flat buffer per layout; at the end
                            of backward each owner's slice is reduced to its owner (reduce-scatter Ψ) and the rest
                            of the buffer is zeroed. Inside `no_sync()` the reduction waits for a later backward.
    Buckets (stages 2-3)    gradients are copied into buckets of about `bucket_cap_mb` (contiguous ranges of a flat
                            buffer, in reverse model order: roughly the order backward produces them); a bucket is
                            reduced, piece by piece to the owner of each piece, as soon as its last gradient
                            arrives, and freed: a rank keeps only its slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from optimized.distributed.collectives import Group
from optimized.distributed.hooks import assign_buckets
from optimized.zero.partition import FlatBuffers, Slot


class ShardedGrad(Tensor):
    """What `p.grad` of a ZeRO-managed parameter holds after backward: a zero-byte stand-in of p's shape whose use
    raises. The real gradient is sharded over the ranks (and stage 1's local one is already reduced), so
    `torch.nn.utils.clip_grad_norm_(model.parameters())` or a hand-written norm would silently see nothing."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__get__", "__set__", "__hash__", "size", "dim", "numel"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(
            f"{getattr(func, '__name__', func)}: ZeroOptimizer shards the gradients over the ranks, so a parameter's "
            f".grad holds no values after backward; use ZeroOptimizer.clip_grad_norm_(max_norm) for clipping and the "
            f"global norm, not torch.nn.utils.clip_grad_norm_(model.parameters())"
        )

    def __repr__(self) -> str:
        return f"ShardedGrad(shape={tuple(self.shape)}: sharded by ZeroOptimizer, see ZeroOptimizer.clip_grad_norm_)"


def sharded_grad(p: Tensor) -> Tensor:
    """A ShardedGrad of p's shape, dtype and device (one element of storage, broadcast)."""
    return torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape).as_subclass(ShardedGrad)


class WholeBuffer:
    """Stage 1: local gradients in a whole flat buffer, reduced to the owners at the end of backward."""

    def __init__(self, flats: list[FlatBuffers], where: dict[int, tuple[FlatBuffers, Slot]], group: Group,
                 offload: bool) -> None:
        self.flats, self.where, self.group, self.offload = flats, where, group, offload
        self._divided = False  # the owned slices hold the average (divided in place), not the sum

    def add(self, p: nn.Parameter, grad: Tensor) -> None:
        flat, slot = self.where[id(p)]
        if self._divided:  # a backward after a reduced one, before zero(): back to sums
            for f in self.flats:
                start, owned = f.layout.shard_start(self.group.rank), f.layout.owned_numel(self.group.rank)
                f.grads[start : start + owned].mul_(self.group.world_size)
            self._divided = False
        flat.grads[slot.offset : slot.end].add_(grad.reshape(-1))

    @torch.no_grad()
    def finish(self) -> None:
        """Reduce every owner's slice to its owner, average it in place, zero what this rank does not own."""
        rank, n = self.group.rank, self.group.world_size
        if self._divided:
            for f in self.flats:
                start, owned = f.layout.shard_start(rank), f.layout.owned_numel(rank)
                f.grads[start : start + owned].mul_(n)
        for flat in self.flats:
            layout = flat.layout
            for r in range(n):
                lo, hi = layout.owned_range(r)
                if hi > lo:
                    self.group.reduce(flat.grads[lo:hi], r)
            start, owned = layout.shard_start(rank), layout.owned_numel(rank)
            flat.grads[:start].zero_()
            flat.grads[start + owned :].zero_()
            flat.grads[start : start + owned].div_(n)
            if self.offload:  # the host slice accumulates averages; the device buffer starts again from zero
                flat.host_grad.add_(flat.grads[start : start + owned].to(flat.host_grad.device, flat.host_grad.dtype))
                flat.grads.zero_()
        self._divided = not self.offload

    def owned(self, flat: FlatBuffers) -> Tensor:
        """The averaged gradient of this rank's owned elements."""
        if self.offload:
            return flat.host_grad
        start = flat.layout.shard_start(self.group.rank)
        return flat.grads[start : start + flat.layout.owned_numel(self.group.rank)]

    def zero(self) -> None:
        for flat in self.flats:
            flat.grads.zero_()
            if flat.host_grad is not None:
                flat.host_grad.zero_()
        self._divided = False


@dataclass
class _Bucket:
    """A contiguous range [lo, hi) of one flat buffer whose gradients are reduced together."""

    flat: FlatBuffers
    lo: int
    hi: int
    params: list[nn.Parameter]
    buffer: Tensor | None = None
    ready: set[int] = field(default_factory=set)


class Buckets:
    """Stages 2-3: gradients copied into buckets, each reduced to the owners of its pieces once complete."""

    def __init__(self, flats: list[FlatBuffers], where: dict[int, tuple[FlatBuffers, Slot]], group: Group,
                 offload: bool, bucket_bytes: int, device: torch.device) -> None:
        self.flats, self.where, self.group, self.offload, self.device = flats, where, group, offload, device
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[int, _Bucket] = {}
        for flat in flats:  # reverse model order, one flat at a time, packed as DataParallel packs its buckets
            members = list(reversed(list(zip(flat.params, flat.layout.slots, strict=True))))
            nbytes = [slot.numel * flat.buffer.element_size() for _, slot in members]
            for indices in assign_buckets(nbytes, [flat.layout.dtype] * len(members), bucket_bytes):
                self._add_bucket(flat, [members[i] for i in indices])

    def _add_bucket(self, flat: FlatBuffers, members: list[tuple[nn.Parameter, Slot]]) -> None:
        bucket = _Bucket(flat, members[-1][1].offset, members[0][1].end, [p for p, _ in members])
        self.buckets.append(bucket)
        for p, _ in members:
            self.bucket_of[id(p)] = bucket

    def add(self, p: nn.Parameter, grad: Tensor) -> None:
        bucket = self.bucket_of[id(p)]
        slot = self.where[id(p)][1]
        if bucket.buffer is None:
            bucket.buffer = torch.zeros(bucket.hi - bucket.lo, dtype=bucket.flat.layout.dtype, device=self.device)
        bucket.buffer[slot.offset - bucket.lo : slot.end - bucket.lo].add_(grad.reshape(-1))
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            self._reduce(bucket)

    @torch.no_grad()
    def finish(self) -> None:
        """Reduce the buckets some of whose parameters got no gradient (they count as zero)."""
        for bucket in self.buckets:
            if bucket.buffer is not None:
                self._reduce(bucket)

    def _reduce(self, bucket: _Bucket) -> None:
        """Sum the bucket over ranks, piece by piece to each piece's owner, which averages it into its slice."""
        layout = bucket.flat.layout
        for r, a, b in layout.pieces(bucket.lo, bucket.hi):
            piece = bucket.buffer[a - bucket.lo : b - bucket.lo]
            self.group.reduce(piece, r)
            if r == self.group.rank:
                start = layout.shard_start(r)
                target = bucket.flat.host_grad if self.offload else bucket.flat.grads
                target[a - start : b - start].add_(piece.div_(self.group.world_size).to(target.device, target.dtype))
        bucket.buffer = None
        bucket.ready.clear()

    def owned(self, flat: FlatBuffers) -> Tensor:
        if self.offload:
            return flat.host_grad
        return flat.grads[: flat.layout.owned_numel(self.group.rank)]

    def zero(self) -> None:
        for flat in self.flats:
            if flat.grads is not None:
                flat.grads.zero_()
            if flat.host_grad is not None:
                flat.host_grad.zero_()
        for bucket in self.buckets:
            bucket.buffer = None
            bucket.ready.clear()
