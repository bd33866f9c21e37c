"""The Triton kernels launched: each launch as data (grid, arguments, constexprs), the autograd function that runs
them, and the entry points.

`launches` makes the four launches of one forward and backward on "meta" tensors, exactly as `TritonAttention`
makes them on real ones, so the ahead-of-time build (triton_build.py) compiles what a GPU would run. Every tensor
reaches the kernels in one layout (`aligned`) and no size is specialised (`common.SIZES`), so those builds cover
every launch. `unsupported` says why the kernels cannot serve some inputs; `triton_attention` and
`triton_attention_varlen` take `reference.attention.attention`'s arguments, `run` and `run_varlen` checked ones
(what `optimized.attention.dispatch` calls).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from triton.runtime.interpreter import InterpretedFunction

from optimized.attention._inputs import Problem, check_inputs, check_varlen_inputs, with_defaults
from optimized.attention.triton.backward import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess
from optimized.attention.triton.forward import _fwd_kernel
from optimized.attention.triton.tuning import Config, Tiles, config, padded_head_dim

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
MAX_ROW_STRIDE = 2**31 // 256
"""Row strides the kernels take: offsets within a tile (at most 256 rows) are 32-bit; a tile's first row is 64-bit."""
GRID_LIMIT = 65535
"""CUDA's limit on a launch grid's second axis, which holds sequences x heads."""


def interpreted() -> bool:
    """Do these kernels run in Triton's interpreter (on CPU tensors) rather than compiled for a GPU?

    `triton.jit` returns an InterpretedFunction when the interpreter was on at decoration time, so the kernels
    themselves are the record; this reads no environment variable."""
    return isinstance(_fwd_kernel, InterpretedFunction)


def unsupported(q: Tensor, p: Problem) -> str | None:
    """Why these kernels cannot serve the inputs, or None when they can."""
    if interpreted():
        if q.device.type != "cpu":
            return f"Triton's interpreter runs on CPU tensors, got device {q.device}"
        if q.dtype == torch.bfloat16:
            return "Triton's interpreter has no bfloat16"
    elif q.device.type != "cuda":
        return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 before import), got device {q.device}"
    elif q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 dot products need a GPU of compute capability >= 8.0"
    if q.dtype not in DTYPES:
        return f"the Triton kernels take {[str(t) for t in DTYPES]}, got {q.dtype}"
    if p.d > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got d={p.d}"
    if p.N * padded_head_dim(p.d) >= 2**31:
        return (f"{p.N} query rows at head dim {padded_head_dim(p.d)} pass 2^31 elements per head (the output's "
                "row offsets are 32-bit)")
    sequences = _sequences(p)[0]
    if sequences * max(p.H, 1) > GRID_LIMIT:
        what = "documents" if p.documents is not None else "batch entries"
        return (f"{sequences} {what} x {p.H} heads = {sequences * p.H} programs along a launch grid's second axis, "
                f"above CUDA's {GRID_LIMIT}")
    return None


@dataclass(frozen=True)
class Launch:
    """One kernel launch as data: what the autograd function runs and what the ahead-of-time build compiles."""

    kernel: Any
    """The @triton.jit function."""
    grid: tuple[int, int]
    """Programs along (tiles, batch x heads)."""
    args: tuple
    """Positional arguments (tensors, strides, sizes, scales)."""
    meta: dict
    """Constexprs and launch options (num_warps, num_stages)."""

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def _opts(t: Tiles) -> dict:
    budget = {} if t.max_registers is None else {"maxnreg": t.max_registers}
    return dict(num_warps=t.num_warps, num_stages=t.num_stages, **budget)


def _pad_args(pad: Tensor | None, lse: Tensor) -> tuple:
    """The pad pointer and its strides; without a mask any float32 tensor stands in (never read: HAS_PAD=False)."""
    return (pad, *pad.stride()) if pad is not None else (lse, 0, 0)


