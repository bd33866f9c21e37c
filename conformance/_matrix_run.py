"""Running the cells of `python -m conformance matrix`: one suite run per cell in a subprocess, its report read
back into an `Outcome`, and the outcomes drawn as a terminal table and as matrix.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conformance._matrix_cells import Cell

LOG_TAIL_LINES = 15
"""How much of a crashed cell's output the matrix shows."""


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
