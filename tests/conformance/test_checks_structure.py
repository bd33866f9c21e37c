"""The shape every check has: one CheckSpec per module, rows built through SPEC.row, claim ids that exist and are all
answered, figures returned as data and drawn by the report alone."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from conformance import checks
from conformance.checks import CheckSpec, Context
from conformance.claims import CLAIMS, Verdict
from conformance.figure import Bar, Figure, Panel, Series
from conformance.report import write_report
from conformance.tolerance import Equivalence

CHECKS_DIR = Path(checks.__file__).parent
CTX = Context(device=torch.device("cpu"), world_size=2, quick=True, out_dir=Path("."))


def test_every_check_declares_one_spec_named_after_its_module():
    names = checks.available()
    modules = sorted(p.stem for p in CHECKS_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert sorted(names) == modules
    specs = checks.specs()
    assert [s.name for s in specs] == names
    assert [s.order for s in specs] == sorted(s.order for s in specs)
    assert len({s.order for s in specs}) == len(specs), "two checks share an order"
    assert names[0] == "training"  # the baseline every parallel technique is held to comes first


def test_every_claim_is_answered_by_some_check_and_every_named_claim_exists():
    named = [c for s in checks.specs() for c in s.claims]
    assert set(named) <= set(CLAIMS), f"unknown claims: {set(named) - set(CLAIMS)}"
    assert set(CLAIMS) <= set(named), f"claims no check answers: {set(CLAIMS) - set(named)}"
    with pytest.raises(ValueError, match="unknown claim"):
        CheckSpec(name="x", technique="t", reference="r", optimized="o", order=1, claims=("no.such.claim",))


def test_row_fills_the_common_fields_and_refuses_a_claim_the_spec_does_not_list():
    spec = CheckSpec(name="demo", technique="demo technique", reference="reference.demo", optimized="optimized.demo",
                     order=1, claims=("flash.speed",))
    row = spec.row(CTX, "a row", world_size=2, claim="flash.speed", verdict=Verdict.HOLDS)
    assert (row.check, row.name, row.technique, row.reference, row.optimized, row.device, row.world_size) == (
        "demo", "a row", "demo technique", "reference.demo", "optimized.demo", "cpu", 2)
    assert spec.row(CTX, "other", optimized="optimized.other").optimized == "optimized.other"
    assert spec.row(None, "no context").device == "cpu"
    with pytest.raises(ValueError, match="does not list"):
        spec.row(CTX, "bad", claim="zero.speed", verdict=Verdict.HOLDS)


def test_a_crash_becomes_one_failing_row():
    spec = CheckSpec(name="demo", technique="t", reference="r", optimized="o", order=1)

    def boom(ctx):
        raise RuntimeError("kaput")

    (row,) = spec.guarded(CTX, "memory", boom)
    assert row.failed and row.name == "memory: crashed" and "RuntimeError: kaput" in row.error


def test_checks_build_rows_only_through_their_spec_and_never_draw():
    """No check constructs Result(...) itself or imports matplotlib: rows come from SPEC.row, plots from the report."""
    for path in CHECKS_DIR.glob("*.py"):
        if path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text())
        calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert "Result" not in calls, f"{path.name} builds a Result directly; use SPEC.row"
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
        assert "matplotlib" not in imported, f"{path.name} draws; return a conformance.figure.Figure instead"


def test_report_draws_each_figure_once_and_keeps_its_data(tmp_path):
    spec = CheckSpec(name="demo", technique="t", reference="r", optimized="o", order=1)
    lines = Figure("demo_lines", [Panel(series=[Series([1, 2, 4], [1.0, 4.0, 16.0], label="n^2", marker="o"),
                                                Series([1, 4], [2.0, 2.0], kind="points"),
                                                Series([1, 2], [3.0, 1.0], kind="bars", width=0.4)],
                                        xscale="log2", yscale="log", xticks=[(1, "1"), (4, "4")], vlines=[2])])
    gantt = Figure("demo_timeline", [Panel(timeline=[Bar(0, 0.0, 1.0, "F0", "forward"),
                                                     Bar(1, 1.0, 3.0, "B0", "backward", shade=1)],
                                           row_labels=["rank 0", "rank 1"], xlabel="s")])
    eq = Equivalence(name="e", passed=True, max_error=0.0, mean_error=0.0, bound=1.0, rule="r")
    rows = [spec.row(CTX, "one", equivalence=eq, figures=[lines]), spec.row(CTX, "two", figures=[lines, gantt])]
    json_path, md_path = write_report(rows, {"torch": torch.__version__}, tmp_path)
    for name in ("demo_lines.png", "demo_timeline.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json_path.read_text())
    assert data["results"][1]["plots"] == ["demo_lines.png", "demo_timeline.png"]
    assert data["figures"]["demo_lines"]["panels"][0]["series"][0]["y"] == [1.0, 4.0, 16.0]
    assert md_path.read_text().count("![demo_lines.png]") == 1
    with pytest.raises(ValueError, match="two different figures"):
        write_report([spec.row(CTX, "x", figures=[lines, Figure("demo_lines", gantt.panels)])], {}, tmp_path)


def test_figure_data_is_checked_when_built():
    with pytest.raises(ValueError, match="2 x values but 1 y"):
        Series([1, 2], [1.0])
    with pytest.raises(ValueError, match="xscale"):
        Panel(xscale="symlog")
    with pytest.raises(ValueError, match="file stem"):
        Figure("a.png", [Panel()])
