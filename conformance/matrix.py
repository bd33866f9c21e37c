"""`python -m conformance matrix`: run the suite once per machine setting ("cell") and show which rows hold where.

    python -m conformance matrix                          a covering set of cells, quick sizes, every check
    python -m conformance matrix --only zero,training --pairwise --out matrix-report
    python -m conformance matrix --cells native-t4-w3-medium,avx2-t1-w2-highest
    python -m conformance matrix --reduced                the CI step: 3 cells, a few cheap checks

A verdict must hold on every machine a user has (DESIGN.md, "Tolerance"): a bound derived from the reference's own
rounding is right on any CPU ISA, thread count, world size and GPU, and a bound tuned to one machine is not. Each
setting below changes the last bits of the results (which kernel runs, in which order sums are added, in which
precision products are formed) without changing the math; the matrix runs `python -m conformance` in a subprocess
per cell, the cell's settings added to this process's environment (nothing else is changed), and each cell writes
its own report folder under --out.

Dimensions (what a cell sets, and why it moves the last bits):
  isa           the CPU instruction set the kernels may use. `native` sets nothing: ATen's widest vector kernels and
                whatever oneDNN and MKL pick for this CPU (AMX tiles and AVX-512 BF16 on a Sapphire Rapids). A forced
                level sets three variables together, each library's ceiling: ATEN_CPU_CAPABILITY (ATen's own kernels:
                reductions, softmax, elementwise), ONEDNN_MAX_CPU_ISA (oneDNN: linear, matmul, conv on the mkldnn
                path) and MKL_ENABLE_INSTRUCTIONS (MKL's sgemm/dgemm, torch's default CPU BLAS):
                  avx512   avx512 / AVX512_CORE / AVX512     (no AMX, no BF16 dot products)
                  avx2     avx2 / AVX2 / AVX2
                  default  default / SSE41 / SSE4_2         (ATen's unvectorized "DEFAULT" kernels)
                A wider vector holds more partial sums, so a reduction adds its terms in another order, and FMA
                contraction differs between kernels: the last bits differ per level. Only the levels this CPU has
                are offered (a forced level above the hardware would silently run a lower one); off x86 only
                `native` and `default` (ATen's variable alone).
  threads       intra-op threads of the suite's own process: 1, 2, 4, set by the suite's --threads
                (torch.set_num_threads) and OMP_NUM_THREADS (for OpenMP and MKL). OMP_NUM_THREADS alone is not
                enough: torch caps the count it derives from it at the cores (4 gave 2 on a 2-core machine); the
                report's environment shows the count that took effect. A parallel reduction splits its terms into
                one chunk per thread and adds the partial sums at the end: another order per count. The ranks of a
                multi-rank check set one thread each (conformance.launch: N ranks share the cores), so the thread
                count reaches the single-process checks and the caller's side only.
  world_size    ranks of the multi-rank checks, 1 to 4 (--world-size): how a batch, a layer or an optimizer state is
                split, and the order in which the all-reduce adds the ranks' parts; 3 finds padding bugs (sizes that
                do not divide).
  precision     torch.set_float32_matmul_precision (--matmul-precision of the suite). On CPU "high" asks oneDNN for
                TF32, which no CPU has: the same bits as "highest". "medium" lets oneDNN form float32 matmuls from
                bfloat16 products where the CPU has them fast (AMX): max error of a 256x512 @ 512x256 product against
                float64 5.2e-5 at "highest", 0.26 at "medium" on a Sapphire Rapids; with ONEDNN_MAX_CPU_ISA below
                AVX512_CORE_AMX "medium" stays float32 but goes through oneDNN instead of MKL (8.9e-5: another
                kernel). The flag sets the suite's own process, and conformance.launch hands it to every rank it
                spawns (a fresh interpreter would start at "highest"); the float32 bounds follow it
                (conformance.tolerance.working_eps: TF32's epsilon under "high", bf16's under "medium").
  tf32          CUDA only, in place of `precision` (on CUDA set_float32_matmul_precision is the TF32 switch of
                matmuls): on / off sets torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                (--tf32 of the suite). TF32 keeps 10 of float32's 23 mantissa bits in the products. "on" also sets
                TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which torch reads at start in every process, so the spawned ranks
                multiply in TF32 too; with "off" they keep torch's defaults (cuBLAS TF32 off, cuDNN TF32 on, and no
                workload here runs a convolution).

The cells: every value of every dimension appears in at least one cell (4 cells on a CPU with AVX-512: the longest
dimension), chosen greedily so that each cell adds as many values not yet covered as it can. --pairwise also covers
every combination of the pairs that interact (IMPORTANT_PAIRS: the ISA ceiling decides which kernel "medium"
picks; TF32 in the ranks meets the all-reduce), at the price of more cells (12 on such a CPU). Each cell is a whole
suite run, so the product of all dimensions (144 cells) is not on offer. A cell is named `isa-tTHREADS-wRANKS-
precision` (on CUDA `...-tf32on` / `-tf32off`); --cells runs named cells.

Exit status: 0 when every row of every cell holds, 1 when a row fails in any cell (or a cell crashed or timed out),
2 for bad arguments (one line, before any cell runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conformance.flags import Parser, names, parse, seconds, writable_dir

ISA_LEVELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
"""Each ISA level's environment: the ceiling of ATen's kernels, of oneDNN and of MKL, set together."""
THREADS = (1, 2, 4)
WORLD_SIZES = (1, 2, 3, 4)
PRECISIONS = ("highest", "high", "medium")
TF32 = ("on", "off")
IMPORTANT_PAIRS = (("isa", "precision"), ("tf32", "world_size"))
"""Pairs of dimensions that interact (the module docstring says how); --pairwise covers each of their combinations.
A pair whose dimensions this machine does not have is left out."""

REDUCED_CELLS = ("native-t2-w2-medium", "avx2-t1-w3-highest", "default-t4-w1-high")
"""--reduced (the CI step): every ISA family a CI runner has (avx2 and default run on any x86; native is the
widest), threads 1/2/4, world sizes 1/2/3 and every matmul precision in three cells."""
REDUCED_CHECKS = ("clipping", "training")
"""--reduced: cheap checks whose rows move with the settings: clipping's global norms (reductions: ISA, threads),
the training step (matmuls: ISA, precision) and training's all-reduced gradients (world size)."""
CUDA_REDUCED_CELLS = ("native-t2-w1-tf32on", "avx2-t1-w2-tf32off")
"""--reduced on CUDA: TF32 on and off, one and two GPUs (the second cell needs two)."""

