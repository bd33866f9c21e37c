"""FlashAttention-2 in plain PyTorch: exact attention, tile by tile, never holding an N x M matrix.

Dao 2023, "FlashAttention-2" (arXiv 2307.08691), Algorithm 1 (forward) and Algorithm 2 (backward); the idea is
FlashAttention (Dao et al. 2022, arXiv 2205.14135, Sec. 3.1): split Q into row blocks of `block_q` queries and K, V
into blocks of `block_k` keys, and keep per query row only three running statistics while the key blocks stream by:

    m  the running max of the scores seen so far          (online softmax, Milakov & Gimelshein 2018)
    l  the running sum of exp(score - m)
    O  the running, unnormalised output sum_j exp(S_ij - m) V_j

When a new block raises the max from m to m', the old l and O are rescaled by exp(m - m'), so after the last block
O / l is softmax(S) V exactly (up to rounding). The forward pass saves only O and LSE = m + log l (N numbers per
head) for the backward pass, which recomputes each probability block as P = exp(S - LSE) and uses
D = rowsum(dO ∘ O) = rowsum(P ∘ dP) to form dS = P ∘ (dP - D) without the full P. Memory is O(N·d + M·d) plus one
(block_q x block_k) tile, against the O(N·M) of the naive spec (reference/attention.py).

Masks as key ranges. Every mask here except key padding leaves query i a contiguous range of keys
lo[i] <= j < hi[i]: causal (hi = i + offset + 1), a sliding window (Beltagy et al. 2020, arXiv 2004.05150: lo =
i + offset - left, hi = i + offset + right + 1) and packed documents (the range clipped to the query's document).
Both edges never decrease with i, so a query tile sees keys [lo[first row], hi[last row]) and a key tile is seen by
the rows between two binary searches: tiles that no query may see are never computed, and a window of w keys or
documents of length w cost O(N·w), not O(N·M). Softcap (Gemma 2, arXiv 2408.00118) caps each score tile as
S = c·tanh(S_raw / c); the backward multiplies dS by its derivative 1 - tanh²(S_raw / c).

This is the algorithm written for reading and for CPUs; optimized/attention/triton/ is the same algorithm as
GPU kernels. GQA is handled by viewing the H query heads as (Hkv, G) so every key/value head is read once per tile
and never copied; the G query heads of a group add into their key/value head's gradients.
Arithmetic runs in float32 (float64 for float64 inputs), as a GPU kernel accumulates, whatever the input dtype.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from optimized.attention._inputs import Problem, check_inputs, check_varlen_inputs, with_defaults

DEFAULT_BLOCK = 128
"""Rows of Q and of K/V per tile: large enough that the Python loop is cheap on a CPU, small against N·M."""


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, *, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
                      **options) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention by FlashAttention-2's tiling: the arguments and results of `reference.attention.attention`.

    q: (B, H, N, d); k, v: (B, Hkv, M, d); options: is_causal, scale, key_padding_mask ((B, M) bool, True =
    attend), causal_alignment, window_size ((left, right), -1 unbounded), softcap (c > 0 caps scores at c),
    return_lse. Returns out (B, H, N, d) in q's dtype and, with return_lse=True, lse (B, H, N) in float32 (float64
    for float64 inputs), without gradient.
    block_q, block_k: tile sizes (any positive integers; they need not divide N or M).
    """
    options = with_defaults(options)
    problem = check_inputs(q, k, v, **options)
    _check_blocks(block_q, block_k)
    out, lse = BlockedAttention.apply(q, k, v, options["key_padding_mask"], problem, block_q, block_k)
    return (out, lse) if options["return_lse"] else out


def blocked_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, *, block_q: int = DEFAULT_BLOCK,
                             block_k: int = DEFAULT_BLOCK, **options) -> Tensor | tuple[Tensor, Tensor]:
    """Packed documents, flash-attn's varlen layout: the arguments and results of
    `reference.attention.attention_varlen`. q: (total_q, H, d); k, v: (total_k, Hkv, d); cu_seqlens_*: (D + 1,)
    int32; options: is_causal, scale, window_size, softcap, return_lse. Returns out (total_q, H, d) and, with
    return_lse=True, lse (H, total_q)."""
    options = with_defaults(options, varlen=True)
    problem = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    _check_blocks(block_q, block_k)
    out, lse = run_varlen(q, k, v, problem, block_q, block_k)
    return (out, lse) if options["return_lse"] else out


