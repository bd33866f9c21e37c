"""`python -m conformance gpu`: the prepared run for a machine with one CUDA GPU and no network.

    python -m conformance gpu --out gpu-report

Three steps, each a subprocess with its own time budget (a failure or a timeout is recorded and the run goes on),
about 8 minutes in all:

    tests        pytest -m gpu: the gpu-marked tests (junit XML parsed for the counts, failures' short tracebacks
                 printed)
    conformance  python -m conformance --device cuda: every check, each check's rows held / failed and verdicts
    bench        python -m conformance bench attention --quick (tools/bench.py): TFLOP/s of our Triton
                 kernels, SDPA's backends and flash-attn, and the naive / flash peak-memory ratio at N=4K

Last it prints a short summary: GPU, driver, torch, triton, python; each step's counts and time; each check's
verdicts; our Triton kernels over SDPA-flash at bf16, d=128, N=8K (the issue's goals: >= 1.0x forward, >= 0.9x
forward + backward); the memory ratio. Everything printed goes to <out>/gpu.log, the summary to <out>/gpu.json,
and each step's full output to <out>/<step>.log beside its own report (pytest.xml, conformance/, bench/).
Missing optional packages (deepspeed, flash-attn) are the steps' business: they skip or report "n/a", never stop
the run.

Exit status: 0 when every step passed, 1 when any failed or timed out, 2 without a CUDA device or for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from conformance.flags import Parser, names, output_dir, seconds
from tools.cuda import args_for_cuda

STEPS = ("tests", "conformance", "bench")
BUDGETS = {"tests": 120.0, "conformance": 210.0, "bench": 130.0}
"""Seconds per step: 460 s in all, under 8 minutes with the start-up."""
BENCH_MARGIN = 40.0
"""Seconds of the bench's budget kept for the case in flight, the memory ratio and the plot."""
TEST_TIMEOUT = 90
"""pytest-timeout per gpu test, in seconds."""
TEST_WORKERS = 4
"""pytest-xdist workers for the gpu tests, all on the one GPU."""
FAILURES_SHOWN = 8
TRACEBACK_LINES = 15
ROOT = Path(__file__).resolve().parents[1]
"""The repository root: where tests/ lives and the subprocesses run."""


@dataclass
class Step:
    """One step of the run and what came of it."""

    name: str
    command: list[str]
    budget_s: float
    status: str = "not run"
    """passed, failed, timed out, or not run."""
    returncode: int | None = None
    seconds: float = 0.0
    passed: int | None = None
    failed: int | None = None
    skipped: int | None = None
    detail: list[str] = field(default_factory=list)
    """Short lines worth printing: failures, crashed checks."""


class Log:
    """Prints and keeps every line in <out>/gpu.log as it goes (a run killed midway keeps what it printed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Running a step


def run_command(command: list[str], budget_s: float, log_path: Path, cwd: Path = ROOT) -> tuple[int | None, float]:
    """Run `command` with its output in `log_path`; kill its whole process group after `budget_s` seconds.
    Returns (exit status, or None when it timed out; seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)  # its own group: the ranks it spawns die with it
        try:
            rc: int | None = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return rc, time.monotonic() - start


def _status(rc: int | None, ok: bool) -> str:
    return "timed out" if rc is None else ("passed" if ok else "failed")


