"""`python -m conformance gpu`: arguments, the no-CUDA exit, the parsers of each step's report, the summary, the
step timeout, and the whole run on CPU with each step's command replaced by a script that writes its report."""

import json
import os
import sys
import textwrap
import time

import pytest
import torch

from conformance.__main__ import main as cli_main
from tools import gpu

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.optimized.test_x" name="test_ok" time="0.1"/>
<testcase classname="tests.optimized.test_x" name="test_skip"><skipped message="no"/></testcase>
<testcase classname="tests.optimized.test_x" name="test_bad"><failure message="boom">line 1
E   AssertionError: boom</failure></testcase>
<testcase classname="tests.optimized.test_y" name="test_err"><error message="fixture">setup failed</error></testcase>
</testsuite></testsuites>"""

REPORT = {"results": [
    {"check": "attention", "name": "a", "equivalence": {"passed": True}, "verdict": None, "error": None},
    {"check": "attention", "name": "b", "equivalence": None, "verdict": "holds", "error": None},
    {"check": "attention", "name": "c", "equivalence": {"passed": False, "name": "dq", "max_error": 1.0,
                                                         "bound": 0.1}, "verdict": None, "error": None},
    {"check": "zero", "name": "crash", "equivalence": None, "verdict": None, "error": "Traceback\nImportError: x"},
]}


def test_arguments():
    args = gpu.parse_args([])
    assert args.steps == gpu.STEPS and sum(args.budgets.values()) <= 480
    args = gpu.parse_args(["--steps", "bench", "--budget-bench", "60", "--out", "x"])
    assert args.steps == ("bench",) and args.budgets["bench"] == 60 and str(args.out) == "x"
    for bad in (["--steps", "lint"], ["--steps", ""], ["--budget-tests", "0"]):
        with pytest.raises(SystemExit) as exit_:
            gpu.parse_args(bad)
        assert exit_.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA path")
def test_no_cuda_is_one_line_and_exit_2(capsys, tmp_path):
    assert cli_main(["gpu", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == "gpu needs a CUDA device\n"
    assert not (tmp_path / "r").exists()


def test_junit_counts_and_short_tracebacks(tmp_path):
    (tmp_path / "p.xml").write_text(JUNIT)
    passed, failed, skipped, detail = gpu.parse_junit(tmp_path / "p.xml")
    assert (passed, failed, skipped) == (1, 2, 1)
    assert "FAILED tests.optimized.test_x::test_bad" in detail and "    E   AssertionError: boom" in detail
    assert "FAILED tests.optimized.test_y::test_err" in detail


def test_conformance_summary_per_check():
    checks = gpu.summarize_conformance(REPORT)
    assert checks == {"attention": {"rows": 3, "failed": 1, "verdicts": {"holds": 1}},
                      "zero": {"rows": 1, "failed": 1, "verdicts": {}}}


def test_step_timeout_kills_the_process_group(tmp_path):
    """The step and what it spawned (a conformance run's ranks) die when the budget is spent."""
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid)); time.sleep(60)")
    rc, seconds = gpu.run_command([sys.executable, "-c", script], 3.0, tmp_path / "log")
    assert rc is None and seconds < 20
    child = int((tmp_path / "pid").read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with open(f"/proc/{child}/stat") as f:
        assert f.read().split()[2] == "Z", "the spawned process outlived the step"


def _fake_step(path, body: str) -> list[str]:
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_the_whole_run_with_fake_steps(tmp_path, monkeypatch, capsys):
    """main() on CPU: each step's command replaced by a script writing the report the real one writes."""
    out = tmp_path / "report"
    bench_json = {"cases": [{"dtype": "bf16", "d": 128, "N": 8192, "causal": c, "timings": {
        "triton": {"fwd": {"tflops": 500.0, "na": None}, "fwd_bwd": {"tflops": 300.0, "na": None}},
        "sdpa-flash": {"fwd": {"tflops": 400.0, "na": None}, "fwd_bwd": {"tflops": 400.0, "na": None}},
        "flash-attn": {m: {"tflops": None, "na": "the flash_attn package is not installed"}
                       for m in ("fwd", "fwd_bwd")}}} for c in (True, False)],
        "headline": {"causal fwd": 1.25, "causal fwd_bwd": 0.75, "full fwd": 1.25, "full fwd_bwd": 0.75},
        "memory": {"label": "fp16 d=64 N=4K causal", "B": 1, "H": 8, "ratios": {"triton": 21.5}}, "skipped": []}
    fakes = {
        "tests": _fake_step(tmp_path / "t.py", f"""
            import pathlib, sys
            pathlib.Path({str(out / 'pytest.xml')!r}).write_text({JUNIT!r})
            sys.exit(1)"""),
        "conformance": _fake_step(tmp_path / "c.py", f"""
            import json, pathlib
            p = pathlib.Path({str(out / 'conformance')!r}); p.mkdir(parents=True)
            (p / "report.json").write_text(json.dumps({REPORT!r}))
            raise SystemExit(1)"""),
        "bench": _fake_step(tmp_path / "b.py", f"""
            import json, pathlib
            p = pathlib.Path({str(out / 'bench')!r}); p.mkdir(parents=True)
            (p / "bench.json").write_text(json.dumps({bench_json!r}))"""),
    }
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "environment", lambda: {"gpu": "NVIDIA H200", "gpus": 1, "driver": "570.1",
                                                     "torch": "2.11", "triton": "3.6", "python": "3.12"})
    monkeypatch.setattr(gpu, "commands", lambda out, budgets: fakes)
    assert gpu.main(["--out", str(out)]) == 1
    printed = capsys.readouterr().out
    summary = printed[printed.index("SUMMARY"):]
    assert "GPU NVIDIA H200 (x1), driver 570.1" in summary
    assert "tests        failed           1       2        1" in summary
    assert "conformance  failed           2       2" in summary
    assert "bench        passed           8       0        4" in summary
    assert "attention        2/3; holds 1" in summary and "zero             0/1; -" in summary
    assert "causal fwd       1.25x (meets goal 1x)" in summary and "causal fwd_bwd   0.75x (below goal 0.9x)" in summary
    assert "triton 21.5x" in summary and "overall: FAIL" in summary
    assert "FAILED zero/crash" in printed and "    ImportError: x" in printed
    assert "FAILED attention/c" in printed and "E   AssertionError: boom" in printed
    assert (out / "gpu.log").read_text() == printed
    saved = json.loads((out / "gpu.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["failed", "failed", "passed"]


def test_a_step_that_times_out_or_writes_nothing_is_recorded(tmp_path, monkeypatch, capsys):
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "environment", lambda: {"gpu": "fake"})
    monkeypatch.setattr(gpu, "commands", lambda out, budgets: {"conformance": hang,
                                                               "bench": [sys.executable, "-c", "print('hi')"]})
    assert gpu.main(["--out", str(tmp_path), "--steps", "conformance,bench", "--budget-conformance", "1"]) == 1
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["timed out", "failed"]
    assert "no bench.json" in capsys.readouterr().out
