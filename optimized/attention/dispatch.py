"""`flash_attention` and `flash_attention_varlen`: one computation, four backends, an explainable choice.

Backends, in the order "auto" tries them:
    flash_attn  the flash-attn package (Dao et al.), CUDA, fp16/bf16, head dim <= 256. Its masks are bottom-right
                aligned (flash-attn >= 2.1): every causal/window mask is passed as its window_size relative to that
                alignment, and one it cannot express (e.g. top-left causal with N < M) is refused. Windows need
                flash-attn >= 2.3, softcap >= 2.6. Packed documents go to `flash_attn_varlen_func`. No key padding
                mask in the padded layout.
    sdpa        torch.nn.functional.scaled_dot_product_attention (its flash / memory-efficient / C++ kernels), where
                it computes exactly the requested mask without materialising one: no key padding mask (a fully
                masked row would give NaN, not 0), causal only on the top-left diagonal (or N == M), no sliding
                window, no softcap, no return_lse (SDPA does not return the LSE); packed documents only when they
                all have one length (then they are a batch). On CPU "auto" never picks it: its C++ flash kernel
                turns a query row whose scores are all NaN or -inf (a NaN in q, say) into zeros where the spec
                gives NaN, for every head layout, GQA or not (see `CPU_SDPA_NONFINITE`), and its float16/bfloat16
                kernels fail the error rule this project holds every backend to (see `CPU_HALF_SDPA`). An explicit
                backend="sdpa" still runs it.
    triton      our Triton kernels (optimized/attention/triton/): everything the reference does on CUDA, fp16 /
                bf16 / fp32, d <= 256, windows, softcap and packed documents (one program per tile of a document)
                included. Also runs on CPU tensors under Triton's interpreter, which "auto" never picks (it is a
                debugging tool, far slower than "blocked").
    blocked     our FlashAttention-2 in PyTorch (optimized/attention/blocked.py): everything, on any device.

"auto" takes the first backend that can serve the inputs; `select_backend` names it and says why the ones before it
could not. An explicit backend that cannot serve the inputs raises `BackendUnavailable` saying why. The choice is
logged at debug level on the logger "optimized.attention".
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from optimized.attention._inputs import Problem, check_inputs, check_varlen_inputs, with_defaults
from optimized.attention.blocked import DEFAULT_BLOCK, BlockedAttention, run_varlen

log = logging.getLogger("optimized.attention")

BACKENDS = ("flash_attn", "sdpa", "triton", "blocked")
"""Explicit backend names, in the order "auto" tries them."""

FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_MAX_HEAD_DIM = 256
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_HALF_SDPA = ("on CPU its float16/bfloat16 kernels break the error rule this project holds every backend to, "
                 "where the blocked path keeps it (e.g. causal N=M=1025, d=59, float16: dv error 6.6e-3 against a "
                 "bound of 4.2e-3); the conformance attention check counts the cases per backend and dtype")
"""Why "auto" passes over SDPA for half precision on CPU (an explicit backend="sdpa" still runs it)."""
CPU_SDPA_NONFINITE = ("on CPU its flash kernel gives zeros, not the spec's NaN, on a query row whose scores are all "
                      "NaN or -inf (e.g. a NaN in q), with or without GQA (the class of PyTorch issue #141128); its "
                      "math kernel adds the causal mask, so a NaN key hidden by the mask still reaches every row; the "
                      "conformance attention check's non-finite row records both")
"""Why "auto" passes over SDPA on CPU in any dtype (an explicit backend="sdpa" still runs it). Expanding k/v to q's
heads (no enable_gqa) does not help: the MHA path has the same defect. Scanning the inputs for NaN on every call would
cost a device sync; blocked propagates like the spec by construction."""


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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention without an N x M matrix: `reference.attention.attention`'s arguments and results.

    softmax(mask(softcap(scale · Q Kᵀ))) V with q: (B, H, N, d); k, v: (B, Hkv, M, d), H % Hkv == 0 (GQA/MQA);
    key_padding_mask: (B, M) bool, True = attend; causal_alignment "top_left" (torch SDPA) or "bottom_right"
    (flash-attn >= 2.1) when N != M; window_size (left, right): query i sees keys i + off - left <= j <= i + off +
    right, -1 unbounded, off the alignment's offset (flash-attn's convention); softcap c > 0: scores -> c·tanh(s/c).
    Returns out (B, H, N, d) in q's dtype and, with return_lse=True, the log-sum-exp of the scaled, capped, masked
    scores (B, H, N) in float32 (float64 for float64 inputs on "blocked"), without gradient. A query that sees no
    key gets zeros and zero gradients.

    backend: "auto" (see `select_backend`), or one of "flash_attn", "sdpa", "triton", "blocked".
    Drop-in for the tiny GPT: `GPT(config, attention=flash_attention)`.
    """
    kwargs = dict(is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                  causal_alignment=causal_alignment, window_size=window_size, softcap=softcap, return_lse=return_lse)
    problem = check_inputs(q, k, v, **kwargs)
    name = _resolve(backend, lambda name, auto: _unsupported(name, q, problem, auto=auto, **kwargs))
    return _RUN[name](q, k, v, problem, **kwargs)


