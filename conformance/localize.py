"""Where did two runs part? The first step, parameter, layer and aten op at which a run left its band.

When a trajectory check fails, "the loss differs at step 7" is where a user of Megatron or DeepSpeed starts
bisecting by hand. This module does the bisection: three levels, each naming the first place outside its band.

1. `first_divergence(run, reference)`: per-step dicts {name: tensor} (parameters after each step, or gradients of
   each step) -> the first (step, name), steps in order and names in the model's registration order.
2. `localize(model, reference, inputs)`: the same input through both models, with hooks on every submodule:
   - layer: forward outputs compared module by module in the order modules finish (a child before its parent, so
     the innermost culprit is named), then, if the forward agrees, what each module hands back in backward
     (`grad_input` of a full backward hook) and each parameter's gradient as it is accumulated, in backward's
     execution order;
   - op: a TorchDispatchMode records every aten op's outputs in both runs, forward and backward, and names the first
     op whose output leaves the band, with the module it ran in ("aten.addmm.default in blocks.1.mlp.fc_in, forward,
     call #41"), or the call at which the two op sequences stop matching. Views (`aten.t`, `aten.view`) compute
     nothing and are skipped, as are ops whose output is uninitialised memory (`aten.empty`).
   `first_layer` and `first_op` are the two halves alone.
3. The band, per tensor: a callable `band(name, actual, expected)` returning an `Equivalence` (conformance.tolerance)
   or `(passed, error, bound)`. Defaults, derived from the computation, never tuned to a machine:
   - both sides float64: `relative_band()`, max|actual - expected| <= 1e-10 * max|expected|. Float64 rounding of a
     small model is ~1e-16 relative (x sqrt of the reduction length), so 1e-10 leaves ~10^5 ulps for a different
     reduction order and still fails any bug larger than one part in 10^10;
   - a lower dtype: the FlashAttention rule of conformance.tolerance.error_ratio against a float64 copy of the
     reference: max|run - ref64| <= k * max|ref - ref64| + one ulp, k = 2 for outputs and 3 for gradients; the
     reference's own rounding spread in its dtype is the band.

To find why step s diverged, build both models from the states *before* step s (they agree, or s would not be the
first) and run step s's batch through `localize`: a forward or backward bug is named; if none is, the update itself
(optimizer, clipping, communication) is where the runs part. Dropout draws the same masks in both runs (each run
starts from the same seed), so models in training mode compare too.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from conformance.tolerance import FORWARD_FACTOR, GRADIENT_FACTOR, Equivalence, error_ratio

FLOAT64_RTOL = 1e-10
"""Default band between two float64 results: this fraction of the expected tensor's largest entry."""

Verdict = Equivalence | tuple[bool, float, float]
Band = Callable[[str, Tensor, Tensor], Verdict]
"""(name, actual, expected) -> verdict: the band of one tensor."""
StepBand = Callable[[int, str, Tensor, Tensor], Verdict]
"""(step, name, actual, expected) -> verdict: the band of one tensor at one step."""
Inputs = Tensor | tuple | list | Mapping
"""What the models are called with: one tensor, positional arguments, or keyword arguments."""

_UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
                            "new_empty_strided", "resize_", "set_"})
"""Ops whose output holds whatever memory held: they differ between runs without meaning anything."""


# ----------------------------------------------------------------------------------------------------- the record
def _fmt(x: float) -> str:
    return f"{x:.1e}"


@dataclass(frozen=True)
class StepDivergence:
    """The first (step, tensor) of a trajectory outside its band."""

    step: int
    name: str
    """The tensor's name (a parameter's qualified name)."""
    kind: str
    """What the tensors are: "parameter", "gradient", ..."""
    error: float
    bound: float
    rule: str

    def __str__(self) -> str:
        return f"step {self.step}, {self.kind} {self.name}: err {_fmt(self.error)} > bound {_fmt(self.bound)}"


