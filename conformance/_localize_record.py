"""The recording half of conformance/localize.py: one forward (and backward) of a model with hooks on every
submodule and, optionally, a TorchDispatchMode on every aten op, each result copied as it is produced.

- modules: forward outputs in the order modules finish (a child before its parent), then in backward what each
  module hands back (`grad_input` of a full backward hook) and each parameter's gradient as it is accumulated;
- ops: every aten op's outputs, forward and backward, with the innermost module it ran in. Views (`aten.t`,
  `aten.view`) compute nothing and are skipped, as are ops whose output is uninitialised memory (`aten.empty`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

Inputs = Tensor | tuple | list | Mapping
"""What the models are called with: one tensor, positional arguments, or keyword arguments."""

_UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
                            "new_empty_strided", "resize_", "set_"})
"""Ops whose output holds whatever memory held: they differ between runs without meaning anything."""


@dataclass
class Entry:
    """What one module produced in one call: its forward outputs, its grad_input, or a parameter's gradient."""

    module: str
    phase: str
    call: int
    labels: list[str]
    tensors: list[Tensor]

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.module, self.phase, self.labels[0] if self.labels else "", self.call


@dataclass
class Op:
    name: str
    module: str
    phase: str
    tensors: list[Tensor]


@dataclass
class Recording:
    forward: list[Entry] = field(default_factory=list)
    backward: list[Entry] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in an output: a tensor, or nested tuples, lists and mappings (HF ModelOutput is one)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _snapshot(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


@dataclass
class _Running:
    """Shared by the hooks and the op recorder: the modules running now (innermost last), and whether a hook is
    copying tensors (its clones are the localizer's own ops, not the model's)."""

    modules: list[str] = field(default_factory=list)
    in_hook: bool = False

    @contextmanager
    def hook(self) -> Iterator[None]:
        self.in_hook = True
        try:
            yield
        finally:
            self.in_hook = False


def _remove_last(stack: list[str], name: str) -> None:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] == name:
            del stack[i]
            return


class _OpRecorder(TorchDispatchMode):
    """Records every aten op that computes something (views and uninitialised allocations skipped), with the
    innermost module running and whether autograd's engine is running (backward)."""

    def __init__(self, running: _Running, ops: list[Op]) -> None:
        super().__init__()
        self.running, self.ops = running, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (self.running.in_hook or func.is_view or func.overloadpacket.__name__ in _UNINITIALISED):
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            modules = self.running.modules
            module = modules[-1] if modules else "(outside the model)"
            self.ops.append(Op(str(func), module, phase, _snapshot(_tensors(out))))
        return out


def _call(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _projection_loss(output: Any, seed: int) -> Tensor | None:
    """sum_i <out_i, r_i> over the floating outputs that need a gradient, r_i ~ N(0, 1) from a fixed seed and
    rounded to bfloat16 (exact in every dtype, so both runs start backward from the same gradient). Not out.sum():
    the gradient of a sum through a norm or a softmax is zero in exact arithmetic, and compares only noise."""
    gen = torch.Generator().manual_seed(seed)
    terms = []
    for t in _tensors(output):
        if t.is_floating_point() and t.requires_grad:
            r = torch.randn(t.shape, generator=gen).to(torch.bfloat16).to(t.device, t.dtype)
            terms.append((t * r).sum())
    return torch.stack(terms).sum() if terms else None


@contextmanager
def _hooks(model: nn.Module, rec: Recording, backward: bool) -> Iterator[_Running]:
    """Hooks on every submodule: the modules running (for the op recorder) and the per-module records."""
    names = {m: n or f"<{type(model).__name__}>" for n, m in model.named_modules()}
    running = _Running()
    stack = running.modules
    calls: Counter = Counter()
    handles = []

    def count(key: tuple) -> int:
        calls[key] += 1
        return calls[key] - 1

    def forward_pre(module, args):
        stack.append(names[module])

    def forward_post(module, args, output):
        name = names[module]
        _remove_last(stack, name)
        tensors = _tensors(output)
        with running.hook():
            rec.forward.append(Entry(name, "forward", count((name, "forward")),
                                      [f"output {i}" for i in range(len(tensors))], _snapshot(tensors)))

    def backward_pre(module, grad_output):
        stack.append(names[module])

    def backward_post(module, grad_input, grad_output):
        name = names[module]
        _remove_last(stack, name)
        given = [(f"grad_input {i}", g) for i, g in enumerate(grad_input) if g is not None]
        if given:
            with running.hook():
                rec.backward.append(Entry(name, "backward", count((name, "backward")),
                                           [label for label, _ in given], _snapshot([g for _, g in given])))

    def accumulated(name: str):
        module, _, leaf = name.rpartition(".")
        def hook(p: Tensor) -> None:
            with running.hook():
                rec.backward.append(Entry(module or names[model], "backward", count((name, "grad")),
                                           [f"{leaf}.grad"], _snapshot([p.grad])))
        return hook

    try:
        for module in names:
            handles += [module.register_forward_pre_hook(forward_pre), module.register_forward_hook(forward_post)]
            if backward:
                handles += [module.register_full_backward_pre_hook(backward_pre),
                            module.register_full_backward_hook(backward_post)]
        if backward:
            handles += [p.register_post_accumulate_grad_hook(accumulated(n))
                        for n, p in model.named_parameters() if p.requires_grad]
        yield running
    finally:
        for handle in handles:
            handle.remove()


def record(model: nn.Module, inputs: Inputs, *, ops: bool, backward: bool, loss: Callable[[Any], Tensor] | None,
            context: Callable[[], AbstractContextManager] | None, seed: int) -> Recording:
    """One forward (and backward) of `model`, recorded; the model's .grad are restored afterwards."""
    rec = Recording()
    params = list(model.parameters())
    saved = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        for p in params:
            p.grad = None
        with ExitStack() as stack, _hooks(model, rec, backward) as running, warnings.catch_warnings():
            # an embedding's input needs no gradient: its hook firing on the output gradient is what we want
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            # a module returning a dict (an HF ModelOutput) gets no backward record; its submodules do
            warnings.filterwarnings("ignore", message="For backward hooks to be called, module output should be")
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(seed)
            if ops:
                stack.enter_context(_OpRecorder(running, rec.ops))
            with context() if context is not None else ExitStack():
                output = _call(model, inputs)
            if backward:
                total = loss(output) if loss is not None else _projection_loss(output, seed)
                if total is not None and total.requires_grad:
                    total.backward()
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return rec


def as_float64(inputs: Inputs) -> Inputs:
    cast = lambda x: x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
    if isinstance(inputs, Tensor):
        return cast(inputs)
    if isinstance(inputs, Mapping):
        return {k: cast(v) for k, v in inputs.items()}
    return tuple(cast(v) for v in inputs)


def is_float64(model: nn.Module, inputs: Inputs) -> bool:
    floats = [t.dtype for t in [*model.parameters(), *model.buffers(), *_tensors(inputs)] if t.is_floating_point()]
    return all(d == torch.float64 for d in floats)