def run_varlen(q: Tensor, k: Tensor, v: Tensor, problem: Problem, block_q: int = DEFAULT_BLOCK,
               block_k: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Packed tensors through the padded-layout kernel as one (1, heads, total, d) batch whose key ranges stop at
    document edges. Returns out (total_q, H, d) and lse (H, total_q)."""
    q1, k1, v1 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, d) views
    out, lse = BlockedAttention.apply(q1, k1, v1, None, problem, block_q, block_k)
    return out[0].transpose(0, 1), lse[0]  # (total_q, H, d), (H, total_q)


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class BlockedAttention(torch.autograd.Function):
    """FA2 forward (Algorithm 1) saving O and LSE; FA2 backward (Algorithm 2) recomputing P from LSE."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, problem: Problem, block_q: int, block_k: int):
        out, lse = _forward(q, k, v, key_padding_mask, problem, block_q, block_k)
        out, lse_nan = _undefined_rows_to_nan(out, lse, key_padding_mask, problem)
        ctx.save_for_backward(q, k, v, out, lse_nan, key_padding_mask)
        ctx.problem, ctx.block_q, ctx.block_k = problem, block_q, block_k
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, d_out, key_padding_mask, ctx.problem, ctx.block_q, ctx.block_k)
        return dq, dk, dv, None, None, None, None


def _undefined_rows_to_nan(out: Tensor, lse: Tensor, key_padding_mask: Tensor | None,
                           p: Problem) -> tuple[Tensor, Tensor]:
    """The spec's softmax on a row that sees keys whose scores are all -inf (a -inf in q, or +inf in k, at the
    moment every visible key is 0/0 = NaN); only a row that sees no key at all is defined as zeros. The online
    softmax cannot tell the two apart (both end with l = 0, LSE = -inf), so the mask decides, from key ranges and
    padding alone: no look at the data, no device sync. Returns out with those rows NaN, and the LSE for backward
    with those rows NaN (so P = exp(S - LSE) is NaN there too, as the spec's is); the returned LSE keeps -inf, the
    spec's logsumexp of an all -inf row."""
    if p.N == 0 or p.M == 0:
        return out, lse
    lo, hi = key_ranges(p)
    lo_t, hi_t = torch.tensor(lo, device=out.device), torch.tensor(hi, device=out.device)  # (N,), (N,)
    has_key = (hi_t > lo_t).view(1, 1, p.N)  # (1, 1, N)
    if key_padding_mask is not None:
        seen = torch.nn.functional.pad(key_padding_mask.cumsum(dim=1), (1, 0))  # (B, M + 1): keys kept before j
        has_key = has_key & (seen[:, hi_t] > seen[:, lo_t.clamp(max=p.M)]).view(p.B, 1, p.N)  # (B, 1, N)
    undefined = has_key & (lse == float("-inf"))  # (B, H, N)
    return out.masked_fill(undefined.unsqueeze(-1), float("nan")), lse.masked_fill(undefined, float("nan"))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_ranges(p: Problem) -> tuple[list[int], list[int]]:
    """lo, hi: query i may see keys lo[i] <= j < hi[i] (key padding aside; lo[i] >= hi[i]: none). Both lists
    never decrease, which is what lets whole tiles be skipped. Built on the CPU from Python ints: no device sync."""
    i = torch.arange(p.N)  # (N,)
    docs = p.documents
    if docs is None:
        lo = (i + p.left_offset).clamp(0, p.M) if p.left_offset is not None else torch.zeros_like(i)  # (N,)
        hi = (i + p.causal_offset + 1).clamp(0, p.M) if p.causal_offset is not None else torch.full_like(i, p.M)
        return lo.tolist(), hi.tolist()
    len_q, len_k = (torch.tensor(n) for n in docs.lengths)  # (D,), (D,)
    cu_k = torch.tensor(docs.cu_seqlens_k)  # (D + 1,)
    doc = torch.repeat_interleave(torch.arange(len(len_q)), len_q)  # (N,) the document of each query row
    start, end = cu_k[doc], cu_k[doc + 1]  # (N,), (N,): its keys
    row = i - torch.tensor(docs.cu_seqlens_q)[doc]  # (N,) position within the document
    diag = start + row + (len_k - len_q)[doc]  # (N,) the key on the document's bottom-right-aligned diagonal
    lo = torch.clamp(diag - docs.left, start, end) if docs.left >= 0 else start  # (N,)
    hi = torch.clamp(diag + docs.right + 1, start, end) if docs.right >= 0 else end  # (N,)
    return lo.tolist(), hi.tolist()


