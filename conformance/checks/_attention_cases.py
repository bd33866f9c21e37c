"""The attention problems of the `attention` check, whose backends they run, and the error rule that holds each
backend to the float64 spec (conformance/tolerance.py's FlashAttention rule).

`compare`, `compare_fn`, `compare_varlen` and `compare_varlen_fn` are also what tests/optimized/test_attention*.py
hold the kernels to, so a test and the check judge a case by the same rule.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from conformance.tolerance import GRADIENT_FACTOR, Equivalence, combine, error_ratio
from optimized.attention import flash_attention, flash_attention_varlen, unsupported, unsupported_varlen
from reference.attention import attention, attention_varlen

PEERS = {"sdpa": "torch SDPA", "flash_attn": "flash-attn"}
"""Backends written by others, by the name the report gives them."""
OURS = ("triton", "blocked")
"""Backends this project wrote: a case outside the error rule fails the run. A peer's is reported in its row."""


@dataclass(frozen=True)
class Case:
    """One attention problem: shapes and options."""

    name: str
    B: int
    H: int
    Hkv: int
    N: int
    M: int
    d: int
    is_causal: bool = False
    causal_alignment: str = "top_left"
    padding: bool = False
    """A random (B, M) key padding mask whose first batch row hides every key (queries that see no key)."""
    window_size: tuple[int, int] = (-1, -1)
    """Sliding window (left, right), -1 unbounded (flash-attn's convention)."""
    softcap: float = 0.0
    """Scores -> softcap · tanh(scores / softcap); 0 = off."""
    q_scale: float = 1.0
    """Multiplies q: large scores, where softcap matters."""

    def inputs(self, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v, d_out in float64 on the CPU, and the key padding mask (or None)."""
        gen = torch.Generator().manual_seed(seed)
        q = self.q_scale * torch.randn(self.B, self.H, self.N, self.d, generator=gen, dtype=torch.float64)
        k = torch.randn(self.B, self.Hkv, self.M, self.d, generator=gen, dtype=torch.float64)
        v = torch.randn(self.B, self.Hkv, self.M, self.d, generator=gen, dtype=torch.float64)
        d_out = torch.randn(self.B, self.H, self.N, self.d, generator=gen, dtype=torch.float64)
        mask = None
        if self.padding:
            mask = torch.rand(self.B, self.M, generator=gen) < 0.7  # (B, M)
            mask[0] = False
        return q, k, v, d_out, mask

    def options(self, mask: Tensor | None) -> dict:
        return dict(is_causal=self.is_causal, causal_alignment=self.causal_alignment, key_padding_mask=mask,
                    window_size=self.window_size, softcap=self.softcap)


@dataclass(frozen=True)
class VarlenCase:
    """Packed documents (flash-attn's varlen layout): their lengths, heads and options."""

    name: str
    lengths_q: tuple[int, ...]
    """Query length of each document."""
    lengths_k: tuple[int, ...] | None = None
    """Key length of each document; None: the query lengths."""
    H: int = 2
    Hkv: int = 1
    d: int = 16
    is_causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    q_scale: float = 1.0
    max_seqlen_extra: int = 0
    """max_seqlen_q and _k exceed the longest document by this much (flash-attn takes any upper bound)."""

    def inputs(self, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple]:
        """q, k, v, d_out in float64 on the CPU, and (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
        lengths_k = self.lengths_k if self.lengths_k is not None else self.lengths_q
        gen = torch.Generator().manual_seed(seed)
        total_q, total_k = sum(self.lengths_q), sum(lengths_k)
        q = self.q_scale * torch.randn(total_q, self.H, self.d, generator=gen, dtype=torch.float64)
        k = torch.randn(total_k, self.Hkv, self.d, generator=gen, dtype=torch.float64)
        v = torch.randn(total_k, self.Hkv, self.d, generator=gen, dtype=torch.float64)
        d_out = torch.randn(total_q, self.H, self.d, generator=gen, dtype=torch.float64)
        cu = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (self.lengths_q, lengths_k)]
        longest = [max(n) + self.max_seqlen_extra for n in (self.lengths_q, lengths_k)]
        return q, k, v, d_out, (*cu, *longest)

    def options(self) -> dict:
        return dict(is_causal=self.is_causal, window_size=self.window_size, softcap=self.softcap)


CASES = (  # sizes above the blocked backend's 128-row tiles, so the online softmax crosses tiles
    Case("causal GQA 4:2, N=M=193, d=64", B=2, H=4, Hkv=2, N=193, M=193, d=64, is_causal=True),
    Case("bottom-right causal, padded, N=71 < M=263, d=40", B=2, H=2, Hkv=1, N=71, M=263, d=40, is_causal=True,
         causal_alignment="bottom_right", padding=True),
    Case("non-causal, N=263 > M=71, d=20", B=1, H=3, Hkv=3, N=263, M=71, d=20),
    Case("bottom-right causal, N=200 > M=77 (empty rows), MQA", B=1, H=2, Hkv=1, N=200, M=77, d=16,
         is_causal=True, causal_alignment="bottom_right"),
    Case("sliding window (64, 0), causal GQA 6:2, N=M=300, d=32", B=1, H=6, Hkv=2, N=300, M=300, d=32,
         is_causal=True, window_size=(64, 0)),
    Case("window (20, 20), bottom-right, N=90 < M=250, d=16", B=1, H=2, Hkv=1, N=90, M=250, d=16,
         causal_alignment="bottom_right", window_size=(20, 20)),
    Case("softcap 30, scores ~100, causal, N=M=200, d=32", B=1, H=2, Hkv=1, N=200, M=200, d=32, is_causal=True,
         softcap=30.0, q_scale=8.0),
)
INTERPRETER_CASES = (  # Triton's interpreter runs every program in Python: tiny shapes only
    Case("bottom-right causal, padded, GQA, N=24 < M=40, d=16", B=1, H=2, Hkv=1, N=24, M=40, d=16, is_causal=True,
         causal_alignment="bottom_right", padding=True),
    Case("window (5, 0) and softcap 3, N=M=40, d=16", B=1, H=2, Hkv=1, N=40, M=40, d=16, is_causal=True,
         window_size=(5, 0), softcap=3.0, q_scale=4.0),
)
VARLEN_CASES = (
    VarlenCase("documents of 1, 7, 13, 130, 2, 97 tokens, causal GQA 4:2, d=32", (1, 7, 13, 130, 2, 97), H=4,
               Hkv=2, d=32, is_causal=True),
    VarlenCase("window (16, 0) and softcap 20, keys longer than queries, max_seqlen + 3", (31, 64, 5), (40, 64, 9),
               H=2, Hkv=1, d=16, is_causal=True, window_size=(16, 0), softcap=20.0, q_scale=6.0,
               max_seqlen_extra=3),
    VarlenCase("three documents of 64 (a plain batch), causal, d=16", (64, 64, 64), H=2, Hkv=2, d=16,
               is_causal=True),
)
INTERPRETER_VARLEN_CASES = (
    VarlenCase("documents of 5, 1, 20 tokens, keys 7, 3, 20, causal GQA 2:1", (5, 1, 20), (7, 3, 20), H=2, Hkv=1,
               d=16, is_causal=True),
    VarlenCase("window (4, 0) and softcap 3, documents of 17, 2, 9 tokens", (17, 2, 9), H=2, Hkv=1, d=16,
               is_causal=True, window_size=(4, 0), softcap=3.0, q_scale=4.0),
)


def _forward_backward(fn: Callable, q: Tensor, k: Tensor, v: Tensor, d_out: Tensor, *, dtype: torch.dtype,
                      device: torch.device, want_lse: bool, grads: bool = True, key_padding_mask: Tensor | None = None,
                      extra_args: tuple = (), **options) -> dict[str, Tensor]:
    """fn's out (and lse) and, with grads=True, dq, dk, dv at `dtype` on `device`, returned on the CPU. Tensors in
    `extra_args` (cu_seqlens) move to `device`, keeping their dtype."""
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_(grads) for t in (q, k, v))
    if key_padding_mask is not None:
        options["key_padding_mask"] = key_padding_mask.to(device)
    extra = tuple(a.to(device) if isinstance(a, Tensor) else a for a in extra_args)
    result = fn(q, k, v, *extra, return_lse=want_lse, **options)
    out, lse = result if want_lse else (result, None)
    values = {"out": out} | ({"lse": lse} if want_lse else {})
    if grads:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out.to(device=device, dtype=dtype))
        values |= {"dq": dq, "dk": dk, "dv": dv}
    return {name: t.detach().cpu() for name, t in values.items()}


def _cancelled(q: Tensor, k: Tensor, d_out: Tensor, out: Tensor) -> dict[str, float]:
    """How large the float32 terms are that FA2's backward subtracts: dS = P ∘ (dP - D) with D = rowsum(dO ∘ O),
    so dQ = scale · dS K and dK = scale · dSᵀ Q carry |dP - D| rounding of order scale · max|D| · max|K| (|Q|), even
    where the exact gradient is 0. (The softcap factor 1 - tanh² is at most 1.) Any layout: rows on the last dim."""
    largest = lambda t: float(t.detach().abs().max()) if t.numel() else 0.0  # noqa: E731
    scale_d = q.shape[-1] ** -0.5 * largest((d_out * out).sum(-1))  # scale · max|D|
    return {"dq": scale_d * largest(k), "dk": scale_d * largest(q)}


def _lse_equivalence(opt: Tensor, ref: Tensor, base: Tensor, *, name: str, dtype: torch.dtype) -> Equivalence:
    """The error rule on the finite LSEs; a row that sees no key must be -inf in both."""
    empty = ref == float("-inf")
    if not torch.equal(opt == float("-inf"), empty) or not opt.masked_fill(empty, 0.0).isfinite().all():
        return Equivalence(name, False, float("inf"), float("inf"), 0.0,
                           "LSE must be -inf exactly on the rows that see no key, finite elsewhere")
    fill = lambda t: t.double().masked_fill(empty, 0.0)  # noqa: E731
    return error_ratio(fill(opt), fill(ref), fill(base), name=name, dtype=dtype)


def compare(backend: str, case: Case, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Equivalence:
    """`flash_attention(backend=...)` at `dtype` vs the float64 reference, by the error rule against the naive
    reference at `dtype`: output (and LSE where the backend returns it) 2x, dq, dk, dv 3x."""
    q, k, v, _, mask = case.inputs(seed)
    mask = mask.to(device) if mask is not None else None
    want_lse = unsupported(backend, q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), return_lse=True,
                           **case.options(mask)) is None
    return compare_fn(functools.partial(flash_attention, backend=backend), case, dtype=dtype, device=device,
                      want_lse=want_lse, seed=seed)


def compare_fn(fn: Callable, case: Case, *, dtype: torch.dtype, device: torch.device, want_lse: bool = True,
               grads: bool = True, seed: int = 0) -> Equivalence:
    """Any attention function `fn` (the reference's signature) held to the float64 reference by the error rule
    (forward only with grads=False)."""
    q, k, v, d_out, mask = case.inputs(seed)
    run = functools.partial(_forward_backward, q=q, k=k, v=v, d_out=d_out, want_lse=want_lse, grads=grads,
                            **case.options(mask))
    return _error_rule(run, attention, fn, case.name, dtype=dtype, device=device, want_lse=want_lse, grads=grads,
                       inputs=(q, k, d_out))


def compare_varlen(backend: str, case: VarlenCase, *, dtype: torch.dtype, device: torch.device,
                   seed: int = 0) -> Equivalence:
    """`flash_attention_varlen(backend=...)` at `dtype` vs the float64 `attention_varlen`, by the error rule."""
    q, k, v, _, args = case.inputs(seed)
    moved = (*(t.to(device, dtype) for t in (q, k, v)), *(a.to(device) for a in args[:2]), *args[2:])
    want_lse = unsupported_varlen(backend, *moved, return_lse=True, **case.options()) is None
    return compare_varlen_fn(functools.partial(flash_attention_varlen, backend=backend), case, dtype=dtype,
                             device=device, want_lse=want_lse, seed=seed)


def compare_varlen_fn(fn: Callable, case: VarlenCase, *, dtype: torch.dtype, device: torch.device,
                      want_lse: bool = True, grads: bool = True, seed: int = 0) -> Equivalence:
    """Any packed attention function `fn` (`attention_varlen`'s signature) held to it in float64 by the error
    rule (forward only with grads=False)."""
    q, k, v, d_out, args = case.inputs(seed)
    run = functools.partial(_forward_backward, q=q, k=k, v=v, d_out=d_out, want_lse=want_lse, grads=grads,
                            extra_args=args, **case.options())
    return _error_rule(run, attention_varlen, fn, case.name, dtype=dtype, device=device, want_lse=want_lse,
                       grads=grads, inputs=(q, k, d_out))


def _error_rule(run: Callable, spec: Callable, fn: Callable, name: str, *, dtype: torch.dtype, device: torch.device,
                want_lse: bool, grads: bool, inputs: tuple[Tensor, Tensor, Tensor]) -> Equivalence:
    """fn at `dtype` against `spec` in float64, with `spec` at `dtype` as the naive baseline: out (and lse) 2x,
    dq, dk, dv 3x. inputs: q, k, d_out in float64, for the size of what FA2's gradients cancel."""
    ref = run(spec, dtype=torch.float64, device=torch.device("cpu"))
    base = run(spec, dtype=dtype, device=device)
    opt = run(fn, dtype=dtype, device=device)
    label = f"{name}, {str(dtype).removeprefix('torch.')}"
    parts = [error_ratio(opt["out"], ref["out"], base["out"], name=f"out, {label}")]
    if want_lse:
        parts.append(_lse_equivalence(opt["lse"], ref["lse"], base["lse"], name=f"lse, {label}", dtype=dtype))
    if grads:
        cancelled = _cancelled(*inputs, ref["out"])
        parts += [error_ratio(opt[g], ref[g], base[g], name=f"{g}, {label}", factor=GRADIENT_FACTOR,
                              cancellation=cancelled.get(g, 0.0)) for g in ("dq", "dk", "dv")]
    return combine(label, parts)