@dataclass(frozen=True)
class LayerDivergence:
    """The first module whose forward output, or whose gradient in backward, left its band."""

    module: str
    """Qualified name (as in named_modules); the whole model is shown as <ClassName>."""
    phase: str
    """"forward" or "backward"."""
    call: int
    """Which call of this module in this phase (0: the first); > 0 for a module run more than once."""
    tensor: str
    """Which tensor: "output i" (forward), "grad_input i" (backward), or "<parameter>.grad"."""
    error: float
    bound: float
    rule: str

    def __str__(self) -> str:
        call = f", call {self.call}" if self.call else ""
        return f"{self.module} ({self.phase}{call}, {self.tensor}: err {_fmt(self.error)} > bound {_fmt(self.bound)})"


@dataclass(frozen=True)
class OpDivergence:
    """The first aten op whose output left its band, or the call at which the two op sequences part."""

    op: str
    """The run's op, e.g. "aten.addmm.default" ("end of run" when the run's sequence is the shorter)."""
    call: int
    """Index of the op in the run's sequence of recorded (non-view) aten calls, forward then backward, from 0."""
    module: str
    """The innermost module the op ran in (forward, or its backward)."""
    phase: str
    error: float | None
    """None where the sequences part (there is nothing to compare)."""
    bound: float | None
    rule: str
    mismatch: str | None = None
    """Where the sequences part: what the reference runs at this call instead."""

    def __str__(self) -> str:
        where = f"{self.op} in {self.module} ({self.phase}, call #{self.call}"
        if self.mismatch is not None:
            return f"op sequences part at call #{self.call}: the run calls {where}), the reference {self.mismatch}"
        return f"{where}: err {_fmt(self.error)} > bound {_fmt(self.bound)})"


@dataclass(frozen=True)
class Divergence:
    """Where a run left its reference: any of step, layer and op that were looked for and found."""

    step: StepDivergence | None = None
    layer: LayerDivergence | None = None
    op: OpDivergence | None = None
    notes: tuple[str, ...] = ()
    """What could not be looked at, and why."""

    def __str__(self) -> str:
        parts = [str(self.step)] if self.step else []
        parts += [f"first layer: {self.layer}"] if self.layer else []
        parts += [f"first op: {self.op}"] if self.op else []
        return "; ".join(parts + list(self.notes)) or "no divergence"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- the bands
def relative_band(rtol: float = FLOAT64_RTOL) -> Band:
    """max|actual - expected| <= rtol * max|expected|, for two results of the same arithmetic in float64.

    Non-finite entries must match exactly (NaN matches NaN); integer and bool tensors must be equal. A tensor that
    is zero in exact arithmetic and rounding noise in practice has no relative scale: give such a one its own band."""
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")

    def band(name: str, actual: Tensor, expected: Tensor) -> Equivalence:
        mismatch = _shape_or_kind_mismatch(name, actual, expected)
        if mismatch is not None:
            return mismatch
        err = _errors(actual, expected)
        finite = expected.detach().double().abs()
        magnitude = float(torch.where(finite.isfinite(), finite, 0).max()) if finite.numel() else 0.0
        bound = rtol * magnitude
        max_err = float(err.max()) if err.numel() else 0.0
        mean_err = float(err.mean()) if err.numel() else 0.0
        return Equivalence(name, max_err <= bound, max_err, mean_err, bound, f"relative: <= {rtol:g} x max|expected|")

    return band


