"""ZeRO-3 parameter gathering (ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 5.3): a rank stores only its
slice of each flat buffer; a module's parameters are gathered (each owner broadcasts its piece) just before the
module's forward and again just before its backward, and released right after.

Gather unit: the parameters one module registers itself, contiguous in one flat buffer, sharing one storage `full`
(each parameter is a view of it). Released, the storage has 0 bytes and the parameter's class is switched to a
guarded subclass (`Released...`): reading its values outside a gather raises an error naming
`ZeroOptimizer.gathered_parameters()` instead of reading freed memory, `print(p)` says what it is, and
`model.state_dict()` raises. Metadata (shape, dtype, requires_grad, grad, hooks) stays readable.

A parameter used outside its own module's forward (nn.MultiheadAttention reads `out_proj.weight` in its own
forward, never calling `out_proj`) is detected on first use: while some hooked module's forward is running, the
guard gathers the parameter's unit on every rank (all ranks run the same forward) and attaches it to that module
from then on, as DeepSpeed's `register_external_parameter` does by hand (which `register_external_parameter` here
also offers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from optimized.distributed.collectives import Group
from optimized.zero.partition import FlatBuffers, Slot

_METADATA = frozenset({
    "size", "dim", "numel", "nelement", "ndimension", "element_size", "is_floating_point", "is_complex",
    "get_device", "requires_grad_", "register_hook", "register_post_accumulate_grad_hook", "__hash__", "__format__",
    "_is_view", "is_contiguous", "stride", "untyped_storage",
})


class ReleasedParameterError(RuntimeError):
    """A ZeRO-3 parameter's values were read while it was released (outside a forward and outside a gather)."""


