"""The forward kernel: FA2 Algorithm 1, one program per (query tile, batch x query head), writing O and LSE."""

from __future__ import annotations

import triton
import triton.language as tl

from optimized.attention.triton.common import SIZES, sequence, softcap


@triton.jit(do_not_specialize=SIZES)
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
    b, q0, k0, n, m, shift = sequence(CU_Q, CU_K, (pid_bh // H).to(tl.int64), N, M, VARLEN)
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
            s, _ = softcap(s, cap2)
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

