"""Checks shared by every attention backend: one ValueError naming the argument, what was given and what is
allowed, raised before any work is done."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """The shape of one attention call, as the backends need it."""

    B: int
    """Batch size."""
    H: int
    """Query heads."""
    Hkv: int
    """Key/value heads (H % Hkv == 0)."""
    N: int
    """Query length."""
    M: int
    """Key length."""
    d: int
    """Head dim."""
    scale: float
    """Multiplier of Q Kᵀ (1/sqrt(d) unless given)."""
    causal_offset: int | None
    """Query i sees keys j <= i + causal_offset; None when not causal (0 top-left, M - N bottom-right)."""

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.H // self.Hkv

    @property
    def rows_can_be_empty(self) -> bool:
        """Can a query see no key from the causal mask alone (bottom-right alignment with N > M, or M = 0)?"""
        return self.M == 0 or (self.causal_offset is not None and self.causal_offset < 0)


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
) -> Problem:
    """Validate the arguments of an attention call and return its `Problem`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "B, H, N, d" if name == "q" else "B, Hkv, M, d"
            raise ValueError(f"{name} must have 4 dimensions ({layout}), got shape {tuple(t.shape)}")
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
    B, H, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads Hkv={Hkv} (grouped-query attention)")
    if d == 0:
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
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask must be a bool tensor (True = attend), got {got}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must have shape (B, M) = {(B, M)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask.device must equal q.device={q.device}, got {key_padding_mask.device}")
    offset = None
    if is_causal:
        offset = 0 if causal_alignment == "top_left" else M - N
    return Problem(B, H, Hkv, N, M, d, 1.0 / math.sqrt(d) if scale is None else float(scale), offset)
