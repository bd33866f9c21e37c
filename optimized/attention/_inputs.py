"""The arguments every attention entry point takes, and their checks: one ValueError naming the argument, what was
given and what is allowed, raised before any work is done.

`flash_attention` and `flash_attention_varlen` spell the options out in their signatures (the drop-ins for
`reference.attention`); the other entry points (blocked, Triton, `select_backend`) take them as `**options`,
completed here by `with_defaults`, so their names and defaults live in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OPTIONS = {"is_causal": False, "scale": None, "key_padding_mask": None, "causal_alignment": "top_left",
           "window_size": (-1, -1), "softcap": 0.0, "return_lse": False}
"""The keyword arguments of `reference.attention.attention`, with their defaults."""
VARLEN_OPTIONS = ("is_causal", "scale", "window_size", "softcap", "return_lse")
"""Those of `reference.attention.attention_varlen` (packed documents: no key padding mask, masks aligned
bottom-right within each document)."""


def with_defaults(given: dict, *, varlen: bool = False) -> dict:
    """`given` keyword arguments with every missing option at its default (OPTIONS), ready for `check_inputs` or,
    with `varlen`, `check_varlen_inputs`. A name that is not an option is a TypeError naming it, as Python's own."""
    allowed = VARLEN_OPTIONS if varlen else tuple(OPTIONS)
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unexpected keyword argument {name!r}{hint}; the options are {', '.join(allowed)}")
    return {name: given.get(name, OPTIONS[name]) for name in allowed}


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
    """The right edge: query i sees keys j <= i + causal_offset; None when no key is hidden that way. Causal
    masking puts it on the aligned diagonal (0 top-left, M - N bottom-right), a window's right size r moves it r
    keys further."""
    left_offset: int | None = None
    """The left edge of a sliding window: query i sees keys j >= i + left_offset; None when unbounded."""
    softcap: float = 0.0
    """Scores S -> softcap · tanh(S / softcap) before masking; 0 = off."""
    documents: Documents | None = None
    """Packed sequences (varlen): B = 1 and the rows of q and of k split into documents; None otherwise."""

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.H // self.Hkv

    @property
    def rows_can_be_empty(self) -> bool:
        """Can a query see no key from the masks alone (before key padding)?"""
        if self.M == 0 or self.documents is not None:
            return True
        right_empty = self.causal_offset is not None and self.causal_offset < 0
        left_empty = self.left_offset is not None and self.N - 1 + self.left_offset > self.M - 1
        return right_empty or left_empty


@dataclass(frozen=True)
class Documents:
    """How packed rows split into documents (flash-attn's varlen layout), as Python ints read once per call."""

    cu_seqlens_q: tuple[int, ...]
    """Document b is query rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]."""
    cu_seqlens_k: tuple[int, ...]
    """Document b is key rows cu_seqlens_k[b]:cu_seqlens_k[b + 1]."""
    left: int
    """Window left size within each document, -1 unbounded."""
    right: int
    """Window right size within each document (0 when causal), -1 unbounded; bottom-right aligned per document."""

    @functools.cached_property
    def lengths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Query and key lengths of each document (computed once: dispatch, the launch and the grid all read it)."""
        diff = lambda cu: tuple(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))  # noqa: E731
        return diff(self.cu_seqlens_q), diff(self.cu_seqlens_k)


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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> Problem:
    """Validate the arguments of an attention call and return its `Problem`, with the causal mask and the window
    folded into two edges (key j visible to query i iff i + left_offset <= j <= i + causal_offset) and every edge
    that hides no key dropped, so equal masks give equal problems."""
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
    left, right = check_window_and_softcap(window_size, softcap)
    align = 0 if causal_alignment == "top_left" else M - N
    edges = _edges(N, M, align, left, 0 if is_causal else right)
    return Problem(B, H, Hkv, N, M, d, 1.0 / math.sqrt(d) if scale is None else float(scale), *edges,
                   float(softcap))


def _edges(N: int, M: int, align: int, left: int, right: int) -> tuple[int | None, int | None]:
    """(right edge, left edge): query i sees keys i + left_edge <= j <= i + right_edge; causal is right = 0
    (flash-attn's convention); an edge that hides no key of any query is None, so equal masks give equal edges."""
    right_edge = align + right if right >= 0 and align + right < M - 1 else None  # j <= i + edge, some i hides one
    left_edge = align - left if left >= 0 and N - 1 + align - left > 0 else None  # j >= i + edge, some i hides one
    return right_edge, left_edge


def check_window_and_softcap(window_size, softcap) -> tuple[int, int]:
    """window_size: (left, right), ints >= -1; softcap: a finite number >= 0. Returns (left, right)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right), two ints >= -1 (-1 = unbounded), got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return int(window_size[0]), int(window_size[1])


def check_varlen_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool,
    scale: float | None,
    window_size: tuple[int, int],
    softcap: float,
    return_lse: bool,
) -> Problem:
    """Validate a packed (varlen) attention call and return its `Problem` (B = 1, N = total_q, M = total_k).

    Reads cu_seqlens once (one device sync on CUDA), as every check of the documents needs their values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a packed (total, heads, d) tensor, got {got}")
    if v.shape != k.shape:
        raise ValueError(f"v shape must equal k shape {tuple(k.shape)} (total_k, Hkv, d), got {tuple(v.shape)}")
    # The per-tensor checks of the padded layout, on the (1, heads, total, d) views the backends run on.
    problem = check_inputs(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), is_causal=False, scale=scale,
                           key_padding_mask=None, causal_alignment="top_left", return_lse=return_lse,
                           window_size=window_size, softcap=softcap)
    starts = {}
    for which, cu, total, longest in (("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                      ("k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        name = f"cu_seqlens_{which}"
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(f"{name} must be a 1-D torch.int32 tensor of D + 1 >= 2 cumulative lengths "
                             f"(flash-attn's layout), got {got}")
        if cu.device != q.device:
            raise ValueError(f"{name}.device must equal q.device={q.device}, got {cu.device}")
        cu_list = tuple(cu.tolist())
        lengths = [b - a for a, b in zip(cu_list[:-1], cu_list[1:], strict=True)]
        if cu_list[0] != 0:
            raise ValueError(f"{name} must start at 0, got {list(cu_list)}")
        if min(lengths) < 0:
            at = lengths.index(min(lengths))
            raise ValueError(f"{name} must never decrease, got {list(cu_list)} (entry {at + 1} < entry {at})")
        if cu_list[-1] != total:
            raise ValueError(f"{name} must end at the packed length of {which}, {total}, got {cu_list[-1]}")
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < max(lengths):
            raise ValueError(f"max_seqlen_{which} must be an int >= the longest document ({max(lengths)}), "
                             f"got {longest!r}")
        starts[which] = cu_list
    if len(starts["q"]) != len(starts["k"]):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must list the same number of documents, got "
                         f"{len(starts['q']) - 1} and {len(starts['k']) - 1}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    left, right = window_size
    documents = Documents(starts["q"], starts["k"], left, 0 if is_causal else right)
    return dataclasses.replace(problem, causal_offset=None, left_offset=None, documents=documents)
