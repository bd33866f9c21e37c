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

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a flat buffer."""

    names: tuple[str, ...]
    """Its names in model.named_parameters(remove_duplicate=False): several when tied (wte.weight, lm_head.weight)."""
    shape: tuple[int, ...]
    offset: int
    """First element in the flat buffer."""
    numel: int


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
            slot = Slot(tuple(names), tuple(shape), offset, math.prod(shape))
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


@dataclass
class FlatBuffers:
    """The runtime tensors of one FlatLayout on this rank."""

    layout: FlatLayout
    params: list[nn.Parameter]
    """The model's parameters, in slot order."""
    buffer: Tensor
    """Parameter values in the compute dtype: the whole padded flat buffer (stages 1-2) or this rank's slice (3)."""
    grads: Tensor | None
    """Gradients in the compute dtype: the whole padded buffer (stage 1, local until reduced), this rank's slice
    (stages 2-3), or None (stages 2-3 with offload, where reduced slices go straight to `host_grad`)."""
    master: Tensor
    """What the inner optimizer updates: the owned real elements, fp32 when the compute dtype is half."""
    master_is_view: bool
    """The master is a view of `buffer` (no separate copy: same dtype, no offload)."""
    host_grad: Tensor | None = None
    """Offload: the fp32 averaged gradient of the owned elements, in CPU memory."""


def parse_groups(model: nn.Module, param_groups: list[dict] | None) -> list[tuple[dict, list]]:
    """[(options, [(names, parameter)])]: the trainable parameters by group, deduplicated (tied weights once, with
    all their names), in model order within each group."""
    names_of: dict[int, list[str]] = {}
    order: list[nn.Parameter] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in names_of:
            names_of[id(p)] = []
            order.append(p)
        names_of[id(p)].append(name)
    trainable = [p for p in order if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    if param_groups is None:
        return [({}, [(tuple(names_of[id(p)]), p) for p in trainable])]
    if not isinstance(param_groups, (list, tuple)) or not param_groups:
        raise ValueError(f"param_groups must be a non-empty list of dicts with a 'params' key, got {param_groups!r}")
    position = {id(p): i for i, p in enumerate(order)}
    seen: dict[int, int] = {}
    out = []
    for g, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"param_groups[{g}] must be a dict with a 'params' key, got {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if id(p) not in position:
                raise ValueError(f"param_groups[{g}] holds a tensor that is not a parameter of model")
            if not p.requires_grad:
                raise ValueError(f"param_groups[{g}] holds the frozen parameter {names_of[id(p)][0]!r}")
            if id(p) in seen:
                raise ValueError(f"parameter {names_of[id(p)][0]!r} is in param_groups[{seen[id(p)]}] and "
                                 f"param_groups[{g}]; each parameter must be in exactly one group")
            seen[id(p)] = g
        params.sort(key=lambda p: position[id(p)])
        options = {k: v for k, v in group.items() if k != "params"}
        out.append((options, [(tuple(names_of[id(p)]), p) for p in params]))
    missing = [names_of[id(p)][0] for p in trainable if id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameter {missing[0]!r} is in no group of param_groups "
                         f"({len(missing)} missing); freeze it (requires_grad=False) or add it to a group")
    return out


def build_layouts(groups: list[tuple[dict, list]], param_dtype: torch.dtype | None,
                  world_size: int) -> list[tuple[FlatLayout, list[nn.Parameter]]]:
    """One FlatLayout per (group, compute dtype), in group order, dtypes in order of first appearance."""
    out = []
    for g, (_, named) in enumerate(groups):
        by_dtype: dict[torch.dtype, list] = {}
        for names, p in named:
            by_dtype.setdefault(param_dtype or p.dtype, []).append((names, p))
        for dtype, members in by_dtype.items():
            layout = FlatLayout.build(g, dtype, [(names, tuple(p.shape)) for names, p in members], world_size)
            out.append((layout, [p for _, p in members]))
    return out
