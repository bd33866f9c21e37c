"""When is an optimized result equal to its reference? Three rules, each returning an `Equivalence` record.

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

3. `within_spread`: for trajectories (many optimizer steps), where a fixed bound cannot be right on every machine:
   Adam turns any rounding difference (a CPU's kernels, the thread count, the reduction order of an all-reduce)
   into a step of size ~lr, so how far two correct runs drift apart depends on the machine, not on correctness.
   The yardstick is measured instead: the reference is re-run with a rounding-level change (`nudge_`: every
   initial weight moved by one ulp, in a random direction), and its distance from itself is its own rounding
   spread on this machine (`rounding_spread`). The run under test passes iff for every tensor
       max|opt - ref| <= SPREAD_FACTOR x spread + one ulp at the tensor's magnitude.
   Where the claim is algorithmic equivalence (sharding, parallelism, accumulation), both sides run in float64:
   the spread is then ~1e-15 on any machine, and a real bug (a missing average, a stale shard, a wrong clipping
   norm) is 1e-8 or more even where AdamW's scale invariance hides it in float32. Where the dtype is the point
   (peers that only run in float32), the same rule runs in float32.

Float32 bounds follow the process's float32 matmul precision (`working_eps`): a user who allows TF32 or bf16
matmuls gets results at that precision, and a bound at float32's epsilon would fail correct code.

Every record carries the max and mean error and the bound, whether it passed or not: the report always shows them,
and says where the bound came from.
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
SPREAD_FACTOR = 10.0
"""A correct run differs from the reference only in rounding (another reduction order, another kernel), as the
nudged reference does (one ulp in every initial weight); the two drift apart through the same training dynamics, so
their distances are of the same order, not equal: the run may be one decade further out than the measured spread.
A bug moves a trajectory by its own size (1e-8 to 1e-1 after a few steps), 1e6 times the float64 spread."""

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


MATMUL_PRECISION_EPS = {"highest": torch.finfo(torch.float32).eps, "high": 2.0**-10, "medium": 2.0**-7}
"""The machine epsilon float32 matmuls may run at under torch.set_float32_matmul_precision: "high" allows TF32 (10
explicit mantissa bits; bf16x3 where a backend has it is closer to float32), "medium" allows bfloat16 (7 bits;
oneDNN does so on CPUs with AMX)."""


def working_eps(dtype: torch.dtype) -> float:
    """The machine epsilon results of `dtype` are computed at: the dtype's own, or for float32 the coarser one that
    the process's float32 matmul precision allows. A user who sets "medium" asks for bf16 matmuls; a verdict that
    held them to float32's epsilon would fail correct code on their machine."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        eps = max(eps, MATMUL_PRECISION_EPS[torch.get_float32_matmul_precision()])
    return eps


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) that torch.testing.assert_close uses for `dtype`; for float32 scaled by how much coarser the
    process's float32 matmul precision is than float32 itself (`working_eps`)."""
    if dtype not in _DEFAULT_TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype}; allowed: {list(_DEFAULT_TOLERANCES)}")
    rtol, atol = _DEFAULT_TOLERANCES[dtype]
    coarser = working_eps(dtype) / torch.finfo(dtype).eps
    return rtol * coarser, atol * coarser


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
    origin = (f"; torch.testing's {str(expected.dtype).removeprefix('torch.')} defaults"
              + (f" at matmul precision {torch.get_float32_matmul_precision()!r}"
                 if expected.dtype == torch.float32 and working_eps(torch.float32) > torch.finfo(torch.float32).eps
                 else "")) if rtol is None and atol is None and expected.is_floating_point() else ""
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
    return Equivalence(name, passed, max_err, mean_err, bound, f"allclose rtol={rtol:g} atol={atol:g}{origin}")


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
    """`ulps` units in the last place of `dtype` at `magnitude` (at least 1): the error no result can avoid. A
    float32 result computed by matmuls at a coarser precision (`working_eps`) cannot avoid that precision's ulp, nor
    can a half-precision one whose kernel accumulates in such float32."""
    eps = torch.finfo(dtype).eps
    if dtype.is_floating_point and torch.finfo(dtype).bits <= 32:
        eps = max(eps, working_eps(torch.float32))
    return ulps * eps * max(1.0, magnitude)


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
    floor = dtype_floor(dtype, magnitude) + FLOOR_ULPS * working_eps(torch.float32) * cancellation
    bound = factor * base_max + floor
    passed = bool(torch.isfinite(err).all()) and max_err <= bound
    rule = f"error ratio: <= {factor:g} x naive {str(dtype).removeprefix('torch.')} error + {floor:.2g} floor"
    return Equivalence(name, passed, max_err, mean_err, bound, rule, baseline_error=base_max)


def step_by_step(
    losses: Sequence[float],
    grads: Sequence[Mapping[str, Tensor]],
    ref_losses: Sequence[float],
    ref_grads: Sequence[Mapping[str, Tensor]],
    *,
    name: str,
    spread: Spread,
    factor: float = SPREAD_FACTOR,
) -> list[Equivalence]:
    """A parallel run held to the reference at every step, each step started from the reference's parameters
    (teacher-forced, so errors cannot compound): the loss and every named gradient within `factor` x the
    reference's own per-step rounding spread (`within_spread`), one record per step."""
    if not (len(losses) == len(grads) == len(ref_losses) == len(ref_grads)):
        raise ValueError(f"{name}: steps differ: {len(losses)} losses, {len(grads)} gradient sets, "
                         f"{len(ref_losses)} reference losses, {len(ref_grads)} reference gradient sets")
    parts = []
    for step, (loss, grad, ref_loss, ref) in enumerate(zip(losses, grads, ref_losses, ref_grads, strict=True)):
        actual = {"loss": torch.tensor([loss], dtype=torch.float64), **grad}
        expected = {"loss": torch.tensor([ref_loss], dtype=torch.float64), **ref}
        parts.append(within_spread(actual, expected, spread, name=f"{name} step {step}", factor=factor))
    return parts


