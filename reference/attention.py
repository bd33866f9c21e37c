"""Naive scaled dot-product attention: the spec (Vaswani et al. 2017, arXiv 1706.03762, Sec. 3.2.1).

For each batch b and query head h, with scale s = 1/sqrt(d) unless given:

    S = s · Q Kᵀ                         (N, M)   every query against every key
    S = c · tanh(S / c)                  (N, M)   softcap, only when c > 0
    S[i, j] = -inf  where key j is hidden from query i (causal mask, sliding window, key padding)
    P = softmax(S) along j               (N, M)   P[i, j] = exp(S[i, j] - LSE[i])
    O = P V                              (N, d)
    LSE[i] = log sum_j exp(S[i, j])      (N,)     the log-sum-exp, -inf on a row that sees no key

S and P are materialised in full, and autograd keeps P for the backward pass (dV = Pᵀ dO, dP = dO Vᵀ,
dS = P ∘ (dP - rowsum(dP ∘ P)), dQ = s · dS K, dK = s · dSᵀ Q), so the memory of attention grows as O(B·H·N·M):
at N = M = 4096 that is 64 MiB per head in fp32. FlashAttention (Dao et al. 2022, arXiv 2205.14135; FA2: Dao 2023,
arXiv 2307.08691) computes the same O without ever holding an N x M matrix (see optimized/attention/); this file is
what it must equal.

Options
- Grouped-query attention (GQA, Ainslie et al. 2023, arXiv 2305.13245): q has H heads, k and v have Hkv heads with
  H % Hkv == 0; query head h reads key/value head h // (H // Hkv). Hkv = 1 is multi-query attention (MQA).
- Causal masking, when N != M, has two conventions. "top_left" (torch SDPA's is_causal): query i sees keys j <= i.
  "bottom_right" (flash-attn >= 2.1, the KV-cache convention: the last query is aligned with the last key): query i
  sees keys j <= i + (M - N). With bottom_right and N > M the first N - M queries see no key at all.
- key_padding_mask: (B, M) bool, True = attend, False = the key is padding.
- Sliding window (local) attention, window_size = (left, right) as in flash-attn (Longformer: Beltagy et al. 2020,
  arXiv 2004.05150, Sec. 3.1; Mistral 7B, arXiv 2310.06825, Sec. 2): query i sees keys j with
      i + off - left <= j <= i + off + right,   -1 = no bound on that side,
  where off is the causal alignment's offset (0 top-left, M - N bottom-right; flash-attn always uses M - N).
  Causal masking is the window's right bound at 0 (flash-attn sets right = 0 when causal), so `is_causal` with a
  window keeps the intersection. Each query then sees at most left + right + 1 keys: attention costs O(N·w).
- Softcap, logit soft-capping (Gemma 2, arXiv 2408.00118, Sec. 2; Grok-1): S -> c·tanh(S / c) after scaling and
  before masking, which keeps every score in (-c, c); c = 0 turns it off. Its derivative is 1 - tanh²(S / c).
- Packed sequences (varlen, flash-attn's `flash_attn_varlen_func`): `attention_varlen` takes documents packed
  along one axis, q: (total_q, H, d) with document b in rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] (int32 cumulative
  lengths starting at 0), and attends within each document only, causal bottom-right aligned in each.
- A query row that sees no key has nothing to average: its output is defined as zeros (and its gradients as
  zeros), never the NaN that softmax of an all -inf row would give.

Precision: the arithmetic runs in the inputs' dtype (the naive baseline of the FlashAttention error rule); the
log-sum-exp is returned in float32 (float64 for float64 inputs) and without gradient, as a statistic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention(
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
    """softmax(mask(softcap(scale · Q Kᵀ))) V, materialising the (B, H, N, M) score matrix.

    q: (B, H, N, d); k, v: (B, Hkv, M, d) with H % Hkv == 0. key_padding_mask: (B, M) bool, True = attend.
    window_size: (left, right) keys around the aligned diagonal, -1 = unbounded. softcap: c > 0 caps scores at c.
    Returns out (B, H, N, d) in q's dtype, and with return_lse=True also lse (B, H, N) in float32 (float64 for
    float64 inputs): the log-sum-exp of the scaled, capped, masked scores, -inf on a row that sees no key.
    """
    check_inputs(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                 causal_alignment=causal_alignment, return_lse=return_lse)
    check_window_and_softcap(window_size, softcap)
    B, H, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    # GQA: copy each key/value head to the H // Hkv query heads that read it.
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, M, d)
    v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, M, d)

    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, M)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)  # (B, H, N, M), in (-softcap, softcap)

    keep = visible_keys(N, M, is_causal=is_causal, causal_alignment=causal_alignment, window_size=window_size,
                        key_padding_mask=key_padding_mask, device=q.device)  # (B or 1, 1, N, M) or None
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))  # (B, H, N, M)

    p = torch.softmax(s, dim=-1)  # (B, H, N, M): the O(N·M) tensor autograd keeps for backward
    # (With no key at all, M = 0, p is empty and p @ v below is already 0: nothing to mask.)
    if keep is not None and _rows_can_be_empty(N, M, is_causal=is_causal, causal_alignment=causal_alignment,
                                               window_size=window_size, key_padding_mask=key_padding_mask):
        # A row of all -inf gives 0/0 = NaN in softmax; the spec says such a row attends to nothing.
        has_key = keep.any(dim=-1, keepdim=True)  # (B or 1, 1, N, 1)
        p = p.masked_fill(~has_key, 0.0)  # (B, H, N, M)

    out = p @ v  # (B, H, N, d)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(s.detach().to(lse_dtype), dim=-1)  # (B, H, N); -inf where no key is visible
    return out, lse


def attention_varlen(
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
    """`attention` on each packed document separately: what packing documents into one row must compute.

    q: (total_q, H, d); k, v: (total_k, Hkv, d). cu_seqlens_q, cu_seqlens_k: (D + 1,) int32, 0 first, never
    decreasing, last = total: document b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against the same rows of k, v by
    cu_seqlens_k, causal and windows bottom-right aligned within it (flash-attn). max_seqlen_q, max_seqlen_k: at
    least the longest document (flash-attn sizes its grid by them). Returns out (total_q, H, d) and, with
    return_lse=True, lse (H, total_q) in float32 (float64 for float64 inputs), flash-attn's layout.
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    outs, lses = [], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):  # one document at a time: nothing crosses a document boundary
        q_b = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, H, n_b, d)
        k_b = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, m_b, d)
        v_b = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, m_b, d)
        out_b, lse_b = attention(q_b, k_b, v_b, is_causal=is_causal, scale=scale, causal_alignment="bottom_right",
                                 window_size=window_size, softcap=softcap, return_lse=True)
        outs.append(out_b[0].transpose(0, 1))  # (n_b, H, d)
        lses.append(lse_b[0])  # (H, n_b)
    out = torch.cat(outs)  # (total_q, H, d)
    return (out, torch.cat(lses, dim=1)) if return_lse else out  # lse: (H, total_q)


