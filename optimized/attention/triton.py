"""FlashAttention-2 as Triton kernels: forward, and a deterministic backward (no atomics).

The algorithm of optimized/attention/blocked.py (FA2, Dao 2023, arXiv 2307.08691, Algorithms 1 and 2), one program
per tile, written after the Triton fused-attention tutorial and the FA2 paper:

    _fwd_kernel        one program per (query tile, batch x query head): online softmax over the key tiles,
                       writes O and LSE (FA2 Alg. 1).
    _bwd_preprocess    D = rowsum(dO ∘ O) (FA2 Alg. 2 line 3).
    _bwd_dkdv_kernel   one program per (key tile, batch x key/value head): loops over the G query heads of its GQA
                       group and over the query tiles, accumulating dK_j and dV_j in registers (Alg. 2 lines 4-17).
    _bwd_dq_kernel     one program per (query tile, batch x query head): loops over the key tiles, accumulating dQ_i.

FA2 accumulates dQ with atomic adds from the dK/dV pass; here dQ has its own pass instead, so each gradient element
is summed by one program in a fixed order and the backward is bitwise reproducible, at the cost of computing
S = Q Kᵀ and dP = dO Vᵀ twice.

Supported: causal masks in both alignments (query i sees keys j <= i + offset, offset 0 for top-left and M - N for
bottom-right), sliding windows (the right edge moves that offset; the left edge, keys j >= i + window_offset, is a
second diagonal: key tiles left of it are skipped like those right of the causal one; Beltagy et al. 2020), softcap
(S -> c·tanh(S / c), Gemma 2; the backward multiplies dS by 1 - tanh²), GQA/MQA, N != M and any length (tails
masked), head dims 1..256 (padded to a power of two >= 16), float16 / bfloat16 / float32 inputs (float32 dot
products in IEEE precision, not TF32), a (B, M) key padding mask, and packed documents (varlen, flash-attn's
cu_seqlens layout): there the grid's second axis is documents x heads, each program reads its document's first row
and length from cu_seqlens (`_sequence`), its tiles start at that row, programs past a shorter document's end return
at once, and the masks are bottom-right aligned per document, so no program reads another document's rows and the
cost is the sum of the documents' squares. Scores are handled in base 2 (exp2 of S·scale·log2 e), LSE is stored in
natural log; softcap in base 2 is C·tanh(s / C) with C = c·log2 e.

The kernels need CUDA tensors, unless Triton's interpreter is active (TRITON_INTERPRET=1 set before this module is
first imported: `triton.jit` reads it when it decorates a kernel), in which case they run on CPU tensors;
`interpreted()` says which. The interpreter has no bfloat16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from triton.runtime.interpreter import InterpretedFunction

from optimized.attention._inputs import Problem, check_inputs, check_varlen_inputs

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
MAX_ROW_STRIDE = 2**31 // 256
"""Row strides the kernels take: offsets within a tile (at most 256 rows) are 32-bit; a tile's first row is 64-bit."""
GRID_LIMIT = 65535
"""CUDA's limit on a launch grid's second axis, which holds sequences x heads."""
_SIZES = ["H", "HKV", "N", "M", "GROUP", "causal_offset", "window_offset"]
"""Integer arguments Triton's JIT must not specialise (on == 1 or on divisibility by 16): one build serves every
length, head count and GQA group, so the ahead-of-time build (conformance/triton_build.py) covers every launch."""


@triton.jit
def _softcap(s, cap2):
    """cap2 · tanh(s / cap2), with tanh(y) = 1 - 2 / (exp(2y) + 1) (tl has no tanh; exp2 of ±inf saturates it to
    ±1). Returns the capped scores and tanh, whose square the backward needs."""
    t = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 * 1.4426950408889634 / cap2)) + 1.0)
    return cap2 * t, t


