"""The tiles each kernel runs at, per architecture, dtype and head dim: the one place to tune the kernels.

Pure Python (no Triton needed), so the table can be read, tested and planned with anywhere; the launcher
(`launch.py`) asks `config` and the ahead-of-time build (triton_build.py) compiles every entry it can return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiles:
    """One kernel's tile shape and launch options."""

    block_m: int
    """Query rows per tile."""
    block_n: int
    """Key rows per tile."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining depth of the inner loop (shared-memory buffers per streamed tile)."""
    max_registers: int | None = None
    """Registers per thread ptxas may use (Triton's `maxnreg`); None: ptxas chooses, and its occupancy heuristic
    may cap a kernel at 128 or 168 registers and spill a few bytes to get there."""


@dataclass(frozen=True)
class Config:
    """The tiles of the four kernels for one (architecture, dtype, padded head dim)."""

    block_d: int
    """The head dim padded to a power of two >= 16 (tl.dot's minimum)."""
    fwd: Tiles
    preprocess: Tiles
    dkdv: Tiles
    dq: Tiles


_T = Tiles
_HALF_TILES: dict[tuple[str, int], tuple[Tiles, Tiles, Tiles]] = {
    # (architecture, BLOCK_D): forward, dK/dV, dQ tiles for float16 / bfloat16. Hopper takes larger query tiles
    # (wgmma works per 4-warp group on 64-row slices). dK/dV keeps two fp32 accumulators and K_j, V_j live, so it
    # streams the thinnest query tiles; on an H200 (bf16, d=128, N=8K) 16x64 with 4 warps ran its backward in
    # 9.4 ms against 15.8 ms for 32x64 with 8 warps.
    ("hopper", 16): (_T(128, 64, 8, 3), _T(32, 64, 4, 3), _T(128, 32, 8, 3)),
    ("hopper", 32): (_T(128, 64, 8, 3), _T(32, 64, 4, 3), _T(128, 32, 8, 3)),
    ("hopper", 64): (_T(128, 64, 8, 3), _T(16, 64, 4, 3), _T(128, 32, 8, 3)),
    ("hopper", 128): (_T(128, 64, 8, 3), _T(16, 64, 8, 2), _T(128, 32, 8, 3)),
    ("hopper", 256): (_T(64, 32, 8, 3), _T(32, 32, 8, 2), _T(64, 32, 8, 2)),
    ("ampere", 16): (_T(128, 64, 8, 3), _T(16, 64, 4, 3, 255), _T(64, 32, 4, 3)),
    ("ampere", 32): (_T(128, 32, 8, 3), _T(16, 64, 4, 3, 255), _T(64, 32, 4, 3)),
    ("ampere", 64): (_T(128, 64, 8, 3), _T(16, 32, 4, 2, 255), _T(64, 32, 4, 3)),
    ("ampere", 128): (_T(64, 32, 4, 3), _T(32, 64, 8, 3), _T(64, 32, 4, 3)),
    ("ampere", 256): (_T(64, 32, 8, 3), _T(32, 32, 8, 2), _T(64, 32, 8, 2)),
}
"""Per-architecture tiles, each checked ahead of time (triton_build.py) with Triton 3.6 and 3.9 for every
mask variant: no register spills on sm_80 / sm_90, shared memory within the chip. Spilling tiles that were replaced:
Hopper dK/dV at d=128 16x64 with 4 warps, 3 stages (timed fastest on an H200: 9.4 ms against 15.8 ms for 32x64 with
8 warps, bf16, N=8K) spills 8-32 B under Triton 3.6; Hopper dK/dV at d=64 32x64 48 B under 3.6; Ampere dK/dV at d=64
32x32 and forward at d=32 128x64 8 B under 3.9 with a window, softcap and padding. Ampere dK/dV at d <= 64 runs with
a register budget of 255: left to its heuristic, ptxas capped the packed-documents variants at 128 or 168 registers
and spilled 8-16 B (Triton 3.6 and 3.9); with the budget they take 152-234 and spill nothing."""



def padded_head_dim(d: int) -> int:
    """The head dim the kernels run at: d rounded up to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())  # triton.next_power_of_2, for d >= 1


def config(d: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> Config:
    """The tiles the launcher uses for head dim `d` and `dtype` on a GPU of compute `capability` (None: the
    interpreter). Half precision: the per-architecture table `_HALF_TILES` (compute capability 9 and above take
    Hopper's tiles). float32 (IEEE dot products on CUDA cores, the accurate path): small tiles that fit any chip."""
    block_d = padded_head_dim(d)
    if capability is None:  # the interpreter runs every program in Python: small tiles, but >= 16 for tl.dot
        t = Tiles(16, 16, 1, 1)
        return Config(block_d, t, t, t, t)
    preprocess = Tiles(64, 1, 4, 1)  # one pass over O and dO: no dot products, no loop to pipeline
    if dtype != torch.float32:
        fwd, dkdv, dq = _HALF_TILES["hopper" if capability >= (9, 0) else "ampere", block_d]
        return Config(block_d, fwd, preprocess, dkdv, dq)
    wide = block_d * 4  # bytes of one float32 row of a tile
    if wide <= 128:
        t = Tiles(64, 64, 4, 2)
    elif wide <= 256:
        t = Tiles(64, 32, 4, 2)
    elif wide <= 512:
        t = Tiles(32, 32, 4, 1)
    else:
        t = Tiles(32, 16, 8, 1)
    return Config(block_d, t, preprocess, t, t)