def _edges(p: Problem) -> tuple[int | None, int | None]:
    """(right, left): the edges the kernels mask with, query i sees keys i + left <= j <= i + right; None where a
    side has no edge. Packed documents: relative to each document's bottom-right diagonal, added per document."""
    docs = p.documents
    if docs is None:
        return p.causal_offset, p.left_offset
    return (docs.right if docs.right >= 0 else None), (-docs.left if docs.left >= 0 else None)


def _sequences(p: Problem) -> tuple[int, int, int]:
    """(sequences, longest query sequence, longest key sequence) a launch grid spans: the batch, or the documents."""
    if p.documents is None:
        return p.B, p.N, p.M
    len_q, len_k = p.documents.lengths
    return len(len_q), max(len_q), max(len_k)


def _with_masks(launch, p: Problem, cu: tuple[Tensor, Tensor] | None, stand_in: Tensor):
    """A launch (or list of launches) with the sliding window's left edge (keys j >= i + window_offset), the softcap
    in base-2 units and the documents' cumulative lengths `cu` (None: the padded layout, `stand_in` is passed and
    never read), passed by keyword to the kernels that compute scores (`_MASK_KERNELS`)."""
    if isinstance(launch, list):
        return [_with_masks(x, p, cu, stand_in) for x in launch]
    if launch.kernel not in _MASK_KERNELS:
        return launch
    left = _edges(p)[1]
    cu_q, cu_k = cu if cu is not None else (stand_in, stand_in)
    masks = dict(window_offset=left or 0, cap2=p.softcap * _LOG2E, HAS_WINDOW=left is not None,
                 SOFTCAP=p.softcap > 0, CU_Q=cu_q, CU_K=cu_k, VARLEN=cu is not None)
    return dataclasses.replace(launch, meta=launch.meta | masks)


_MASK_KERNELS = (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel)


def _fwd_launch(q, k, v, out, lse, pad, cu, p: Problem, cfg: Config) -> Launch:
    t = cfg.fwd
    pad_ptr, *pad_strides = _pad_args(pad, lse)
    right = _edges(p)[0]
    sequences, longest_q, _ = _sequences(p)
    return _with_masks(Launch(
        _fwd_kernel, (triton.cdiv(longest_q, t.block_m), sequences * p.H),
        (q, k, v, out, lse, pad_ptr, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pad_strides,
         p.H, p.N, p.M, p.group, p.scale * _LOG2E, right or 0),
        dict(IS_CAUSAL=right is not None, HAS_PAD=pad is not None,
             BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=cfg.block_d, **_opts(t)),
    ), p, cu, lse)


def _bwd_launches(q, k, v, out, d_out, lse, delta, pad, cu, dq, dk, dv, p: Problem, cfg: Config) -> list[Launch]:
    pad_ptr, *pad_strides = _pad_args(pad, lse)
    right = _edges(p)[0]
    sequences, longest_q, longest_k = _sequences(p)
    flags = dict(IS_CAUSAL=right is not None, HAS_PAD=pad is not None, BLOCK_D=cfg.block_d)
    scales = (p.scale * _LOG2E, p.scale, right or 0)
    pre, dkdv, dqt = cfg.preprocess, cfg.dkdv, cfg.dq
    return _with_masks([
        # D = rowsum(dO ∘ O) is per row, documents or not: one pass over the (B, H, N) rows.
        Launch(_bwd_preprocess, (triton.cdiv(p.N, pre.block_m), p.B * p.H),
               (out, d_out, delta, *out.stride(), *d_out.stride(), p.H, p.N),
               dict(BLOCK_M=pre.block_m, BLOCK_D=cfg.block_d, **_opts(pre))),
        Launch(_bwd_dkdv_kernel, (triton.cdiv(longest_k, dkdv.block_n), sequences * p.Hkv),
               (q, k, v, d_out, lse, delta, pad_ptr, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *pad_strides, *dk.stride(), *dv.stride(),
                p.H, p.Hkv, p.N, p.M, p.group, *scales),
               dict(BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, **flags, **_opts(dkdv))),
        Launch(_bwd_dq_kernel, (triton.cdiv(longest_q, dqt.block_m), sequences * p.H),
               (q, k, v, d_out, lse, delta, pad_ptr, dq,
                *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *pad_strides, *dq.stride(),
                p.H, p.N, p.M, p.group, *scales),
               dict(BLOCK_M=dqt.block_m, BLOCK_N=dqt.block_n, **flags, **_opts(dqt))),
    ], p, cu, lse)


