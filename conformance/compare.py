"""`python -m conformance compare OLD/report.json NEW/report.json`: what changed between two conformance reports.

Rows are matched by (check, row name). Listed: rows whose equivalence or claim verdict changed, errors that grew past
their bound or by more than `--factor`, memory and speed ratios (unit "x") that moved by more than `--tolerance`
(relative), and rows added or gone. A regression, which makes the exit status 1, is a row that held and now fails
(or crashes), a verdict that became "does not hold", or an error that grew by more than the factor. Ratios that
moved and rows added or gone are reported but are no regression: which way is better depends on the ratio, and
another stack or --only runs other rows. Exit status 2: a report that cannot be read.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from conformance.flags import Parser, json_file, parse, positive_float

DOES_NOT_HOLD = "does not hold"


@dataclass
class Changes:
    """What `compare` found; `regressions` decide the exit status."""

    regressions: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)


def _report(text: str) -> dict[tuple[str, str], dict]:
    """An argparse type: the rows of the conformance report.json at `text`, by (check, row name). The file must be a
    regular, readable JSON file whose rows have the fields compare reads, with the types it reads them as: a file
    that is not a report is a usage error (exit 2), never a crash or a "regression"."""
    try:
        data = json_file(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"cannot read a conformance report: {error}") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise argparse.ArgumentTypeError(f"cannot read a conformance report: {text!r} has no 'results' list")
    for row in rows:
        problem = _row_problem(row)
        if problem:
            raise argparse.ArgumentTypeError(f"cannot read a conformance report: in {text!r}, a row {problem}")
    return {(r["check"], r["name"]): r for r in rows}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _row_problem(row) -> str | None:
    """What makes `row` unusable by compare(), or None."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("check", "name")):
        return f"is not an object with string 'check' and 'name': {str(row)[:100]}"
    eq = row.get("equivalence")
    if eq is not None and not (isinstance(eq, dict) and _number(eq.get("max_error")) and _number(eq.get("bound"))
                               and isinstance(eq.get("passed"), bool)):
        return f"{row['name']!r} has an 'equivalence' without numeric max_error and bound and a boolean passed"
    for kind in ("memory", "speed"):
        ms = row.get(kind) or []
        if not isinstance(ms, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                               and (m.get("unit") != "x" or _number(m.get("measured"))) for m in ms):
            return f"{row['name']!r} has a {kind!r} that is not a list of named measurements"
    return None


def _status(row: dict) -> str:
    if row.get("error"):
        return "crashed"
    eq = row.get("equivalence")
    if eq is None:
        return "measured"
    return "holds" if eq["passed"] else "fails"


def _ratios(row: dict) -> dict[str, float]:
    return {f"{kind}: {m['name']}": m["measured"] for kind in ("memory", "speed") for m in row.get(kind) or []
            if m.get("unit") == "x"}


def compare(old: dict[tuple[str, str], dict], new: dict[tuple[str, str], dict], *, factor: float = 10.0,
            tolerance: float = 0.1) -> Changes:
    """The differences between two reports' rows (see the module docstring)."""
    out = Changes()
    for key in old.keys() - new.keys():
        out.gone.append(f"{key[0]} / {key[1]}")
    for key in new.keys() - old.keys():
        out.added.append(f"{key[0]} / {key[1]}")
    for key in [k for k in old if k in new]:
        a, b = old[key], new[key]
        label = f"{key[0]} / {key[1]}"
        sa, sb = _status(a), _status(b)
        if sa != sb:
            worse = sa in ("holds", "measured") and sb in ("fails", "crashed")
            (out.regressions if worse else out.changed).append(f"{label}: {sa} -> {sb}")
        if a.get("verdict") != b.get("verdict"):
            line = f"{label}: claim {b.get('claim') or a.get('claim')} {a.get('verdict')} -> {b.get('verdict')}"
            (out.regressions if b.get("verdict") == DOES_NOT_HOLD else out.changed).append(line)
        ea, eb = a.get("equivalence"), b.get("equivalence")
        if ea and eb and sb == "holds":
            floor = 1e-3 * max(ea["bound"], eb["bound"])  # growth from ~0 counts from a thousandth of the bound
            if eb["max_error"] > factor * max(ea["max_error"], floor) and eb["max_error"] > 0:
                out.regressions.append(f"{label}: max error {ea['max_error']:.3g} -> {eb['max_error']:.3g} (more than "
                                       f"{factor:g}x; bound {eb['bound']:.3g})")
        ra, rb = _ratios(a), _ratios(b)
        for name in ra.keys() & rb.keys():
            x, y = ra[name], rb[name]
            if abs(y - x) > tolerance * max(abs(x), 1e-12):
                out.moved.append(f"{label}: {name} {x:.3g}x -> {y:.3g}x ({(y - x) / x:+.0%})" if x else
                                 f"{label}: {name} {x:.3g}x -> {y:.3g}x")
    for lst in (out.regressions, out.changed, out.moved, out.added, out.gone):
        lst.sort()
    return out


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m conformance compare",
                    description="Compare two conformance reports (report.json): rows whose verdict changed, errors "
                    "that grew, memory and speed ratios that moved, rows added or gone. Exit status 1 on a "
                    "regression (a row that held now fails, a verdict now 'does not hold', an error grown by more "
                    "than --factor), 2 on unreadable input (missing, not a regular file, not JSON, not a report).")
    parser.add_argument("old", type=_report, metavar="OLD", help="the earlier report.json (or the other stack's)")
    parser.add_argument("new", type=_report, metavar="NEW", help="the report.json to judge")
    parser.add_argument("--factor", type=positive_float, default=10.0,
                        help="an error that grew by more than this factor is a regression, even within its bound "
                        "(default: 10)")
    parser.add_argument("--tolerance", type=positive_float, default=0.1,
                        help="relative change of a memory or speed ratio worth listing (default: 0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(_parser(), argv)
    if isinstance(args, int):
        return args
    old, new = args.old, args.new
    changes = compare(old, new, factor=args.factor, tolerance=args.tolerance)
    sections = (("REGRESSION", changes.regressions), ("changed", changes.changed), ("moved", changes.moved),
                ("added", changes.added), ("gone", changes.gone))
    for title, lines in sections:
        for line in lines:
            print(f"{title}: {line}")
    common = len(old.keys() & new.keys())
    print(f"{common} rows in both, {len(changes.added)} added, {len(changes.gone)} gone; "
          f"{len(changes.regressions)} regression(s)", file=sys.stdout)
    return 1 if changes.regressions else 0
