"""`python -m conformance mutate`: prove the conformance checks catch bugs, by injecting them (mutation testing).

    python -m conformance mutate                          every mutation of conformance.mutations, 2 at a time
    python -m conformance mutate --only dp-missing-average,clipping-local-norm --jobs 1
    python -m conformance mutate --all-checks --out mutate-report

For each mutation (a realistic bug in optimized/, as data in conformance/mutations.py) the runner copies the
repository's tracked files (`git ls-files`, as they are in the working tree) into a temporary directory, replaces the
mutation's snippet there (never in the working tree), and runs `python -m conformance --quick --only <the checks the
mutation names>` with that copy as cwd and PYTHONPATH. The verdict per mutation:
    killed    some row's equivalence FAILs (the first such row is shown, with its error and bound);
    crashed   no equivalence failed but a check crashed, or the suite died or hung (killed by a crash: counted
              apart, since a crash proves less than a failed comparison);
    SURVIVED  every row held: the checks cannot tell the bug from the spec;
    baseline  the unmutated copy crashed or failed every row of these checks: nothing can be judged.
Each distinct set of checks is first run once on an unmutated copy (the baseline). Rows that fail there (a bound
being reworked, a machine the check does not hold on yet) are not judged for the mutation: only a row the baseline
holds can kill it, and the verdict names the rows set aside. A mutation may name an
environment its checks need on a CPU-only machine to reach the mutated code (TRITON_INTERPRET=1 for the Triton
kernels); its baseline then runs with it too.

A mutation whose snippet does not occur exactly once in the current tree is refused before anything runs (exit 2),
so the list cannot rot silently. Exit status: 0 when every mutation is killed (or crashed) and every baseline passes,
1 when any survives or a baseline fails, 2 for bad arguments. The table goes to the terminal; mutate.json and
mutate.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conformance.mutations import MUTATIONS, Mutation

STATUSES = ("killed", "crashed", "SURVIVED", "baseline")


class MutationError(ValueError):
    """A mutation that cannot be applied: its snippet is missing or occurs more than once."""


def occurrences(text: str, mutation: Mutation) -> int:
    return text.count(mutation.original)


def apply_mutation(root: Path, mutation: Mutation) -> None:
    """Replace the mutation's snippet in root/mutation.file; refuse unless it occurs exactly once."""
    path = Path(root) / mutation.file
    if not path.is_file():
        raise MutationError(f"mutation {mutation.id!r}: file {mutation.file} does not exist")
    text = path.read_text()
    count = occurrences(text, mutation)
    if count != 1:
        where = "does not occur" if count == 0 else f"occurs {count} times"
        raise MutationError(f"mutation {mutation.id!r}: its snippet {where} in {mutation.file} (it must occur "
                            f"exactly once; update conformance/mutations.py): {mutation.original!r}")
    path.write_text(text.replace(mutation.original, mutation.replacement))


def stale(root: Path, mutations: Iterable[Mutation]) -> list[str]:
    """Messages for the mutations that would be refused on the tree at root."""
    problems = []
    for m in mutations:
        path = Path(root) / m.file
        if not path.is_file():
            problems.append(f"mutation {m.id!r}: file {m.file} does not exist")
            continue
        count = occurrences(path.read_text(), m)
        if count != 1:
            problems.append(f"mutation {m.id!r}: snippet occurs {count} times in {m.file}, expected exactly once")
    return problems


def repo_root() -> Path:
    """The git work tree holding this package."""
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip())


