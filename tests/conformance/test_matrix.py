"""`python -m conformance matrix`: the cells cover every setting, bad arguments are one line, a real run of two cells
holds and shows its table, and a row that fails in one cell only makes the matrix fail and names that cell."""

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance import _matrix_run, matrix
from conformance.__main__ import main as suite_main
from conformance._matrix_cells import (
    IMPORTANT_PAIRS,
    ISA_LEVELS,
    Cell,
    Machine,
    cells_for,
    covering,
    dimensions,
    parse_cell,
)
from conformance.matrix import main

ROOT = Path(__file__).resolve().parents[2]
MACHINES = [
    Machine(("native", "avx512", "avx2", "default"), 0),  # an AVX-512 server
    Machine(("native", "avx2", "default"), 0),  # a laptop
    Machine(("native", "default"), 0),  # ARM
    Machine(("native", "avx2", "default"), 1),
    Machine(("native", "avx512", "avx2", "default"), 8),
]
SETTING_VARIABLES = {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS",
                     "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"}


@pytest.mark.parametrize("m", MACHINES, ids=lambda m: f"{len(m.isa_levels)}isa-{m.cuda_devices}gpu")
def test_the_cells_cover_every_value_of_every_dimension_and_with_pairwise_every_important_pair(m):
    dims = dimensions(m)
    assert ("tf32" in dims) == bool(m.cuda_devices) and ("precision" in dims) != bool(m.cuda_devices)
    assert dims["world_size"] == ((1, 2, 3, 4) if not m.cuda_devices else tuple(range(1, min(4, m.cuda_devices) + 1)))
    for pairwise in (False, True):
        cells = cells_for(m, pairwise=pairwise)
        seen = [{k: v for k, v in vars(c).items() if v is not None} for c in cells]
        for d, values in dims.items():
            assert {s[d] for s in seen} == set(values), (d, pairwise)
        pairs = [(a, b) for a, b in IMPORTANT_PAIRS if pairwise and a in dims and b in dims]
        for a, b in pairs:
            assert {(s[a], s[b]) for s in seen} == set(itertools.product(dims[a], dims[b])), (a, b)
        # no more cells than the largest requirement needs: each is a whole run of the suite
        assert len(cells) == max([len(v) for v in dims.values()] + [len(dims[a]) * len(dims[b]) for a, b in pairs])
        assert len({c.name for c in cells}) == len(cells)
        for c in cells:
            assert parse_cell(c.name, m) == c  # a name printed in the table runs that cell again
            assert set(c.env()) <= SETTING_VARIABLES and c.env()["OMP_NUM_THREADS"] == str(c.threads)
            assert all(c.env()[k] == v for k, v in ISA_LEVELS[c.isa].items())
            # "high" and TF32 reach the spawned ranks through torch's start-up variable
            assert ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" in c.env()) == (c.precision == "high" or c.tf32 == "on")
            assert c.args()[:2] == ["--world-size", str(c.world_size)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.data())
def test_covering_meets_every_requirement_for_any_dimensions(sizes, data):
    dims = {f"d{i}": tuple(range(n)) for i, n in enumerate(sizes)}
    names = list(dims)
    pairs = tuple(data.draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names))
                                     .filter(lambda p: p[0] != p[1]), max_size=3)))
    cells = covering(dims, pairs)
    assert all(set(c) == set(dims) and all(c[d] in dims[d] for d in dims) for c in cells)
    for d in dims:
        assert {c[d] for c in cells} == set(dims[d])
    for a, b in pairs:
        assert {(c[a], c[b]) for c in cells} == set(itertools.product(dims[a], dims[b]))