def table_band(bounds: Mapping[tuple[int, str], float]) -> StepBand:
    """A step band from explicit bounds: (step, name) -> the largest max|actual - expected| allowed."""

    def band(step: int, name: str, actual: Tensor, expected: Tensor) -> Equivalence:
        if (step, name) not in bounds:
            raise ValueError(f"table_band: no bound for step {step}, tensor {name!r}; the table has "
                             f"{len(bounds)} entries, e.g. {next(iter(bounds), None)}")
        label = f"step {step} {name}"
        mismatch = _shape_or_kind_mismatch(label, actual, expected)
        if mismatch is not None:
            return mismatch
        err = _errors(actual, expected)
        max_err = float(err.max()) if err.numel() else 0.0
        bound = float(bounds[(step, name)])
        return Equivalence(label, max_err <= bound, max_err, float(err.mean()) if err.numel() else 0.0, bound,
                           "explicit bound")

    return band


def _errors(actual: Tensor, expected: Tensor) -> Tensor:
    """|actual - expected| in float64, 0 where both hold the same non-finite value, inf where only one does."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same = (a.isnan() & e.isnan()) | (a == e)
    return torch.nan_to_num(torch.where(same, torch.zeros_like(a), (a - e).abs()), nan=math.inf)


def _shape_or_kind_mismatch(name: str, actual: Tensor, expected: Tensor) -> Equivalence | None:
    """A failed verdict where the tensors cannot be compared as numbers, or an exact one for integer tensors."""
    if actual.shape != expected.shape:
        return Equivalence(name, False, math.inf, math.inf, 0.0,
                           f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.is_floating_point() and expected.is_floating_point():
        return None
    equal = bool(torch.equal(actual.detach().cpu(), expected.detach().cpu().to(actual.dtype)))
    err = 0.0 if equal else math.inf
    return Equivalence(name, equal, err, err, 0.0, "exact (not floating point)")


def _as_equivalence(verdict: Verdict, name: str) -> Equivalence:
    if isinstance(verdict, Equivalence):
        return verdict
    try:
        passed, error, bound = verdict
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a band must return an Equivalence or (passed, error, bound), got {verdict!r}") from exc
    return Equivalence(name, bool(passed), float(error), float(error), float(bound), "caller's band")


def _spread(name: str, actual: Tensor, ref64: Tensor, ref: Tensor, factor: float) -> Equivalence:
    """error_ratio: the run against the float64 reference, allowed `factor` x the reference's own spread."""
    mismatch = _shape_or_kind_mismatch(name, actual, ref)
    if mismatch is not None:
        return mismatch
    a, e, b = (t.detach().double().cpu() for t in (actual, ref64, ref))
    nonfinite = ~e.isfinite()
    if nonfinite.any():  # a masked score's -inf: it must be reproduced exactly, and then it is no error
        if bool(_errors(a, e)[nonfinite].max()) or bool(_errors(b, e)[nonfinite].max()):
            return Equivalence(name, False, math.inf, math.inf, 0.0, "non-finite entries differ from float64's")
        a, e, b = (t.masked_fill(nonfinite, 0.0) for t in (a, e, b))
    return error_ratio(a, e, b, name=name, factor=factor, dtype=ref.dtype)


