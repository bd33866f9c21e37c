"""`python -m conformance`: hold every optimized technique to its spec on this machine, measure the seed's claims.

    python -m conformance                       quick suite: CPU + 2 gloo ranks, or CUDA + NCCL on all visible GPUs
    python -m conformance --only attention,zero --full --out my-report --junitxml results.xml
    torchrun --nproc-per-node 8 -m conformance  one rank per GPU, launched by torchrun (also across nodes)
    python -m conformance plan --help           the parallel-strategy planner (tools/plan/)
    python -m conformance bench attention       attention TFLOP/s on one CUDA GPU (tools/bench/)
    python -m conformance gpu                   gpu tests, the suite and the bench on one CUDA GPU (tools/gpu.py)
    python -m conformance compare OLD/report.json NEW/report.json    what changed between two reports
    python -m conformance matrix --help         the suite under several machine settings (ISA, threads, ranks, ...)
    python -m conformance mutate                injected bugs in optimized/ that the checks must catch

The terminal shows one line per check and the seed's claims with their verdicts (-v: every row); the report folder
holds everything. Exit status: 0 when every equivalence holds, 1 when any fails or a check crashes, 2 for bad
arguments (one line naming the flag, before any check runs).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys

COMMANDS = {
    "plan": "tools.plan.cli",
    "compare": "conformance.compare",
    "bench": "tools.bench.cli",
    "gpu": "tools.gpu",
    "matrix": "conformance.matrix",
    "mutate": "conformance.mutate",
}
"""Subcommands: `python -m conformance NAME ...` imports the module only then and calls its `main(argv)`; without one,
the suite runs. plan, bench and gpu are tools (tools/), the others parts of the harness."""

EXTRA_HINT = "pip install 'pretrain-spec[conformance]'"


def _check_names(text: str) -> list[str]:
    """--only / --skip: comma-separated check names, each one that exists (else the closest names)."""
    from conformance import checks
    from conformance.flags import names

    chosen, known = names(text), checks.available()
    for name in chosen:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise argparse.ArgumentTypeError(f"unknown check {name!r}; {hint}available: {', '.join(known)}")
    return chosen


def add_size_flags(parser: argparse.ArgumentParser, *, quick: str, full: str) -> None:
    """--quick (the default) or --full, into args.quick: the suite's sizes, here and in every command that runs it."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=True, help=quick)
    size.add_argument("--full", dest="quick", action="store_false", help=full)


