"""`flash_attention`: one function, five ways to compute it, and an explainable choice between them.

Backends, in the order "auto" tries them:
    flash_attn  the flash-attn package (Dao et al.), CUDA, fp16/bf16, head dim <= 256. Its `causal=True` is
                bottom-right aligned (flash-attn >= 2.1), so top-left causal with N != M is refused. No key padding
                mask (that needs its varlen API), and its LSE is used for return_lse.
    sdpa        torch.nn.functional.scaled_dot_product_attention (its flash / memory-efficient / C++ kernels), where
                its semantics match the request: no key padding mask (a fully masked row would give NaN, not 0),
                causal only top-left or with N == M, no return_lse (SDPA does not return the LSE).
    triton      our Triton kernels (optimized/attention/triton.py): everything the reference does on CUDA, fp16 /
                bf16 / fp32, d <= 256. Also runs on CPU tensors under Triton's interpreter, which "auto" never
                picks (it is a debugging tool, far slower than "blocked").
    blocked     our FlashAttention-2 in PyTorch (optimized/attention/blocked.py): everything, on any device.

"auto" takes the first backend that can serve the inputs; `select_backend` names it and says why the ones before it
could not. An explicit backend that cannot serve the inputs raises `BackendUnavailable` saying why. The choice is
logged at debug level on the logger "optimized.attention".
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.attention._inputs import Problem, check_inputs
from optimized.attention.blocked import blocked_attention

log = logging.getLogger("optimized.attention")

BACKENDS = ("flash_attn", "sdpa", "triton", "blocked")
"""Explicit backend names, in the order "auto" tries them."""

FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_MAX_HEAD_DIM = 256


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot serve these inputs (the message says why)."""


@dataclass(frozen=True)
class BackendChoice:
    """What "auto" runs for some inputs, and why."""

    backend: str
    """The backend "auto" runs: one of BACKENDS."""
    reason: str
    """Why it was chosen."""
    rejected: dict[str, str] = field(default_factory=dict)
    """The backends tried before it, each with the reason it could not serve the inputs."""

    def __str__(self) -> str:
        skipped = "; ".join(f"{name}: {why}" for name, why in self.rejected.items())
        return f"{self.backend} ({self.reason})" + (f" [not {skipped}]" if skipped else "")


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    causal_alignment: str = "top_left",
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention without an N x M matrix: `reference.attention.attention`'s arguments and results.

    softmax(scale · Q Kᵀ + mask) V with q: (B, H, N, d); k, v: (B, Hkv, M, d), H % Hkv == 0 (GQA/MQA);
    key_padding_mask: (B, M) bool, True = attend; causal_alignment "top_left" (torch SDPA) or "bottom_right"
    (flash-attn >= 2.1) when N != M. Returns out (B, H, N, d) in q's dtype and, with return_lse=True, the
    log-sum-exp of the scaled, masked scores (B, H, N) in float32 (float64 for float64 inputs on "blocked"),
    without gradient. A query that sees no key gets zeros and zero gradients.

    backend: "auto" (see `select_backend`), or one of "flash_attn", "sdpa", "triton", "blocked".
    Drop-in for the tiny GPT: `GPT(config, attention=flash_attention)`.
    """
    kwargs = dict(is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                  causal_alignment=causal_alignment, return_lse=return_lse)
    problem = check_inputs(q, k, v, **kwargs)
    if backend == "auto":
        choice = _choose(q, problem, **kwargs)
        log.debug("flash_attention: %s", choice)
        name = choice.backend
    elif backend in BACKENDS:
        reason = _unsupported(backend, q, problem, **kwargs)
        if reason is not None:
            raise BackendUnavailable(f"backend {backend!r} cannot serve these inputs: {reason}")
        log.debug("flash_attention: %s (requested)", backend)
        name = backend
    else:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return _RUN[name](q, k, v, problem, **kwargs)


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    causal_alignment: str = "top_left",
    return_lse: bool = False,
) -> BackendChoice:
    """The backend `flash_attention(..., backend="auto")` runs for these inputs, with the reasons."""
    kwargs = dict(is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                  causal_alignment=causal_alignment, return_lse=return_lse)
    return _choose(q, check_inputs(q, k, v, **kwargs), **kwargs)


def unsupported(backend: str, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> str | None:
    """Why `backend` cannot serve these inputs (explicitly requested), or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kwargs = {"is_causal": False, "scale": None, "key_padding_mask": None, "causal_alignment": "top_left",
              "return_lse": False, **kwargs}
    return _unsupported(backend, q, check_inputs(q, k, v, **kwargs), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Choosing


def _choose(q: Tensor, p: Problem, **kwargs) -> BackendChoice:
    rejected: dict[str, str] = {}
    for name in BACKENDS:
        reason = _unsupported(name, q, p, auto=True, **kwargs)
        if reason is None:
            return BackendChoice(name, _WHY[name], rejected)
        rejected[name] = reason
    raise AssertionError("the blocked backend serves every valid input")  # pragma: no cover


_WHY = {
    "flash_attn": "the flash-attn package serves these inputs",
    "sdpa": "torch SDPA's semantics match the request",
    "triton": "our Triton kernel serves these inputs",
    "blocked": "FlashAttention-2 in PyTorch serves every input",
}


def _unsupported(name: str, q: Tensor, p: Problem, *, auto: bool = False, key_padding_mask=None,
                 return_lse: bool = False, **_) -> str | None:
    if name == "flash_attn":
        return _flash_attn_unsupported(q, p, key_padding_mask)
    if name == "sdpa":
        return _sdpa_unsupported(p, key_padding_mask, return_lse)
    if name == "triton":
        if not _installed("triton"):
            return "the triton package is not installed"
        if auto and q.device.type != "cuda":
            return f"needs CUDA tensors, got device {q.device} (Triton's interpreter is for tests, never 'auto')"
        from optimized.attention import triton as triton_backend

        return triton_backend.unsupported(q, p)
    return None


def _flash_attn_unsupported(q: Tensor, p: Problem, key_padding_mask: Tensor | None) -> str | None:
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got device {q.device}"
    if q.dtype not in FLASH_ATTN_DTYPES:
        return f"takes float16 or bfloat16, got {q.dtype}"
    if p.d > FLASH_ATTN_MAX_HEAD_DIM:
        return f"takes head dims up to {FLASH_ATTN_MAX_HEAD_DIM}, got d={p.d}"
    if key_padding_mask is not None:
        return "a key padding mask needs flash-attn's varlen API, which is not wired here"
    if p.causal_offset == 0 and p.N != p.M:  # top-left alignment with N != M
        return "its causal mask is bottom-right aligned; top-left causal with N != M is not what it computes"
    if p.N == 0 or p.M == 0:
        return f"takes non-empty sequences, got N={p.N}, M={p.M}"
    if not _installed("flash_attn"):
        return "the flash_attn package is not installed"
    version = _flash_attn_version()
    if version < (2, 1):
        return f"flash-attn >= 2.1 is needed (bottom-right causal alignment), found {version}"
    return None


@functools.cache
def _installed(package: str) -> bool:
    """Is `package` importable? Asked once per process: `flash_attention` runs in every layer of every step."""
    return importlib.util.find_spec(package) is not None


@functools.cache
def _flash_attn_version() -> tuple[int, int]:
    import flash_attn

    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in
                    flash_attn.__version__.split(".")[:2])
    return major, minor


