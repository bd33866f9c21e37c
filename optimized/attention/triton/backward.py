"""The backward kernels, deterministic (no atomics): FA2 Algorithm 2 in three passes.

    _bwd_preprocess    D = rowsum(dO ∘ O) (Alg. 2 line 3).
    _bwd_dkdv_kernel   one program per (key tile, batch x key/value head): loops over the G query heads of its GQA
                       group and over the query tiles, accumulating dK_j and dV_j in registers (lines 4-17).
    _bwd_dq_kernel     one program per (query tile, batch x query head): loops over the key tiles, accumulating dQ_i
                       (line 14 without FA2's atomic add, so every dQ element is summed in one fixed order).
"""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.attention.triton.common import SIZES, sequence, softcap


@triton.jit(do_not_specialize=SIZES)
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


@triton.jit(do_not_specialize=SIZES)
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
    b, q0, k0, n, m, shift = sequence(CU_Q, CU_K, (pid_bhk // HKV).to(tl.int64), N, M, VARLEN)
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
                sT, _ = softcap(sT, cap2)
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


@triton.jit(do_not_specialize=SIZES)
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
    b, q0, k0, n, m, shift = sequence(CU_Q, CU_K, (pid_bh // H).to(tl.int64), N, M, VARLEN)
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
            s, t = softcap(s, cap2)
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
