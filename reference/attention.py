"""Naive scaled dot-product attention: the spec (Vaswani et al. 2017, arXiv 1706.03762, Sec. 3.2.1).

    S = Q Kᵀ · scale          (B, H, N, M)   materialised in full: O(N·M) memory per head
    P = softmax(S + mask)      (B, H, N, M)
    O = P V                    (B, H, N, d)

Grouped-query attention (GQA): q has H heads, k and v have Hkv heads with H % Hkv == 0; query head h reads key/value
head h // (H // Hkv).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False, scale: float | None = None) -> Tensor:
    """q: (B, H, N, d); k, v: (B, Hkv, M, d). Returns (B, H, N, d). Causal masks key j > query i (top-left)."""
    B, H, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"q heads H={H} must be divisible by k/v heads Hkv={Hkv}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, M, d)
    v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, M, d)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, M)
    if is_causal:
        keep = torch.ones(N, M, dtype=torch.bool, device=q.device).tril()  # (N, M)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)  # (B, H, N, M)
    return p @ v  # (B, H, N, d)