def combine(name: str, parts: Iterable[Equivalence]) -> Equivalence:
    """One record for many comparisons (e.g. every parameter of a model): passes iff all pass. Its max error and
    bound are those of the worst part by error-to-bound ratio (the pair that decides), named in the rule, and so is
    the first part to fail when that is another; its mean error is the mean of the parts' mean errors."""
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name}: nothing to combine")
    def badness(e: Equivalence) -> tuple[bool, bool, float]:
        ratio = e.max_error / e.bound if e.bound > 0 else (0.0 if e.max_error == 0 else math.inf)
        return (not e.passed, math.isnan(e.max_error), ratio)

    worst = max(parts, key=badness)
    failing = [p for p in parts if not p.passed]
    # In a trajectory the parts come in order (steps, then parameters in model order): the first to fail is where
    # the run left its band, which the worst need not be.
    first = f"; first to fail: {failing[0].name}" if failing and failing[0] is not worst else ""
    return Equivalence(
        name,
        not failing,
        worst.max_error,
        sum(p.mean_error for p in parts) / len(parts),
        worst.bound,
        f"{worst.rule}; worst of {len(parts)}: {worst.name}{first}",
        baseline_error=worst.baseline_error,
    )


def assert_equivalent(eq: Equivalence) -> None:
    """Raise AssertionError carrying the whole record unless it passed."""
    if not eq.passed:
        raise AssertionError(str(eq))


# ---- trajectories: the reference's own rounding spread as the yardstick -------------------------------------------


NUDGE_SEEDS = (1, 2)
"""Seeds of the reference's one-ulp nudged re-runs; its rounding spread is the largest distance over them."""


def nudge_(tensors: Iterable[Tensor], *, seed: int = 0) -> None:
    """Move every element of every floating tensor one ulp up or down (a random direction per element, from `seed`),
    in place: a rounding-level change of the initial weights, whose effect on a run is the run's own rounding spread.
    Zeros stay zero (a zero bias moved to a denormal would only measure the denormal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            if not t.is_floating_point() or t.numel() == 0:
                continue
            up = torch.rand(t.shape, generator=gen) < 0.5
            away = torch.where(up, math.inf, -math.inf).to(device=t.device, dtype=t.dtype)
            t.copy_(torch.where(t == 0, t, torch.nextafter(t, away)))


@dataclass(frozen=True)
class Spread:
    """How far the reference moves from itself under rounding-level changes: the yardstick of a trajectory."""

    value: float
    """max |variant - reference| over the variants and every tensor."""
    origin: str
    """How the variants were made (e.g. "AdamW x3, float64, initial weights nudged by one ulp, 2 seeds")."""
    worst: str = ""
    """The tensor where the spread is largest."""


def rounding_spread(ref: Mapping[str, Tensor], variants: Sequence[Mapping[str, Tensor]], *, origin: str) -> Spread:
    """The largest distance between the reference's tensors and those of its re-runs with a rounding-level change."""
    if not variants:
        raise ValueError("rounding_spread needs at least one variant run of the reference")
    worst, value = "", 0.0
    for variant in variants:
        if variant.keys() != ref.keys():
            raise ValueError(f"a variant's tensors differ from the reference's: only in the variant "
                             f"{sorted(variant.keys() - ref.keys())}, only in the reference "
                             f"{sorted(ref.keys() - variant.keys())}")
        for k, r in ref.items():
            err, _ = _stat(_errors(variant[k], r))
            if not math.isfinite(err):
                raise ValueError(f"the reference's variant run is not finite at {k!r}: no yardstick")
            if err > value:
                worst, value = k, err
    return Spread(value, origin, worst)


def within_spread(
    actual: Mapping[str, Tensor],
    ref: Mapping[str, Tensor],
    spread: Spread,
    *,
    name: str,
    factor: float = SPREAD_FACTOR,
) -> Equivalence:
    """Every tensor of a run within `factor` x the reference's own rounding spread (plus one ulp of the reference's
    dtype at the tensor's magnitude) of the reference; the rule states the ratio actually reached."""
    if actual.keys() != ref.keys():
        raise ValueError(f"{name}: tensors differ: only in the run {sorted(actual.keys() - ref.keys())}, only in "
                         f"the reference {sorted(ref.keys() - actual.keys())}")
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    parts = []
    for k, r in ref.items():
        _check_pair(actual[k], r, k)
        err = _errors(actual[k], r)
        max_err, mean_err = _stat(err)
        magnitude = float(r.detach().abs().max()) if r.numel() else 0.0
        floor = dtype_floor(r.dtype if r.is_floating_point() else torch.float64, magnitude)
        bound = factor * spread.value + floor
        passed = bool(torch.isfinite(err).all()) and max_err <= bound
        ratio = f"{max_err / spread.value:.2g}x" if spread.value > 0 else f"{max_err:.2g} (spread 0)"
        rule = (f"within {factor:g}x the reference's own rounding spread {spread.value:.2g} ({spread.origin}) + 1 ulp;"
                f" reached {ratio}")
        parts.append(Equivalence(k, passed, max_err, mean_err, bound, rule, baseline_error=spread.value))
    return combine(name, parts)