def parse_junit(path: Path) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, failure lines) from pytest's junit XML; errors count as failures.
    Each failure gives its test id and the last TRACEBACK_LINES lines of its short traceback."""
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    details: list[str] = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed += 1
            if len(details) < FAILURES_SHOWN * (TRACEBACK_LINES + 1):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                text = (bad.text or bad.get("message") or "").strip().splitlines()
                details += [f"FAILED {name}", *(f"    {line}" for line in text[-TRACEBACK_LINES:])]
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, details


def summarize_conformance(report: dict) -> dict[str, dict]:
    """{check: {"rows", "failed", "verdicts": {verdict: count}}} from a conformance report.json."""
    out: dict[str, dict] = {}
    for row in report.get("results", []):
        entry = out.setdefault(row.get("check", "?"), {"rows": 0, "failed": 0, "verdicts": Counter()})
        entry["rows"] += 1
        equivalence = row.get("equivalence") or {}
        if row.get("error") or equivalence.get("passed") is False:
            entry["failed"] += 1
        if row.get("verdict"):
            entry["verdicts"][row["verdict"]] += 1
    return {name: {**e, "verdicts": dict(e["verdicts"])} for name, e in out.items()}


def _tests(step: Step, out: Path) -> None:
    xml = out / "pytest.xml"
    rc, step.seconds = run_command(step.command, step.budget_s, out / "tests.log")
    step.returncode = rc
    if xml.exists():
        step.passed, step.failed, step.skipped, step.detail = parse_junit(xml)
    else:
        step.detail = [f"no junit XML (see {out / 'tests.log'})", *_tail(out / "tests.log")]
    step.status = _status(rc, rc == 0 or (rc == 5 and not step.failed))  # 5: nothing collected


def _run_for_json(step: Step, log: Path, path: Path) -> dict | None:
    """Run the step's command; the JSON file it writes, or None (the step failed, the log's tail says why)."""
    rc, step.seconds = run_command(step.command, step.budget_s, log)
    step.returncode = rc
    if not path.exists():
        step.status = _status(rc, False)
        step.detail = [f"no {path.name}", *_tail(log)]
        return None
    step.status = _status(rc, rc == 0)
    return json.loads(path.read_text())


def _conformance(step: Step, out: Path) -> dict:
    report = _run_for_json(step, out / "conformance.log", out / "conformance" / "report.json")
    if report is None:
        return {}
    checks = summarize_conformance(report)
    step.passed = sum(c["rows"] - c["failed"] for c in checks.values())
    step.failed = sum(c["failed"] for c in checks.values())
    for row in report.get("results", []):
        if row.get("error") or (row.get("equivalence") or {}).get("passed") is False:
            eq = row.get("equivalence") or {}
            why = (row.get("error") or f"{eq.get('name')}: max error {eq.get('max_error')} > bound {eq.get('bound')}"
                   ).strip().splitlines()
            step.detail += [f"FAILED {row.get('check')}/{row.get('name')}", *(f"    {x}" for x in why[-6:])]
    return checks


def _bench(step: Step, out: Path) -> dict:
    payload = _run_for_json(step, out / "bench.log", out / "bench" / "bench.json")
    if payload is None:
        return {}
    cells = [(impl, t) for case in payload.get("cases", []) for impl, modes in case["timings"].items()
             for t in modes.values()]
    absent = [t for _, t in cells if t.get("na") and "not installed" in t["na"]]
    step.passed = sum(t.get("tflops") is not None for _, t in cells)
    step.skipped = len(absent)  # an implementation whose package is not installed
    step.failed = sum(t.get("na") is not None for _, t in cells) - len(absent)  # refused the case, or failed on it
    ours = list(dict.fromkeys(t["na"] for impl, t in cells if impl == "triton" and t.get("na")))
    step.detail += [f"triton n/a: {why}" for why in ours[:3]]
    if payload.get("skipped"):
        step.detail.append(f"{len(payload['skipped'])} case(s) skipped: time budget")
    return payload


def _tail(path: Path, lines: int = 10) -> list[str]:
    if not path.exists():
        return []
    return [f"    {x}" for x in path.read_text(errors="replace").splitlines()[-lines:]]


# ---------------------------------------------------------------------------------------------------------------
# Environment and summary


def environment() -> dict:
    env = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpus": torch.cuda.device_count(), "driver": _driver(), "cuda": torch.version.cuda,
           "torch": torch.__version__, "python": platform.python_version()}
    for package in ("triton", "transformers", "deepspeed", "flash-attn"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    return env


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _ratio(value: float | None, goal: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x ({'meets' if value >= goal else 'below'} goal {goal:g}x)"


def render_summary(summary: dict) -> str:
    """The short table printed last."""
    env = summary["environment"]
    lines = ["=" * 100, "SUMMARY",
             f"GPU {env.get('gpu')} (x{env.get('gpus')}), driver {env.get('driver') or 'unknown'}, "
             f"CUDA {env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"python {env.get('python')}, flash-attn {env.get('flash-attn') or 'absent'}, "
             f"deepspeed {env.get('deepspeed') or 'absent'}",
             f"{'step':<12} {'status':<10} {'passed':>7} {'failed':>7} {'skipped':>8} {'seconds':>8}  budget"]
    for s in summary["steps"]:
        count = lambda v: "-" if v is None else str(v)  # noqa: E731
        lines.append(f"{s['name']:<12} {s['status']:<10} {count(s['passed']):>7} {count(s['failed']):>7} "
                     f"{count(s['skipped']):>8} {s['seconds']:>8.0f}  {s['budget_s']:.0f}")
    lines.append("(bench: passed = cells measured, failed = cells n/a (refused or failed), skipped = package absent)")
    checks = summary.get("checks") or {}
    if checks:
        lines.append("conformance checks: rows held/rows; verdicts")
        for name, c in checks.items():
            verdicts = ", ".join(f"{v} {n}" for v, n in c["verdicts"].items()) or "-"
            lines.append(f"  {name:<16} {c['rows'] - c['failed']}/{c['rows']}; {verdicts}")
    head = summary.get("headline") or {}
    if head:
        lines.append("ours (Triton) / SDPA-flash, TFLOP/s at bf16 d=128 N=8K:")
        for key, value in head.items():
            goal = 1.0 if key.endswith(" fwd") else 0.9
            lines.append(f"  {key:<16} {_ratio(value, goal)}")
    memory = summary.get("memory")
    if memory:
        ratios = ", ".join(f"{impl} {r:.1f}x" for impl, r in memory.get("ratios", {}).items()) or "n/a"
        lines.append(f"peak memory naive / flash, fwd+bwd, {memory.get('label')} B={memory.get('B')} "
                     f"H={memory.get('H')}: {ratios} (paper: 20x at 4K)")
    lines.append(f"overall: {'PASS' if summary['passed'] else 'FAIL'} in {summary['seconds']:.0f} s; "
                 f"full output in {summary['out']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The run


def commands(out: Path, budgets: dict[str, float]) -> dict[str, list[str]]:
    py = sys.executable
    pytest = [py, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--tb=short", "-rf",
              "--continue-on-collection-errors",
              f"--junitxml={out / 'pytest.xml'}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        pytest.append(f"--timeout={TEST_TIMEOUT}")
    if importlib.util.find_spec("xdist") is not None:
        pytest += ["-n", str(TEST_WORKERS)]  # the kernels' first compiles dominate: compile on several cores
    return {
        "tests": pytest,
        "conformance": [py, "-m", "conformance", "--device", "cuda", "--out", str(out / "conformance"),
                        "--timeout", str(max(30.0, budgets["conformance"] - 20))],
        "bench": [py, "-m", "conformance", "bench", "attention", "--quick", "--out", str(out / "bench"),
                  "--budget", str(max(10.0, budgets["bench"] - BENCH_MARGIN))],
    }


def _steps(text: str) -> tuple[str, ...]:
    """--steps: comma-separated step names, each one of STEPS, at least one."""
    chosen = tuple(names(text))
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step {unknown[0]!r}; choose from {', '.join(STEPS)}")
    return chosen


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m conformance gpu",
                    description="The prepared run for one CUDA GPU: gpu tests, conformance, bench.")
    parser.add_argument("--out", type=output_dir, default=Path("gpu-report"), help="default: ./gpu-report")
    parser.add_argument("--steps", type=_steps, default=STEPS, help=f"comma-separated subset of {', '.join(STEPS)}")
    for name in STEPS:
        parser.add_argument(f"--budget-{name}", type=seconds, default=BUDGETS[name], metavar="SECONDS",
                            help=f"time budget of the {name} step (default: {BUDGETS[name]:g}; at most a week)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, each checked by its type; a bad one exits 2 with one line naming it (SystemExit)."""
    args = _parser().parse_args(argv)
    args.budgets = {name: getattr(args, f"budget_{name}") for name in STEPS}
    return args


