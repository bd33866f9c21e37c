"""The Triton attention kernels built ahead of time for Ampere (sm_80) and Hopper (sm_90), on any machine.

Triton ships `ptxas` and `cuobjdump`, so `triton.compile(ASTSource(kernel, signature, constexprs, attrs),
target=GPUTarget("cuda", 90, 32))` turns a kernel into the same cubin a GPU would load, without one. Each build here
is one launch of `optimized.attention.triton` as the launcher makes it (`launches`: the tiles `config` picks for the
architecture, dtype and head dim, the argument types and the integer specialisations Triton's JIT would derive from
the real arguments), compiled with the installed Triton; `cuobjdump -res-usage` reads the cubin's registers per
thread, stack frame and local memory, the compiled kernel's metadata its shared memory, and its PTX whether the dot
products run on tensor cores (`wgmma` on sm_90, `mma.sync` on sm_80 and as Hopper's fallback).

A build fails on a compile error, on shared memory above the chip's per-block limit, or, at float16 / bfloat16, on
any stack frame or local memory (registers spilled: the kernel then runs far below its roofline). float32 builds
(IEEE dot products, no tensor cores) may spill: they are the accurate path, not the fast one.

What changes the generated code, and so what is built: the kernel, the architecture, the dtype, the padded head dim
BLOCK_D (16 ... 256), and five flags: causal (the right edge), a key padding mask, a sliding window's left edge,
softcap, packed documents (varlen: cu_seqlens read per program; never with a key padding mask). Nothing else does:
the sizes (H, N, M, the GQA group, the causal offset) are never specialised by the kernels, and `triton_attention`
and `triton_attention_varlen` hand them every tensor in one layout (head dim zero-padded to BLOCK_D, strides multiples
of 16 elements, 16-byte aligned, cu_seqlens contiguous and 16-byte aligned; see
`optimized.attention.triton.launch.aligned`), so the lengths, documents, GQA and odd head dims run the builds made here.
(Not covered:
a tensor with more than 2^31 elements in one batch row, whose stride Triton passes as a 64-bit integer.)

The builds run in worker processes (compiling is CPU-bound, and a worker can import the kernels with Triton's
interpreter off even when the caller has it on); Triton's cache (~/.triton/cache) makes a repeated build nearly free.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ARCHS = (80, 90)
"""Compute capabilities built for: A100 (sm_80) and H100 / H200 (sm_90)."""
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
"""Bytes of shared memory one block may use (the opt-in maximum: A100 163 KB, H100 227 KB)."""
DTYPES = ("float16", "bfloat16", "float32")
HALF = ("float16", "bfloat16")
BLOCK_DS = (16, 32, 64, 128, 256)
"""The padded head dims the launcher can pick (head dims 1 ... 256)."""
KERNELS = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
_SPECIMEN_LENGTH = 1024
"""Query and key length of the problems built (the sizes are not specialised; see the module docstring)."""


@dataclass(frozen=True)
class Spec:
    """One build: a kernel of one launch, for one architecture."""

    kernel: str
    """One of KERNELS."""
    arch: int
    """Compute capability as an integer (80, 90)."""
    dtype: str
    """One of DTYPES."""
    block_d: int
    """Padded head dim, one of BLOCK_DS."""
    causal: bool
    pad: bool
    """A key padding mask is passed."""
    window: bool = False
    """A sliding window's left edge (HAS_WINDOW)."""
    softcap: bool = False
    """Scores soft-capped (SOFTCAP)."""
    varlen: bool = False
    """Packed documents (VARLEN), flash-attn's varlen layout."""

    @property
    def masks(self) -> str:
        on = [n for n, f in (("causal", self.causal), ("pad", self.pad), ("window", self.window),
                             ("softcap", self.softcap), ("varlen", self.varlen)) if f]
        return ",".join(on) or "-"

    def __str__(self) -> str:
        return f"sm_{self.arch} {self.dtype} d={self.block_d} {self.kernel} {self.masks}"


@dataclass(frozen=True)
class Build:
    """What the compiler made of one Spec."""

    spec: Spec
    tiles: str = ""
    """BLOCK_M x BLOCK_N, warps and pipeline stages the launcher picked."""
    registers: int = 0
    """Registers per thread."""
    stack: int = 0
    """Stack frame bytes per thread (non-zero: registers spilled)."""
    local: int = 0
    """Local memory bytes per thread."""
    shared: int = 0
    """Shared memory bytes per block."""
    mma: str = "none"
    """Tensor-core instructions in the PTX: "wgmma", "mma" (mma.sync) or "none"."""
    seconds: float = 0.0
    """Compile time (near 0 when Triton's cache had it)."""
    error: str | None = None
    """The compile error, if the build failed."""
    problems: tuple[str, ...] = field(default=())
    """Why this build fails the check (empty: it passes)."""


