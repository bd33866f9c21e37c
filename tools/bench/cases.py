"""The bench's problems: the cases (sized as flash-attn's benchmark sizes them), their FLOP count (FA2's), the
GPUs' dense peaks, and the attention implementations under test, each `(q, k, v, causal) -> out`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (64, 128)
SEQLENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096, 8192)
MODES = ("fwd", "fwd_bwd")
IMPLS = ("triton", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn")
TOKENS = 16384
"""B·N of every case (flash-attn's benchmark: batch_size = 16384 // seqlen)."""
HIDDEN = 2048
"""H·d of every case (flash-attn's benchmark: nheads = 2048 // headdim)."""
HEADLINE = ("bf16", 128, 8192)
"""dtype, d, N of the issue's goal (ours / SDPA-flash >= 1.0x forward, >= 0.9x forward + backward): measured first."""
MEMORY_N = 4096
"""The sequence length of the paper's 20x memory claim."""
CONVENTION = ("FLOPs per FA2 and flash-attn's benchmark: forward 4·B·H·N·M·d, half when causal; backward 2.5x, "
              "forward + backward 3.5x the forward. TFLOP/s = FLOPs / median time; B·N and H·d fixed per case")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
"""FLOPs of each mode as a multiple of the forward's (FA2's count: the backward does 2.5x the forward's matmuls)."""

# Dense (no sparsity) bf16/fp16 tensor-core peaks with fp32 accumulation, TFLOP/s, from NVIDIA's data sheets.
# The first pattern that matches torch.cuda.get_device_name() wins, so the specific forms come first.
DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16/fp16 peak of the GPU called `device_name` (e.g. "NVIDIA H200"), or None when unknown."""
    for pattern, peak in DENSE_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def attention_flops(B: int, H: int, N: int, M: int, d: int, *, causal: bool, mode: str) -> float:
    """FA2's FLOP count: forward 4·B·H·N·M·d (two matmuls of 2·N·M·d each), half when causal; bwd 2.5x, fwd_bwd 3.5x."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(MODE_FACTOR)}, got {mode!r}")
    forward = 4.0 * B * H * N * M * d * (0.5 if causal else 1.0)
    return MODE_FACTOR[mode] * forward


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: self-attention, q, k, v of shape (B, H, N, d), N = M."""

    dtype: str
    d: int
    N: int
    causal: bool
    B: int
    H: int

    @classmethod
    def sized(cls, dtype: str, d: int, N: int, causal: bool, tokens: int = TOKENS, hidden: int = HIDDEN) -> Case:
        """B = tokens // N (at least 1), H = hidden // d (at least 1), as flash-attn's benchmark sizes them."""
        return cls(dtype, d, N, causal, B=max(1, tokens // N), H=max(1, hidden // d))

    @property
    def label(self) -> str:
        return f"{self.dtype} d={self.d} N={_k(self.N)} {'causal' if self.causal else 'full'}"

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.H, self.N, self.N, self.d, causal=self.causal, mode=mode)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def cases(dtypes, head_dims, seqlens, causals, tokens: int = TOKENS, hidden: int = HIDDEN) -> list[Case]:
    """Every combination, the HEADLINE ones first (so a run cut short by its budget still has them)."""
    every = [Case.sized(t, d, n, c, tokens, hidden) for t in dtypes for d in head_dims for n in seqlens
             for c in causals]
    return sorted(every, key=lambda c: (c.dtype, c.d, c.N) != HEADLINE)


Attention = Callable[[Tensor, Tensor, Tensor, bool], Tensor]
"""(q, k, v, causal) -> out, all (B, H, N, d)."""


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    from optimized.attention.triton.launch import triton_attention

    return triton_attention(q, k, v, is_causal=causal)


def _sdpa(backend_name: str) -> Attention:
    def run(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, d)

    return run


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    from flash_attn import flash_attn_func

    # flash-attn takes (B, N, H, d); the transposes are views, flash_attn_func makes them contiguous itself.
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


IMPLEMENTATIONS: dict[str, Attention] = {
    "triton": _triton,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "flash-attn": _flash_attn,
}


def missing_package(impl: str) -> str | None:
    """Why `impl` cannot run here (its package is not installed), or None."""
    import importlib.util

    package = {"triton": "triton", "flash-attn": "flash_attn"}.get(impl)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed"
    return None
