"""How ZeRO lays the parameters out over the ranks (ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 5).

The trainable parameters of one parameter group and one dtype are concatenated, in model order, into one flat
buffer of `numel` elements, padded with zeros to Nd·S elements, S = ceil(numel / Nd). Rank r owns the slice
[r·S, (r+1)·S): it keeps the optimizer state (stage 1+), the reduced gradient (stage 2+) and the parameter values
(stage 3) of those elements only. The padding (at most Nd - 1 elements, all in the last slices) exists so that
every slice has the same length; it never enters a norm, an update or a checkpoint.

    flat:  | wte.weight | wpe.weight | blocks.0.ln_1.weight | ... | pad |
    ranks: |   rank 0 slice   |   rank 1 slice   |   rank 2 slice  |

A contiguous range [lo, hi) of the flat buffer (one parameter, a gradient bucket) overlaps one or a few slices;
`pieces` lists them, which is all the collectives need: a range is gathered by broadcasting each owner's piece,
and reduced by reducing each piece to its owner.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a flat buffer."""

    names: tuple[str, ...]
    """Its names in model.named_parameters(remove_duplicate=False): several when tied (wte.weight, lm_head.weight)."""
    shape: tuple[int, ...]
    offset: int
    """First element in the flat buffer."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def end(self) -> int:
        return self.offset + self.numel

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class FlatLayout:
    """The flat buffer of one (parameter group, dtype): which parameter sits where, and who owns what."""

    group: int
    """Index of the parameter group."""
    dtype: torch.dtype
    """dtype of the parameters as the model computes with them."""
    slots: tuple[Slot, ...]
    world_size: int

    @classmethod
    def build(cls, group: int, dtype: torch.dtype, named: list[tuple[tuple[str, ...], tuple[int, ...]]],
              world_size: int) -> FlatLayout:
        slots, offset = [], 0
        for names, shape in named:
            slot = Slot(tuple(names), tuple(shape), offset)
            slots.append(slot)
            offset = slot.end
        return cls(group, dtype, tuple(slots), world_size)

    @property
    def numel(self) -> int:
        """Real elements (no padding)."""
        return self.slots[-1].end if self.slots else 0

    @property
    def shard_numel(self) -> int:
        """S = ceil(numel / Nd): the length of every rank's slice."""
        return -(-self.numel // self.world_size)

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    def shard_start(self, rank: int) -> int:
        return rank * self.shard_numel

    def owned_numel(self, rank: int) -> int:
        """Real elements in rank's slice: S, fewer in the last slices, 0 when the slice is all padding."""
        return max(0, min(self.shard_numel, self.numel - rank * self.shard_numel))

    def owned_range(self, rank: int) -> tuple[int, int]:
        start = self.shard_start(rank)
        return start, start + self.owned_numel(rank)

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(rank, a, b) for every slice that [lo, hi) overlaps, with [a, b) the overlap, in rank order."""
        s = self.shard_numel
        if hi <= lo:
            return
        for rank in range(lo // s, -(-hi // s)):
            yield rank, max(lo, rank * s), min(hi, (rank + 1) * s)

    def describe(self) -> dict:
        """Plain-data description (for manifests and state dicts): what must match for a checkpoint to load."""
        return {
            "group": self.group,
            "dtype": str(self.dtype).removeprefix("torch."),
            "numel": self.numel,
            "params": [{"names": list(s.names), "shape": list(s.shape), "offset": s.offset} for s in self.slots],
        }

    def params_in(self, lo: int, hi: int) -> list[str]:
        """Names of the parameters that overlap [lo, hi) (for error messages)."""
        return [s.name for s in self.slots if s.offset < hi and s.end > lo]