def main(argv: list[str]) -> int:
    args = args_for_cuda(parse_args, argv, "gpu")
    if isinstance(args, int):
        return args
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu.log")
    start = time.monotonic()
    env = environment()
    log(f"pretrain-spec gpu run: {env}")
    cmds = commands(out, args.budgets)
    steps = [Step(name, cmds[name], args.budgets[name]) for name in args.steps]
    summary: dict = {"environment": env, "out": str(out), "checks": {}, "headline": {}, "memory": None}
    for step in steps:
        log(f"[{step.name}] {' '.join(step.command)}  (budget {step.budget_s:g} s)")
        try:
            if step.name == "tests":
                _tests(step, out)
            elif step.name == "conformance":
                summary["checks"] = _conformance(step, out)
            else:
                bench = _bench(step, out)
                summary["headline"], summary["memory"] = bench.get("headline") or {}, bench.get("memory")
        except Exception as error:  # noqa: BLE001 - a step that cannot even be run is recorded; the others go on
            step.status, step.detail = "failed", [f"{type(error).__name__}: {error}"]
        log(f"[{step.name}] {step.status} in {step.seconds:.0f} s: passed {step.passed}, failed {step.failed}, "
            f"skipped {step.skipped}")
        for line in step.detail:
            log(line)
    summary["steps"] = [asdict(s) for s in steps]
    summary["passed"] = all(s.status == "passed" for s in steps)
    summary["seconds"] = time.monotonic() - start
    (out / "gpu.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(render_summary(summary))
    return 0 if summary["passed"] else 1
