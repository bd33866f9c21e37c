"""Where did two runs part? The first step, parameter, layer and aten op at which a run left its band.

When a trajectory check fails, "the loss differs at step 7" is where a user of Megatron or DeepSpeed starts
bisecting by hand. Two modules do the bisection, three levels, each naming the first place outside its band:

1. here, `first_divergence(run, reference)`: per-step dicts {name: tensor} (parameters after each step, or gradients
   of each step) -> the first (step, name), steps in order and names in the model's registration order;
2. conformance/localize.py, `localize(model, reference, inputs)`: the first module (layer) and the first aten op
   whose result leaves its band when the same input goes through both models, forward and backward.

This module also holds what both levels share: the records of where a run left (`Divergence` and its parts) and
the band, per tensor: a callable `band(name, actual, expected)` returning an `Equivalence` (conformance.tolerance)
or `(passed, error, bound)`. Defaults, derived from the computation, never tuned to a machine:
- both sides float64: `relative_band()`, max|actual - expected| <= 1e-10 * max|expected|. Float64 rounding of a
  small model is ~1e-16 relative (x sqrt of the reduction length), so 1e-10 leaves ~10^5 ulps for a different
  reduction order and still fails any bug larger than one part in 10^10;
- a lower dtype: the FlashAttention rule of conformance.tolerance.error_ratio against a float64 copy of the
  reference: max|run - ref64| <= k * max|ref - ref64| + one ulp, k = 2 for outputs and 3 for gradients; the
  reference's own rounding spread in its dtype is the band.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from conformance.tolerance import GRADIENT_FACTOR, Equivalence, error_ratio

FLOAT64_RTOL = 1e-10
"""Default band between two float64 results: this fraction of the expected tensor's largest entry."""

Verdict = Equivalence | tuple[bool, float, float]
Band = Callable[[str, Tensor, Tensor], Verdict]
"""(name, actual, expected) -> verdict: the band of one tensor."""
StepBand = Callable[[int, str, Tensor, Tensor], Verdict]
"""(step, name, actual, expected) -> verdict: the band of one tensor at one step."""


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
        mismatch = shape_or_kind_mismatch(name, actual, expected)
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
        mismatch = shape_or_kind_mismatch(label, actual, expected)
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


def shape_or_kind_mismatch(name: str, actual: Tensor, expected: Tensor) -> Equivalence | None:
    """A failed verdict where the tensors cannot be compared as numbers, or an exact one for integer tensors."""
    if actual.shape != expected.shape:
        return Equivalence(name, False, math.inf, math.inf, 0.0,
                           f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.is_floating_point() and expected.is_floating_point():
        return None
    equal = bool(torch.equal(actual.detach().cpu(), expected.detach().cpu().to(actual.dtype)))
    err = 0.0 if equal else math.inf
    return Equivalence(name, equal, err, err, 0.0, "exact (not floating point)")


def as_equivalence(verdict: Verdict, name: str) -> Equivalence:
    if isinstance(verdict, Equivalence):
        return verdict
    try:
        passed, error, bound = verdict
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a band must return an Equivalence or (passed, error, bound), got {verdict!r}") from exc
    return Equivalence(name, bool(passed), float(error), float(error), float(bound), "caller's band")


def against_float64(name: str, actual: Tensor, ref64: Tensor, ref: Tensor, factor: float) -> Equivalence:
    """error_ratio: the run against the float64 reference, allowed `factor` x the reference's own spread (its
    non-finite entries, a masked score's -inf, must be reproduced exactly)."""
    mismatch = shape_or_kind_mismatch(name, actual, ref)
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
                eq = as_equivalence(band(step, name, got[name], want[name]), f"step {step} {name}")
            else:
                ref64 = float64_reference[i][name]
                eq = against_float64(f"step {step} {name}", got[name], ref64, want[name], GRADIENT_FACTOR)
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
