"""`python -m conformance compare`: which differences between two reports are regressions, on hand-made rows."""

from __future__ import annotations

import copy
import json

from conformance.compare import compare, main


def _row(name, *, max_error=1e-7, bound=1e-5, passed=True, verdict=None, claim=None, memory=(), error=None):
    return {"check": "demo", "name": name, "error": error, "claim": claim, "verdict": verdict,
            "equivalence": {"max_error": max_error, "bound": bound, "passed": passed} if bound is not None else None,
            "memory": [{"name": n, "measured": v, "unit": "x"} for n, v in memory], "speed": [], "metrics": []}


def _rows(*rows):
    return {(r["check"], r["name"]): r for r in rows}


OLD = _rows(_row("a"), _row("b", verdict="holds", claim="flash.memory", bound=None, memory=[("ratio", 4.0)]),
            _row("c"), _row("gone"))


def test_identical_reports_have_no_change():
    changes = compare(OLD, copy.deepcopy(OLD))
    assert not (changes.regressions or changes.changed or changes.moved or changes.added or changes.gone)


def test_regressions_and_mere_changes_are_told_apart():
    new = copy.deepcopy(OLD)
    new[("demo", "a")]["equivalence"].update(max_error=2e-5, passed=False)  # past its bound: regression
    new[("demo", "b")].update(verdict="does not hold", memory=[{"name": "ratio", "measured": 3.0, "unit": "x"}])
    new[("demo", "c")]["equivalence"]["max_error"] = 5e-6  # within its bound but 50x larger: regression
    del new[("demo", "gone")]
    new[("demo", "new")] = _row("new")
    changes = compare(OLD, new, factor=10.0, tolerance=0.1)
    assert changes.regressions == [
        "demo / a: holds -> fails",
        "demo / b: claim flash.memory holds -> does not hold",
        "demo / c: max error 1e-07 -> 5e-06 (more than 10x; bound 1e-05)",
    ]
    assert changes.moved == ["demo / b: memory: ratio 4x -> 3x (-25%)"]
    assert changes.added == ["demo / new"] and changes.gone == ["demo / gone"]


def test_an_improvement_or_small_growth_is_no_regression():
    new = copy.deepcopy(OLD)
    new[("demo", "a")]["equivalence"]["max_error"] = 5e-7  # 5x: below the factor
    new[("demo", "b")]["verdict"] = "holds only under stated conditions"
    changes = compare(OLD, new)
    assert changes.regressions == [] and changes.changed == [
        "demo / b: claim flash.memory holds -> holds only under stated conditions"]


def test_cli_exit_status_and_unreadable_input(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"results": list(OLD.values())}))
    bad = copy.deepcopy(OLD)
    bad[("demo", "a")]["error"] = "Traceback ...\nRuntimeError: boom"
    new.write_text(json.dumps({"results": list(bad.values())}))
    assert main([str(old), str(old)]) == 0
    assert main([str(old), str(new)]) == 1
    assert "REGRESSION: demo / a: holds -> crashed" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("{")
    assert main([str(old), str(tmp_path / "junk.json")]) == 2
    err = capsys.readouterr().err
    assert "argument NEW: cannot read a conformance report" in err and err.count("\n") == 1