def _sdpa_unsupported(p: Problem, key_padding_mask: Tensor | None, return_lse: bool) -> str | None:
    if key_padding_mask is not None:
        return "a key padding mask can leave a query with no key, where SDPA gives NaN instead of zeros"
    if p.causal_offset not in (None, 0):  # bottom-right alignment with N != M
        return "its is_causal is top-left aligned; bottom-right causal with N != M is not what it computes"
    if return_lse:
        return "it does not return the log-sum-exp"
    if p.M == 0:
        return "it gives NaN for an empty key sequence, where the spec gives zeros"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Running


def _run_flash_attn(q, k, v, p: Problem, *, is_causal, scale, key_padding_mask, causal_alignment, return_lse):
    from flash_attn import flash_attn_func

    result = flash_attn_func(
        q.transpose(1, 2),  # (B, N, H, d): flash-attn's layout
        k.transpose(1, 2),  # (B, M, Hkv, d)
        v.transpose(1, 2),  # (B, M, Hkv, d)
        softmax_scale=p.scale,
        causal=is_causal,
        return_attn_probs=return_lse,
    )
    if not return_lse:
        return result.transpose(1, 2)  # (B, H, N, d)
    out, lse, _ = result
    # flash-attn writes +inf as the LSE of a row that sees no key; the spec's log(0) is -inf.
    lse = lse[..., : p.N].detach().float()  # (B, H, N); a statistic, without gradient as in the other backends
    lse = torch.where(lse == float("inf"), float("-inf"), lse)  # (B, H, N)
    return out.transpose(1, 2), lse  # (B, H, N, d), (B, H, N)


def _run_sdpa(q, k, v, p: Problem, *, is_causal, scale, key_padding_mask, causal_alignment, return_lse):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=p.scale,
                                          enable_gqa=p.Hkv != p.H)  # (B, H, N, d)


def _run_triton(q, k, v, p: Problem, **kwargs):
    from optimized.attention.triton import triton_attention

    return triton_attention(q, k, v, **kwargs)


def _run_blocked(q, k, v, p: Problem, **kwargs):
    return blocked_attention(q, k, v, **kwargs)


_RUN = {"flash_attn": _run_flash_attn, "sdpa": _run_sdpa, "triton": _run_triton, "blocked": _run_blocked}