def _bad_args(tmp_path: Path) -> list[tuple[list[str], str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [
        (["--cells", "avx512-t1-w1-highest"], "ISA level 'avx512' is not offered on this CPU; allowed: native, avx2"),
        (["--cells", "sse-t1-w1-highest"], "ISA level 'sse' is unknown; allowed: native, avx2, default"),
        (["--cells", "native-t0-w1-highest"], "'t0' is not tN (N >= 1"),
        (["--cells", "native-t1-x2-highest"], "'x2' is not wN"),
        (["--cells", "native-t1-w1-low"], "matmul precision 'low' is not one of highest, high, medium"),
        (["--cells", "native-t1-w1-tf32on"], "(tf32on/tf32off are for CUDA; no GPU is visible)"),
        (["--cells", "native-t1"], "cell 'native-t1' is not ISA-tTHREADS-wRANKS-PRECISION"),
        (["--cells", "native-t1-w1-high,native-t1-w1-high"], "a cell is named twice"),
        (["--cells", ","], "argument --cells: expected comma-separated names"),
        (["--reduced", "--cells", "native-t1-w1-high"], "argument --cells: not allowed with argument --reduced"),
        (["--only", "zer"], "argument --only: unknown check 'zer'; did you mean zero?"),
        (["--only", "schedules", "--skip", "schedules"], "argument --skip: no check left to run"),
        (["--reduced", "--skip", "clipping,training"], "argument --skip: no check left to run"),
        (["--cell-timeout", "0"],
         "argument --cell-timeout: must be a positive number of seconds at most 604800, got 0"),
        (["--out", str(blocker / "m")], "argument --out: cannot create folder"),
        (["--quick", "--full"], "argument --full: not allowed with argument --quick"),
    ]


def test_bad_arguments_exit_2_with_one_line_before_any_cell_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(matrix, "machine", lambda: Machine(("native", "avx2", "default"), 0))
    monkeypatch.setattr(matrix, "run_cell", lambda *a: pytest.fail("a cell ran despite bad arguments"))
    for argv, message in _bad_args(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert err.startswith("python -m conformance matrix: error: ") and err.count("\n") == 1, (argv, err)


def test_the_suite_flags_the_cells_use_set_the_precision_and_reject_contradictions(tmp_path, capsys):
    for argv, message in ((["--matmul-precision", "low"], "argument --matmul-precision: invalid choice: 'low'"),
                          (["--tf32", "on", "--matmul-precision", "high"], "argument --matmul-precision: not allowed "
                           "with argument --tf32")):
        with pytest.raises(SystemExit) as info:
            suite_main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and err.count("\n") == 1, err
    before = torch.get_float32_matmul_precision()
    try:
        assert suite_main(["--only", "schedules", "--matmul-precision", "medium", "--out", str(tmp_path)]) == 0
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def _cells_see_this_checkout(monkeypatch, *extra: Path) -> None:
    """The cells' `python -m conformance` imports this checkout's code (and `extra` folders first)."""
    path = [str(p) for p in extra] + [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


@pytest.mark.slow
def test_a_real_run_of_two_cells_holds_and_writes_the_table_and_each_cells_report(tmp_path, capsys, monkeypatch):
    _cells_see_this_checkout(monkeypatch)
    cells = "native-t1-w1-highest,default-t4-w2-medium"
    assert main(["--cells", cells, "--only", "schedules", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "conformance matrix: one run of the suite per cell" in out and "2 of 2 cells hold" in out
    for name in cells.split(","):
        assert name in out and (tmp_path / name / "report.json").exists() and (tmp_path / name / "cell.log").exists()
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert data["suite_args"] == ["--quick", "--only", "schedules"]
    by_name = {c["cell"]: c for c in data["cells"]}
    assert [c["cell"] for c in data["cells"]] == cells.split(",")
    assert all(c["returncode"] == 0 and c["fail"] == 0 and c["hold"] == c["rows"] > 0 for c in data["cells"])
    # the settings took effect in the suite's process
    assert by_name["native-t1-w1-highest"]["effective"] == {"cpu_threads": 1, "world_size": 1}
    assert by_name["default-t4-w2-medium"]["effective"] == {"cpu_threads": 4, "world_size": 2}  # not capped at cores
    assert by_name["default-t4-w2-medium"]["env"]["ATEN_CPU_CAPABILITY"] == "default"
    assert "--matmul-precision medium" in (tmp_path / "default-t4-w2-medium" / "cell.log").read_text()
    assert "None: every row holds in every cell." in (tmp_path / "matrix.md").read_text()


INJECTED_BUG = """
import os

if os.environ.get("OMP_NUM_THREADS") == "2":  # only the cell with two threads carries the bug
    from optimized import schedules

    _multiplier = schedules.CosineAnnealing.multiplier
    schedules.CosineAnnealing.multiplier = lambda self, step: _multiplier(self, step) * (1 + 1e-9)
"""


@pytest.mark.slow
def test_a_row_failing_in_one_cell_fails_the_matrix_and_is_named_with_its_error_and_bound(
        tmp_path, capsys, monkeypatch):
    """A real bug (cosine annealing off by one part in 1e9), injected into optimized/ by a sitecustomize that only
    the two-thread cell's process acts on: the real schedules check must fail there and hold in the other cell."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECTED_BUG)
    _cells_see_this_checkout(monkeypatch, inject)
    out_dir = tmp_path / "matrix"
    assert main(["--cells", "native-t1-w1-highest,native-t2-w1-highest", "--only", "schedules",
                 "--out", str(out_dir)]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 cells hold" in out and "schedules/cosine_annealing" in out
    held, failed = json.loads((out_dir / "matrix.json").read_text())["cells"]
    assert held["fail"] == 0 and held["returncode"] == 0
    assert failed["cell"] == "native-t2-w1-highest" and failed["returncode"] == 1 and failed["fail"] >= 1
    rows = {f["row"]: f for f in failed["failures"]}
    assert all(r.startswith("schedules/cosine_annealing") for r in rows)
    assert all(f["error"] > f["bound"] for f in rows.values())
    md = (out_dir / "matrix.md").read_text()
    assert "### native-t2-w1-highest" in md and "schedules/cosine_annealing" in md


def test_a_cell_that_crashes_or_hangs_fails_the_matrix_with_its_output(tmp_path, monkeypatch):
    """A suite that exits without a report (here: an argument it rejects) or outlives --cell-timeout is a failed
    cell showing the end of its output, never a cell that holds."""
    _cells_see_this_checkout(monkeypatch)
    crashed = _matrix_run.run_cell(Cell("native", 1, 1, "highest"), ["--only", "nope"], tmp_path, timeout=120)
    assert crashed.failed and crashed.returncode == 2 and "without a report" in crashed.problem
    assert "unknown check 'nope'" in crashed.problem
    hung = _matrix_run.run_cell(Cell("native", 1, 1, "highest"), ["--only", "schedules"], tmp_path, timeout=0.5)
    assert hung.failed and hung.returncode is None and "timed out after 0.5 s" in hung.problem