def copy_tracked(root: Path, dest: Path) -> None:
    """Copy the tracked files of the git work tree at root (their working-tree content) into dest."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        if not name:
            continue
        src = root / name
        if not src.is_file():  # deleted in the work tree, or a submodule
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


@dataclass
class Outcome:
    """What one run of the suite on one copy showed."""

    status: str
    """killed / crashed / SURVIVED (for a baseline: SURVIVED means every row held)."""
    detail: str = ""
    """The first failing row (check/name: error vs bound), the crash, or 'all N rows hold'."""
    rows: int = 0
    failed_rows: list[str] = field(default_factory=list)
    """check/name of every failing row."""
    seconds: float = 0.0
    wrote_report: bool = True


def _judge(report: Path, returncode: int, output: str, ignore: frozenset[str] = frozenset()) -> Outcome:
    """The verdict of one run from its report.json; rows named in `ignore` (check/name: those the baseline already
    fails) do not count."""
    if not report.is_file():
        tail = output.strip().splitlines()[-1] if output.strip() else f"exit status {returncode}"
        return Outcome("crashed", f"the suite wrote no report (exit {returncode}): {tail}", wrote_report=False)
    results = json.loads(report.read_text())["results"]
    unequal, crashed, labels = [], [], []
    for r in results:
        eq = r.get("equivalence")
        label = f"{r['check']}/{r['name']}"
        if label in ignore:
            continue
        if eq is not None and not eq["passed"] or r.get("error"):
            labels.append(label)
        if eq is not None and not eq["passed"]:
            unequal.append(f"{label}: {eq['name']}: error {eq['max_error']:.3g} > bound {eq['bound']:.3g}")
        elif r.get("error"):
            last = [line for line in r["error"].strip().splitlines() if line.strip()][-1:]
            crashed.append(f"{label}: {last[0].strip() if last else 'crashed'}")
    judged = len(results) - sum(f"{r['check']}/{r['name']}" in ignore for r in results)
    if unequal:
        return Outcome("killed", unequal[0], len(results), labels)
    if crashed:
        return Outcome("crashed", crashed[0], len(results), labels)
    if returncode != 0 and not ignore:
        return Outcome("crashed", f"exit status {returncode} with every row holding", len(results))
    return Outcome("SURVIVED", f"all {judged} judged rows hold", len(results))


def run_suite(root: Path, checks: Sequence[str] | None, mutation: Mutation | None, *, timeout: float,
              device: str, world_size: int | None, env: Sequence[tuple[str, str]] = (),
              ignore: frozenset[str] = frozenset()) -> Outcome:
    """Copy the tree, apply `mutation` (None: the baseline), run the quick suite on `checks` (None: all), with the
    extra environment `env`; rows in `ignore` are not judged."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tracked(root, copy)
        if mutation is not None:
            apply_mutation(copy, mutation)
        out = Path(tmp) / "report"
        cmd = [sys.executable, "-m", "conformance", "--quick", "--device", device, "--out", str(out)]
        if checks:
            cmd += ["--only", ",".join(checks)]
        if world_size is not None:
            cmd += ["--world-size", str(world_size)]
        environ = {**os.environ, **dict(env), "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run(cmd, cwd=copy, env=environ, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome("crashed", f"timed out after {timeout:g} s (a hang counts as a crash)",
                           seconds=time.monotonic() - start)
        outcome = _judge(out / "report.json", proc.returncode, proc.stdout + proc.stderr, ignore)
    outcome.seconds = time.monotonic() - start
    return outcome


