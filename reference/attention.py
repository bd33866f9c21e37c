"""Naive scaled dot-product attention: the spec (Vaswani et al. 2017, arXiv 1706.03762, Sec. 3.2.1).

For each batch b and query head h, with scale s = 1/sqrt(d) unless given:

    S = s · Q Kᵀ                         (N, M)   every query against every key
    S[i, j] = -inf  where key j is hidden from query i (causal mask, key padding)
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
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(scale · Q Kᵀ + mask) V, materialising the (B, H, N, M) score matrix.

    q: (B, H, N, d); k, v: (B, Hkv, M, d) with H % Hkv == 0. key_padding_mask: (B, M) bool, True = attend.
    Returns out (B, H, N, d) in q's dtype, and with return_lse=True also lse (B, H, N) in float32 (float64 for
    float64 inputs): the log-sum-exp of the scaled, masked scores, -inf on a row that sees no key.
    """
    check_inputs(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                 causal_alignment=causal_alignment, return_lse=return_lse)
    B, H, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    # GQA: copy each key/value head to the H // Hkv query heads that read it.
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, M, d)
    v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, M, d)

    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, M)

    keep = visible_keys(N, M, is_causal=is_causal, causal_alignment=causal_alignment,
                        key_padding_mask=key_padding_mask, device=q.device)  # (B or 1, 1, N, M) or None
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))  # (B, H, N, M)

    p = torch.softmax(s, dim=-1)  # (B, H, N, M): the O(N·M) tensor autograd keeps for backward
    if _rows_can_be_empty(N, M, is_causal=is_causal, causal_alignment=causal_alignment,
                          key_padding_mask=key_padding_mask):
        # A row of all -inf gives 0/0 = NaN in softmax; the spec says such a row attends to nothing.
        has_key = keep.any(dim=-1, keepdim=True)  # (B or 1, 1, N, 1)
        p = p.masked_fill(~has_key, 0.0)  # (B, H, N, M)

    out = p @ v  # (B, H, N, d)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(s.detach().to(lse_dtype), dim=-1)  # (B, H, N); -inf where no key is visible
    return out, lse


def visible_keys(
    N: int,
    M: int,
    *,
    is_causal: bool,
    causal_alignment: str = "top_left",
    key_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """keep[b, 0, i, j] = may query i see key j: (B or 1, 1, N, M) bool, or None when every key is visible."""
    keep = None
    if is_causal:
        offset = 0 if causal_alignment == "top_left" else M - N
        i = torch.arange(N, device=device).unsqueeze(1)  # (N, 1)
        j = torch.arange(M, device=device).unsqueeze(0)  # (1, M)
        keep = (j <= i + offset).view(1, 1, N, M)  # (1, 1, N, M)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(-1, 1, 1, M)  # (B, 1, 1, M)
        keep = pad if keep is None else keep & pad  # (B or 1, 1, N, M)
        keep = keep.expand(-1, 1, N, M)  # (B, 1, N, M)
    return keep


def _rows_can_be_empty(N: int, M: int, *, is_causal: bool, causal_alignment: str,
                       key_padding_mask: Tensor | None) -> bool:
    """Can some query see no key? Decided from the options alone (no look at the data, no device sync)."""
    return key_padding_mask is not None or (is_causal and causal_alignment == "bottom_right" and N > M)


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