class _Released:
    """Mixin of the guarded class a released parameter is switched to (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        descriptor = getattr(getattr(func, "__self__", None), "__name__", None)
        if name in _METADATA or (name in ("__get__", "__set__") and descriptor != "data"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, _Released):
                type(t).gathering.use_outside_forward(t, descriptor or name)
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}: released by ZeRO-3; read it inside "
                f"`with opt.gathered_parameters():`)")


@dataclass
class Unit:
    """Parameters of one module, contiguous in one flat buffer, sharing the storage `full`."""

    flat: FlatBuffers
    lo: int
    hi: int
    params: list[nn.Parameter]
    full: Tensor
    gathered: bool = False
    ready: set[int] = field(default_factory=set)


class Gathering:
    """Stage 3's parameter strategy: build the units, hook the modules, gather and release."""

    def __init__(self, model: nn.Module, flats: list[FlatBuffers], where: dict[int, tuple[FlatBuffers, Slot]],
                 group: Group, device: torch.device, names: dict[int, str]) -> None:
        self.flats, self.where, self.group, self.device, self.names = flats, where, group, device, names
        self.units: list[Unit] = []
        self.unit_of: dict[int, Unit] = {}
        self.hooks: list[Any] = []
        self.pinned = False
        self._running: list[list[Unit]] = []  # units of the hooked modules whose forward is running, innermost last
        self._module_units: dict[int, list[Unit]] = {}
        self._guarded: dict[type, type] = {}  # parameter class -> its guarded subclass, which knows this object
        position = {id(flat): i for i, flat in enumerate(flats)}
        for module in model.modules():
            own = [p for p in module._parameters.values() if p is not None and id(p) in where]
            new = sorted((p for p in own if id(p) not in self.unit_of),
                         key=lambda p: (position[id(where[id(p)][0])], where[id(p)][1].offset))
            run: list[nn.Parameter] = []
            for p in new:
                if run and (where[id(run[-1])][0] is not where[id(p)][0]
                            or where[id(run[-1])][1].end != where[id(p)][1].offset):
                    self._add_unit(run)
                    run = []
                run.append(p)
            if run:
                self._add_unit(run)
            units = list({id(self.unit_of[id(p)]): self.unit_of[id(p)] for p in own}.values())
            if units:
                self._hook(module, units)

    def _add_unit(self, params: list[nn.Parameter]) -> None:
        flat, first = self.where[id(params[0])]
        lo, hi = first.offset, self.where[id(params[-1])][1].end
        full = torch.empty(hi - lo, dtype=flat.layout.dtype, device=self.device)
        for p in params:
            slot = self.where[id(p)][1]
            p.data = full[slot.offset - lo : slot.end - lo].view(slot.shape)
        unit = Unit(flat, lo, hi, params, full, gathered=True)
        self.units.append(unit)
        for p in params:
            self.unit_of[id(p)] = unit
        self._release_unit(unit)

    def _hook(self, module: nn.Module, units: list[Unit]) -> None:
        self._module_units[id(module)] = units
        self.hooks.append(module.register_forward_pre_hook(partial(self._before_forward, units)))
        self.hooks.append(module.register_forward_hook(partial(self._after_forward, units)))

    def register_external_parameter(self, module: nn.Module, p: nn.Parameter) -> None:
        """Gather p's unit whenever `module` runs (forward and backward), as module's own parameters are."""
        unit = self.unit_of[id(p)]
        units = self._module_units.get(id(module))
        if units is None:
            self._hook(module, [unit])
        elif unit not in units:
            units.append(unit)

    # --- gather and release ------------------------------------------------------------------------------------

    @torch.no_grad()
    def gather(self, units: Iterable[Unit]) -> None:
        """Give each unit its storage back and fill it: each owner of a piece of [lo, hi) broadcasts it."""
        for unit in units:
            if unit.gathered:
                continue
            layout, buffer = unit.flat.layout, unit.flat.buffer
            unit.full.untyped_storage().resize_((unit.hi - unit.lo) * unit.full.element_size())
            for p in unit.params:
                p.__class__ = type(p).__mro__[2]  # the class before it was guarded
            for r, a, b in layout.pieces(unit.lo, unit.hi):
                piece = unit.full[a - unit.lo : b - unit.lo]
                if r == self.group.rank:
                    piece.copy_(buffer[a - layout.shard_start(r) : b - layout.shard_start(r)])
                self.group.broadcast(piece, r)
            unit.gathered = True

    def release(self, units: Iterable[Unit]) -> None:
        if self.pinned:
            return
        for unit in units:
            if unit.gathered:
                self._release_unit(unit)

    def _release_unit(self, unit: Unit) -> None:
        unit.full.untyped_storage().resize_(0)  # autograd's saved views share it: they are freed too
        for p in unit.params:
            cls = type(p)
            if cls not in self._guarded:
                self._guarded[cls] = type(f"Released{cls.__name__}", (_Released, cls), {"gathering": self})
            p.__class__ = self._guarded[cls]
        unit.gathered = False

    def release_keeping_reads(self, units: Iterable[Unit]) -> None:
        """Release units by moving the parameters to new (empty) storage instead of freeing the old one, so tensors
        read while gathered (model.state_dict() inside gathered_parameters()) stay valid: their storage lives on
        for as long as they do."""
        for unit in units:
            if not unit.gathered:
                continue
            fresh = torch.empty(unit.hi - unit.lo, dtype=unit.full.dtype, device=unit.full.device)
            for p in unit.params:
                slot = self.where[id(p)][1]
                p.data = fresh[slot.offset - unit.lo : slot.end - unit.lo].view(slot.shape)
            unit.full = fresh
            self._release_unit(unit)

    def use_outside_forward(self, p: Tensor, what: str) -> None:
        """A released parameter is being read: gather it for the running forward, or raise."""
        unit = self.unit_of[id(p)]
        if self._running:
            if unit not in self._running[-1]:
                self._running[-1].append(unit)  # from now on gathered with that module, forward and backward
            self.gather([unit])
            return
        raise ReleasedParameterError(
            f"ZeRO-3 parameter {self.names[id(p)]!r} is released (its values live sharded over the ranks) and was "
            f"read by {what!r} outside the forward of any module holding parameters; read parameters inside "
            f"`with opt.gathered_parameters():` (ZeroOptimizer.gathered_parameters), e.g. for model.state_dict(), "
            f"copy.deepcopy(model) or printing; for a module whose forward reads it, call "
            f"opt.register_external_parameter(module, parameter)"
        )

    # --- module hooks ------------------------------------------------------------------------------------------

    def _before_forward(self, units: list[Unit], module: nn.Module, args: Any) -> None:
        self._running.append(units)
        self.gather(units)

    def _after_forward(self, units: list[Unit], module: nn.Module, args: Any, output: Any) -> None:
        if self._running and self._running[-1] is units:
            self._running.pop()
        self.release(units)
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if isinstance(t, Tensor) and t.requires_grad:
                    t.register_hook(partial(self._before_backward, units))

    def _before_backward(self, units: list[Unit], grad: Tensor) -> None:
        self.gather(units)

    def on_grad_ready(self, p: nn.Parameter) -> None:
        """Free a unit as soon as every one of its parameters has its gradient."""
        unit = self.unit_of[id(p)]
        unit.ready.add(id(p))
        if len(unit.ready) == len(unit.params):
            self.release([unit])
            unit.ready.clear()

    def finish_backward(self) -> None:
        """Free what backward left gathered (parameters that got no gradient)."""
        for unit in self.units:
            unit.ready.clear()
        self.release(self.units)
        self._running.clear()  # a forward that raised midway never popped itself