def _tile_mask(p: Problem, ranges: tuple[list[int], list[int], Tensor, Tensor], key_padding_mask: Tensor | None,
               i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
    """keep[b, 0, 0, i, j] for queries i0:i1 and keys j0:j1, or None when the whole tile is visible."""
    lo, hi, lo_dev, hi_dev = ranges
    keep = None
    if lo[i1 - 1] > j0 or hi[i0] < j1:  # some row of the tile does not see every key of it
        j = torch.arange(j0, j1, device=lo_dev.device)  # (bk,)
        keep = (j >= lo_dev[i0:i1, None]) & (j < hi_dev[i0:i1, None])  # (bq, bk)
        keep = keep.view(1, 1, 1, i1 - i0, j1 - j0)  # (1, 1, 1, bq, bk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, j0:j1].view(p.B, 1, 1, 1, j1 - j0)  # (B, 1, 1, 1, bk)
        keep = pad if keep is None else keep & pad  # (B or 1, 1, 1, bq, bk)
    return keep


def _ranges(p: Problem, device: torch.device) -> tuple[list[int], list[int], Tensor, Tensor]:
    lo, hi = key_ranges(p)
    return lo, hi, torch.tensor(lo, device=device), torch.tensor(hi, device=device)


def _scores(q_i: Tensor, k_j: Tensor, p: Problem) -> tuple[Tensor, Tensor | None]:
    """S_ij = scale · Q_i K_jᵀ, softcapped: (S, tanh(S_raw / c) or None)."""
    s = (q_i @ k_j.transpose(-2, -1)) * p.scale  # (B, Hkv, G, bq, bk)
    if not p.softcap:
        return s, None
    t = torch.tanh(s / p.softcap)  # (B, Hkv, G, bq, bk)
    return p.softcap * t, t


@torch.no_grad()
def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, p: Problem, block_q: int,
             block_k: int) -> tuple[Tensor, Tensor]:
    """FA2 Algorithm 1. Returns out (B, H, N, d) in q's dtype and lse (B, H, N) in the accumulation dtype."""
    acc_dtype = _acc_dtype(q.dtype)
    ranges = _ranges(p, q.device)
    lo, hi = ranges[:2]
    qg = q.unflatten(1, (p.Hkv, p.group))  # (B, Hkv, G, N, d): query head h = kv head h // G, member h % G
    kg = k.unsqueeze(2)  # (B, Hkv, 1, M, d)
    vg = v.unsqueeze(2)  # (B, Hkv, 1, M, d)
    out = torch.empty(p.B, p.Hkv, p.group, p.N, p.d, dtype=q.dtype, device=q.device)  # (B, Hkv, G, N, d)
    lse = torch.empty(p.B, p.Hkv, p.group, p.N, dtype=acc_dtype, device=q.device)  # (B, Hkv, G, N)

    for i0 in range(0, p.N, block_q):  # line 3: for each query tile Q_i
        i1 = min(i0 + block_q, p.N)
        q_i = qg[..., i0:i1, :].to(acc_dtype)  # (B, Hkv, G, bq, d)
        # line 5: O_i = 0, l_i = 0, m_i = -inf
        o_i = torch.zeros(p.B, p.Hkv, p.group, i1 - i0, p.d, dtype=acc_dtype, device=q.device)  # (B, Hkv, G, bq, d)
        l_i = torch.zeros(p.B, p.Hkv, p.group, i1 - i0, dtype=acc_dtype, device=q.device)  # (B, Hkv, G, bq)
        m_i = torch.full_like(l_i, float("-inf"))  # (B, Hkv, G, bq)

        key_end = hi[i1 - 1]  # the tile's rows see keys lo[i0] <= j < hi[i1 - 1] at most: skip every other tile
        for j0 in range(lo[i0], key_end, block_k):  # line 6: for each key tile K_j, V_j
            j1 = min(j0 + block_k, key_end)
            k_j = kg[..., j0:j1, :].to(acc_dtype)  # (B, Hkv, 1, bk, d)
            v_j = vg[..., j0:j1, :].to(acc_dtype)  # (B, Hkv, 1, bk, d)
            s, _ = _scores(q_i, k_j, p)  # line 8: S_ij = Q_i K_jᵀ  (B, Hkv, G, bq, bk)
            keep = _tile_mask(p, ranges, key_padding_mask, i0, i1, j0, j1)
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            # line 9: m_new = max(m, rowmax(S_ij)); P~ = exp(S_ij - m_new); l = exp(m - m_new) l + rowsum(P~)
            m_new = torch.maximum(m_i, s.amax(dim=-1))  # (B, Hkv, G, bq)
            # A row that has seen only masked keys keeps m = -inf; shift it by 0 so exp(-inf - 0) = 0, not NaN.
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # (B, Hkv, G, bq)
            p_tilde = torch.exp(s - m_safe.unsqueeze(-1))  # (B, Hkv, G, bq, bk)
            alpha = torch.exp(m_i - m_safe)  # (B, Hkv, G, bq): the rescaling of everything seen before
            l_i = alpha * l_i + p_tilde.sum(dim=-1)  # (B, Hkv, G, bq)
            # line 10: O_i = diag(alpha) O_i + P~ V_j
            o_i = alpha.unsqueeze(-1) * o_i + p_tilde @ v_j  # (B, Hkv, G, bq, d)
            m_i = m_new

        # line 12: O_i = diag(l)^-1 O_i. A row that saw no key has l = 0 and O = 0: divide by 1 to give zeros.
        out[..., i0:i1, :] = o_i / torch.where(l_i > 0, l_i, 1.0).unsqueeze(-1)
        # line 13: L_i = m_i + log(l_i); -inf + log(0) = -inf on a row that saw no key
        lse[..., i0:i1] = m_i + torch.log(l_i)
    return out.flatten(1, 2), lse.flatten(1, 2)  # (B, H, N, d), (B, H, N)