def _parser() -> argparse.ArgumentParser:
    from conformance import checks
    from conformance.flags import (
        MAX_CPU_RANKS,
        MAX_SECONDS,
        MAX_THREADS,
        Parser,
        positive_integer,
        seconds,
        world_size,
        writable_dir,
        writable_file,
    )

    parser = Parser(
        prog="python -m conformance",
        description="Run the conformance checks (each optimized technique vs its reference and peers, and the "
        "seed's claims measured) and write a report. Subcommands: plan (the parallel-strategy planner), compare "
        "(two reports).",
    )
    parser.add_argument("--only", type=_check_names, default=None, metavar="NAMES",
                        help="comma-separated checks to run (default: all). Available: "
                        + ", ".join(checks.available()))
    parser.add_argument("--skip", type=_check_names, default=None, metavar="NAMES",
                        help="comma-separated checks not to run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when a GPU is visible, else cpu (default: auto)")
    parser.add_argument("--world-size", type=world_size, default=None,
                        help="ranks for multi-rank checks (default: 2 on CPU, every visible GPU on CUDA, "
                        f"WORLD_SIZE under torchrun); at most {MAX_CPU_RANKS} on CPU, the visible GPUs on CUDA")
    add_size_flags(parser, quick="small sizes, a smoke run of every check (default)",
                   full="the full measurement sizes")
    parser.add_argument("--out", type=writable_dir, default=None,
                        help="report folder, created if needed (default: ./conformance-report)")
    parser.add_argument("--junitxml", type=writable_file, default=None, metavar="PATH",
                        help="also write JUnit XML to PATH: one testcase per row, a failure for each failing "
                        "equivalence, the measurements as properties (pytest's flag name)")
    parser.add_argument("--timeout", type=seconds, default=600.0,
                        help="seconds a multi-rank run may take before its ranks are killed (default: 600; at most "
                        f"{MAX_SECONDS:g}, a week)")
    parser.add_argument("--threads", type=positive_integer(MAX_THREADS), default=None,
                        help="intra-op threads of this process, torch.set_num_threads (default: torch's, "
                        "OMP_NUM_THREADS capped at the cores); spawned CPU ranks use one each")
    matmul = parser.add_mutually_exclusive_group()
    matmul.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default=None,
                        help="torch.set_float32_matmul_precision in this process (default: torch's, highest); on a "
                        "CPU with AMX, medium forms float32 matmuls from bfloat16 products. Ranks spawned on CPU "
                        "keep torch's default")
    matmul.add_argument("--tf32", choices=("on", "off"), default=None,
                        help="CUDA: torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 in "
                        "this process (default: torch's)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: every row of the report in the terminal; -vv: also debug logging (e.g. attention "
                        "dispatch)")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    import torch

    from conformance import checks
    from conformance.flags import MAX_CPU_RANKS, writable_dir
    from conformance.launch import under_torchrun

    parser = _parser()
    args = parser.parse_args(argv)
    skip = args.skip or []
    args.selected = [n for n in (args.only or checks.available()) if n not in skip]
    if not args.selected:
        parser.error("argument --skip: no check left to run after --only/--skip")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but no CUDA device is visible")
    args.device = torch.device("cuda" if args.device == "cuda" or
                               (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if args.world_size not in (None, env_world):
            parser.error(f"argument --world-size: {args.world_size} differs from torchrun's WORLD_SIZE={env_world}")
        args.world_size = env_world
    elif args.world_size is None:
        args.world_size = max(torch.cuda.device_count(), 1) if args.device.type == "cuda" else 2
    if args.device.type == "cpu" and not under_torchrun() and args.world_size > MAX_CPU_RANKS:
        parser.error(f"argument --world-size: {args.world_size} CPU ranks; at most {MAX_CPU_RANKS} gloo ranks run on "
                     "one machine")
    if args.device.type == "cuda" and not under_torchrun() and args.world_size > torch.cuda.device_count():
        parser.error(f"argument --world-size: {args.world_size} exceeds the {torch.cuda.device_count()} visible "
                     "GPUs")
    if args.out is None:
        try:
            args.out = writable_dir("conformance-report")
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument --out: {error}")
    return args


def _run_checks(args: argparse.Namespace, console, show: bool) -> list:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from conformance import checks

    ctx = checks.Context(device=args.device, world_size=args.world_size, quick=args.quick, out_dir=args.out,
                         timeout=args.timeout)
    results = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=not show, transient=True) as progress:
        task = progress.add_task("conformance", total=len(args.selected))
        for name in args.selected:
            progress.update(task, description=f"check {name}")
            results.extend(checks.run(name, ctx))  # a crashing check is one failing row; the others still run
            progress.advance(task)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    try:
        from rich.console import Console
    except ImportError as error:  # the main job's extras are missing: say which install brings them
        print(f"python -m conformance: error: {error.name} is not installed; {EXTRA_HINT}", file=sys.stderr)
        return 2
    args = _parse(argv)

    import torch
    import torch.distributed as dist

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.matmul_precision is not None:
        torch.set_float32_matmul_precision(args.matmul_precision)
    if args.tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"

    from conformance.launch import under_torchrun
    from conformance.report import environment, print_summary, print_table, write_junit, write_report

    logging.basicConfig(level=logging.DEBUG if args.verbose >= 2 else logging.WARNING)
    rank0 = not under_torchrun() or int(os.environ["RANK"]) == 0
    console = Console(quiet=not rank0, width=None if sys.stdout.isatty() else 160)
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    env = environment(args.device, args.world_size, backend)
    if rank0:
        console.print("[bold]pretrain-spec conformance[/bold]: " + ", ".join(
            f"{k} {env[k]}" for k in ("torch", "device", "device_name", "backend", "world_size", "deepspeed",
                                       "triton", "flash-attn") if env.get(k) is not None)
            + f"; {'quick' if args.quick else 'full'} sizes; {len(args.selected)} checks", highlight=False)
    results = _run_checks(args, console, show=rank0)
    failed = [r for r in results if r.failed]
    if rank0:
        if args.verbose:
            print_table(results, env, console)
        json_path, md_path = write_report(results, env, args.out)
        print_summary(results, console, verbose=bool(args.verbose))
        if args.junitxml is not None:
            write_junit(results, env, args.junitxml)
        console.print(f"[{'red' if failed else 'green'}]{len(results) - len(failed)} rows hold, {len(failed)} fail"
                      f"[/]; report: {md_path} (and {json_path.name}"
                      + (f"; JUnit XML: {args.junitxml}" if args.junitxml is not None else "") + ")", highlight=False)
    if under_torchrun() and dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
