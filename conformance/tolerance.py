"""When is an optimized result equal to its reference? Two rules, each returning an `Equivalence` record.

1. `allclose` (and `bitwise`): where the optimized path can mirror the reference's arithmetic (fp32, same
   reduction order or nearly), demand what torch.testing.assert_close demands by default for the dtype:
   |actual - expected| <= atol + rtol * |expected| elementwise, with NaN matching NaN at the same position (a NaN
   the reference produces must be reproduced, e.g. by a clipping norm; torch.testing's default would refuse both).

2. `error_ratio`: for low precision and kernels, the FlashAttention rule (the FA2 repository's tests):
       ref  = the reference computed in float64
       base = the naive reference computed in the SAME low dtype as the optimized path
       pass iff  max|opt - ref| <= factor * max|base - ref| + floor
   with factor 2 for outputs and 3 for gradients. The kernel may be as wrong as a naive implementation in its own
   dtype, times a small factor, never more. `floor` is one ulp of the dtype at the reference's magnitude, so a
   baseline that happens to be exact cannot make the bound zero.

Every record carries the max and mean error and the bound, whether it passed or not: the report always shows them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
FLOOR_ULPS = 1.0
TRAJECTORY_RTOL = 1e-4
"""Losses of two whole fp32 runs, each with its own Adam: trajectories drift apart by ~1e-5 over ten steps of a
small model without either being wrong (Adam turns rounding noise into full-size steps); per-step gradients, from
the same parameters, are the tight comparison (rtol 1e-5)."""

# torch.testing.assert_close defaults: dtype -> (rtol, atol)
_DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


@dataclass(frozen=True)
class Equivalence:
    """The verdict of one comparison, with the numbers behind it."""

    name: str
    """What was compared (e.g. "dq, causal, fp16")."""
    passed: bool
    max_error: float
    """max |actual - expected|."""
    mean_error: float
    """mean |actual - expected|."""
    bound: float
    """The largest error the rule allowed (for allclose: atol + rtol*|expected| at the worst element)."""
    rule: str
    """The rule, in words, with its parameters."""
    baseline_error: float | None = None
    """error_ratio only: max |base - ref|."""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return f"{self.name}: {verdict} max_err={self.max_error:.3g} mean_err={self.mean_error:.3g} " \
               f"bound={self.bound:.3g} ({self.rule})"


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) that torch.testing.assert_close uses for `dtype`."""
    if dtype not in _DEFAULT_TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype}; allowed: {list(_DEFAULT_TOLERANCES)}")
    return _DEFAULT_TOLERANCES[dtype]


def _check_pair(actual: Tensor, expected: Tensor, name: str) -> None:
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shapes differ, actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")


def _errors(actual: Tensor, expected: Tensor) -> Tensor:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()


def _stat(err: Tensor) -> tuple[float, float]:
    if err.numel() == 0:
        return 0.0, 0.0
    return float(err.max()), float(err.mean())


def allclose(
    actual: Tensor,
    expected: Tensor,
    *,
    name: str = "",
    rtol: float | None = None,
    atol: float | None = None,
) -> Equivalence:
    """Elementwise |actual - expected| <= atol + rtol*|expected|; defaults from torch.testing for expected's dtype.

    NaN matches NaN at the same position (as torch.testing with equal_nan=True); inf must match exactly."""
    _check_pair(actual, expected, name)
    d_rtol, d_atol = default_tolerances(expected.dtype) if expected.is_floating_point() else (0.0, 0.0)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    same_nonfinite = (a.isnan() & e.isnan()) | (a == e)
    err = torch.where(same_nonfinite, torch.zeros_like(a), (a - e).abs())
    err = torch.nan_to_num(err, nan=float("inf"))
    allowed = atol + rtol * torch.where(e.isfinite(), e.abs(), torch.zeros_like(e))
    max_err, mean_err = _stat(err)
    passed = bool((err <= allowed).all())
    # The bound shown beside max_err: where the largest error sits when all pass (so "max_err <= bound" is true),
    # at the element furthest past its bound when some fail (so "max_err > bound" is true).
    ratio = err / allowed.clamp(min=torch.finfo(torch.float64).tiny) if not passed else err
    at = int(ratio.argmax()) if ratio.numel() else 0
    bound = float(allowed.flatten()[at]) if allowed.numel() else atol
    return Equivalence(name, passed, max_err, mean_err, bound, f"allclose rtol={rtol:g} atol={atol:g}")


def bitwise(actual: Tensor, expected: Tensor, *, name: str = "") -> Equivalence:
    """Same dtype, same shape, same bits (NaNs with the same payload count as equal)."""
    _check_pair(actual, expected, name)
    if actual.dtype != expected.dtype:
        raise ValueError(f"{name}: dtypes differ, {actual.dtype} vs {expected.dtype}")
    a, e = actual.detach().cpu(), expected.detach().cpu()
    same = a.reshape(-1).view(torch.uint8).equal(e.reshape(-1).view(torch.uint8)) if a.numel() else True
    max_err, mean_err = _stat(torch.nan_to_num(_errors(a, e), nan=0.0))
    return Equivalence(name, same, max_err, mean_err, 0.0, "bitwise equal")


