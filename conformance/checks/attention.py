"""Check `attention`: FlashAttention held to the naive spec, and its memory and speed claims measured.

1. Equivalence, for every backend of `optimized.attention.flash_attention` and `flash_attention_varlen` that can
   run on the device (blocked everywhere, SDPA, Triton on CUDA or under its interpreter, flash-attn on CUDA): the
   output, the LSE and dQ, dK, dV against `reference.attention.attention` / `attention_varlen` in float64, by the
   FlashAttention error rule (conformance/tolerance.py: at most 2x the naive reference's own error in the same dtype
   for outputs, 3x for gradients, plus an ulp floor), over cases covering GQA, both causal alignments, N != M, key
   padding, queries that see no key, sliding windows, softcap and packed documents. Each row counts the cases that
   hold the rule; a peer's failing case is reported in its row without failing the run, ours fail it.
   FlexAttention (torch.nn.attention.flex_attention, mask_mod + score_mod) is a peer on every case, forward only
   on CPU (it has no CPU backward).
2. Memory, naive vs each fast implementation, attention forward + backward at growing N: bytes saved for backward
   (inputs included: what attention holds between forward and backward) and peak live bytes (fresh inputs
   included: the footprint of one attention call). Claims: FlashAttention paper Fig. 3, "10x at 2K, 20x at 4K"
   (flash.memory); the seed's "7.6x memory" (flash.memory_seed), which the paper reports as a speed-up.
3. Speed, naive vs each fast implementation in the same run; on GPU in TFLOP/s with FA2's FLOP count
   (4·N·M·d·H forward, half when causal, backward 2.5x forward). Claim flash.speed (2-4x), made for GPUs.
4. Packing: the same documents packed (varlen) vs padded to the longest, bytes saved for backward and time.

This file builds the equivalence rows (1, FlexAttention and non-finite inputs included); beside it, private to the
check: _attention_cases.py (the cases and the error rule), _attention_flex.py (FlexAttention's adapter) and
_attention_claims.py (the rows of 2-4).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conformance.checks import CheckSpec, Context, _attention_claims
from conformance.checks._attention_cases import (
    CASES,
    INTERPRETER_CASES,
    INTERPRETER_VARLEN_CASES,
    OURS,
    PEERS,
    VARLEN_CASES,
    Case,
    VarlenCase,
    compare,
    compare_fn,
    compare_varlen,
    compare_varlen_fn,
)
from conformance.checks._attention_flex import flex_attention_fn, flex_attention_varlen_fn
from conformance.result import Metric, Result
from conformance.tolerance import Equivalence, allclose, combine
from optimized.attention import BACKENDS, flash_attention, unsupported, unsupported_varlen
from reference.attention import attention
from tools import triton_build

SPEC = CheckSpec(
    name="attention", technique="FlashAttention", reference="reference.attention.attention",
    optimized="optimized.attention.flash_attention", order=20, peers=("torch SDPA", "flash-attn", "FlexAttention"),
    claims=("flash.memory", "flash.memory_seed", "flash.speed"),
)


# ---------------------------------------------------------------------------------------------------------------
# Equivalence


def _dtypes(backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    if backend == "flash_attn":
        return (torch.float16, torch.bfloat16)
    if backend == "triton" and device.type == "cpu":
        return (torch.float32, torch.float16)  # the interpreter has no bfloat16
    return (torch.float32, torch.float16, torch.bfloat16)



def _served(backend: str, case: Case | VarlenCase, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `backend` cannot serve `case` at `dtype` on `device`, or None."""
    if isinstance(case, VarlenCase):
        q, k, v, _, args = case.inputs()
        moved = (*(t.to(device, dtype) for t in (q, k, v)), *(a.to(device) for a in args[:2]), *args[2:])
        return unsupported_varlen(backend, *moved, **case.options())
    q, k, v, _, mask = case.inputs()
    opts = case.options(mask.to(device) if mask is not None else None)
    return unsupported(backend, *(t.to(device, dtype) for t in (q, k, v)), **opts)


def _compare(backend: str, case: Case | VarlenCase, dtype: torch.dtype, device: torch.device) -> Equivalence:
    if isinstance(case, VarlenCase):
        return compare_varlen(backend, case, dtype=dtype, device=device)
    return compare(backend, case, dtype=dtype, device=device)


def _case_sets(backend: str, device: torch.device) -> dict[str, tuple]:
    """{row label: cases}: the padded layout and packed documents (varlen)."""
    if backend == "triton" and device.type == "cpu":
        return {"": INTERPRETER_CASES, "varlen ": INTERPRETER_VARLEN_CASES}
    return {"": CASES, "varlen ": VARLEN_CASES}