def flash_attention_varlen(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Packed documents, flash-attn's `flash_attn_varlen_func` layout: `reference.attention.attention_varlen`'s
    arguments and results. Attention never crosses a document boundary.

    q: (total_q, H, d); k, v: (total_k, Hkv, d); cu_seqlens_q, cu_seqlens_k: (D + 1,) torch.int32 cumulative
    lengths from 0 to the packed length; max_seqlen_q, max_seqlen_k: at least the longest document. Causal masks and
    windows are bottom-right aligned within each document. Returns out (total_q, H, d) and, with return_lse=True,
    lse (H, total_q) (flash-attn's layout).

    backend: "auto" (see `select_backend_varlen`): flash-attn's varlen function where installed, torch SDPA as a
    plain batch when every document has the same length, our Triton kernels on CUDA, else "blocked". The last two
    never compute a tile across a document boundary, so packing costs the sum of the documents' squares, not the
    square of their sum.
    """
    options = dict(is_causal=is_causal, scale=scale, window_size=window_size, softcap=softcap, return_lse=return_lse)
    problem, batch, kwargs = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options)
    name = _resolve(backend, lambda name, auto: _varlen_unsupported(name, q, problem, batch, auto=auto, **kwargs))
    if name == "flash_attn":
        return _run_flash_attn_varlen(q, k, v, problem, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      return_lse=return_lse)
    # Documents of one length run "blocked" as a plain batch: its packed path computes tiles that span documents,
    # where a NaN or inf in one document meets P = 0 of another (0·NaN = NaN) and leaks across the boundary.
    if name == "triton" or (name == "blocked" and batch is None):
        out, lse = _run_varlen(name, q, k, v, problem, cu_seqlens_q, cu_seqlens_k)
        return (out, lse) if return_lse else out
    qb, kb, vb, pb = batch  # SDPA or blocked, documents of one length: a plain (D, heads, n, d) batch
    result = _RUN[name](qb, kb, vb, pb, **kwargs)
    out, lse = result if return_lse else (result, None)
    out = out.transpose(1, 2).flatten(0, 1)  # (D, H, n, d) -> (total_q, H, d)
    return (out, lse.transpose(0, 1).flatten(1, 2)) if return_lse else out  # lse (D, H, n) -> (H, total_q)


def select_backend(q: Tensor, k: Tensor, v: Tensor, **options) -> BackendChoice:
    """The backend `flash_attention(..., backend="auto")` runs for these inputs (`options`: its keyword arguments
    but `backend`), with the reasons."""
    kwargs = with_defaults(options)
    problem = check_inputs(q, k, v, **kwargs)
    return _choose(lambda name: _unsupported(name, q, problem, auto=True, **kwargs))


def select_backend_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, **options) -> BackendChoice:
    """The backend `flash_attention_varlen(..., backend="auto")` runs for these inputs, with the reasons."""
    problem, batch, kwargs = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             with_defaults(options, varlen=True))
    return _choose(lambda name: _varlen_unsupported(name, q, problem, batch, auto=True, **kwargs))


def unsupported(backend: str, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> str | None:
    """Why `backend` cannot serve these inputs (explicitly requested), or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kwargs = with_defaults(kwargs)
    return _unsupported(backend, q, check_inputs(q, k, v, **kwargs), **kwargs)


def unsupported_varlen(backend: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                       max_seqlen_q: int, max_seqlen_k: int, **options) -> str | None:
    """Why `backend` cannot serve these packed inputs (explicitly requested), or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    problem, batch, kwargs = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             with_defaults(options, varlen=True))
    return _varlen_unsupported(backend, q, problem, batch, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Choosing


def _resolve(backend: str, why_not: Callable[[str, bool], str | None]) -> str:
    """The backend to run: "auto"'s choice (logged) or the requested one, refused with the reason it cannot serve."""
    if backend == "auto":
        choice = _choose(lambda name: why_not(name, True))
        log.debug("flash_attention: %s", choice)
        return choice.backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = why_not(backend, False)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot serve these inputs: {reason}")
    log.debug("flash_attention: %s (requested)", backend)
    return backend


def _choose(why_not: Callable[[str], str | None]) -> BackendChoice:
    rejected: dict[str, str] = {}
    for name in BACKENDS:
        reason = why_not(name)
        if reason is None:
            return BackendChoice(name, _WHY[name], rejected)
        rejected[name] = reason
    raise AssertionError("the blocked backend serves every valid input")  # pragma: no cover


_WHY = {
    "flash_attn": "the flash-attn package serves these inputs",
    "sdpa": "torch SDPA computes exactly this mask",
    "triton": "our Triton kernel serves these inputs",
    "blocked": "FlashAttention-2 in PyTorch serves every input",
}


def _unsupported(name: str, q: Tensor, p: Problem, *, auto: bool = False, key_padding_mask=None,
                 return_lse: bool = False, **_) -> str | None:
    if name == "flash_attn":
        return _flash_attn_unsupported(q, p, key_padding_mask)
    if name == "sdpa":
        return _sdpa_unsupported(q, p, key_padding_mask, return_lse, auto)
    if name == "triton":
        if not _installed("triton"):
            return "the triton package is not installed"
        if auto and q.device.type != "cuda":
            return f"needs CUDA tensors, got device {q.device} (Triton's interpreter is for tests, never 'auto')"
        from optimized.attention.triton import launch

        return launch.unsupported(q, p)
    return None


def _flash_attn_unsupported(q: Tensor, p: Problem, key_padding_mask: Tensor | None) -> str | None:
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got device {q.device}"
    if q.dtype not in FLASH_ATTN_DTYPES:
        return f"takes float16 or bfloat16, got {q.dtype}"
    if p.d > FLASH_ATTN_MAX_HEAD_DIM:
        return f"takes head dims up to {FLASH_ATTN_MAX_HEAD_DIM}, got d={p.d}"
    if key_padding_mask is not None:
        return "a key padding mask needs flash-attn's varlen API: pass packed documents to flash_attention_varlen"
    if p.N == 0 or p.M == 0:
        return f"takes non-empty sequences, got N={p.N}, M={p.M}"
    window = _flash_attn_window(p)
    if window is None:
        return ("its masks are bottom-right aligned; this one (e.g. top-left causal with N < M) has an edge it "
                "cannot express")
    if not _installed("flash_attn"):
        return "the flash_attn package is not installed"
    return _flash_attn_version_unsupported(windowed=window not in ((-1, -1), (-1, 0)), softcap=p.softcap)


def _flash_attn_window(p: Problem) -> tuple[int, int] | None:
    """The problem's edges as flash-attn's window_size (left, right) around its bottom-right diagonal, -1 =
    unbounded; None when an edge lies on the wrong side of that diagonal, which flash-attn cannot express."""
    align = p.M - p.N
    right = -1 if p.causal_offset is None else p.causal_offset - align
    left = -1 if p.left_offset is None else align - p.left_offset
    if (p.causal_offset is not None and right < 0) or (p.left_offset is not None and left < 0):
        return None
    return left, right


def _flash_attn_version_unsupported(*, windowed: bool, softcap: float) -> str | None:
    version = _flash_attn_version()
    for needed, wanted, what in (((2, 1), True, "bottom-right causal alignment"), ((2, 3), windowed,
                                 "sliding windows"), ((2, 6), bool(softcap), "softcap")):
        if wanted and version < needed:
            return f"flash-attn >= {needed[0]}.{needed[1]} is needed ({what}), found {version}"
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


def _sdpa_unsupported(q: Tensor, p: Problem, key_padding_mask: Tensor | None, return_lse: bool,
                      auto: bool) -> str | None:
    if key_padding_mask is not None:
        return "a key padding mask can leave a query with no key, where SDPA gives NaN instead of zeros"
    if p.causal_offset not in (None, 0):  # bottom-right causal with N != M, or a right window
        return ("its is_causal is the top-left diagonal; this mask's right edge (bottom-right causal with N != M, "
                "or a window's right size) is not what it computes")
    if p.left_offset is not None:
        return "a sliding window needs an N x M mask tensor, the memory flash attention exists to avoid"
    if p.softcap:
        return "it has no softcap (no score modification)"
    if return_lse:
        return "it does not return the log-sum-exp"
    if p.M == 0:
        return "it gives NaN for an empty key sequence, where the spec gives zeros"
    if auto and q.device.type == "cpu":
        # Never route to a kernel known to differ from the spec on non-finite inputs (and, in half precision, on
        # the error rule): on CPU every SDPA kernel does (see CPU_SDPA_NONFINITE).
        return CPU_HALF_SDPA if q.dtype in HALF_DTYPES else CPU_SDPA_NONFINITE
    return None


def _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options: dict):
    """The packed problem (`options`: every one of VARLEN_OPTIONS); the same documents as a (D, heads, n, d) batch
    when they all have one length (else None); and the batch's keyword arguments."""
    problem = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    kwargs = dict(options, key_padding_mask=None, causal_alignment="bottom_right")
    len_q, len_k = problem.documents.lengths
    D = len(len_q)
    if len(set(len_q)) != 1 or len(set(len_k)) != 1 or 0 in (len_q[0], len_k[0]):
        return problem, None, kwargs
    qb, kb, vb = (t.unflatten(0, (D, -1)).transpose(1, 2) for t in (q, k, v))  # (D, heads, n or m, d) views
    return problem, (qb, kb, vb, check_inputs(qb, kb, vb, **kwargs)), kwargs


def _varlen_unsupported(name: str, q: Tensor, p: Problem, batch, *, auto: bool = False, **kwargs) -> str | None:
    if name == "flash_attn":
        if q.device.type != "cuda":
            return f"needs CUDA tensors, got device {q.device}"
        if q.dtype not in FLASH_ATTN_DTYPES:
            return f"takes float16 or bfloat16, got {q.dtype}"
        if p.d > FLASH_ATTN_MAX_HEAD_DIM:
            return f"takes head dims up to {FLASH_ATTN_MAX_HEAD_DIM}, got d={p.d}"
        if not _installed("flash_attn"):
            return "the flash_attn package is not installed"
        docs = p.documents
        return _flash_attn_version_unsupported(windowed=(docs.left, docs.right) not in ((-1, -1), (-1, 0)),
                                               softcap=p.softcap)
    if name in ("triton", "blocked"):
        return _unsupported(name, q, p, auto=auto)
    if batch is None:
        return ("packed documents of different lengths: it has no varlen mode (documents of one length are "
                "served as a plain batch)")
    qb, _, _, pb = batch
    return _unsupported(name, qb, pb, auto=auto, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Running


def _flash_attn_mask_kwargs(left: int, right: int, softcap: float) -> dict:
    """flash-attn's keyword arguments for a window; causal alone (and nothing at all) stays in the 2.1 API."""
    if (left, right) == (-1, 0):
        kwargs = {"causal": True}
    elif (left, right) == (-1, -1):
        kwargs = {"causal": False}
    else:
        kwargs = {"causal": False, "window_size": (left, right)}
    return kwargs | ({"softcap": softcap} if softcap else {})


def _flash_attn_lse(lse: Tensor) -> Tensor:
    """flash-attn writes +inf as the LSE of a row that sees no key; the spec's log(0) is -inf."""
    lse = lse.detach().float()  # a statistic, without gradient as in the other backends
    return torch.where(lse == float("inf"), float("-inf"), lse)


def _run_flash_attn(q, k, v, p: Problem, *, return_lse, **_):
    from flash_attn import flash_attn_func

    result = flash_attn_func(
        q.transpose(1, 2),  # (B, N, H, d): flash-attn's layout
        k.transpose(1, 2),  # (B, M, Hkv, d)
        v.transpose(1, 2),  # (B, M, Hkv, d)
        softmax_scale=p.scale,
        return_attn_probs=return_lse,
        **_flash_attn_mask_kwargs(*_flash_attn_window(p), p.softcap),
    )
    if not return_lse:
        return result.transpose(1, 2)  # (B, H, N, d)
    out, lse, _ = result
    return out.transpose(1, 2), _flash_attn_lse(lse[..., : p.N])  # (B, H, N, d), (B, H, N)


def _run_flash_attn_varlen(q, k, v, p: Problem, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           return_lse):
    from flash_attn import flash_attn_varlen_func

    docs = p.documents
    result = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale=p.scale, return_attn_probs=return_lse,
                                    **_flash_attn_mask_kwargs(docs.left, docs.right, p.softcap))
    if not return_lse:
        return result  # (total_q, H, d)
    out, lse, _ = result
    return out, _flash_attn_lse(lse)  # (total_q, H, d), (H, total_q)


def _run_sdpa(q, k, v, p: Problem, **_):
    return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal_offset is not None, scale=p.scale,
                                          enable_gqa=p.Hkv != p.H)  # (B, H, N, d)


def _run_triton(q, k, v, p: Problem, *, key_padding_mask, return_lse, **_):
    from optimized.attention.triton import launch

    out, lse = launch.run(q, k, v, p, key_padding_mask)
    return (out, lse) if return_lse else out


def _run_blocked(q, k, v, p: Problem, *, key_padding_mask, return_lse, **_):
    out, lse = BlockedAttention.apply(q, k, v, key_padding_mask, p, DEFAULT_BLOCK, DEFAULT_BLOCK)
    return (out, lse) if return_lse else out


_RUN = {"flash_attn": _run_flash_attn, "sdpa": _run_sdpa, "triton": _run_triton, "blocked": _run_blocked}


def _run_varlen(name: str, q, k, v, p: Problem, cu_seqlens_q, cu_seqlens_k) -> tuple[Tensor, Tensor]:
    """Our backends on packed documents: out (total_q, H, d), lse (H, total_q)."""
    if name == "blocked":
        return run_varlen(q, k, v, p)
    from optimized.attention.triton import launch

    return launch.run_varlen(q, k, v, p, cu_seqlens_q, cu_seqlens_k)