def launches(p: Problem, dtype: torch.dtype, has_pad: bool, capability: tuple[int, int]) -> list[Launch]:
    """The four launches of one forward and backward at `p`, on tensors of the "meta" device (shapes, strides and
    dtypes without data), as the autograd function would make them on a GPU of compute `capability`. p.d must be
    a padded head dim (`triton_attention` pads the inputs to one); packed documents (p.documents) take the layout
    of `triton_attention_varlen`."""
    if p.d != padded_head_dim(p.d):
        raise ValueError(f"p.d must be a padded head dim (a power of two >= 16), got {p.d}")
    cfg = config(p.d, dtype, capability)
    q, out, dq, d_out = (torch.empty(p.B, p.H, p.N, p.d, dtype=dtype, device="meta") for _ in range(4))
    k, v, dk, dv = (torch.empty(p.B, p.Hkv, p.M, p.d, dtype=dtype, device="meta") for _ in range(4))
    lse, delta = (torch.empty(p.B, p.H, p.N, dtype=torch.float32, device="meta") for _ in range(2))
    pad = torch.empty(p.B, p.M, dtype=torch.int8, device="meta") if has_pad else None
    cu = None
    if p.documents is not None:
        count = len(p.documents.cu_seqlens_q)
        cu = tuple(torch.empty(count, dtype=torch.int32, device="meta") for _ in range(2))
    return [_fwd_launch(q, k, v, out, lse, pad, cu, p, cfg),
            *_bwd_launches(q, k, v, out, d_out, lse, delta, pad, cu, dq, dk, dv, p, cfg)]


def _capability(t: Tensor) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None


class TritonAttention(torch.autograd.Function):
    """The Triton forward saving O and LSE; the three-kernel backward. pad: (B, M) int8 or None; cu: the documents'
    (cu_seqlens_q, cu_seqlens_k) when p.documents is set, else None."""

    @staticmethod
    def forward(ctx, q, k, v, pad, cu, problem: Problem):
        p = problem
        out = torch.empty(p.B, p.H, p.N, p.d, dtype=q.dtype, device=q.device)  # (B, H, N, d)
        lse = torch.empty(p.B, p.H, p.N, dtype=torch.float32, device=q.device)  # (B, H, N)
        if lse.numel() > 0:
            with _device(q):
                _fwd_launch(q, k, v, out, lse, pad, cu, p, config(p.d, q.dtype, _capability(q))).run()
        ctx.save_for_backward(q, k, v, out, lse, pad, *(cu or ()))
        ctx.problem = p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse, pad, *cu = ctx.saved_tensors
        p: Problem = ctx.problem
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        if lse.numel() == 0 or p.M == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), None, None, None
        d_out = aligned(d_out, p.d)
        delta = torch.empty_like(lse)  # (B, H, N)
        cfg = config(p.d, q.dtype, _capability(q))
        with _device(q):
            for launch in _bwd_launches(q, k, v, out, d_out, lse, delta, pad, tuple(cu) or None, dq, dk, dv, p,
                                        cfg):
                launch.run()
        return dq, dk, dv, None, None, None


