"""`python -m conformance`: argument errors, a real run writing its report, and the torchrun path."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conformance.__main__ import main
from conformance.compare import main as compare_main

ROOT = Path(__file__).resolve().parents[2]


def _bad_args(tmp_path: Path) -> list[tuple[list[str], str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [
        (["--only", "training,nope"], "argument --only: unknown check 'nope'; available: training"),
        (["--only", "zer"], "argument --only: unknown check 'zer'; did you mean zero?"),
        (["--only", ","], "argument --only: expected comma-separated names, got ','"),
        (["--skip", "trainin"], "argument --skip: unknown check 'trainin'; did you mean training"),
        (["--world-size", "0"], "argument --world-size: must be a positive integer at most 1048576, got 0"),
        (["--world-size", "two"], "argument --world-size: must be a positive integer at most 1048576, got 'two'"),
        (["--skip", "training", "--only", "training"], "argument --skip: no check left to run"),
        (["--timeout", "-1"], "argument --timeout: must be a positive number of seconds at most 604800, got -1"),
        (["--timeout", "nan"], "argument --timeout: must be a positive number of seconds at most 604800, got nan"),
        (["--timeout", "inf"], "argument --timeout: must be a positive number of seconds at most 604800, got inf"),
        (["--timeout", "1e300"], "argument --timeout: must be a positive number of seconds at most 604800, got 1e300"),
        (["--device", "cpu", "--world-size", "1000"], "argument --world-size: 1000 CPU ranks; at most 64"),
        (["--out", str(blocker / "report")], "argument --out: cannot create folder"),
        (["--junitxml", str(blocker / "r.xml")], "argument --junitxml: cannot create folder"),
        (["--junitxml", str(tmp_path)], "argument --junitxml: "),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ]


def test_bad_arguments_exit_2_with_one_line_naming_the_flag_before_any_check_runs(tmp_path, capsys, monkeypatch):
    from conformance import checks

    monkeypatch.setattr(checks, "run", lambda *a: pytest.fail("a check ran despite bad arguments"))
    for argv, message in _bad_args(tmp_path):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, argv
        assert message in err, (argv, err)
        assert err.count("\n") == 1, (argv, err)


def test_a_run_prints_a_summary_writes_the_report_and_junit_and_compare_finds_a_doctored_regression(
        tmp_path, capsys):
    xml_path = tmp_path / "ci" / "results.xml"
    assert main(["--only", "training", "--world-size", "3", "--out", str(tmp_path), "--junitxml", str(xml_path)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "gloo" in out and "world_size 3" in out
    assert "the seed's claims" in out and "not run" in out and "report:" in out
    assert "gradients all-reduced by hand" not in out  # the rows are in the report; the terminal sums them up
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["world_size"] == 3 and report["failed"] == []
    rows = {r["name"]: r for r in report["results"]}
    assert rows["3 ranks, gradients all-reduced by hand"]["equivalence"]["passed"]
    assert rows["3 ranks, gradients all-reduced by hand"]["verdict"] == "holds"
    assert "data_parallel.equivalence" in (tmp_path / "report.md").read_text()

    suite = ET.parse(xml_path).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("tests") == str(len(cases)) == str(len(report["results"])) and suite.get("failures") == "0"
    case = next(c for c in cases if c.get("name") == "3 ranks, gradients all-reduced by hand")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert case.get("classname") == "conformance.training" and props["verdict"] == "holds"
    assert float(props["equivalence.max_error"]) <= float(props["equivalence.bound"])

    old = tmp_path / "report.json"
    assert compare_main([str(old), str(old)]) == 0
    doctored = json.loads(old.read_text())
    row = next(r for r in doctored["results"] if r["name"] == "3 ranks, gradients all-reduced by hand")
    row["equivalence"]["max_error"] = 2 * row["equivalence"]["bound"]
    row["equivalence"]["passed"] = False
    row["verdict"] = "does not hold"
    new = tmp_path / "doctored.json"
    new.write_text(json.dumps(doctored))
    capsys.readouterr()
    assert compare_main([str(old), str(new)]) == 1
    text = capsys.readouterr().out
    assert "REGRESSION: training / 3 ranks, gradients all-reduced by hand: holds -> fails" in text
    assert "claim data_parallel.equivalence holds -> does not hold" in text


def test_under_torchrun_each_rank_runs_in_place(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "conformance", "--only", "training", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["world_size"] == 2 and report["failed"] == []
