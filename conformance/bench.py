"""`python -m conformance bench attention`: attention TFLOP/s on one CUDA GPU, ours against SDPA and flash-attn.

    python -m conformance bench attention                       bf16/fp16, d = 64/128, N = 1K..16K, causal and not
    python -m conformance bench attention --quick               N = 1K, 4K, 8K, fewer repetitions
    python -m conformance bench attention --dtype bf16 --head-dim 128 --seqlen 8192 --causal yes --out bench

Implementations: our Triton kernels (optimized.attention.triton), torch SDPA forced onto each of its flash,
memory-efficient and cuDNN backends (torch.nn.attention.sdpa_kernel), and flash-attn's `flash_attn_func` where
installed. One that refuses a case is reported "n/a" with its reason, never a crash.

Shapes follow flash-attn's benchmarks/benchmark_flash_attention.py: B·N = 16K tokens and H = 2048 / d, so every
case does about the same work per token. FLOPs are counted as FA2 (Dao 2023, arXiv 2307.08691) and that script
count them: forward 4·B·H·N·M·d (half when causal), backward 2.5x the forward, forward + backward 3.5x. TFLOP/s
is that count over the median time of repeated calls after warm-up (CUDA events), and "% peak" its share of the
GPU's dense bf16/fp16 tensor-core peak (DENSE_PEAK_TFLOPS; omitted for a GPU not in the table).

Also measured: the peak memory of naive attention (reference.attention.attention) over a flash implementation's,
forward + backward at N = 4K (torch.cuda.max_memory_allocated, reset between): the FlashAttention paper's "20x at
4K" (arXiv 2205.14135, Fig. 3). Writes a table to stdout, bench.json (rewritten after every case, so a run cut
short keeps what it measured) and bench.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from conformance.measure import cuda_peak_bytes, peak_live_bytes, time_fn

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


# ---------------------------------------------------------------------------------------------------------------
# Cases and implementations


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


def _missing(impl: str) -> str | None:
    import importlib.util

    package = {"triton": "triton", "flash-attn": "flash_attn"}.get(impl)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Timing:
    """One (case, implementation, mode): its time and rate, or why it has none."""

    ms: float | None = None
    tflops: float | None = None
    pct_peak: float | None = None
    na: str | None = None
    """Why there is no number: the implementation refused the case, or failed on it."""


@dataclass
class CaseResult:
    case: Case
    timings: dict[str, dict[str, Timing]] = field(default_factory=dict)
    """{implementation: {mode: Timing}}"""

    def to_dict(self) -> dict:
        return {**asdict(self.case), "label": self.case.label,
                "timings": {i: {m: asdict(t) for m, t in modes.items()} for i, modes in self.timings.items()}}


def _reason(error: BaseException, caught: list) -> str:
    """One line: what the implementation said (its warnings first: SDPA explains a refusal there), then the error."""
    lines = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    text = str(error).strip().splitlines()
    lines.append(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "))
    unique = list(dict.fromkeys(lines))
    return "; ".join(unique)[:300]


def _inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, d_out = (torch.randn(case.B, case.H, case.N, case.d, generator=gen, device=device,
                                  dtype=DTYPES[case.dtype]) for _ in range(4))  # (B, H, N, d) each
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), d_out


def _step(fn: Attention, mode: str, q: Tensor, k: Tensor, v: Tensor, d_out: Tensor, causal: bool) -> Callable:
    if mode == "fwd":
        return lambda: fn(q, k, v, causal)
    return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), d_out)  # no .grad accumulation to time


def measure_case(case: Case, impls: tuple[str, ...], device: torch.device, *, modes: tuple[str, ...] = MODES,
                 warmup: int = 3, reps: int = 10, peak: float | None = None) -> CaseResult:
    """Time each implementation on `case` in each mode on `device` (CUDA events on CUDA, wall clock elsewhere)."""
    result = CaseResult(case)
    q, k, v, d_out = _inputs(case, device)
    for impl in impls:
        result.timings[impl] = {}
        missing = _missing(impl)
        for mode in modes:
            if missing is not None:
                result.timings[impl][mode] = Timing(na=missing)
                continue
            step = _step(IMPLEMENTATIONS[impl], mode, q, k, v, d_out, case.causal)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    seconds = time_fn(step, warmup=warmup, reps=reps, device=device).median_s
                except Exception as error:  # noqa: BLE001 - a refusal or a failure is a row, never a crash
                    result.timings[impl][mode] = Timing(na=_reason(error, caught))
                    continue
            tflops = case.flops(mode) / seconds / 1e12
            result.timings[impl][mode] = Timing(ms=seconds * 1e3, tflops=tflops,
                                                pct_peak=100 * tflops / peak if peak else None)
    return result


@dataclass
class MemoryResult:
    """Peak bytes of naive attention and of each flash implementation, forward + backward of fresh inputs."""

    case: Case
    naive_bytes: int | None
    flash_bytes: dict[str, int | str]
    """{implementation: peak bytes, or the reason it has none}"""

    @property
    def ratios(self) -> dict[str, float]:
        return {impl: self.naive_bytes / b for impl, b in self.flash_bytes.items()
                if isinstance(b, int) and b > 0 and self.naive_bytes}

    def to_dict(self) -> dict:
        return {**asdict(self.case), "label": self.case.label, "naive_bytes": self.naive_bytes,
                "flash_bytes": self.flash_bytes, "ratios": self.ratios}


def memory_case(device: torch.device, N: int = MEMORY_N) -> Case:
    """The attention check's CUDA workload (B=1, H=8, d=64, fp16, causal), so the two reports agree."""
    return Case("fp16", 64, N, True, B=1, H=8)