@torch.no_grad()
def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
              key_padding_mask: Tensor | None, p: Problem, block_q: int, block_k: int) -> tuple[Tensor, ...]:
    """FA2 Algorithm 2. Returns dq, dk, dv in the dtypes of q, k, v."""
    acc_dtype = _acc_dtype(q.dtype)
    ranges = _ranges(p, q.device)
    lo, hi = ranges[:2]
    qg = q.unflatten(1, (p.Hkv, p.group))  # (B, Hkv, G, N, d)
    dog = d_out.unflatten(1, (p.Hkv, p.group))  # (B, Hkv, G, N, d)
    kg = k.unsqueeze(2)  # (B, Hkv, 1, M, d)
    vg = v.unsqueeze(2)  # (B, Hkv, 1, M, d)
    # line 3: D = rowsum(dO ∘ O), which equals rowsum(P ∘ dP) (FA2 Sec. 3.1.2)
    D = (d_out.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).unflatten(1, (p.Hkv, p.group))  # (B, Hkv, G, N)
    # P = exp(S - LSE); a row that saw no key has LSE = -inf: make it +inf so its P is exp(-inf) = 0, not NaN.
    lse = lse.unflatten(1, (p.Hkv, p.group))  # (B, Hkv, G, N)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # (B, Hkv, G, N)

    dq = torch.zeros(p.B, p.Hkv, p.group, p.N, p.d, dtype=acc_dtype, device=q.device)  # (B, Hkv, G, N, d)
    dk = torch.zeros(p.B, p.Hkv, p.M, p.d, dtype=k.dtype, device=k.device)  # (B, Hkv, M, d): unseen keys get 0
    dv = torch.zeros(p.B, p.Hkv, p.M, p.d, dtype=v.dtype, device=v.device)  # (B, Hkv, M, d)

    for j0 in range(0, p.M, block_k):  # line 4: for each key tile K_j, V_j
        j1 = min(j0 + block_k, p.M)
        # The rows that may see a key of this tile: hi[i] > j0 and lo[i] < j1 (both edges never decrease).
        rows_start, rows_end = bisect_right(hi, j0), bisect_left(lo, j1)
        if rows_start >= rows_end:
            continue
        k_j = kg[..., j0:j1, :].to(acc_dtype)  # (B, Hkv, 1, bk, d)
        v_j = vg[..., j0:j1, :].to(acc_dtype)  # (B, Hkv, 1, bk, d)
        # line 6: dK_j = 0, dV_j = 0
        dk_j = torch.zeros(p.B, p.Hkv, j1 - j0, p.d, dtype=acc_dtype, device=q.device)  # (B, Hkv, bk, d)
        dv_j = torch.zeros_like(dk_j)  # (B, Hkv, bk, d)

        for i0 in range(rows_start, rows_end, block_q):  # line 7: for each query tile that sees this key tile
            i1 = min(i0 + block_q, rows_end)
            q_i = qg[..., i0:i1, :].to(acc_dtype)  # (B, Hkv, G, bq, d)
            do_i = dog[..., i0:i1, :].to(acc_dtype)  # (B, Hkv, G, bq, d)
            s, tanh = _scores(q_i, k_j, p)  # line 9: S_ij = Q_i K_jᵀ  (B, Hkv, G, bq, bk)
            keep = _tile_mask(p, ranges, key_padding_mask, i0, i1, j0, j1)
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            p_ij = torch.exp(s - lse[..., i0:i1].unsqueeze(-1))  # line 10: P_ij = exp(S_ij - L_i)  (.., bq, bk)
            # line 11: dV_j += P_ijᵀ dO_i, summed over the G query heads that read this key/value head
            dv_j += (p_ij.transpose(-2, -1) @ do_i).sum(dim=2)  # (B, Hkv, bk, d)
            dp = do_i @ v_j.transpose(-2, -1)  # line 12: dP_ij = dO_i V_jᵀ  (B, Hkv, G, bq, bk)
            ds = p_ij * (dp - D[..., i0:i1].unsqueeze(-1))  # line 13: dS_ij = P_ij ∘ (dP_ij - D_i)
            if keep is not None:  # a hidden score's gradient is 0, as through the spec's masked_fill, even where
                ds = ds.masked_fill(~keep, 0.0)  # P = 0 meets a NaN dP or D (0·NaN would leak into dQ, dK)
            if tanh is not None:  # through the softcap: d(c·tanh(x / c))/dx = 1 - tanh²(x / c)
                ds = ds * (1 - tanh * tanh)  # (B, Hkv, G, bq, bk)
            # line 14: dQ_i += dS_ij K_j (scaled: S = scale Q Kᵀ). The loop runs in order: no atomics, deterministic.
            dq[..., i0:i1, :] += (ds @ k_j) * p.scale  # (B, Hkv, G, bq, d)
            dk_j += (ds.transpose(-2, -1) @ q_i).sum(dim=2) * p.scale  # line 15: dK_j += dS_ijᵀ Q_i  (B, Hkv, bk, d)

        dk[..., j0:j1, :] = dk_j  # line 17: write dK_j, dV_j
        dv[..., j0:j1, :] = dv_j
    return dq.flatten(1, 2).to(q.dtype), dk, dv  # (B, H, N, d), (B, Hkv, M, d), (B, Hkv, M, d)
