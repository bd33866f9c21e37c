"""The @triton.jit pieces the forward and backward kernels share, and the sizes no kernel specialises on."""

from __future__ import annotations

import triton
import triton.language as tl

SIZES = ["H", "HKV", "N", "M", "GROUP", "causal_offset", "window_offset"]
"""Integer arguments Triton's JIT must not specialise (on == 1 or on divisibility by 16): one build serves every
length, head count and GQA group, so the ahead-of-time build (triton_build.py) covers every launch."""


@triton.jit
def softcap(s, cap2):
    """cap2 · tanh(s / cap2), with tanh(y) = 1 - 2 / (exp(2y) + 1) (tl has no tanh; exp2 of ±inf saturates it to
    ±1). Returns the capped scores and tanh, whose square the backward needs."""
    t = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 * 1.4426950408889634 / cap2)) + 1.0)
    return cap2 * t, t


@triton.jit
def sequence(CU_Q, CU_K, b, N, M, VARLEN: tl.constexpr):
    """The sequence program axis 1 names: (its batch index in the tensors, its first query row, first key row,
    query rows, key rows, the shift of its masks). The padded layout: batch entry b, all N and M rows, no shift
    (the launcher has aligned the edges). Packed documents (VARLEN): the tensors are one batch entry of N = total_q
    and M = total_k rows, b is a document, rows cu_seqlens[b]:cu_seqlens[b + 1], and its masks are bottom-right
    aligned (flash-attn's convention): the edges shift by len_k - len_q."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        n = tl.load(CU_Q + b + 1) - q0
        m = tl.load(CU_K + b + 1) - k0
        return 0, q0.to(tl.int64), k0.to(tl.int64), n, m, m - n
    else:
        return b, b * 0, b * 0, N, M, 0  # first rows 0, as int64 like the packed ones

