"""`python -m conformance mutate`: the mutation list applies to the current tree, the runner refuses a snippet that is
missing or ambiguous, and one real mutation is killed end to end while the unmutated baseline passes (~20 s)."""

from __future__ import annotations

import json

import pytest

from conformance import checks, mutate
from conformance.mutations import MUTATIONS, Mutation


def _mutation(original: str, replacement: str = "X", file: str = "optimized/thing.py") -> Mutation:
    return Mutation(id="t", file=file, original=original, replacement=replacement, description="test",
                    checks=("schedules",))


def test_apply_replaces_a_snippet_that_occurs_once(tmp_path):
    (tmp_path / "optimized").mkdir()
    (tmp_path / "optimized/thing.py").write_text("a = 1\nb = 2\n")
    mutate.apply_mutation(tmp_path, _mutation("b = 2", "b = 3"))
    assert (tmp_path / "optimized/thing.py").read_text() == "a = 1\nb = 3\n"


@pytest.mark.parametrize("text, words", [("a = 1\n", "does not occur"), ("b = 2\nb = 2\n", "occurs 2 times")])
def test_apply_refuses_a_missing_or_repeated_snippet(tmp_path, text, words):
    (tmp_path / "optimized").mkdir()
    (tmp_path / "optimized/thing.py").write_text(text)
    with pytest.raises(mutate.MutationError, match=words):
        mutate.apply_mutation(tmp_path, _mutation("b = 2"))
    assert (tmp_path / "optimized/thing.py").read_text() == text  # nothing changed
    assert mutate.stale(tmp_path, [_mutation("b = 2")])


def test_a_mutation_must_target_optimized_and_name_a_check():
    with pytest.raises(ValueError, match="not under optimized/"):
        _mutation("x", file="reference/model.py")
    with pytest.raises(ValueError, match="names no check"):
        Mutation(id="t", file="optimized/x.py", original="a", replacement="b", description="d", checks=())


def test_every_mutation_applies_to_the_current_tree():
    """Each snippet occurs exactly once in today's optimized/: an edit there that moves one fails here (rot)."""
    assert mutate.stale(mutate.repo_root(), MUTATIONS) == []
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids)), "mutation ids must be unique"
    known = set(checks.available())
    assert {c for m in MUTATIONS for c in m.checks} <= known
    assert len(MUTATIONS) >= 25
    modules = {m.file.split("/")[1].removesuffix(".py") for m in MUTATIONS}
    assert {"attention", "data_parallel", "accumulation", "precision", "checkpointing", "optimizers",
            "clipping", "zero", "tensor_parallel", "pipeline", "context_parallel", "schedules"} <= modules


@pytest.mark.parametrize("argv", [["--only", "no-such-mutation"], ["--jobs", "0"], ["--only", ","]])
def test_bad_arguments_exit_2(argv, capsys):
    assert mutate.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_end_to_end_a_real_bug_is_killed_and_a_harmless_edit_survives(tmp_path, monkeypatch):
    """The warmup off-by-one is killed by the schedules check; a comment edit survives (exit 1); the baseline of
    the unmutated copy passes. The working tree is never touched."""
    real = next(m for m in MUTATIONS if m.id == "schedules-warmup-off-by-one")
    harmless = Mutation(id="harmless-comment", file="optimized/schedules.py",
                        original='"""Linear warmup, step / warmup_steps: 0 at step 0."""',
                        replacement='"""Linear warmup (a harmless edit)."""', description="no bug",
                        checks=("schedules",))
    before = (mutate.repo_root() / real.file).read_text()
    monkeypatch.setattr(mutate, "MUTATIONS", (real, harmless))
    assert mutate.main(["--out", str(tmp_path), "--device", "cpu"]) == 1
    assert (mutate.repo_root() / real.file).read_text() == before
    report = json.loads((tmp_path / "mutate.json").read_text())
    verdicts = {m["id"]: m for m in report["mutations"]}
    assert verdicts[real.id]["status"] == "killed", verdicts[real.id]
    assert "schedules/" in verdicts[real.id]["detail"] and "bound" in verdicts[real.id]["detail"]
    assert verdicts["harmless-comment"]["status"] == "SURVIVED"
    assert report["baselines"]["schedules"]["status"] == "passes"  # every row of the unmutated copy holds
    assert "| schedules-warmup-off-by-one |" in (tmp_path / "mutate.md").read_text()


def test_rows_the_baseline_fails_do_not_judge_a_mutation(tmp_path):
    def row(name, passed=True, error=None):
        eq = {"name": name, "passed": passed, "max_error": 2.0, "bound": 1.0}
        return {"check": "zero", "name": name, "equivalence": eq, "error": error}

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"results": [row("a", passed=False), row("b")]}))
    assert mutate._judge(report, 1, "", ignore=frozenset({"zero/a"})).status == "SURVIVED"
    killed = mutate._judge(report, 1, "")
    assert killed.status == "killed" and killed.failed_rows == ["zero/a"] and "error 2 > bound 1" in killed.detail
    report.write_text(json.dumps({"results": [row("b"), row("c", error="Traceback\nValueError: boom\n")]}))
    crashed = mutate._judge(report, 1, "")
    assert crashed.status == "crashed" and "ValueError: boom" in crashed.detail
    assert mutate._judge(tmp_path / "missing.json", 1, "Killed").status == "crashed"
