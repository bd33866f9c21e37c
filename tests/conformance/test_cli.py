"""`python -m conformance`: argument errors, a real run writing its report, and the torchrun path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "training,nope"], "--only: unknown check(s) nope; available: training"),
        (["--world-size", "0"], "--world-size must be >= 1, got 0"),
        (["--skip", "training", "--only", "training"], "no check left to run"),
        (["--timeout", "-1"], "--timeout must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_prints_the_environment_and_writes_the_report(tmp_path, capsys):
    assert main(["--only", "training", "--world-size", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "gloo" in out and "world_size 3" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["world_size"] == 3 and report["failed"] == []
    rows = {r["name"]: r for r in report["results"]}
    assert rows["3 ranks, gradients all-reduced by hand"]["equivalence"]["passed"]
    assert rows["3 ranks, gradients all-reduced by hand"]["verdict"] == "holds"
    assert "data_parallel.equivalence" in (tmp_path / "report.md").read_text()


def test_under_torchrun_each_rank_runs_in_place(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "conformance", "--only", "training", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["world_size"] == 2 and report["failed"] == []
