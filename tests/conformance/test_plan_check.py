"""The `plan` check: the planner's bytes per rank against real runs, and against DeepSpeed's estimators.

Real multi-rank runs (world sizes 3 and 2: 3 does not divide the parameter count, so ZeRO pads) of every layout whose
implementation is in this build; the layouts that are not give skip rows, never a crash.
"""

from __future__ import annotations

import pytest

from conformance.checks import plan as plan_check
from conformance.checks._plan_deepspeed import deepspeed_rows
from conformance.launch import spawn
from tools.plan import GB, Layout

W3_SPECS = [
    plan_check.LayoutRun(Layout(1, 1, 3, 0)),
    plan_check.LayoutRun(Layout(1, 1, 3, 1)),
    plan_check.LayoutRun(Layout(1, 1, 3, 2)),
    plan_check.LayoutRun(Layout(1, 1, 3, 3)),
    plan_check.LayoutRun(Layout(1, 1, 3, 3), bf16=True),
    plan_check.LayoutRun(Layout(1, 1, 3, 1, offload=True)),
    plan_check.LayoutRun(Layout(1, 3, 1, 0)),  # 4 blocks over 3 stages: uneven
]
W2_SPECS = [plan_check.LayoutRun(Layout(2, 1, 1, 0)), plan_check.LayoutRun(Layout(1, 2, 1, 0)),
            plan_check.LayoutRun(Layout(1, 1, 2, 2, offload=True))]


@pytest.mark.parametrize(("world_size", "specs"), [(3, W3_SPECS), (2, W2_SPECS)], ids=["w3", "w2"])
def test_planner_predicts_measured_bytes_per_rank(world_size, specs):
    per_rank = spawn(plan_check._run_specs, world_size, specs, "cpu", timeout=240)
    for i, spec in enumerate(specs):
        rows = plan_check._layout_rows(spec, [r[i] for r in per_rank], "cpu")
        for row in rows:
            assert row.error is None, row.error
            assert row.equivalence.passed, (row.name, str(row.equivalence), row.notes)
        states = rows[0].memory
        predicted, measured = states[0].measured, states[1].measured
        assert measured > 0 and predicted > 0
        if spec.layout.pp > 1:  # the stage bound is an upper bound
            assert predicted >= measured


def test_deepspeed_estimators_differ_by_the_explained_terms():
    psi, largest = 7_500_000_000, 4 * 4096 * 4096 + 4 * 4096
    rows = deepspeed_rows(plan_check.SPEC, [("7.5B", psi, largest, 8, 8)])
    assert len(rows) == 4
    for row in rows:
        assert row.equivalence.passed, (row.name, str(row.equivalence))
    by_name = {r.name.split(" per GPU")[0]: {m.name: m.measured for m in r.memory} for r in rows}
    zero2 = by_name["ZeRO-2"]
    assert zero2["planner (ZeRO paper: 2+2+12 bytes)"] / GB == pytest.approx(16.64, abs=0.01)
    assert zero2["DeepSpeed's estimate"] == pytest.approx(2 * psi + 18 * psi / 64, abs=1)
    assert zero2["explained difference"] == pytest.approx(4 * psi / 64)
    zero3 = by_name["ZeRO-3"]
    assert zero3["DeepSpeed's estimate"] == pytest.approx(18 * psi / 64 + 4 * largest, abs=1)
    assert by_name["ZeRO-2 + optimizer offload"]["explained difference"] == 0.0


def test_layout_list_covers_every_kind():
    specs = plan_check.specs_for(4, quick=False, cuda=False)
    kinds = {(s.layout.tp > 1, s.layout.pp > 1, s.layout.zero, s.layout.offload, s.bf16) for s in specs}
    assert (False, False, 0, False, False) in kinds and (True, False, 0, False, False) in kinds
    assert (False, True, 0, False, False) in kinds and (False, False, 3, True, False) in kinds
    assert all(s.world_size == 4 for s in specs)
    assert not any(s.layout.pp > 1 for s in plan_check.specs_for(2, quick=True, cuda=True))  # the executor is gloo-only