# ----------------------------------------------------------------------------------------------------- steps
def first_divergence(
    run: Sequence[Mapping[str, Tensor]],
    reference: Sequence[Mapping[str, Tensor]],
    *,
    band: StepBand | None = None,
    float64_reference: Sequence[Mapping[str, Tensor]] | None = None,
    order: nn.Module | Sequence[str] | None = None,
    start: int = 0,
    kind: str = "parameter",
) -> Divergence | None:
    """The first (step, name) at which `run` leaves its band around `reference`, or None if it never does.

    run, reference: one {name: tensor} per step, e.g. `{n: p.detach().clone() for n, p in model.named_parameters()}`
    after each step; run[i] is step `start + i`. Names are visited in `order`: a module (its named_parameters order,
    i.e. registration order, which is forward order for a model written top to bottom), a list of names, or None
    (the reference dict's own order); names not in `order` come after, in the dict's order.
    band(step, name, actual, expected): the band of each tensor. Default: with `float64_reference` (the reference
    re-run in float64), error_ratio against it with factor 3 (the reference's own spread); without, both sides must
    be float64 and the band is relative_band() (1e-10 relative). `kind` names the tensors in the report."""
    if len(run) != len(reference):
        raise ValueError(f"run has {len(run)} steps, reference has {len(reference)}; they must be equal")
    if float64_reference is not None and len(float64_reference) != len(reference):
        raise ValueError(f"float64_reference has {len(float64_reference)} steps, reference has {len(reference)}")
    if band is None and float64_reference is None:
        _require_float64(reference, "reference")
        _require_float64(run, "run")
        relative = relative_band()
        band = lambda step, name, actual, expected: relative(f"step {step} {name}", actual, expected)
    names_first = ([n for n, _ in order.named_parameters()] if isinstance(order, nn.Module)
                   else list(order) if order is not None else [])
    for i, (got, want) in enumerate(zip(run, reference, strict=True)):
        step = start + i
        if got.keys() != want.keys():
            raise ValueError(f"step {step}: names differ: only in the run {sorted(got.keys() - want.keys())}, "
                             f"only in the reference {sorted(want.keys() - got.keys())}")
        for name in _ordered(want, names_first):
            if band is not None:
                eq = _as_equivalence(band(step, name, got[name], want[name]), f"step {step} {name}")
            else:
                ref64 = float64_reference[i][name]
                eq = _spread(f"step {step} {name}", got[name], ref64, want[name], GRADIENT_FACTOR)
            if not eq.passed:
                return Divergence(step=StepDivergence(step, name, kind, eq.max_error, eq.bound, eq.rule))
    return None


def _require_float64(steps: Sequence[Mapping[str, Tensor]], what: str) -> None:
    for i, tensors in enumerate(steps):
        for name, t in tensors.items():
            if t.is_floating_point() and t.dtype != torch.float64:
                raise ValueError(f"{what}[{i}][{name!r}] is {t.dtype}: the default band is for float64 on both "
                                 f"sides; pass float64_reference= (the reference re-run in float64) or band=")


def _ordered(names: Mapping[str, Any], first: Sequence[str]) -> list[str]:
    listed = [n for n in dict.fromkeys(first) if n in names]
    seen = set(listed)
    return listed + [n for n in names if n not in seen]


# ----------------------------------------------------------------------------------------------------- recording
@dataclass
class _Entry:
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
class _Op:
    name: str
    module: str
    phase: str
    tensors: list[Tensor]