def dtype_floor(dtype: torch.dtype, magnitude: float = 1.0, ulps: float = FLOOR_ULPS) -> float:
    """`ulps` units in the last place of `dtype` at `magnitude` (at least 1): the error no result can avoid."""
    return ulps * torch.finfo(dtype).eps * max(1.0, magnitude)


def error_ratio(
    opt: Tensor,
    ref: Tensor,
    base: Tensor,
    *,
    name: str = "",
    factor: float = FORWARD_FACTOR,
    dtype: torch.dtype | None = None,
    cancellation: float = 0.0,
) -> Equivalence:
    """The FlashAttention rule: max|opt - ref| <= factor * max|base - ref| + floor.

    ref: float64 reference; base: naive reference in the low dtype; opt: the result under test. The floor is one ulp
    of `dtype` (default opt's dtype) at max|ref|, plus one float32 ulp at `cancellation`: the size of float32
    intermediates that the algorithm under test subtracts where the naive one does not (FA2's dS = P ∘ (dP - D), with
    D = rowsum(dO ∘ O) in place of rowsum(P ∘ dP)). Where the exact result is 0 and the naive path cancels exactly
    (one visible key: P = 1, dP = D), that subtraction's rounding is the whole error, at the scale of what cancelled,
    not of the result."""
    _check_pair(opt, ref, name)
    _check_pair(base, ref, name)
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    dtype = dtype or opt.dtype
    err = _errors(opt, ref)
    base_err = _errors(base, ref)
    max_err, mean_err = _stat(err)
    base_max, _ = _stat(base_err)
    magnitude = float(ref.detach().abs().max()) if ref.numel() else 1.0
    if not cancellation >= 0:
        raise ValueError(f"cancellation must be >= 0, got {cancellation}")
    floor = dtype_floor(dtype, magnitude) + FLOOR_ULPS * torch.finfo(torch.float32).eps * cancellation
    bound = factor * base_max + floor
    passed = bool(torch.isfinite(err).all()) and max_err <= bound
    rule = f"error ratio: <= {factor:g} x naive {str(dtype).removeprefix('torch.')} error + {floor:.2g} floor"
    return Equivalence(name, passed, max_err, mean_err, bound, rule, baseline_error=base_max)


def series_close(
    values: Sequence[float], ref_values: Sequence[float], *, name: str, rtol: float = 1e-5
) -> list[Equivalence]:
    """A per-step scalar series (losses, gradient norms) against the reference's: each value within rtol, no
    absolute slack."""
    if len(values) != len(ref_values):
        raise ValueError(f"{name}: {len(values)} values vs {len(ref_values)} reference values")
    return [allclose(torch.tensor(v), torch.tensor(r), rtol=rtol, atol=0.0, name=f"{name} step {step}")
            for step, (v, r) in enumerate(zip(values, ref_values, strict=True))]


def step_by_step(
    losses: Sequence[float],
    grads: Sequence[Mapping[str, Tensor]],
    ref_losses: Sequence[float],
    ref_grads: Sequence[Mapping[str, Tensor]],
    *,
    name: str,
    rtol: float = 1e-5,
) -> list[Equivalence]:
    """A parallel run held to the reference at every step: the loss within rtol, and every named gradient within
    rtol with an absolute floor of rtol times the step's largest reference gradient entry (some entries are zero in
    exact arithmetic and only rounding noise in fp32, where a relative bound means nothing)."""
    if not (len(losses) == len(grads) == len(ref_losses) == len(ref_grads)):
        raise ValueError(f"{name}: steps differ: {len(losses)} losses, {len(grads)} gradient sets, "
                         f"{len(ref_losses)} reference losses, {len(ref_grads)} reference gradient sets")
    parts = series_close(losses, ref_losses, name=f"{name} loss", rtol=rtol)
    for step, (grad, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        if grad.keys() != ref.keys():
            raise ValueError(f"{name} step {step}: gradient names differ: only in the run {sorted(grad.keys() - ref)}, "
                             f"only in the reference {sorted(ref.keys() - grad)}")
        scale = max((float(g.abs().max()) for g in ref.values() if g.numel()), default=0.0)
        parts += [allclose(grad[n], g, rtol=rtol, atol=rtol * scale, name=f"{name} {n} step {step}")
                  for n, g in ref.items()]
    return parts


def combine(name: str, parts: Iterable[Equivalence]) -> Equivalence:
    """One record for many comparisons (e.g. every parameter of a model): passes iff all pass. Its max error and
    bound are those of the worst part by error-to-bound ratio (the pair that decides), named in the rule; its mean
    error is the mean of the parts' mean errors."""
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name}: nothing to combine")
    def badness(e: Equivalence) -> tuple[bool, bool, float]:
        ratio = e.max_error / e.bound if e.bound > 0 else (0.0 if e.max_error == 0 else math.inf)
        return (not e.passed, math.isnan(e.max_error), ratio)

    worst = max(parts, key=badness)
    return Equivalence(
        name,
        all(p.passed for p in parts),
        worst.max_error,
        sum(p.mean_error for p in parts) / len(parts),
        worst.bound,
        f"{worst.rule}; worst of {len(parts)}: {worst.name}",
        baseline_error=worst.baseline_error,
    )


def assert_equivalent(eq: Equivalence) -> None:
    """Raise AssertionError carrying the whole record unless it passed."""
    if not eq.passed:
        raise AssertionError(str(eq))