def _equivalence_rows(ctx: Context) -> list[Result]:
    """One row per backend, layout (padded, varlen) and dtype: every case it serves, forward and backward,
    combined, with how many hold the error rule. A backend that serves nothing here gets one row saying why."""
    rows = []
    for backend in BACKENDS:
        backend_rows, reasons = [], []
        for layout, cases in _case_sets(backend, ctx.device).items():
            function = "flash_attention_varlen" if layout else "flash_attention"
            for dtype in _dtypes(backend, ctx.device):
                results, skipped = [], []
                for case in cases:
                    reason = _served(backend, case, dtype, ctx.device)
                    if reason is None:
                        results.append((case.name, _compare(backend, case, dtype, ctx.device)))
                    else:
                        skipped.append(f"{case.name}: {reason}")
                        reasons.append(reason)
                if not results:
                    continue
                notes = "out, lse (where returned), dq, dk, dv"
                if backend == "triton" and ctx.device.type == "cpu":
                    notes += "; run in Triton's interpreter (tiny shapes)"
                backend_rows.append(_rule_row(
                    ctx, f"{layout}{backend} {_dt(dtype)} vs float64 naive (error rule)", results, len(cases),
                    skipped, notes, optimized=f"optimized.attention.{function}(backend={backend!r})",
                    peer=PEERS.get(backend), fails_run=backend in OURS))
        if not backend_rows:
            backend_rows.append(SPEC.row(ctx, f"{backend}: not run here", peer=PEERS.get(backend),
                                         optimized=f"optimized.attention.flash_attention(backend={backend!r})",
                                         notes="not available: " + "; ".join(dict.fromkeys(reasons))))
        rows += backend_rows
    return rows + _flex_rows(ctx)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rule_row(ctx: Context, name: str, results: list[tuple[str, Equivalence]], n_cases: int, skipped: list[str],
              notes: str, *, fails_run: bool, **fields) -> Result:
    """A row of error-rule comparisons: the combined record, the count of cases that hold the rule and, for a
    peer (fails_run=False), the failing cases in the notes instead of a failing record."""
    held = [name for name, eq in results if eq.passed]
    failing = [f"{case}: {eq.max_error:.3g} > bound {eq.bound:.3g} ({eq.rule.rsplit('worst of', 1)[-1].strip()})"
               for case, eq in results if not eq.passed]
    equivalence = combine(name, [eq for _, eq in results])
    counts = Metric(f"cases within the error rule, of {len(results)} served ({n_cases} asked)", len(held), "cases")
    notes = f"{len(held)} of {len(results)} served cases hold the rule ({n_cases} asked); {notes}"
    if failing:
        notes += "; OUTSIDE THE RULE: " + "; ".join(failing)
    if skipped:
        notes += "; not served: " + "; ".join(skipped)
    if failing and not fails_run:
        notes += " (a peer: reported here, not failing the run)"
        equivalence = None
    return SPEC.row(ctx, name, equivalence=equivalence, metrics=[counts], notes=notes, **fields)

# ---------------------------------------------------------------------------------------------------------------
# FlexAttention, a peer: the same masks as mask_mod, softcap as score_mod