@dataclass
class _Recording:
    forward: list[_Entry] = field(default_factory=list)
    backward: list[_Entry] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)


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

    def __init__(self, running: _Running, ops: list[_Op]) -> None:
        super().__init__()
        self.running, self.ops = running, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (self.running.in_hook or func.is_view or func.overloadpacket.__name__ in _UNINITIALISED):
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            modules = self.running.modules
            module = modules[-1] if modules else "(outside the model)"
            self.ops.append(_Op(str(func), module, phase, _snapshot(_tensors(out))))
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
def _hooks(model: nn.Module, rec: _Recording, backward: bool) -> Iterator[_Running]:
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
            rec.forward.append(_Entry(name, "forward", count((name, "forward")),
                                      [f"output {i}" for i in range(len(tensors))], _snapshot(tensors)))

    def backward_pre(module, grad_output):
        stack.append(names[module])

    def backward_post(module, grad_input, grad_output):
        name = names[module]
        _remove_last(stack, name)
        given = [(f"grad_input {i}", g) for i, g in enumerate(grad_input) if g is not None]
        if given:
            with running.hook():
                rec.backward.append(_Entry(name, "backward", count((name, "backward")),
                                           [label for label, _ in given], _snapshot([g for _, g in given])))

    def accumulated(name: str):
        module, _, leaf = name.rpartition(".")
        def hook(p: Tensor) -> None:
            with running.hook():
                rec.backward.append(_Entry(module or names[model], "backward", count((name, "grad")),
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


def _record(model: nn.Module, inputs: Inputs, *, ops: bool, backward: bool, loss: Callable[[Any], Tensor] | None,
            context: Callable[[], AbstractContextManager] | None, seed: int) -> _Recording:
    """One forward (and backward) of `model`, recorded; the model's .grad are restored afterwards."""
    rec = _Recording()
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


def _as_float64(inputs: Inputs) -> Inputs:
    cast = lambda x: x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
    if isinstance(inputs, Tensor):
        return cast(inputs)
    if isinstance(inputs, Mapping):
        return {k: cast(v) for k, v in inputs.items()}
    return tuple(cast(v) for v in inputs)


def _is_float64(model: nn.Module, inputs: Inputs) -> bool:
    floats = [t.dtype for t in [*model.parameters(), *model.buffers(), *_tensors(inputs)] if t.is_floating_point()]
    return all(d == torch.float64 for d in floats)


# ----------------------------------------------------------------------------------------------------- comparing
def _compare_layers(run: _Recording, ref: _Recording, judge: Callable) -> LayerDivergence | None:
    for phase in ("forward", "backward"):
        expected = {e.key: e for e in getattr(ref, phase)}
        for entry in getattr(run, phase):
            want = expected.get(entry.key)
            if want is None:  # a module only the run has: nothing to hold it to
                continue
            for i, (label, got) in enumerate(zip(entry.labels, entry.tensors, strict=True)):
                if i >= len(want.tensors):
                    return LayerDivergence(entry.module, phase, entry.call, label, math.inf, 0.0,
                                           f"the run has {len(entry.tensors)} tensors, the reference "
                                           f"{len(want.tensors)}")
                name = f"{entry.module} ({phase}, call {entry.call}) {label}"
                eq = judge(name, got, want.tensors[i], ("layer", want.key, i), phase)
                if not eq.passed:
                    return LayerDivergence(entry.module, phase, entry.call, label, eq.max_error, eq.bound, eq.rule)
    return None


def _compare_ops(run: list[_Op], ref: list[_Op], judge: Callable) -> OpDivergence | None:
    for call, (got, want) in enumerate(zip(run, ref, strict=False)):  # the shorter ends: handled below
        if got.name != want.name or len(got.tensors) != len(want.tensors):
            return OpDivergence(got.name, call, got.module, got.phase, None, None, "op sequences differ",
                                mismatch=f"calls {want.name} in {want.module} ({want.phase})")
        for i, (a, e) in enumerate(zip(got.tensors, want.tensors, strict=True)):
            eq = judge(f"{got.name} call #{call} output {i}", a, e, ("op", call, i), got.phase)
            if not eq.passed:
                return OpDivergence(got.name, call, got.module, got.phase, eq.max_error, eq.bound, eq.rule)
    if len(run) == len(ref):
        return None
    call = min(len(run), len(ref))
    if len(run) < len(ref):
        want = ref[call]
        return OpDivergence("end of run", call, "-", "-", None, None, "op sequences differ",
                            mismatch=f"calls {want.name} in {want.module} ({want.phase})")
    got = run[call]
    return OpDivergence(got.name, call, got.module, got.phase, None, None, "op sequences differ",
                        mismatch="has ended")


class _NoBand(Exception):
    """The float64 copy cannot give a band from here on (its ops or records differ from the reference's)."""


def _judge(band: Band | None, ref64: _Recording | None, ref: _Recording) -> Callable:
    """judge(name, actual, expected, where, phase) -> Equivalence, with the caller's band or the spread band."""
    if band is not None:
        def judge(name, actual, expected, where, phase):
            mismatch = _shape_or_kind_mismatch(name, actual, expected)
            return mismatch if mismatch is not None else _as_equivalence(band(name, actual, expected), name)
        return judge
    assert ref64 is not None
    layers = {e.key: e for e in [*ref64.forward, *ref64.backward]}

    def spread(name, actual, expected, where, phase):
        kind, key, i = where
        if kind == "op":
            if key >= len(ref64.ops) or ref64.ops[key].name != ref.ops[key].name:
                raise _NoBand(f"ops compared up to call #{key} only: from there the float64 copy of the reference "
                              "runs other ops than the reference (casts), so it gives no band; pass band=")
            ref64_tensor = ref64.ops[key].tensors[i]
        elif key in layers:
            ref64_tensor = layers[key].tensors[i]
        else:
            raise _NoBand(f"modules compared up to {key[0]} ({key[1]}) only: the float64 copy of the reference "
                          "has no such record, so it gives no band; pass band=")
        factor = FORWARD_FACTOR if phase == "forward" else GRADIENT_FACTOR
        return _spread(name, actual, ref64_tensor, expected, factor)

    return spread


def localize(
    model: nn.Module,
    reference: nn.Module,
    inputs: Inputs,
    *,
    band: Band | None = None,
    layers: bool = True,
    ops: bool = True,
    backward: bool = True,
    loss: Callable[[Any], Tensor] | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    divergence: Divergence | None = None,
    seed: int = 0,
) -> Divergence | None:
    """Run `inputs` through `model` (under test) and `reference`, forward and backward, and name the first module
    (`layers`) and the first aten op (`ops`) whose result leaves its band; None if everything agrees.

    inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments, the same for both models.
    band(name, actual, expected): the band per tensor. Default: relative_band() (1e-10 relative) when the reference
    and its inputs are float64; otherwise a float64 copy of the reference is run too and each tensor may be 2x
    (outputs) or 3x (gradients) as far from it as the reference is, plus one ulp (conformance.tolerance's rule), so
    give the reference the run's dtype. Where the copy runs other ops (a cast that float64 skips), ops are compared up
    to there and the result's notes say so.
    backward: also compare the backward pass, started from loss(output) (default: a fixed random projection of the
    floating outputs). context / reference_context: a callable returning a context manager for each model's forward
    (e.g. `lambda: torch.autocast("cpu", torch.bfloat16)`). divergence: a step found by first_divergence, kept in
    the result. Both models' .grad are left as they were; module records are matched by qualified name, so a module
    only one model has is skipped."""
    if not (layers or ops):
        raise ValueError("localize: layers and ops are both False; ask for at least one")
    options = dict(ops=ops, backward=backward, loss=loss, seed=seed)
    ref = _record(reference, inputs, context=reference_context, **options)
    ref64 = None
    if band is None and not _is_float64(reference, inputs):
        ref64 = _record(copy.deepcopy(reference).double(), _as_float64(inputs), context=None, **options)
    elif band is None:
        band = relative_band()
    got = _record(model, inputs, context=context, **options)
    judge = _judge(band, ref64, ref)
    notes: list[str] = []

    def compare(what: Callable[[], Any]) -> Any:
        try:
            return what()
        except _NoBand as no_band:
            notes.append(str(no_band))
            return None

    layer = compare(lambda: _compare_layers(got, ref, judge)) if layers else None
    op = compare(lambda: _compare_ops(got.ops, ref.ops, judge)) if ops else None
    step = divergence.step if divergence is not None else None
    if step is None and layer is None and op is None:
        return None
    return Divergence(step=step, layer=layer, op=op, notes=tuple(notes))


def first_layer(model: nn.Module, reference: nn.Module, inputs: Inputs, **options: Any) -> Divergence | None:
    """`localize` with module hooks only: the first module whose forward output or backward gradient differs."""
    return localize(model, reference, inputs, layers=True, ops=False, **options)


def first_op(model: nn.Module, reference: nn.Module, inputs: Inputs, **options: Any) -> Divergence | None:
    """`localize` with the op recorder only: the first aten op (and its module) whose output differs, or the call
    at which the two op sequences part."""
    return localize(model, reference, inputs, layers=False, ops=True, **options)
