"""`python -m conformance matrix`: run the suite once per machine setting ("cell") and show which rows hold where.

    python -m conformance matrix                          a covering set of cells, quick sizes, every check
    python -m conformance matrix --only zero,training --pairwise --out matrix-report
    python -m conformance matrix --cells native-t4-w3-medium,avx2-t1-w2-highest
    python -m conformance matrix --reduced                the CI step: 3 cells, a few cheap checks

A verdict must hold on every machine a user has (DESIGN.md, "Tolerance"): a bound derived from the reference's own
rounding is right on any CPU ISA, thread count, world size and GPU, and a bound tuned to one machine is not. Each
setting changes the last bits of the results (which kernel runs, in which order sums are added, in which precision
products are formed) without changing the math; the matrix runs `python -m conformance` in a subprocess per cell,
the cell's settings added to this process's environment (nothing else is changed), and each cell writes its own
report folder under --out.

conformance/_matrix_cells.py names the settings (ISA level, threads, world size, matmul precision, TF32), says why
each moves the last bits and chooses the cells that cover them; conformance/_matrix_run.py runs a cell and draws the
table; this file is the command.

Exit status: 0 when every row of every cell holds, 1 when a row fails in any cell (or a cell crashed or timed out),
2 for bad arguments (one line, before any cell runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

from conformance._matrix_cells import Cell, Machine, cells_for, machine, parse_cell
from conformance._matrix_run import print_table, run_cell, write_markdown
from conformance.flags import Parser, names, parse, seconds, writable_dir

REDUCED_CELLS = ("native-t2-w2-medium", "avx2-t1-w3-highest", "default-t4-w1-high")
"""--reduced (the CI step): every ISA family a CI runner has (avx2 and default run on any x86; native is the
widest), threads 1/2/4, world sizes 1/2/3 and every matmul precision in three cells."""
REDUCED_CHECKS = ("clipping", "training")
"""--reduced: cheap checks whose rows move with the settings: clipping's global norms (reductions: ISA, threads),
the training step (matmuls: ISA, precision) and training's all-reduced gradients (world size)."""
CUDA_REDUCED_CELLS = ("native-t2-w1-tf32on", "avx2-t1-w2-tf32off")
"""--reduced on CUDA: TF32 on and off, one and two GPUs (the second cell needs two)."""


# ---- the command -----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from conformance.__main__ import _check_names

    parser = Parser(prog="python -m conformance matrix",
                    description="Run the conformance suite once per machine setting (CPU ISA level, intra-op threads, "
                    "world size, float32 matmul precision; TF32 on CUDA) and show which rows hold in which cell. "
                    "Exit status 1 when a row fails in any cell, 2 on bad arguments.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cells", type=names, default=None, metavar="NAMES",
                       help="comma-separated cells to run, each ISA-tTHREADS-wRANKS-PRECISION (CUDA: "
                       "ISA-tTHREADS-wRANKS-tf32on|tf32off), e.g. native-t4-w3-medium")
    which.add_argument("--reduced", action="store_true",
                       help=f"the CI step: cells {', '.join(REDUCED_CELLS)} with the checks "
                       f"{', '.join(REDUCED_CHECKS)} (unless --only names others)")
    which.add_argument("--pairwise", action="store_true",
                       help="also cover every combination of the dimensions that interact (ISA x precision; TF32 x "
                       "world size on CUDA): more cells")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="the suite's small sizes (default)")
    size.add_argument("--full", dest="quick", action="store_false", help="the suite's full measurement sizes")
    parser.add_argument("--only", type=_check_names, default=None, metavar="NAMES",
                        help="comma-separated checks each cell runs (default: all)")
    parser.add_argument("--skip", type=_check_names, default=None, metavar="NAMES",
                        help="comma-separated checks no cell runs")
    parser.add_argument("--out", type=writable_dir, default=None,
                        help="folder for matrix.json, matrix.md and one report folder per cell (default: "
                        "./conformance-matrix)")
    parser.add_argument("--cell-timeout", type=seconds, default=3600.0, metavar="SECONDS",
                        help="seconds one cell may run before it is killed and counted as failed (default: 3600)")
    parser.add_argument("--list", action="store_true", help="print the cells and their settings, run nothing")
    return parser