LOG_TAIL_LINES = 15
"""How much of a crashed cell's output the matrix shows."""


@dataclass(frozen=True)
class Machine:
    """What the cells may ask of this machine."""

    isa_levels: tuple[str, ...]
    """The ISA levels this CPU runs (see ISA_LEVELS), widest first."""
    cuda_devices: int
    """Visible CUDA devices; 0 runs the CPU suite."""


@dataclass(frozen=True)
class Cell:
    """One machine setting: a run of the suite."""

    isa: str
    threads: int
    world_size: int
    precision: str | None = None
    """CPU: torch.set_float32_matmul_precision; None on CUDA (tf32 takes its place)."""
    tf32: str | None = None
    """CUDA: "on" / "off"; None on CPU."""

    @property
    def name(self) -> str:
        last = self.precision if self.tf32 is None else f"tf32{self.tf32}"
        return f"{self.isa}-t{self.threads}-w{self.world_size}-{last}"

    def env(self) -> dict[str, str]:
        """The variables this cell adds to (or overrides in) the inherited environment."""
        env = dict(ISA_LEVELS[self.isa])
        env["OMP_NUM_THREADS"] = str(self.threads)
        if self.tf32 == "on" or self.precision == "high":  # every process, spawned ranks included, starts at "high"
            env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1"
        return env

    def args(self) -> list[str]:
        """The suite's flags for this cell."""
        args = ["--world-size", str(self.world_size), "--threads", str(self.threads)]
        if self.precision is not None:
            args += ["--matmul-precision", self.precision]
        if self.tf32 is not None:
            args += ["--device", "cuda", "--tf32", self.tf32]
        return args


