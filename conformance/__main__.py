"""`python -m conformance`: hold every optimized technique to its spec on this machine, measure the seed's claims.

    python -m conformance                       quick suite: CPU + 2 gloo ranks, or CUDA + NCCL on all visible GPUs
    python -m conformance --only attention,zero --full --out my-report
    torchrun --nproc-per-node 8 -m conformance  one rank per GPU, launched by torchrun
    python -m conformance plan --help           the parallel-strategy planner (plan must come first)

Exit status: 0 when every equivalence holds, 1 when any fails or a check crashes, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from conformance import checks
from conformance.launch import under_torchrun
from conformance.report import environment, print_table, write_report
from conformance.result import Result


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Run the conformance checks (each optimized technique vs its reference and peers, and the "
        "seed's claims measured) and write a report.",
    )
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="comma-separated checks to run (default: all). Available: "
                        + ", ".join(checks.available()))
    parser.add_argument("--skip", default=None, metavar="NAMES", help="comma-separated checks not to run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when a GPU is visible, else cpu (default: auto)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks for multi-rank checks (default: 2 on CPU, every visible GPU on CUDA, "
                        "WORLD_SIZE under torchrun)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="small sizes, a smoke run of every check (default)")
    size.add_argument("--full", dest="quick", action="store_false", help="the full measurement sizes")
    parser.add_argument("--out", type=Path, default=Path("conformance-report"),
                        help="report folder (default: ./conformance-report)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a multi-rank run may take before its ranks are killed (default: 600)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (e.g. attention dispatch)")
    args = parser.parse_args(argv)

    names = checks.available()

    def _names(text: str | None, flag: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()] if text else []
        unknown = [n for n in chosen if n not in names]
        if unknown:
            parser.error(f"{flag}: unknown check(s) {', '.join(unknown)}; available: {', '.join(names)}")
        return chosen

    only, skip = _names(args.only, "--only"), _names(args.skip, "--skip")
    args.selected = [n for n in (only or names) if n not in skip]
    if not args.selected:
        parser.error("no check left to run after --only/--skip")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.device = torch.device("cuda" if args.device == "cuda" or
                               (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if args.world_size not in (None, env_world):
            parser.error(f"--world-size {args.world_size} differs from torchrun's WORLD_SIZE={env_world}")
        args.world_size = env_world
    elif args.world_size is None:
        args.world_size = torch.cuda.device_count() if args.device.type == "cuda" else 2
    if args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.device.type == "cuda" and not under_torchrun() and args.world_size > torch.cuda.device_count():
        parser.error(f"--world-size {args.world_size} exceeds the {torch.cuda.device_count()} visible GPUs")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    return args


def _run_checks(args: argparse.Namespace, console: Console, show: bool) -> list[Result]:
    ctx = checks.Context(device=args.device, world_size=args.world_size, quick=args.quick, out_dir=args.out,
                         timeout=args.timeout)
    results: list[Result] = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=not show, transient=False) as progress:
        task = progress.add_task("conformance", total=len(args.selected))
        for name in args.selected:
            progress.update(task, description=f"check {name}")
            results.extend(checks.run(name, ctx))  # a crashing check is one failing row; the others still run
            progress.advance(task)
    return results


COMMANDS = {
    "plan": "conformance.plan.cli",
    "bench": "conformance.bench",
    "gpu": "conformance.gpu",
}
"""Subcommands: `python -m conformance NAME ...` calls `main(argv)` of the module; without one, the suite runs."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    rank0 = not under_torchrun() or int(os.environ["RANK"]) == 0
    console = Console(quiet=not rank0, width=None if sys.stdout.isatty() else 200)
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    env = environment(args.device, args.world_size, backend)
    if rank0:
        console.print("[bold]pretrain-spec conformance[/bold]: " + ", ".join(
            f"{k} {env[k]}" for k in ("torch", "device", "device_name", "backend", "world_size", "deepspeed",
                                       "triton", "flash-attn") if env.get(k) is not None)
            + f"; {'quick' if args.quick else 'full'} sizes; checks: {', '.join(args.selected)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = _run_checks(args, console, show=rank0)
    failed = [r for r in results if r.failed]
    if rank0:
        print_table(results, env, console)
        for r in failed:
            if r.error:
                console.print(f"[red]{r.check} crashed:[/red]\n{r.error}")
        json_path, md_path = write_report(results, env, args.out)
        console.print(f"report: {md_path}, {json_path}")
        console.print(f"[{'red' if failed else 'green'}]{len(results) - len(failed)} rows hold, {len(failed)} fail"
                      f"[/]")
    if under_torchrun() and dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