def _suite_args(args: argparse.Namespace) -> list[str]:
    """The flags every cell passes to the suite; --reduced means its checks unless --only names others."""
    suite = ["--quick" if args.quick else "--full"]
    only = args.only if args.only is not None else list(REDUCED_CHECKS) if args.reduced else None
    if only is not None:
        suite += ["--only", ",".join(only)]
    if args.skip is not None:
        suite += ["--skip", ",".join(args.skip)]
    return suite


def _choose_cells(args: argparse.Namespace, m: Machine, parser: argparse.ArgumentParser) -> list[Cell]:
    if args.cells is not None:
        cells = []
        for text in args.cells:
            try:
                cells.append(parse_cell(text, m))
            except ValueError as error:
                parser.error(f"argument --cells: {error}")
        if len({c.name for c in cells}) < len(cells):
            parser.error(f"argument --cells: a cell is named twice in {','.join(args.cells)}")
        return cells
    if args.reduced:
        names_ = CUDA_REDUCED_CELLS if m.cuda_devices else REDUCED_CELLS
        return [parse_cell(n, m) for n in names_ if _offered(n, m)]
    return cells_for(m, pairwise=args.pairwise)


def _offered(name: str, m: Machine) -> bool:
    """A --reduced cell this machine can run (a CI runner without AVX2 or with one GPU skips the cell it lacks)."""
    try:
        parse_cell(name, m)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parse(parser, argv)
    if isinstance(args, int):
        return args
    suite_args = _suite_args(args)
    only = suite_args[suite_args.index("--only") + 1].split(",") if "--only" in suite_args else None
    if only is not None and not set(only) - set(args.skip or []):
        return _error(parser, "argument --skip: no check left to run after --only/--skip")
    m = machine()
    try:
        cells = _choose_cells(args, m, parser)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.list:
        for c in cells:
            print(f"{c.name}: {' '.join(f'{k}={v}' for k, v in c.env().items())} python -m conformance "
                  f"{' '.join(suite_args + c.args())}")
        return 0
    out = args.out
    if out is None:
        try:
            out = writable_dir("conformance-matrix")
        except argparse.ArgumentTypeError as error:
            return _error(parser, f"argument --out: {error}")

    import torch
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    describe = (f"{m.cuda_devices} CUDA device(s)" if m.cuda_devices else f"CPU {platform.machine()}") \
        + f", ISA levels {', '.join(m.isa_levels)}"
    console.print(f"[bold]conformance matrix[/bold]: {len(cells)} cells, {describe}; each runs `python -m conformance "
                  f"{' '.join(suite_args)}`", highlight=False)
    outcomes = []
    for i, cell in enumerate(cells, 1):
        console.print(f"cell {i}/{len(cells)} {cell.name}: {' '.join(f'{k}={v}' for k, v in cell.env().items())} "
                      f"{' '.join(cell.args())}", highlight=False)
        outcome = run_cell(cell, suite_args, out, args.cell_timeout)
        outcomes.append(outcome)
        console.print(f"  {'ERROR' if outcome.problem else 'FAIL' if outcome.failures else 'holds'}: "
                      f"{outcome.rows - len(outcome.failures)} rows hold, {len(outcome.failures)} fail, "
                      f"{outcome.seconds:.0f} s", highlight=False, style="red" if outcome.failed else "green")
    header = {"suite_args": suite_args, "torch": torch.__version__, "machine": describe,
              "isa_levels": list(m.isa_levels), "cuda_devices": m.cuda_devices}
    (out / "matrix.json").write_text(json.dumps({**header, "cells": [o.to_dict() for o in outcomes]}, indent=2) + "\n")
    write_markdown(outcomes, header, out / "matrix.md")
    print_table(outcomes, console)
    failed = [o for o in outcomes if o.failed]
    console.print(f"[{'red' if failed else 'green'}]{len(outcomes) - len(failed)} of {len(outcomes)} cells hold"
                  f"[/]; matrix: {out / 'matrix.md'} (and matrix.json, one report folder per cell)", highlight=False)
    return 1 if failed else 0


def _error(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 2