def machine() -> Machine:
    """This machine: the ISA levels its CPU has (from the CPU's feature flags, not from a forced
    ATEN_CPU_CAPABILITY) and its CUDA devices."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        levels = ("native", "default")
    else:
        has_avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
        has_avx2 = getattr(torch.cpu, "_is_avx2_supported", None)
        if has_avx512 is None or has_avx2 is None:  # an older torch: its running capability (unforced here)
            capability = torch.backends.cpu.get_cpu_capability().lower()
            avx512, avx2 = capability.startswith("avx512"), capability.startswith("avx")
        else:
            avx512, avx2 = has_avx512(), has_avx2()
        levels = tuple(n for n, ok in (("native", True), ("avx512", avx512), ("avx2", avx2), ("default", True)) if ok)
    return Machine(isa_levels=levels, cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)


def dimensions(m: Machine) -> dict[str, tuple]:
    """Each dimension's values on machine `m`, in the order the cells take them."""
    dims: dict[str, tuple] = {"isa": m.isa_levels, "threads": THREADS}
    if m.cuda_devices:
        dims["world_size"] = tuple(w for w in WORLD_SIZES if w <= m.cuda_devices)
        dims["tf32"] = TF32
    else:
        dims["world_size"] = WORLD_SIZES
        # "medium" first: the first cell takes the widest ISA level, where "medium" can mean bfloat16 products.
        dims["precision"] = ("medium", "highest", "high")
    return dims