def measure_memory(case: Case, impls: tuple[str, ...], device: torch.device) -> MemoryResult:
    """Peak memory of forward + backward, naive (reference.attention.attention) and each of `impls`:
    torch.cuda.max_memory_allocated on CUDA (reset between), the peak of live storages elsewhere."""
    from reference.attention import attention

    q0, k0, v0, _ = _inputs(case, device)
    q0, k0, v0 = (t.detach() for t in (q0, k0, v0))

    def fwd_bwd(fn: Attention) -> None:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))  # fresh leaves: they count in the footprint
        out = fn(q, k, v, case.causal)  # (B, H, N, d)
        out.backward(torch.ones_like(out))

    def peak(fn: Attention) -> int | str:
        if _missing_for(fn) is not None:
            return _missing_for(fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                measure = cuda_peak_bytes if device.type == "cuda" else peak_live_bytes
                return measure(fwd_bwd, fn)[1]
            except Exception as error:  # noqa: BLE001 - reported, never a crash
                return _reason(error, caught)

    naive = peak(lambda q, k, v, causal: attention(q, k, v, is_causal=causal))
    return MemoryResult(case, naive if isinstance(naive, int) else None,
                        {impl: peak(IMPLEMENTATIONS[impl]) for impl in impls})


def _missing_for(fn: Attention) -> str | None:
    names = [name for name, f in IMPLEMENTATIONS.items() if f is fn]
    return _missing(names[0]) if names else None


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _cell(t: Timing | None, notes: list[str]) -> str:
    if t is None:
        return "-"
    if t.na is not None:
        if t.na not in notes:
            notes.append(t.na)
        return f"n/a [{notes.index(t.na) + 1}]"
    pct = f" ({t.pct_peak:.0f}%)" if t.pct_peak is not None else ""
    return f"{_rate(t.tflops)}{pct}"


def _rate(tflops: float) -> str:
    return f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}"


