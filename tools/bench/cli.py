"""`python -m conformance bench attention`: attention TFLOP/s on one CUDA GPU, ours against SDPA and flash-attn.

`run` measures every case within the time budget, then the memory ratio, writing bench.json as it goes;
`parse_args` checks every flag before any work (see the package docstring for what is measured and how).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from conformance.flags import Parser, output_dir, positive_integer, seconds
from tools.bench.cases import (
    CONVENTION,
    DTYPES,
    HEAD_DIMS,
    HIDDEN,
    IMPLS,
    QUICK_SEQLENS,
    SEQLENS,
    TOKENS,
    cases,
    peak_tflops,
)
from tools.bench.measure import CaseResult, measure_case, measure_memory, memory_case
from tools.bench.report import headline_ratios, plot, rate, render_table
from tools.cuda import args_for_cuda


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
            f"{impl} {mode} {rate(t.tflops)}" for impl, modes in results[-1].timings.items()
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


MAX_SEQLEN = 1 << 20
MAX_HEAD_DIM = 1024
MAX_TOKENS = 1 << 30
"""Bounds of --seqlen, --head-dim and --tokens / --hidden: past them a case cannot fit any GPU."""


def _bounded(kind: Callable[[str], int], high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        n = kind(text)
        if not 1 <= n <= high:
            raise ValueError(text)
        return n

    return parse


def _seqlen(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m conformance bench",
                    description="Benchmark attention implementations on one CUDA GPU.")
    parser.add_argument("target", choices=("attention",), help="what to benchmark")
    parser.add_argument("--dtype", type=_list(str, tuple(DTYPES), "--dtype"), default=tuple(DTYPES),
                        help="comma-separated: bf16, fp16 (default: both)")
    parser.add_argument("--head-dim", type=_list(_bounded(int, MAX_HEAD_DIM), None, "--head-dim"), default=HEAD_DIMS,
                        help=f"comma-separated head dims in [1, {MAX_HEAD_DIM}] (default: 64,128)")
    parser.add_argument("--seqlen", type=_list(_bounded(_seqlen, MAX_SEQLEN), None, "--seqlen"), default=None,
                        help=f"comma-separated sequence lengths, 4096 or 4k, at most {MAX_SEQLEN} (default: 1K..16K; "
                        "--quick: 1K,4K,8K)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="default: both")
    parser.add_argument("--impl", type=_list(str, IMPLS, "--impl"), default=IMPLS,
                        help=f"comma-separated implementations (default: all of {', '.join(IMPLS)})")
    parser.add_argument("--quick", action="store_true", help="N = 1K, 4K, 8K and fewer repetitions")
    parser.add_argument("--tokens", type=positive_integer(MAX_TOKENS), default=TOKENS,
                        help=f"B·N per case (default: {TOKENS})")
    parser.add_argument("--hidden", type=positive_integer(MAX_TOKENS), default=HIDDEN,
                        help=f"H·d per case (default: {HIDDEN})")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the naive / flash peak-memory ratio at N=4K")
    parser.add_argument("--budget", type=seconds, default=math.inf,
                        help="seconds after which no new case starts; the first always runs (default: no limit; at "
                        "most a week)")
    parser.add_argument("--out", type=output_dir, default=Path("bench-report"), help="default: ./bench-report")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, each checked by its type; a bad one exits 2 with one line naming it (SystemExit)."""
    args = _parser().parse_args(argv)
    if args.seqlen is None:
        args.seqlen = QUICK_SEQLENS if args.quick else SEQLENS
    args.causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    args.warmup, args.reps = (2, 7) if args.quick else (3, 10)
    return args


def main(argv: list[str]) -> int:
    args = args_for_cuda(parse_args, argv, "bench attention")
    if isinstance(args, int):
        return args
    run(args, torch.device("cuda"))
    return 0