def covering(dims: dict[str, tuple], pairs: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """Cells (dimension -> value) in which every value of every dimension appears, and every combination of the
    values of each pair in `pairs` (pairs naming a dimension not in `dims` are left out).

    Greedy (AETG's idea): a cell starts from the first requirement not yet covered, then each other dimension takes
    the value that covers the most requirements still open, ties going to the value used least so far, then to the
    earlier one. Deterministic."""
    pairs = tuple((a, b) for a, b in pairs if a in dims and b in dims)
    open_: list[frozenset] = [frozenset({(a, va), (b, vb)}) for a, b in pairs for va in dims[a] for vb in dims[b]]
    open_ += [frozenset({(d, v)}) for d in dims for v in dims[d]]
    used: dict[tuple, int] = {(d, v): 0 for d in dims for v in dims[d]}
    cells = []
    while open_:
        cell = dict(open_[0])
        for d in dims:
            if d not in cell:
                gains = {v: sum(1 for r in open_ if r <= set(cell.items()) | {(d, v)}) for v in dims[d]}
                cell[d] = min(dims[d], key=lambda v, d=d, gains=gains: (-gains[v], used[(d, v)], dims[d].index(v)))
        items = set(cell.items())
        open_ = [r for r in open_ if not r <= items]
        for item in items:
            used[item] += 1
        cells.append({d: cell[d] for d in dims})
    return cells


def cells_for(m: Machine, *, pairwise: bool) -> list[Cell]:
    """The default cells on machine `m`: every value of every dimension, and with `pairwise` the IMPORTANT_PAIRS."""
    return [Cell(**c) for c in covering(dimensions(m), IMPORTANT_PAIRS if pairwise else ())]


def parse_cell(text: str, m: Machine) -> Cell:
    """`isa-tTHREADS-wRANKS-precision` (CPU) or `isa-tTHREADS-wRANKS-tf32on|tf32off` (CUDA), each value one this
    machine offers; ValueError naming the part that is wrong and what is allowed."""
    form = "ISA-tTHREADS-wRANKS-" + ("tf32on|tf32off" if m.cuda_devices else "PRECISION")
    parts = text.split("-")
    if len(parts) != 4:
        raise ValueError(f"cell {text!r} is not {form} (e.g. {cells_for(m, pairwise=False)[0].name})")
    isa, threads, world, last = parts
    if isa not in m.isa_levels:
        why = "not offered on this CPU; " if isa in ISA_LEVELS else ""
        raise ValueError(f"cell {text!r}: ISA level {isa!r} is {why or 'unknown; '}allowed: {', '.join(m.isa_levels)}")
    dims = dimensions(m)
    numbers = {}
    for key, part, prefix in (("threads", threads, "t"), ("world_size", world, "w")):
        value = int(part[1:]) if part[:1] == prefix and part[1:].isdigit() else None
        if value is None or value < 1:
            raise ValueError(f"cell {text!r}: {part!r} is not {prefix}N (N >= 1, e.g. {prefix}{dims[key][-1]})")
        numbers[key] = value
    if m.cuda_devices and numbers["world_size"] > m.cuda_devices:
        raise ValueError(f"cell {text!r}: {numbers['world_size']} ranks exceed the {m.cuda_devices} visible GPUs")
    if m.cuda_devices:
        if last not in ("tf32on", "tf32off"):
            raise ValueError(f"cell {text!r}: {last!r} on CUDA must be tf32on or tf32off")
        return Cell(isa, numbers["threads"], numbers["world_size"], tf32=last[4:])
    if last not in PRECISIONS:
        raise ValueError(f"cell {text!r}: matmul precision {last!r} is not one of {', '.join(PRECISIONS)}"
                         + (" (tf32on/tf32off are for CUDA; no GPU is visible)" if last.startswith("tf32") else ""))
    return Cell(isa, numbers["threads"], numbers["world_size"], precision=last)


# ---- running a cell --------------------------------------------------------------------------------------------------


@dataclass
class Failure:
    """One failing row of a cell's report."""

    row: str
    """check/row name."""
    error: float | None = None
    """max |optimized - reference| (None for a crash)."""
    bound: float | None = None
    detail: str = ""
    """The equivalence's name and rule, or the last line of a crash's traceback."""

    def __str__(self) -> str:
        if self.error is None:
            return f"{self.row}: crashed: {self.detail}"
        return f"{self.row}: {self.error:.3g} > {self.bound:.3g} ({self.detail})"


@dataclass
class Outcome:
    """What a cell's run gave."""

    cell: Cell
    folder: Path
    returncode: int | None
    """The suite's exit status; None when the cell timed out and was killed."""
    seconds: float
    rows: int = 0
    failures: list[Failure] = field(default_factory=list)
    problem: str = ""
    """Why the cell has no usable report (crashed, timed out), with the tail of its output."""
    effective: dict = field(default_factory=dict)
    """What the suite's process reported it ran with (threads, from report.json's environment)."""

    @property
    def failed(self) -> bool:
        return bool(self.failures or self.problem)

    def to_dict(self) -> dict:
        return {"cell": self.cell.name, "settings": asdict(self.cell), "env": self.cell.env(), "args": self.cell.args(),
                "folder": str(self.folder), "returncode": self.returncode,
                "seconds": round(self.seconds, 1), "rows": self.rows, "hold": self.rows - len(self.failures),
                "fail": len(self.failures), "failures": [asdict(f) for f in self.failures],
                "problem": self.problem or None, "effective": self.effective}


def _failures(report: dict) -> list[Failure]:
    out = []
    for r in report["results"]:
        row = f"{r['check']}/{r['name']}"
        eq = r.get("equivalence")
        if r.get("error"):
            out.append(Failure(row, detail=r["error"].strip().splitlines()[-1]))
        elif eq is not None and not eq["passed"]:
            out.append(Failure(row, eq["max_error"], eq["bound"], f"{eq['name']}: {eq['rule']}"))
    return out


def run_cell(cell: Cell, suite_args: list[str], out: Path, timeout: float) -> Outcome:
    """Run the suite for `cell` in a subprocess; its report and its output (cell.log) go to out/<cell name>."""
    folder = out / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    report_path = folder / "report.json"
    report_path.unlink(missing_ok=True)  # a report left by an earlier run must not stand in for this one
    command = [sys.executable, "-m", "conformance", *suite_args, *cell.args(), "--out", str(folder)]
    start = time.monotonic()
    with open(folder / "cell.log", "w") as log:
        log.write(f"$ {' '.join(f'{k}={v}' for k, v in cell.env().items())} {' '.join(command)}\n")
        log.flush()
        try:
            returncode = subprocess.run(command, env={**os.environ, **cell.env()}, stdout=log,
                                        stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    outcome = Outcome(cell, folder, returncode, time.monotonic() - start)
    tail = "\n".join((folder / "cell.log").read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    if returncode is None:
        outcome.problem = f"timed out after {timeout:g} s and was killed; last output:\n{tail}"
    elif returncode not in (0, 1) or not report_path.exists():
        outcome.problem = f"the suite exited with status {returncode} without a report; last output:\n{tail}"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        outcome.rows = len(report["results"])
        outcome.failures = _failures(report)
        outcome.effective = {"cpu_threads": report["environment"].get("cpu_threads"),
                             "world_size": report["environment"].get("world_size")}
        if returncode == 1 and not outcome.failures and not outcome.problem:
            outcome.problem = f"the suite exited with status 1 but its report has no failing row; last output:\n{tail}"
    return outcome


# ---- the table -------------------------------------------------------------------------------------------------------


def _columns(outcome: Outcome) -> list[str]:
    c = outcome.cell
    status = "ERROR" if outcome.problem else ("FAIL" if outcome.failures else "holds")
    return [c.name, c.isa, str(c.threads), str(c.world_size), c.precision or f"tf32 {c.tf32}", status,
            str(outcome.rows - len(outcome.failures)), str(len(outcome.failures)), f"{outcome.seconds:.0f} s"]


HEADERS = ["cell", "isa", "threads", "ranks", "matmul", "verdict", "rows hold", "fail", "time"]


def _details(outcome: Outcome) -> list[str]:
    lines = [str(f) for f in outcome.failures]
    if outcome.problem:
        lines.insert(0, outcome.problem.splitlines()[0])
    return lines


def print_table(outcomes: list[Outcome], console) -> None:
    from rich.table import Table

    table = Table(title="conformance matrix: one run of the suite per cell", show_lines=True)
    for h in HEADERS + ["failing rows: error > bound"]:
        table.add_column(h, overflow="fold")
    for o in outcomes:
        style = "red" if o.failed else "green"
        table.add_row(*_columns(o), "\n".join(_details(o)) or "-", style=style)
    console.print(table)


def write_markdown(outcomes: list[Outcome], header: dict, path: Path) -> None:
    lines = ["# Conformance matrix", "", f"Suite: `python -m conformance {' '.join(header['suite_args'])}`; "
             f"torch {header['torch']}; {header['machine']}.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_columns(o)) + " |" for o in outcomes]
    lines += ["", "## Failing rows", ""]
    failed = [o for o in outcomes if o.failed]
    for o in failed:
        lines.append(f"### {o.cell.name}  (`{' '.join(f'{k}={v}' for k, v in o.cell.env().items())} python -m "
                     f"conformance {' '.join(o.cell.args())}`; report: {o.cell.name}/report.md)")
        lines += [""] + [f"- {line}".replace("|", "\\|") for line in _details(o)] + [""]
    if not failed:
        lines.append("None: every row holds in every cell.")
    path.write_text("\n".join(lines) + "\n")


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