def render_table(results: list[CaseResult], impls: tuple[str, ...], modes: tuple[str, ...] = MODES,
                 memory: MemoryResult | None = None, device_name: str = "", peak: float | None = None) -> str:
    """The bench as plain text: one line per case and mode, TFLOP/s (and % of the dense peak) per implementation,
    then the notes (why an implementation has no number) and the memory ratio."""
    notes: list[str] = []
    header = ["case", "mode", *impls]
    rows = [[r.case.label, mode, *(_cell(r.timings.get(i, {}).get(mode), notes) for i in impls)]
            for r in results for mode in modes]
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    peak_text = f", dense peak {peak:g} TFLOP/s" if peak else ", peak unknown for this GPU (no %)"
    lines = [f"attention TFLOP/s on {device_name or 'this device'}{peak_text}", CONVENTION,
             fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in rows)]
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    if memory is not None:
        lines.append(render_memory(memory))
    return "\n".join(lines)


def render_memory(memory: MemoryResult) -> str:
    c = memory.case
    if memory.naive_bytes is None:
        return f"memory at {c.label}: naive attention could not run"
    parts = [f"{impl} {memory.naive_bytes / b:.1f}x" if isinstance(b, int) and b > 0 else f"{impl} n/a ({str(b)[:80]})"
             for impl, b in memory.flash_bytes.items()]
    return (f"peak memory naive / flash, forward + backward, {c.label} B={c.B} H={c.H} "
            f"(naive {memory.naive_bytes / 2**20:.0f} MiB): " + ", ".join(parts) + " (paper: 20x at 4K)")


def headline_ratios(results: list[dict]) -> dict[str, float | None]:
    """ours (triton) / sdpa-flash in TFLOP/s, at HEADLINE causal and not, fwd and fwd_bwd; from bench.json cases."""
    dtype, d, n = HEADLINE
    out: dict[str, float | None] = {}
    for causal in (True, False):
        for mode in MODES:
            key = f"{'causal' if causal else 'full'} {mode}"
            out[key] = None
            for r in results:
                if (r["dtype"], r["d"], r["N"], r["causal"]) == (dtype, d, n, causal):
                    ours = r["timings"].get("triton", {}).get(mode, {}).get("tflops")
                    peer = r["timings"].get("sdpa-flash", {}).get(mode, {}).get("tflops")
                    out[key] = ours / peer if ours and peer else None
    return out