def _flex_rows(ctx: Context) -> list[Result]:
    """FlexAttention on every case (padded and varlen), per dtype; forward only on CPU, where it has no backward."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest  # noqa: F401
    except ImportError as e:
        return [SPEC.row(ctx, "flex_attention: not run here", peer="FlexAttention",
                         optimized="torch.nn.attention.flex_attention", notes=f"not available in this torch: {e}")]
    grads = ctx.device.type == "cuda"
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        results, raised = [], []
        calls = [(case.name, functools.partial(compare_fn, flex_attention_fn, case)) for case in CASES]
        calls += [(case.name, functools.partial(compare_varlen_fn, flex_attention_varlen_fn, case))
                  for case in VARLEN_CASES]
        for name, compare_case in calls:
            try:
                results.append((name, compare_case(dtype=dtype, device=ctx.device, grads=grads)))
            except Exception as e:  # noqa: BLE001 - a peer that raises is reported, and our rows still run
                raised.append(f"{name}: raised {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")
        what = "out, lse, dq, dk, dv" if grads else "out, lse (forward only: no flex_attention backward on CPU)"
        if not results:
            rows.append(SPEC.row(ctx, f"flex_attention {_dt(dtype)}: every case raised", peer="FlexAttention",
                                 optimized="torch.nn.attention.flex_attention", notes="; ".join(raised)))
            continue
        rows.append(_rule_row(ctx, f"flex_attention {_dt(dtype)} vs float64 naive (error rule)", results,
                              len(calls), raised, f"{what}; eager flex_attention with a mask_mod and a score_mod",
                              optimized="torch.nn.attention.flex_attention", peer="FlexAttention", fails_run=False))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Non-finite inputs (issue 22, item 5): NaN and inf propagate as through the spec


@dataclass(frozen=True)
class NonFiniteCase:
    """One non-finite element planted in q, k, v or dO (head 0, element 0) of a tiny GQA 4:2 problem, N = M = 6."""

    name: str
    which: str
    """"q", "k", "v" or "dO"."""
    row: int
    """The query row (q, dO) or key (k, v) it sits in."""
    value: float
    is_causal: bool


NONFINITE_CASES = (
    NonFiniteCase("NaN in q (the issue's example), no mask", "q", 5, float("nan"), False),
    NonFiniteCase("-inf in q, causal row 0: its one visible score is -inf, softmax 0/0", "q", 0, float("-inf"), True),
    NonFiniteCase("NaN key hidden by the causal mask from all but the last query", "k", 5, float("nan"), True),
    NonFiniteCase("+inf in v, seen by every query", "v", 0, float("inf"), True),
    NonFiniteCase("+inf in the upstream gradient dO", "dO", 5, float("inf"), False),
)
NONFINITE_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
"""float32 kernel against the float32 reference on the finite entries; non-finite entries must match exactly."""


def _nonfinite_compare(fn: Callable, case: NonFiniteCase, device: torch.device, grads: bool) -> Equivalence:
    """fn against `attention` on `case`: out by `allclose` (NaN at the reference's NaN, inf equal to its inf), dq,
    dk, dv by `allclose` after mapping every non-finite entry to NaN (the FA2 identity D = rowsum(dO ∘ O) meets
    inf - inf where the reference's softmax backward does not, so NaN and inf may trade places there)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (1, 4, 6, 8), "k": (1, 2, 6, 8), "v": (1, 2, 6, 8), "dO": (1, 4, 6, 8)}
    t = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    t[case.which][0, 0, case.row, 0] = case.value

    def run(f, dev):
        q, k, v = (t[n].to(dev).requires_grad_(grads) for n in ("q", "k", "v"))
        out = f(q, k, v, is_causal=case.is_causal)
        values = {"out": out}
        if grads:
            values |= dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), t["dO"].to(dev)), strict=True))
        return {n: x.detach().cpu() for n, x in values.items()}

    want, got = run(attention, torch.device("cpu")), run(fn, device)
    as_nan = lambda x: torch.where(x.isfinite(), x, float("nan"))  # noqa: E731
    return combine(case.name, [allclose(got[n] if n == "out" else as_nan(got[n]), w if n == "out" else as_nan(w),
                                        name=f"{n}, {case.name}", **NONFINITE_TOLERANCE) for n, w in want.items()])


def _nonfinite_row(ctx: Context) -> Result:
    """One row: "auto" and "blocked" (ours, failing the run) held to the spec on every NONFINITE_CASES entry, forward
    and backward; the peers (torch SDPA's CPU / CUDA kernels called directly, FlexAttention) on the same cases, their
    differences listed in the notes as peer defects."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def fn(q, k, v, *, is_causal):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
        return fn

    ours = {name: functools.partial(flash_attention, backend=name) for name in ("auto", "blocked")}
    peers = {"sdpa " + b.name.lower(): sdpa_with(b) for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION,
                                                              SDPBackend.EFFICIENT_ATTENTION)}
    if ctx.device.type == "cuda":
        peers["triton (ours; known defect, tests xfail)"] = functools.partial(flash_attention, backend="triton")
    parts, defects, not_run = [], [], []
    for case in NONFINITE_CASES:
        parts += [_nonfinite_compare(fn, case, ctx.device, grads=True) for fn in ours.values()]
        for name, fn in peers.items():
            try:
                eq = _nonfinite_compare(fn, case, ctx.device, grads=True)
            except RuntimeError as e:  # a kernel this device or dtype does not have
                not_run.append(f"{name}: {str(e).strip().splitlines()[0][:80]}")
                continue
            if not eq.passed:
                defects.append(f"{name} on '{case.name}'")
    equivalence = combine("non-finite inputs propagate like the reference", parts)
    notes = (f"{len(NONFINITE_CASES)} cases (NaN/inf in q, k, v, dO; masked and visible positions; GQA 4:2), "
             "forward and backward, 'auto' and 'blocked'; out: the NaN/inf pattern exactly, gradients: the "
             "non-finite pattern exactly, finite entries by allclose. 'auto' never picks SDPA on CPU for this "
             "reason (optimized.attention.dispatch.CPU_SDPA_NONFINITE). A value hidden by the mask that reaches "
             "other rows only through the reference's dense 0·NaN products is outside the contract (a spec gap)")
    if defects:
        notes += "; PEER DEFECTS (reported, not failing the run): " + "; ".join(dict.fromkeys(defects))
    if not_run:
        notes += "; peers not run here: " + "; ".join(dict.fromkeys(not_run))
    return SPEC.row(ctx, "non-finite inputs propagate like the reference", equivalence=equivalence, notes=notes,
                    peer="torch SDPA, FlexAttention")



def run(ctx: Context) -> list[Result]:
    rows = _equivalence_rows(ctx)
    rows.append(_nonfinite_row(ctx))
    rows += _attention_claims.rows(ctx, SPEC)
    if importlib.util.find_spec("triton") is not None:  # the Triton kernels compiled for sm_80 / sm_90, no GPU needed
        rows.append(triton_build.report_row(SPEC, ctx))
    return rows