@dataclass
class Verdict:
    """One line of the result: a mutation and what its checks did with it."""

    id: str
    file: str
    description: str
    checks: list[str]
    status: str
    detail: str
    seconds: float


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _parser() -> argparse.ArgumentParser:
    from conformance.flags import MAX_JOBS, Parser, names, positive_integer, seconds, world_size, writable_dir

    parser = Parser(prog="python -m conformance mutate",
                    description="Inject each mutation of conformance/mutations.py (a realistic bug in optimized/) "
                    "into a temporary copy of the repository and run the conformance checks that should catch it; "
                    "report which mutations they kill and which survive.")
    parser.add_argument("--only", type=names, default=None, metavar="IDS",
                        help="comma-separated mutation ids (default: all)")
    parser.add_argument("--all-checks", action="store_true",
                        help="run the whole quick suite for every mutation, not only the checks it names")
    parser.add_argument("--jobs", type=positive_integer(MAX_JOBS), default=2,
                        help="copies run in parallel (default: 2)")
    parser.add_argument("--timeout", type=seconds, default=900.0,
                        help="seconds one run of the suite may take before it counts as a hang (default: 900)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="passed to the suite (default: auto)")
    parser.add_argument("--world-size", type=world_size, default=None, help="passed to the suite")
    parser.add_argument("--out", type=writable_dir, default=None,
                        help="folder for mutate.json and mutate.md (default: ./conformance-report/mutate)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    return parser


def _select(parser: argparse.ArgumentParser, chosen: list[str] | None) -> list[Mutation]:
    import difflib

    if chosen is None:
        return list(MUTATIONS)
    known = {m.id: m for m in MUTATIONS}
    for name in chosen:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(known)}"
            parser.error(f"argument --only: unknown mutation {name!r}{hint}")
    return [known[n] for n in chosen]


def write_reports(verdicts: list[Verdict], baselines: dict[str, Outcome], out: Path, command: str,
                  seconds: float) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    payload = {"command": command, "wall_s": round(seconds, 1), "counts": counts,
               "baselines": {k: asdict(v) for k, v in baselines.items()},
               "mutations": [asdict(v) for v in verdicts]}
    json_path, md_path = out / "mutate.json", out / "mutate.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    killed = counts["killed"] + counts["crashed"]
    lines = ["# Mutation testing of the conformance checks", "",
             f"`{command}`: {killed}/{len(verdicts)} killed ({counts['killed']} by a failing row, "
             f"{counts['crashed']} by a crash), {counts['SURVIVED']} survived, {counts['baseline']} not judged "
             f"(baseline fails); wall time {seconds:.0f} s.", "",
             "| mutation | file | checks | verdict | detail |", "|---|---|---|---|---|"]
    for v in verdicts:
        detail = v.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {v.id} | {v.file} | {', '.join(v.checks)} | {v.status} | {detail} |")
    lines += ["", "Baselines (unmutated copy):", ""]
    lines += [f"- {k}: {b.status}: {b.detail}" for k, b in baselines.items()]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except SystemExit as exit_:  # argparse's errors (exit 2) and --help (0), as a status
        return int(exit_.code or 0)


def _main(argv: list[str]) -> int:
    from conformance.flags import writable_dir

    parser = _parser()
    args = parser.parse_args(argv)
    selected = _select(parser, args.only)
    if args.list:
        for m in selected:
            print(f"{m.id:40s} {m.file:36s} {','.join(m.checks):24s} {m.description}")
        return 0
    root = repo_root()
    problems = stale(root, selected)
    if problems:
        parser.error("refusing stale mutations (conformance/mutations.py no longer matches optimized/): "
                     + "; ".join(problems))
    out = args.out
    if out is None:
        out = writable_dir("conformance-report/mutate")
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    command = "python -m conformance mutate " + " ".join(argv)
    start = time.monotonic()

    on_cpu = args.device == "cpu" or (args.device == "auto" and not _cuda_visible())

    def check_set(m: Mutation) -> tuple[tuple[str, ...] | None, tuple[tuple[str, str], ...]]:
        """What a run is: the checks (None: all) and the extra environment (a baseline per distinct pair)."""
        return (None if args.all_checks else tuple(dict.fromkeys(m.checks))), (m.cpu_env if on_cpu else ())

    def key(run: tuple) -> str:
        checks, env = run
        return ("all checks" if checks is None else ",".join(checks)) + "".join(f" {k}={v}" for k, v in env)

    sets = list(dict.fromkeys(check_set(m) for m in selected))
    suite = dict(timeout=args.timeout, device=args.device, world_size=args.world_size)
    console.print(f"[bold]mutation testing[/bold]: {len(selected)} mutations, {len(sets)} baselines, "
                  f"{args.jobs} at a time", highlight=False)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        base_futures = {key(s): pool.submit(run_suite, root, s[0], None, env=s[1], **suite) for s in sets}
        baselines = {}
        for k, f in base_futures.items():
            b = f.result()
            b.status = "passes" if b.status == "SURVIVED" else "fails"  # every row held / some failed or crashed
            baselines[k] = b
            state = "passes" if b.status == "passes" else f"[red]FAILS[/red] ({b.detail})"
            console.print(f"baseline {k}: {state} in {b.seconds:.0f} s", highlight=False)
        # A baseline with failing rows still judges a mutation, on the rows it holds; one that wrote no report
        # (or whose rows all fail) cannot.
        runnable = [m for m in selected if baselines[key(check_set(m))].wrote_report
                    and len(baselines[key(check_set(m))].failed_rows) < baselines[key(check_set(m))].rows]
        futures = {m.id: pool.submit(run_suite, root, check_set(m)[0], m, env=check_set(m)[1],
                                     ignore=frozenset(baselines[key(check_set(m))].failed_rows), **suite)
                   for m in runnable}
        verdicts = []
        for m in selected:
            base = baselines[key(check_set(m))]
            if m.id in futures:
                o = futures[m.id].result()
                detail = o.detail if base.status == "passes" else (
                    f"{o.detail} (judged on the rows the baseline holds; it fails {len(base.failed_rows)}: "
                    f"{', '.join(base.failed_rows)})")
                verdicts.append(Verdict(m.id, m.file, m.description, list(m.checks), o.status, detail,
                                        round(o.seconds, 1)))
            else:
                verdicts.append(Verdict(m.id, m.file, m.description, list(m.checks), "baseline",
                                        f"the unmutated copy already fails: {base.detail}", 0.0))
            v = verdicts[-1]
            console.print(f"  {v.status:9s} {v.id} ({v.seconds:.0f} s)", highlight=False)
    seconds = time.monotonic() - start
    table = Table(title="mutations")
    for col in ("mutation", "checks", "verdict", "detail"):
        table.add_column(col, overflow="fold")
    colour = {"killed": "green", "crashed": "yellow", "SURVIVED": "red", "baseline": "magenta"}
    for v in verdicts:
        table.add_row(v.id, ",".join(v.checks), f"[{colour[v.status]}]{v.status}[/]", v.detail)
    console.print(table)
    json_path, md_path = write_reports(verdicts, baselines, out, command, seconds)
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    console.print(f"{counts['killed'] + counts['crashed']}/{len(verdicts)} killed ({counts['crashed']} by a crash), "
                  f"{counts['SURVIVED']} survived, {counts['baseline']} not judged (baseline fails); "
                  f"{seconds:.0f} s; report: {md_path} (and {json_path.name})", highlight=False)
    baseline_failed = any(b.status != "passes" for b in baselines.values())
    return 1 if counts["SURVIVED"] or counts["baseline"] or baseline_failed else 0


if __name__ == "__main__":
    sys.exit(main())