def plot(results: list[CaseResult], impls: tuple[str, ...], path: Path, title: str) -> None:
    """TFLOP/s vs N: one panel per (dtype, d, causal) and mode, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.case.dtype, r.case.d, r.case.causal) for r in results})
    if not groups:
        return
    fig, axes = plt.subplots(len(MODES), len(groups), figsize=(3.4 * len(groups), 6.4), squeeze=False)
    for col, (dtype, d, causal) in enumerate(groups):
        chosen = sorted((r for r in results if (r.case.dtype, r.case.d, r.case.causal) == (dtype, d, causal)),
                        key=lambda r: r.case.N)
        for row, mode in enumerate(MODES):
            ax = axes[row][col]
            for impl, marker in zip(impls, "osD^v", strict=False):
                points = [(r.case.N, r.timings[impl][mode].tflops) for r in chosen
                          if impl in r.timings and mode in r.timings[impl] and r.timings[impl][mode].tflops]
                if points:
                    ax.plot(*zip(*points, strict=True), marker=marker, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dtype} d={d} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The run


def environment(device: torch.device) -> dict:
    import platform

    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run(args: argparse.Namespace, device: torch.device, out=None) -> dict:
    """The bench on `device`: every case within args.budget seconds, then the memory ratio; writes bench.json after
    each case and bench.png at the end into args.out; prints to `out` (default: stdout). Returns the JSON payload."""
    out = out or sys.stdout
    env = environment(device)
    name = env.get("device_name", str(device))
    peak = peak_tflops(name) if device.type == "cuda" else None
    todo = cases(args.dtype, args.head_dim, args.seqlen, args.causal, args.tokens, args.hidden)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "bench.json"
    payload: dict = {"environment": env, "peak_tflops": peak, "convention": CONVENTION,
                     "warmup": args.warmup, "reps": args.reps, "cases": [], "skipped": [], "memory": None}
    results: list[CaseResult] = []
    start = time.monotonic()
    for i, case in enumerate(todo):
        if i > 0 and time.monotonic() - start > args.budget:  # the first (headline) case always runs
            payload["skipped"] = [c.label for c in todo[i:]]
            print(f"time budget of {args.budget:g} s spent: {len(todo) - i} case(s) skipped", file=out)
            break
        results.append(measure_case(case, args.impl, device, warmup=args.warmup, reps=args.reps, peak=peak))
        payload["cases"].append(results[-1].to_dict())
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"  {case.label}: " + ", ".join(
            f"{impl} {mode} {_rate(t.tflops)}" for impl, modes in results[-1].timings.items()
            for mode, t in modes.items() if t.tflops is not None), file=out, flush=True)
    memory = None
    if args.memory:
        memory = measure_memory(memory_case(device), args.impl, device)
        payload["memory"] = memory.to_dict()
    payload["headline"] = headline_ratios(payload["cases"])
    payload["seconds"] = time.monotonic() - start
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(render_table(results, args.impl, memory=memory, device_name=name, peak=peak), file=out)
    plot(results, args.impl, args.out / "bench.png", f"attention TFLOP/s on {name} (torch {env['torch']}, "
         f"triton {env['triton']})")
    print(f"wrote {json_path} and {args.out / 'bench.png'}", file=out)
    return payload


def _list(kind: Callable, allowed: tuple | None, flag: str):
    def parse(text: str) -> tuple:
        values = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            try:
                value = kind(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag}: {part!r} is not a valid value") from None
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(f"{flag}: {part!r} is not one of {', '.join(map(str, allowed))}")
            values.append(value)
        if not values:
            raise argparse.ArgumentTypeError(f"{flag}: give at least one value")
        return tuple(values)

    return parse


def _seqlen(text: str) -> int:
    n = int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)
    if n < 1:
        raise ValueError(text)
    return n


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m conformance bench",
                                     description="Benchmark attention implementations on one CUDA GPU.")
    parser.add_argument("target", choices=("attention",), help="what to benchmark")
    parser.add_argument("--dtype", type=_list(str, tuple(DTYPES), "--dtype"), default=tuple(DTYPES),
                        help="comma-separated: bf16, fp16 (default: both)")
    parser.add_argument("--head-dim", type=_list(int, None, "--head-dim"), default=HEAD_DIMS,
                        help="comma-separated head dims (default: 64,128)")
    parser.add_argument("--seqlen", type=_list(_seqlen, None, "--seqlen"), default=None,
                        help="comma-separated sequence lengths, 4096 or 4k (default: 1K..16K; --quick: 1K,4K,8K)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="default: both")
    parser.add_argument("--impl", type=_list(str, IMPLS, "--impl"), default=IMPLS,
                        help=f"comma-separated implementations (default: all of {', '.join(IMPLS)})")
    parser.add_argument("--quick", action="store_true", help="N = 1K, 4K, 8K and fewer repetitions")
    parser.add_argument("--tokens", type=int, default=TOKENS, help=f"B·N per case (default: {TOKENS})")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"H·d per case (default: {HIDDEN})")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the naive / flash peak-memory ratio at N=4K")
    parser.add_argument("--budget", type=float, default=math.inf,
                        help="seconds after which no new case starts; the first always runs (default: no limit)")
    parser.add_argument("--out", type=Path, default=Path("bench-report"), help="default: ./bench-report")
    args = parser.parse_args(argv)
    if args.seqlen is None:
        args.seqlen = QUICK_SEQLENS if args.quick else SEQLENS
    for flag, value in (("--tokens", args.tokens), ("--hidden", args.hidden)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    args.causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    args.warmup, args.reps = (2, 7) if args.quick else (3, 10)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench attention needs a CUDA device", file=sys.stderr)
        return 2
    run(args, torch.device("cuda"))
    return 0