def specs(*, full: bool = True, archs: tuple[int, ...] = ARCHS, dtypes: tuple[str, ...] = DTYPES,
          block_ds: tuple[int, ...] = BLOCK_DS) -> list[Spec]:
    """The builds to check. full: every variant (each of the five flags on or off, but never a key padding mask
    with packed documents); otherwise each kernel, architecture, dtype and head dim once in each layout with every
    mask it takes on (the most live values): padded (causal, pad, window, softcap) and packed (causal, window,
    softcap, varlen)."""
    for name, values, allowed in (("archs", archs, ARCHS), ("dtypes", dtypes, DTYPES),
                                  ("block_ds", block_ds, BLOCK_DS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values!r}")
    if full:
        flags = [f for f in itertools.product((False, True), repeat=5) if not (f[1] and f[4])]  # pad, varlen
    else:
        flags = [(True, True, True, True, False), (True, False, True, True, True)]
    out = []
    for arch, dtype, block_d in itertools.product(archs, dtypes, block_ds):
        out.append(Spec("_bwd_preprocess", arch, dtype, block_d, False, False))
        for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
            out += [Spec(kernel, arch, dtype, block_d, *f) for f in flags]
    return out


def quick_specs() -> list[Spec]:
    """The CI subset: every kernel, architecture and padded head dim in bfloat16 with every mask on in each layout
    (the most live values), plus float16 and float32 at d=128 (98 builds; the test suite and the quick report row
    share them, so the second finds them in Triton's cache)."""
    return (specs(full=False, dtypes=("bfloat16",))
            + specs(full=False, dtypes=("float16", "float32"), block_ds=(128,)))


def build_all(todo: list[Spec], *, workers: int | None = None) -> list[Build]:
    """Build every Spec in worker processes (default: one per CPU), in order."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 or None (one per CPU), got {workers}")
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
    with ProcessPoolExecutor(min(workers, max(1, len(todo))), mp_context=ctx, initializer=_worker_init) as pool:
        return [judge(b) for b in pool.map(build, todo)]


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # triton.jit reads it when the kernels module is first imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default


def build(spec: Spec) -> Build:
    """Compile one Spec with the installed Triton and read what it uses (`judge` says whether it passes). Needs
    Triton's interpreter off."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from optimized.attention._inputs import Documents, Problem
    from optimized.attention.triton import launch as kernels

    if kernels.interpreted():
        raise RuntimeError("the Triton kernels were imported with TRITON_INTERPRET=1: they cannot be compiled here")
    n = _SPECIMEN_LENGTH
    problem = Problem(B=2, H=4, Hkv=2, N=n, M=n, d=spec.block_d, scale=spec.block_d**-0.5,
                      causal_offset=0 if spec.causal else None, left_offset=-256 if spec.window else None,
                      softcap=30.0 if spec.softcap else 0.0)
    if spec.varlen:  # two documents packed into one row
        cu = (0, n // 4, n)
        problem = dataclasses.replace(problem, B=1, causal_offset=None, left_offset=None, documents=Documents(
            cu, cu, left=256 if spec.window else -1, right=0 if spec.causal else -1))
    capability = divmod(spec.arch, 10)
    launch = next(x for x in kernels.launches(problem, getattr(torch, spec.dtype), spec.pad, capability)
                  if x.kernel.__name__ == spec.kernel)
    meta = launch.meta
    tiles = f"{meta.get('BLOCK_M', '-')}x{meta.get('BLOCK_N', '-')} w{meta['num_warps']} s{meta['num_stages']}" + (
        f" r{meta['maxnreg']}" if "maxnreg" in meta else "")
    fn = launch.kernel
    target = GPUTarget("cuda", spec.arch, 32)
    backend = make_backend(target)
    # The JIT's own binder: the same signature, constexprs and divisibility attributes a launch would compile with.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - a compile error is a result to report, whatever its type
        first = str(e).strip().splitlines()
        return Build(spec, tiles, error=f"{type(e).__name__}: {first[0] if first else ''}"[:300])
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"], os.path.dirname(triton.__file__))
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return Build(spec, tiles, usage["REG"], usage["STACK"], usage["LOCAL"], compiled.metadata.shared, mma, seconds)


def _resource_usage(cubin: bytes, triton_dir: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one kernel, from `cuobjdump -res-usage` (shipped with Triton)."""
    tool = os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "REG" not in usage or "STACK" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line: {text!r}")
    return usage


def judge(b: Build) -> Build:
    """`b` with its `problems` filled in by the rules of this module (in the caller's process, with its limits)."""
    return dataclasses.replace(b, problems=_problems(b))


def _problems(b: Build) -> tuple[str, ...]:
    if b.error is not None:
        return ("compile error",)
    out = []
    limit = SHARED_LIMIT[b.spec.arch]
    if b.shared > limit:
        out.append(f"shared memory {b.shared} B > sm_{b.spec.arch}'s {limit} B")
    if b.spec.dtype in HALF and (b.stack or b.local):
        out.append(f"spills: {b.stack} B stack, {b.local} B local")
    return tuple(out)


def failures(builds: list[Build]) -> list[str]:
    """One line per failing build, saying why."""
    return [f"{b.spec}: {'; '.join(b.problems)}" + (f" ({b.error})" if b.error else "") for b in builds if b.problems]


def table(builds: list[Build]) -> str:
    """The builds as a fixed-width table, one row per build."""
    head = f"{'arch':6} {'dtype':8} {'d':>3} {'kernel':16} {'masks':26} {'tiles':16} {'reg':>4} {'stack':>5} " \
           f"{'smem':>7} {'mma':5} {'s':>5}  problems"
    rows = [head]
    for b in builds:
        s = b.spec
        name = s.kernel.removeprefix("_").removesuffix("_kernel")
        rows.append(f"sm_{s.arch:<3} {s.dtype:8} {s.block_d:3d} {name:16} {s.masks:26} {b.tiles:16} {b.registers:4d} "
                    f"{b.stack:5d} {b.shared:7d} {b.mma:5} {b.seconds:5.1f}  {'; '.join(b.problems)}")
    return "\n".join(rows)


def summary(builds: list[Build]) -> dict[str, float]:
    """The numbers a report row shows: counts, the worst registers / stack / shared memory per architecture."""
    out: dict[str, float] = {"builds": len(builds), "failing builds": sum(bool(b.problems) for b in builds)}
    for arch in sorted({b.spec.arch for b in builds}):
        mine = [b for b in builds if b.spec.arch == arch and not b.error]
        half = [b for b in mine if b.spec.dtype in HALF]
        out[f"sm_{arch} max registers"] = max((b.registers for b in mine), default=0)
        out[f"sm_{arch} max shared memory (bytes)"] = max((b.shared for b in mine), default=0)
        out[f"sm_{arch} half-precision builds with a stack frame"] = sum(bool(b.stack or b.local) for b in half)
        out[f"sm_{arch} half-precision dot kernels on tensor cores"] = sum(
            b.mma != "none" for b in half if b.spec.kernel != "_bwd_preprocess")
        out[f"sm_{arch} half-precision dot kernels"] = sum(b.spec.kernel != "_bwd_preprocess" for b in half)
    return out


def report_row(spec, ctx, *, workers: int | None = None):
    """One row of a check (`spec`, a conformance.checks.CheckSpec): build every variant (`specs()`) or, when
    ctx.quick, `quick_specs()`; write the table to ctx.out_dir/triton_build.txt; the row's `error` lists the failing
    builds (None when all pass). The builds run on the CPU whatever ctx.device is."""
    import triton

    from conformance.result import Metric

    start = time.perf_counter()
    builds = build_all(quick_specs() if ctx.quick else specs(), workers=workers)
    seconds = time.perf_counter() - start
    bad = failures(builds)
    os.makedirs(ctx.out_dir, exist_ok=True)
    with open(os.path.join(ctx.out_dir, "triton_build.txt"), "w") as f:
        f.write(table(builds) + "\n")
    scope = ("bf16 at every head dim, fp16 / fp32 at d=128, every mask on, padded and packed" if ctx.quick
             else "every variant")
    metrics = [Metric(name, value, "bytes" if "bytes" in name else "count") for name, value in summary(builds).items()]
    metrics.append(Metric("build time, wall clock", seconds, "s"))
    return spec.row(
        ctx, f"Triton kernels built ahead of time for {', '.join(f'sm_{a}' for a in ARCHS)}",
        optimized="optimized.attention.triton (its kernels at the tiles config() picks)", device="cpu",
        metrics=metrics, error=("builds failing: " + " | ".join(bad)) if bad else None,
        notes=f"triton {triton.__version__}; {len(builds)} builds ({scope}) in {seconds:.0f} s on {os.cpu_count()} "
              "CPUs; fails on a compile error, shared memory over the chip's limit or a stack frame at fp16 / bf16; "
              "table in triton_build.txt",
    )