class _device:
    """The CUDA device of `t` for the kernel launches (a no-op on CPU, where the interpreter runs)."""

    def __init__(self, t: Tensor) -> None:
        self._ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention by the Triton kernels: the arguments and results of `reference.attention.attention`
    (options: is_causal, scale, key_padding_mask, causal_alignment, window_size, softcap, return_lse; lse in
    float32). Raises ValueError saying why when the kernels cannot serve the inputs."""
    options = with_defaults(options)
    p = check_inputs(q, k, v, **options)
    _refuse_unsupported(q, p)
    out, lse = run(q, k, v, p, options["key_padding_mask"])
    return (out, lse) if options["return_lse"] else out


def triton_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, **options) -> Tensor | tuple[Tensor, Tensor]:
    """Packed documents by the Triton kernels: the arguments and results of `reference.attention.attention_varlen`
    (flash-attn's varlen layout; options: is_causal, scale, window_size, softcap, return_lse; lse (H, total_q) in
    float32). One program per (query or key tile of a document, head), as flash-attn's varlen kernels: a
    document's tiles never read another document's rows, so the cost is the sum of the documents' squares (less
    with a window). Raises ValueError saying why when the kernels cannot serve the inputs."""
    options = with_defaults(options, varlen=True)
    p = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    _refuse_unsupported(q, p)
    out, lse = run_varlen(q, k, v, p, cu_seqlens_q, cu_seqlens_k)
    return (out, lse) if options["return_lse"] else out


def run(q: Tensor, k: Tensor, v: Tensor, p: Problem, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Checked inputs (`p` from `check_inputs`, `unsupported` None) through the kernels. Returns out (B, H, N, d)
    and lse (B, H, N)."""
    pad = None
    if key_padding_mask is not None:  # (B, M) int8 (what Triton loads), rows 16-aligned like every other stride
        pad = torch.zeros(p.B, -(-p.M // 16) * 16, dtype=torch.int8, device=q.device)[:, : p.M]
        pad.copy_(key_padding_mask)
    return _attend(q, k, v, pad, None, p)


def run_varlen(q: Tensor, k: Tensor, v: Tensor, p: Problem, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """Checked packed inputs (`p` from `check_varlen_inputs`, `unsupported` None) through the kernels as one
    (1, heads, total, d) batch entry whose programs each take one document. Returns out (total_q, H, d) and
    lse (H, total_q)."""
    q1, k1, v1 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, d) views
    cu = tuple(c if c.is_contiguous() and c.data_ptr() % 16 == 0 else c.clone() for c in (cu_seqlens_q, cu_seqlens_k))
    out, lse = _attend(q1, k1, v1, None, cu, p)
    return out[0].transpose(0, 1), lse[0]  # (total_q, H, d), (H, total_q)


def _refuse_unsupported(q: Tensor, p: Problem) -> None:
    reason = unsupported(q, p)
    if reason is not None:
        raise ValueError(f"backend 'triton' cannot serve these inputs: {reason}")


def _attend(q, k, v, pad, cu, p: Problem) -> tuple[Tensor, Tensor]:
    """The autograd function on inputs brought to the kernels' layout. Returns out (B, H, N, d), lse (B, H, N)."""
    block_d = padded_head_dim(p.d)
    q, k, v = (aligned(t, block_d) for t in (q, k, v))  # (B, H or Hkv, N or M, block_d)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) >= MAX_ROW_STRIDE:
            raise ValueError(f"backend 'triton' cannot serve these inputs: {name}'s row stride {t.stride(2)} is not "
                             f"below {MAX_ROW_STRIDE} elements (offsets within a tile are 32-bit)")
    out, lse = TritonAttention.apply(q, k, v, pad, cu, dataclasses.replace(p, d=block_d))
    return out[..., : p.d], lse  # the zero columns of the padded head dim dropped


def aligned(t: Tensor, block_d: int) -> Tensor:
    """`t` in the one layout the kernels are compiled for: the head dim zero-padded to `block_d` (zero columns of
    Q and K add nothing to Q Kᵀ, those of V give output columns that are dropped), the last stride 1, every other
    stride a multiple of 16 elements and the address 16-byte aligned, so Triton's JIT always specialises the same
    way (vectorised loads, no masks along the head dim) and the ahead-of-time build (triton_build.py)
    covers every launch. A copy only when `t` is not in that layout already; the padding is differentiable."""
    if t.shape[-1] != block_d:
        return F.pad(t, (0, block_d - t.shape[-1])).contiguous()
    if t.stride(-1) == 1 and all(s % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