def visible_keys(
    N: int,
    M: int,
    *,
    is_causal: bool,
    causal_alignment: str = "top_left",
    window_size: tuple[int, int] = (-1, -1),
    key_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """keep[b, 0, i, j] = may query i see key j: (B or 1, 1, N, M) bool, or None when every key is visible."""
    offset = 0 if causal_alignment == "top_left" else M - N
    i = torch.arange(N, device=device).view(1, 1, N, 1)  # (1, 1, N, 1)
    j = torch.arange(M, device=device).view(1, 1, 1, M)  # (1, 1, 1, M)
    left, right = window_size
    if is_causal:
        right = 0  # causal = the window's right edge on the diagonal (right >= 0 would see no more)
    keep = None
    for bound in ((j >= i + offset - left) if left >= 0 else None,
                  (j <= i + offset + right) if right >= 0 else None):  # each (1, 1, N, M)
        if bound is not None:
            keep = bound if keep is None else keep & bound  # (1, 1, N, M)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(-1, 1, 1, M)  # (B, 1, 1, M)
        keep = pad if keep is None else keep & pad  # (B or 1, 1, N, M)
        keep = keep.expand(-1, 1, N, M)  # (B, 1, N, M)
    return keep


def _rows_can_be_empty(N: int, M: int, *, is_causal: bool, causal_alignment: str, window_size: tuple[int, int],
                       key_padding_mask: Tensor | None) -> bool:
    """Can some query see no key? Decided from the options alone (no look at the data, no device sync), so the
    common case keeps a single N x M tensor for backward."""
    offset = 0 if causal_alignment == "top_left" else M - N
    left, right = window_size
    right = 0 if is_causal else right
    first_row_before_keys = right >= 0 and offset + right < 0  # query 0's last key is left of key 0
    last_row_after_keys = left >= 0 and N - 1 + offset - left > M - 1  # query N-1's first key is right of key M-1
    return key_padding_mask is not None or M == 0 or first_row_before_keys or last_row_after_keys


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    key_padding_mask: Tensor | None,
    causal_alignment: str,
    return_lse: bool,
) -> None:
    """Raise ValueError naming the argument, the value given and what is allowed, before any work is done."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions ({'B, H, N, d' if name == 'q' else 'B, Hkv, M, d'}), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, one of {[str(x) for x in FLOAT_DTYPES]}, "
                             f"got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must equal q.dtype={q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device must equal q.device={q.device}, got {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size must equal q's B={q.shape[0]}, got {t.shape[0]} "
                             f"(shape {tuple(t.shape)})")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} head dim must equal q's d={q.shape[3]}, got {t.shape[3]} "
                             f"(shape {tuple(t.shape)})")
    if v.shape != k.shape:
        raise ValueError(f"v shape must equal k shape {tuple(k.shape)} (B, Hkv, M, d), got {tuple(v.shape)}")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads Hkv={Hkv} (grouped-query attention)")
    if q.shape[3] == 0:
        raise ValueError(f"head dim d must be >= 1, got q shape {tuple(q.shape)}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(d)), got {scale!r}")
    if key_padding_mask is not None:
        B, M = k.shape[0], k.shape[2]
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask must be a bool tensor (True = attend), got {got}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must have shape (B, M) = {(B, M)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask.device must equal q.device={q.device}, got {key_padding_mask.device}")


def check_window_and_softcap(window_size, softcap) -> None:
    """window_size: two ints >= -1; softcap: a finite number >= 0."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right), two ints >= -1 (-1 = unbounded), got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")


def check_varlen_inputs(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q: int, max_seqlen_k: int) -> None:
    """Packed (total, heads, d) tensors and int32 cumulative lengths that cover them: ValueError otherwise."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a packed (total, heads, d) tensor, got {got}")
    if v.shape != k.shape:
        raise ValueError(f"v shape must equal k shape {tuple(k.shape)} (total_k, Hkv, d), got {tuple(v.shape)}")
    for which, cu, total, longest in (("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                      ("k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        name = f"cu_seqlens_{which}"
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(f"{name} must be a 1-D int32 tensor of D + 1 >= 2 cumulative lengths, got {got}")
        starts = cu.tolist()
        lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
        if starts[0] != 0 or min(lengths) < 0 or starts[-1] != total:
            raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, "
                             f"got {starts}")
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < max(lengths):
            raise ValueError(f"max_seqlen_{which} must be an int >= the longest document ({max(lengths)}), "
                             f"got {longest!r}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must list the same documents, got {cu_seqlens_q.numel()} "
                         f"and {cu_seqlens_k.numel()} entries")