@triton.jit
def _sequence(CU_Q, CU_K, b, N, M, VARLEN: tl.constexpr):
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


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(
    Q, K, V, O, LSE, PAD,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    spb, spm,
    H, N, M, GROUP, qk_scale, causal_offset,
    IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    window_offset, cap2, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  # by keyword: `_MASK_KERNELS`
    CU_Q, CU_K, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Addresses: 64-bit scalar bases (batch, head, first row of the tile: B·H·N·d and a row's stride times N may pass
    # 2^31) plus 32-bit offsets within a tile.
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP  # GQA: query head h reads key/value head h // G
    b, q0, k0, n, m, shift = _sequence(CU_Q, CU_K, (pid_bh // H).to(tl.int64), N, M, VARLEN)
    lse_rows = N  # LSE is (B, H, lse_rows)
    N = n  # from here on, the lengths of this one sequence
    M = m
    if VARLEN and pid_m * BLOCK_M >= N:  # a query tile past the end of a shorter document
        return
    causal_offset += shift
    window_offset += shift
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    last_key = offs_m + causal_offset  # causal: query i sees keys j <= i + offset
    first_key = offs_m + window_offset  # sliding window: query i sees keys j >= i + window_offset

    tile_m = tl.arange(0, BLOCK_M)
    q = tl.load(Q + b * sqb + h * sqh + (q0 + pid_m * BLOCK_M) * sqn + tile_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running unnormalised output

    # Scalar pointers to the current key tile, advanced per tile; the tile offsets stay loop-invariant int32
    # (pointer tensors carried through the loop cost two registers per element).
    k_tile = K + b * skb + hk * skh + k0 * skn
    v_tile = V + b * svb + hk * svh + k0 * svn
    pad_tile = PAD + b * spb
    kT_offs = offs_n[None, :] * skn + offs_d[:, None] * skd  # (BLOCK_D, BLOCK_N)
    v_offs = offs_n[:, None] * svn + offs_d[None, :] * svd  # (BLOCK_N, BLOCK_D)
    hi = M
    if IS_CAUSAL:  # key tiles past the last key the tile's last query may see are never loaded
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M + causal_offset)
    lo = 0
    if HAS_WINDOW:  # nor key tiles before the first key the tile's first query may see
        lo = tl.maximum(0, tl.minimum(hi, pid_m * BLOCK_M + window_offset))
        k_tile += lo.to(tl.int64) * skn
        v_tile += lo.to(tl.int64) * svn
        pad_tile += lo * spm
    for start_n in range(lo, hi, BLOCK_N):  # FA2 Alg. 1 line 6
        cols = start_n + offs_n
        col_ok = cols < M
        kT = tl.load(k_tile + kT_offs, mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale  # S = Q Kᵀ · scale · log2(e)  (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            s, _ = _softcap(s, cap2)
        keep = col_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= last_key[:, None])
        if HAS_WINDOW:
            keep = keep & (cols[None, :] >= first_key[:, None])
        if HAS_PAD:
            keep = keep & (tl.load(pad_tile + offs_n * spm, mask=col_ok, other=0) != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # line 9: online softmax
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: exp2(-inf) = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_tile + v_offs, mask=col_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")  # line 10, in place
        m_i = m_new
        k_tile += BLOCK_N * skn
        v_tile += BLOCK_N * svn
        pad_tile += BLOCK_N * spm

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key: O = 0 / 1 = 0
    out = acc / l_safe[:, None]  # line 12
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # line 13, ln
    if VARLEN:  # re-read, not kept live through the loop: that one register spilled on sm_80
        q0 = tl.load(CU_Q + pid_bh // H, volatile=True).to(tl.int64)
    # O is ours and contiguous, its row stride block_d <= 256: 32-bit row offsets hold up to 8M rows, and keeping
    # tile_m live through the loop for a 64-bit tile base spilled on sm_90 (d=128, Triton 3.6).
    tl.store(O + b * sob + h * soh + q0 * son + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (b * H + h) * lse_rows + q0 + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_preprocess(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, N,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None]
    m0 = pid_m.to(tl.int64) * BLOCK_M  # 64-bit: the rows of a whole packed batch may pass 2^31 elements
    tile_m = tl.arange(0, BLOCK_M)
    o = tl.load(O + b * sob + h * soh + m0 * son + tile_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + m0 * sdn + tile_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # FA2 Alg. 2 line 3: D = rowsum(dO ∘ O)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, PAD, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    spb, spm,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    H, HKV, N, M, GROUP, qk_scale, sm_scale, causal_offset,
    IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    window_offset, cap2, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    CU_Q, CU_K, VARLEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    hk = (pid_bhk % HKV).to(tl.int64)
    b, q0, k0, n, m, shift = _sequence(CU_Q, CU_K, (pid_bhk // HKV).to(tl.int64), N, M, VARLEN)
    stats = b * H * N + q0  # LSE and DELTA are (B, H, N): where this sequence's rows of head 0 start
    stats_h = N  # and of head h, h · N further
    N = n
    M = m
    if VARLEN and pid_n * BLOCK_N >= M:  # a key tile past the end of a shorter document
        return
    causal_offset += shift
    window_offset += shift
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < M
    kv_mask = col_ok[:, None]
    first_query = offs_n - causal_offset  # causal: key j is seen by queries i >= j - offset
    last_query = offs_n - window_offset  # sliding window: key j is seen by queries i <= j - window_offset
    # FA2 Alg. 2 lines 5-6: load K_j, V_j; dK_j = dV_j = 0
    tile_n = tl.arange(0, BLOCK_N)
    k = tl.load(K + b * skb + hk * skh + (k0 + pid_n * BLOCK_N) * skn + tile_n[:, None] * skn + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + (k0 + pid_n * BLOCK_N) * svn + tile_n[:, None] * svn + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    keep_cols = col_ok
    if HAS_PAD:
        keep_cols = keep_cols & (tl.load(PAD + b * spb + offs_n * spm, mask=col_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    qT_offs = offs_m[None, :] * sqn + offs_d[:, None] * sqd  # (BLOCK_D, BLOCK_M), loop-invariant
    do_offs = offs_m[:, None] * sdn + offs_d[None, :] * sdd  # (BLOCK_M, BLOCK_D)
    lo = 0
    if IS_CAUSAL:  # query tiles before the first query that may see this key tile are skipped
        lo = tl.maximum(0, pid_n * BLOCK_N - causal_offset)
        lo = (lo // BLOCK_M) * BLOCK_M
    hi = N
    if HAS_WINDOW:  # and query tiles after the last one
        hi = tl.maximum(lo, tl.minimum(N, (pid_n + 1) * BLOCK_N - window_offset))
    q_first = Q + b * sqb + (q0 + lo) * sqn  # the sequence's first query tile to visit, of head 0
    do_first = DO + b * sdb + (q0 + lo) * sdn
    stats += lo
    for g in range(0, GROUP):  # the G query heads that read this key/value head, in a fixed order
        h = hk * GROUP + g
        q_tile = q_first + h * sqh  # scalar pointers to the current query tile
        do_tile = do_first + h * sdh
        row_stats = stats + h * stats_h  # LSE and DELTA offset of the tile's first row
        for start_m in range(lo, hi, BLOCK_M):  # line 7
            rows = start_m + offs_m
            row_ok = rows < N
            qT = tl.load(q_tile + qT_offs, mask=row_ok[None, :], other=0.0)
            lse = tl.load(LSE + row_stats + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # base 2
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw no key: P = 0
            sT = tl.dot(k, qT, input_precision="ieee") * qk_scale  # line 9, transposed: Sᵀ (BLOCK_N, BLOCK_M)
            if SOFTCAP:
                sT, _ = _softcap(sT, cap2)
            keep = keep_cols[:, None] & row_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (rows[None, :] >= first_query[:, None])
            if HAS_WINDOW:
                keep = keep & (rows[None, :] <= last_query[:, None])
            pT = tl.where(keep, tl.math.exp2(sT - lse[None, :]), 0.0)  # line 10: Pᵀ = exp(Sᵀ - L)
            do = tl.load(do_tile + do_offs, mask=row_ok[:, None], other=0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision="ieee")  # line 11: dV_j += Pᵀ dO_i
            if SOFTCAP:  # through the cap, d(c·tanh(x / c))/dx = 1 - tanh², folded into Pᵀ now that dV has it.
                # tanh = S / c is read back from Pᵀ = exp2(S - L) rather than kept live across dV's dot (keeping
                # it spilled on sm_90, float16, d=64); a Pᵀ of 0 stays 0.
                tT = (tl.math.log2(tl.maximum(pT, 1e-30)) + lse[None, :]) / cap2
                pT = pT * tl.where(pT > 0.0, 1.0 - tT * tT, 0.0)
            delta = tl.load(DELTA + row_stats + offs_m, mask=row_ok, other=0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")  # line 12: dPᵀ = V_j dO_iᵀ
            dsT = pT * (dpT - delta[None, :])  # line 13: dSᵀ = Pᵀ ∘ (dPᵀ - D_i)
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision="ieee")  # line 15: dK_j += dSᵀ Q_i
            q_tile += BLOCK_M * sqn
            do_tile += BLOCK_M * sdn
            row_stats += BLOCK_M
    dk = dk * sm_scale  # S = scale · Q Kᵀ
    if VARLEN:  # re-read, not kept live through the loop: that one register spilled on sm_80
        k0 = tl.load(CU_K + pid_bhk // HKV, volatile=True).to(tl.int64)
    n0 = k0 + pid_n * BLOCK_N
    tl.store(DK + b * sdkb + hk * sdkh + n0 * sdkn + tile_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)  # line 17
    tl.store(DV + b * sdvb + hk * sdvh + n0 * sdvn + tile_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, PAD, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    spb, spm,
    sdqb, sdqh, sdqn, sdqd,
    H, N, M, GROUP, qk_scale, sm_scale, causal_offset,
    IS_CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    window_offset, cap2, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    CU_Q, CU_K, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    b, q0, k0, n, m, shift = _sequence(CU_Q, CU_K, (pid_bh // H).to(tl.int64), N, M, VARLEN)
    stats = (b * H + h) * N + q0
    N = n
    M = m
    if VARLEN and pid_m * BLOCK_M >= N:
        return
    causal_offset += shift
    window_offset += shift
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q_mask = row_ok[:, None]
    last_key = offs_m + causal_offset
    first_key = offs_m + window_offset
    tile_m = tl.arange(0, BLOCK_M)
    m0 = q0 + pid_m * BLOCK_M  # 64-bit first row of the tile
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqn + tile_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + m0 * sdn + tile_m[:, None] * sdn + offs_d[None, :] * sdd, mask=q_mask,
                 other=0.0)
    lse = tl.load(LSE + stats + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + stats + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_tile = K + b * skb + hk * skh + k0 * skn  # scalar pointers to the current key tile
    v_tile = V + b * svb + hk * svh + k0 * svn
    pad_tile = PAD + b * spb
    kT_offs = offs_n[None, :] * skn + offs_d[:, None] * skd  # (BLOCK_D, BLOCK_N), loop-invariant
    vT_offs = offs_n[None, :] * svn + offs_d[:, None] * svd  # (BLOCK_D, BLOCK_N)
    hi = M
    if IS_CAUSAL:
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M + causal_offset)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, tl.minimum(hi, pid_m * BLOCK_M + window_offset))
        k_tile += lo.to(tl.int64) * skn
        v_tile += lo.to(tl.int64) * svn
        pad_tile += lo * spm
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < M
        kT = tl.load(k_tile + kT_offs, mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale  # S, base 2  (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            s, t = _softcap(s, cap2)
        keep = col_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= last_key[:, None])
        if HAS_WINDOW:
            keep = keep & (cols[None, :] >= first_key[:, None])
        if HAS_PAD:
            keep = keep & (tl.load(pad_tile + offs_n * spm, mask=col_ok, other=0) != 0)[None, :]
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)  # P = exp(S - L)
        vT = tl.load(v_tile + vT_offs, mask=col_ok[None, :], other=0.0)
        dp = tl.dot(do, vT, input_precision="ieee")  # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP - D)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        # FA2 Alg. 2 line 14, without the atomic add: dQ_i += dS Kᵀᵀ
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision="ieee")
        k_tile += BLOCK_N * skn
        v_tile += BLOCK_N * svn
        pad_tile += BLOCK_N * spm
    dq = dq * sm_scale
    if VARLEN:  # re-read, not kept live through the loop
        q0 = tl.load(CU_Q + pid_bh // H, volatile=True).to(tl.int64)
    tl.store(DQ + b * sdqb + h * sdqh + (q0 + pid_m * BLOCK_M) * sdqn + tile_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def interpreted() -> bool:
    """Do these kernels run in Triton's interpreter (on CPU tensors) rather than compiled for a GPU?

    `triton.jit` returns an InterpretedFunction when the interpreter was on at decoration time, so the kernels
    themselves are the record; this reads no environment variable."""
    return isinstance(_fwd_kernel, InterpretedFunction)


def unsupported(q: Tensor, p: Problem) -> str | None:
    """Why these kernels cannot serve the inputs, or None when they can."""
    if interpreted():
        if q.device.type != "cpu":
            return f"Triton's interpreter runs on CPU tensors, got device {q.device}"
        if q.dtype == torch.bfloat16:
            return "Triton's interpreter has no bfloat16"
    elif q.device.type != "cuda":
        return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 before import), got device {q.device}"
    elif q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 dot products need a GPU of compute capability >= 8.0"
    if q.dtype not in DTYPES:
        return f"the Triton kernels take {[str(t) for t in DTYPES]}, got {q.dtype}"
    if p.d > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got d={p.d}"
    if p.N * padded_head_dim(p.d) >= 2**31:
        return (f"{p.N} query rows at head dim {padded_head_dim(p.d)} pass 2^31 elements per head (the output's "
                "row offsets are 32-bit)")
    sequences = _sequences(p)[0]
    if sequences * max(p.H, 1) > GRID_LIMIT:
        what = "documents" if p.documents is not None else "batch entries"
        return (f"{sequences} {what} x {p.H} heads = {sequences * p.H} programs along a launch grid's second axis, "
                f"above CUDA's {GRID_LIMIT}")
    return None


@dataclass(frozen=True)
class Tiles:
    """One kernel's tile shape and launch options."""

    block_m: int
    """Query rows per tile."""
    block_n: int
    """Key rows per tile."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining depth of the inner loop (shared-memory buffers per streamed tile)."""
    max_registers: int | None = None
    """Registers per thread ptxas may use (Triton's `maxnreg`); None: ptxas chooses, and its occupancy heuristic
    may cap a kernel at 128 or 168 registers and spill a few bytes to get there."""


@dataclass(frozen=True)
class Config:
    """The tiles of the four kernels for one (architecture, dtype, padded head dim)."""

    block_d: int
    """The head dim padded to a power of two >= 16 (tl.dot's minimum)."""
    fwd: Tiles
    preprocess: Tiles
    dkdv: Tiles
    dq: Tiles


_T = Tiles
_HALF_TILES: dict[tuple[str, int], tuple[Tiles, Tiles, Tiles]] = {
    # (architecture, BLOCK_D): forward, dK/dV, dQ tiles for float16 / bfloat16. Hopper takes larger query tiles
    # (wgmma works per 4-warp group on 64-row slices). dK/dV keeps two fp32 accumulators and K_j, V_j live, so it
    # streams the thinnest query tiles; on an H200 (bf16, d=128, N=8K) 16x64 with 4 warps ran its backward in
    # 9.4 ms against 15.8 ms for 32x64 with 8 warps.
    ("hopper", 16): (_T(128, 64, 8, 3), _T(32, 64, 4, 3), _T(128, 32, 8, 3)),
    ("hopper", 32): (_T(128, 64, 8, 3), _T(32, 64, 4, 3), _T(128, 32, 8, 3)),
    ("hopper", 64): (_T(128, 64, 8, 3), _T(16, 64, 4, 3), _T(128, 32, 8, 3)),
    ("hopper", 128): (_T(128, 64, 8, 3), _T(16, 64, 8, 2), _T(128, 32, 8, 3)),
    ("hopper", 256): (_T(64, 32, 8, 3), _T(32, 32, 8, 2), _T(64, 32, 8, 2)),
    ("ampere", 16): (_T(128, 64, 8, 3), _T(16, 64, 4, 3, 255), _T(64, 32, 4, 3)),
    ("ampere", 32): (_T(128, 32, 8, 3), _T(16, 64, 4, 3, 255), _T(64, 32, 4, 3)),
    ("ampere", 64): (_T(128, 64, 8, 3), _T(16, 32, 4, 2, 255), _T(64, 32, 4, 3)),
    ("ampere", 128): (_T(64, 32, 4, 3), _T(32, 64, 8, 3), _T(64, 32, 4, 3)),
    ("ampere", 256): (_T(64, 32, 8, 3), _T(32, 32, 8, 2), _T(64, 32, 8, 2)),
}
"""Per-architecture tiles, each checked ahead of time (conformance/triton_build.py) with Triton 3.6 and 3.9 for every
mask variant: no register spills on sm_80 / sm_90, shared memory within the chip. Spilling tiles that were replaced:
Hopper dK/dV at d=128 16x64 with 4 warps, 3 stages (timed fastest on an H200: 9.4 ms against 15.8 ms for 32x64 with
8 warps, bf16, N=8K) spills 8-32 B under Triton 3.6; Hopper dK/dV at d=64 32x64 48 B under 3.6; Ampere dK/dV at d=64
32x32 and forward at d=32 128x64 8 B under 3.9 with a window, softcap and padding. Ampere dK/dV at d <= 64 runs with
a register budget of 255: left to its heuristic, ptxas capped the packed-documents variants at 128 or 168 registers
and spilled 8-16 B (Triton 3.6 and 3.9); with the budget they take 152-234 and spill nothing."""


def padded_head_dim(d: int) -> int:
    """The head dim the kernels run at: d rounded up to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def config(d: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> Config:
    """The tiles the launcher uses for head dim `d` and `dtype` on a GPU of compute `capability` (None: the
    interpreter). Half precision: the per-architecture table `_HALF_TILES` (compute capability 9 and above take
    Hopper's tiles). float32 (IEEE dot products on CUDA cores, the accurate path): small tiles that fit any chip."""
    block_d = padded_head_dim(d)
    if capability is None:  # the interpreter runs every program in Python: small tiles, but >= 16 for tl.dot
        t = Tiles(16, 16, 1, 1)
        return Config(block_d, t, t, t, t)
    preprocess = Tiles(64, 1, 4, 1)  # one pass over O and dO: no dot products, no loop to pipeline
    if dtype != torch.float32:
        fwd, dkdv, dq = _HALF_TILES["hopper" if capability >= (9, 0) else "ampere", block_d]
        return Config(block_d, fwd, preprocess, dkdv, dq)
    wide = block_d * 4  # bytes of one float32 row of a tile
    if wide <= 128:
        t = Tiles(64, 64, 4, 2)
    elif wide <= 256:
        t = Tiles(64, 32, 4, 2)
    elif wide <= 512:
        t = Tiles(32, 32, 4, 1)
    else:
        t = Tiles(32, 16, 8, 1)
    return Config(block_d, t, preprocess, t, t)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as data: what the autograd function runs and what the ahead-of-time build compiles."""

    kernel: Any
    """The @triton.jit function."""
    grid: tuple[int, int]
    """Programs along (tiles, batch x heads)."""
    args: tuple
    """Positional arguments (tensors, strides, sizes, scales)."""
    meta: dict
    """Constexprs and launch options (num_warps, num_stages)."""

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def _opts(t: Tiles) -> dict:
    budget = {} if t.max_registers is None else {"maxnreg": t.max_registers}
    return dict(num_warps=t.num_warps, num_stages=t.num_stages, **budget)


def _pad_args(pad: Tensor | None, lse: Tensor) -> tuple:
    """The pad pointer and its strides; without a mask any float32 tensor stands in (never read: HAS_PAD=False)."""
    return (pad, *pad.stride()) if pad is not None else (lse, 0, 0)


def _edges(p: Problem) -> tuple[int | None, int | None]:
    """(right, left): the edges the kernels mask with, query i sees keys i + left <= j <= i + right; None where a
    side has no edge. Packed documents: relative to each document's bottom-right diagonal, added per document."""
    docs = p.documents
    if docs is None:
        return p.causal_offset, p.left_offset
    return (docs.right if docs.right >= 0 else None), (-docs.left if docs.left >= 0 else None)


def _sequences(p: Problem) -> tuple[int, int, int]:
    """(sequences, longest query sequence, longest key sequence) a launch grid spans: the batch, or the documents."""
    if p.documents is None:
        return p.B, p.N, p.M
    len_q, len_k = p.documents.lengths
    return len(len_q), max(len_q), max(len_k)


def _with_masks(launch, p: Problem, cu: tuple[Tensor, Tensor] | None, stand_in: Tensor):
    """A launch (or list of launches) with the sliding window's left edge (keys j >= i + window_offset), the softcap
    in base-2 units and the documents' cumulative lengths `cu` (None: the padded layout, `stand_in` is passed and
    never read), passed by keyword to the kernels that compute scores (`_MASK_KERNELS`)."""
    if isinstance(launch, list):
        return [_with_masks(x, p, cu, stand_in) for x in launch]
    if launch.kernel not in _MASK_KERNELS:
        return launch
    left = _edges(p)[1]
    cu_q, cu_k = cu if cu is not None else (stand_in, stand_in)
    masks = dict(window_offset=left or 0, cap2=p.softcap * _LOG2E, HAS_WINDOW=left is not None,
                 SOFTCAP=p.softcap > 0, CU_Q=cu_q, CU_K=cu_k, VARLEN=cu is not None)
    return dataclasses.replace(launch, meta=launch.meta | masks)


_MASK_KERNELS = (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel)


def _fwd_launch(q, k, v, out, lse, pad, cu, p: Problem, cfg: Config) -> Launch:
    t = cfg.fwd
    pad_ptr, *pad_strides = _pad_args(pad, lse)
    right = _edges(p)[0]
    sequences, longest_q, _ = _sequences(p)
    return _with_masks(Launch(
        _fwd_kernel, (triton.cdiv(longest_q, t.block_m), sequences * p.H),
        (q, k, v, out, lse, pad_ptr, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pad_strides,
         p.H, p.N, p.M, p.group, p.scale * _LOG2E, right or 0),
        dict(IS_CAUSAL=right is not None, HAS_PAD=pad is not None,
             BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=cfg.block_d, **_opts(t)),
    ), p, cu, lse)


def _bwd_launches(q, k, v, out, d_out, lse, delta, pad, cu, dq, dk, dv, p: Problem, cfg: Config) -> list[Launch]:
    pad_ptr, *pad_strides = _pad_args(pad, lse)
    right = _edges(p)[0]
    sequences, longest_q, longest_k = _sequences(p)
    flags = dict(IS_CAUSAL=right is not None, HAS_PAD=pad is not None, BLOCK_D=cfg.block_d)
    scales = (p.scale * _LOG2E, p.scale, right or 0)
    pre, dkdv, dqt = cfg.preprocess, cfg.dkdv, cfg.dq
    return _with_masks([
        # D = rowsum(dO ∘ O) is per row, documents or not: one pass over the (B, H, N) rows.
        Launch(_bwd_preprocess, (triton.cdiv(p.N, pre.block_m), p.B * p.H),
               (out, d_out, delta, *out.stride(), *d_out.stride(), p.H, p.N),
               dict(BLOCK_M=pre.block_m, BLOCK_D=cfg.block_d, **_opts(pre))),
        Launch(_bwd_dkdv_kernel, (triton.cdiv(longest_k, dkdv.block_n), sequences * p.Hkv),
               (q, k, v, d_out, lse, delta, pad_ptr, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *pad_strides, *dk.stride(), *dv.stride(),
                p.H, p.Hkv, p.N, p.M, p.group, *scales),
               dict(BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, **flags, **_opts(dkdv))),
        Launch(_bwd_dq_kernel, (triton.cdiv(longest_q, dqt.block_m), sequences * p.H),
               (q, k, v, d_out, lse, delta, pad_ptr, dq,
                *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *pad_strides, *dq.stride(),
                p.H, p.N, p.M, p.group, *scales),
               dict(BLOCK_M=dqt.block_m, BLOCK_N=dqt.block_n, **flags, **_opts(dqt))),
    ], p, cu, lse)


def launches(p: Problem, dtype: torch.dtype, has_pad: bool, capability: tuple[int, int]) -> list[Launch]:
    """The four launches of one forward and backward at `p`, on tensors of the "meta" device (shapes, strides and
    dtypes without data), as the autograd function would make them on a GPU of compute `capability`. p.d must be
    a padded head dim (`triton_attention` pads the inputs to one); packed documents (p.documents) take the layout
    of `triton_attention_varlen`."""
    if p.d != padded_head_dim(p.d):
        raise ValueError(f"p.d must be a padded head dim (a power of two >= 16), got {p.d}")
    cfg = config(p.d, dtype, capability)
    q, out, dq, d_out = (torch.empty(p.B, p.H, p.N, p.d, dtype=dtype, device="meta") for _ in range(4))
    k, v, dk, dv = (torch.empty(p.B, p.Hkv, p.M, p.d, dtype=dtype, device="meta") for _ in range(4))
    lse, delta = (torch.empty(p.B, p.H, p.N, dtype=torch.float32, device="meta") for _ in range(2))
    pad = torch.empty(p.B, p.M, dtype=torch.int8, device="meta") if has_pad else None
    cu = None
    if p.documents is not None:
        count = len(p.documents.cu_seqlens_q)
        cu = tuple(torch.empty(count, dtype=torch.int32, device="meta") for _ in range(2))
    return [_fwd_launch(q, k, v, out, lse, pad, cu, p, cfg),
            *_bwd_launches(q, k, v, out, d_out, lse, delta, pad, cu, dq, dk, dv, p, cfg)]


def _capability(t: Tensor) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None


class TritonAttention(torch.autograd.Function):
    """The Triton forward saving O and LSE; the three-kernel backward. pad: (B, M) int8 or None; cu: the documents'
    (cu_seqlens_q, cu_seqlens_k) when p.documents is set, else None."""

    @staticmethod
    def forward(ctx, q, k, v, pad, cu, problem: Problem):
        p = problem
        out = torch.empty(p.B, p.H, p.N, p.d, dtype=q.dtype, device=q.device)  # (B, H, N, d)
        lse = torch.empty(p.B, p.H, p.N, dtype=torch.float32, device=q.device)  # (B, H, N)
        if lse.numel() > 0:
            with _device(q):
                _fwd_launch(q, k, v, out, lse, pad, cu, p, config(p.d, q.dtype, _capability(q))).run()
        ctx.save_for_backward(q, k, v, out, lse, pad, *(cu or ()))
        ctx.problem = p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse, pad, *cu = ctx.saved_tensors
        p: Problem = ctx.problem
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        if lse.numel() == 0 or p.M == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), None, None, None
        d_out = aligned(d_out, p.d)
        delta = torch.empty_like(lse)  # (B, H, N)
        cfg = config(p.d, q.dtype, _capability(q))
        with _device(q):
            for launch in _bwd_launches(q, k, v, out, d_out, lse, delta, pad, tuple(cu) or None, dq, dk, dv, p,
                                        cfg):
                launch.run()
        return dq, dk, dv, None, None, None


class _device:
    """The CUDA device of `t` for the kernel launches (a no-op on CPU, where the interpreter runs)."""

    def __init__(self, t: Tensor) -> None:
        self._ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention by the Triton kernels: the arguments and results of `reference.attention.attention`
    (lse in float32). Raises ValueError saying why when the kernels cannot serve the inputs."""
    p = check_inputs(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                     causal_alignment=causal_alignment, return_lse=return_lse, window_size=window_size,
                     softcap=softcap)
    _refuse_unsupported(q, p)
    pad = None
    if key_padding_mask is not None:  # (B, M) int8 (what Triton loads), rows 16-aligned like every other stride
        pad = torch.zeros(p.B, -(-p.M // 16) * 16, dtype=torch.int8, device=q.device)[:, : p.M]
        pad.copy_(key_padding_mask)
    out, lse = _attend(q, k, v, pad, None, p)
    return (out, lse) if return_lse else out


def triton_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Packed documents by the Triton kernels: the arguments and results of `reference.attention.attention_varlen`
    (flash-attn's varlen layout; lse (H, total_q) in float32). One program per (query or key tile of a document,
    head), as flash-attn's varlen kernels: a document's tiles never read another document's rows, so the cost is
    the sum of the documents' squares (less with a window). Raises ValueError saying why when the kernels cannot
    serve the inputs."""
    p = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=is_causal,
                            scale=scale, window_size=window_size, softcap=softcap, return_lse=return_lse)
    _refuse_unsupported(q, p)
    out, lse = run_varlen(q, k, v, p, cu_seqlens_q, cu_seqlens_k)
    return (out, lse) if return_lse else out


def run_varlen(q: Tensor, k: Tensor, v: Tensor, p: Problem, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """Checked packed inputs (`p` from `check_varlen_inputs`, `unsupported` None) through the kernels as one
    (1, heads, total, d) batch entry whose programs each take one document. Returns out (total_q, H, d) and
    lse (H, total_q)."""
    q1, k1, v1 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, d) views
    cu = tuple(c if c.is_contiguous() and c.data_ptr() % 16 == 0 else c.clone() for c in (cu_seqlens_q, cu_seqlens_k))
    out, lse = _attend(q1, k1, v1, None, cu, p)
    return out[0].transpose(0, 1), lse[0]  # (total_q, H, d), (H, total_q)


def _refuse_unsupported(q: Tensor, p: Problem) -> None:
    reason = unsupported(q, p)
    if reason is not None:
        raise ValueError(f"backend 'triton' cannot serve these inputs: {reason}")


def _attend(q, k, v, pad, cu, p: Problem) -> tuple[Tensor, Tensor]:
    """The autograd function on inputs brought to the kernels' layout. Returns out (B, H, N, d), lse (B, H, N)."""
    block_d = padded_head_dim(p.d)
    q, k, v = (aligned(t, block_d) for t in (q, k, v))  # (B, H or Hkv, N or M, block_d)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) >= MAX_ROW_STRIDE:
            raise ValueError(f"backend 'triton' cannot serve these inputs: {name}'s row stride {t.stride(2)} is not "
                             f"below {MAX_ROW_STRIDE} elements (offsets within a tile are 32-bit)")
    out, lse = TritonAttention.apply(q, k, v, pad, cu, dataclasses.replace(p, d=block_d))
    return out[..., : p.d], lse  # the zero columns of the padded head dim dropped


def aligned(t: Tensor, block_d: int) -> Tensor:
    """`t` in the one layout the kernels are compiled for: the head dim zero-padded to `block_d` (zero columns of
    Q and K add nothing to Q Kᵀ, those of V give output columns that are dropped), the last stride 1, every other
    stride a multiple of 16 elements and the address 16-byte aligned, so Triton's JIT always specialises the same
    way (vectorised loads, no masks along the head dim) and the ahead-of-time build (conformance/triton_build.py)
    covers every launch. A copy only when `t` is not in that layout already; the padding is differentiable."""
    if t.shape[-1] != block_d:
        return F.pad(t, (0, block_d - t.shape[-1])).contiguous()
    if t.stride(-1) == 1 and all(s % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)

