"""Pipeline schedules as data and the simulator: formulas, golden timelines, deadlocks, bad input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimized.pipeline import (
    Action,
    Deadlock,
    Schedule,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    simulate,
)

COSTS = st.sampled_from([(1.0, 1.0), (1.0, 2.0), (0.5, 3.0), (2.0, 1.0)])


def bubble_formula(p, m, v=1):
    return (p - 1) / (v * m + p - 1)


# --- printed form and golden timelines ------------------------------------------------------------------------------


def test_schedules_print_as_per_rank_action_lists():
    assert str(one_f_one_b(2, 4)) == (
        "1f1b p=2 m=4\n"
        "rank 0: F0 F1 B0 F2 B1 F3 B2 B3\n"
        "rank 1: F0 B0 F1 B1 F2 B2 F3 B3"
    )
    assert str(gpipe(3, 2)) == (
        "gpipe p=3 m=2\n"
        "rank 0: F0 F1 B0 B1\n"
        "rank 1: F0 F1 B0 B1\n"
        "rank 2: F0 F1 B0 B1"
    )
    assert one_f_one_b(4, 6).format_rank(0) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert interleaved_one_f_one_b(2, 2, 2).format_rank(1) == "F0@1 F1@1 F0@3 B0@3 F1@3 B1@3 B0@1 B1@1"


def test_gpipe_golden_timeline():
    sim = simulate(gpipe(2, 2), forward_cost=1, backward_cost=2)
    assert sim.render() == (
        "rank 0: F0 F1 .. .. .. B0 B0 B1 B1\n"
        "rank 1: .. F0 F1 B0 B0 B1 B1 .. .."
    )
    assert sim.makespan == 9
    assert [(str(iv.action), iv.start, iv.end) for iv in sim.timeline[1]] == [
        ("F0@1", 1, 2), ("F1@1", 2, 3), ("B0@1", 3, 5), ("B1@1", 5, 7)
    ]


def test_one_f_one_b_golden_timeline():
    sim = simulate(one_f_one_b(3, 4), forward_cost=1, backward_cost=1)
    assert sim.render() == (
        "rank 0: F0 F1 F2 .. .. B0 F3 B1 .. B2 .. B3\n"
        "rank 1: .. F0 F1 .. B0 F2 B1 F3 B2 .. B3 ..\n"
        "rank 2: .. .. F0 B0 F1 B1 F2 B2 F3 B3 .. .."
    )
    assert sim.makespan == (4 + 3 - 1) * 2
    assert sim.peak_alive == (3, 2, 1)


def test_parse_reads_back_what_str_prints():
    for schedule in (gpipe(3, 5), one_f_one_b(4, 3), interleaved_one_f_one_b(2, 4, 3)):
        parsed = Schedule.parse(str(schedule), stages_per_rank=schedule.stages_per_rank, name=schedule.name)
        assert parsed == schedule


# --- formulas over many (p, m) --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 17), costs=COSTS)
def test_gpipe_and_1f1b_bubble_equals_formula(p, m, costs):
    f, b = costs
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        sim = simulate(schedule, forward_cost=f, backward_cost=b)  # no Deadlock
        assert sim.bubble_fraction == pytest.approx(bubble_formula(p, m), abs=1e-12)
        assert sim.makespan == pytest.approx((m + p - 1) * (f + b))


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 17))
def test_peak_alive_is_m_for_gpipe_and_at_most_p_for_1f1b(p, m):
    assert simulate(gpipe(p, m)).peak_alive == (m,) * p
    peaks = simulate(one_f_one_b(p, m)).peak_alive
    assert peaks == tuple(min(p - r, m) for r in range(p))
    assert max(peaks) <= p


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 6), rounds=st.integers(1, 4), v=st.integers(1, 4), costs=COSTS)
def test_interleaved_bubble_shrinks_by_the_number_of_virtual_stages(p, rounds, v, costs):
    m = p * rounds
    f, b = costs
    sim = simulate(interleaved_one_f_one_b(p, m, v), forward_cost=f / v, backward_cost=b / v)
    assert sim.bubble_fraction == pytest.approx(bubble_formula(p, m, v), abs=1e-9)
    if p > 1 and v > 1:
        assert sim.bubble_fraction < bubble_formula(p, m)


def test_communication_latency_costs_gpipe_two_trips_and_1f1b_more():
    p, m, f, b, c = 4, 6, 1.0, 2.0, 0.25
    ideal = (m + p - 1) * (f + b)
    assert simulate(gpipe(p, m), f, b, comm_cost=c).makespan == pytest.approx(ideal + 2 * (p - 1) * c)
    # 1F1B's steady state waits on round trips (B needs the next stage's B, which needed this stage's F)
    assert simulate(one_f_one_b(p, m), f, b, comm_cost=c).makespan > ideal + 2 * (p - 1) * c


def test_per_stage_costs_make_the_slowest_stage_the_bottleneck():
    p, m = 3, 8
    sim = simulate(one_f_one_b(p, m), forward_cost=[1, 3, 1], backward_cost=[2, 6, 2])
    busy_slow = m * (3 + 6)
    assert sim.makespan >= busy_slow
    assert sim.bubble_fraction > bubble_formula(p, m)


def test_timeline_plot_is_a_png(tmp_path):
    path = simulate(one_f_one_b(4, 8)).plot(tmp_path / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# --- deadlocks ------------------------------------------------------------------------------------------------------


def test_cross_rank_deadlock_names_ranks_and_actions():
    # rank 0 wants B0 back before it sends F1; rank 1 wants F1 before it runs B0
    schedule = Schedule.parse("rank 0: F0 B0 F1 B1\nrank 1: F0 F1 B0 B1")
    with pytest.raises(Deadlock) as info:
        simulate(schedule)
    message = str(info.value)
    assert "rank 0 waits at B0@0 for B0@1 on rank 1" in message
    assert "rank 1 waits at F1@1 for F1@0 on rank 0" in message
    assert info.value.waiting == {
        0: (Action("B", 0, 0), Action("B", 0, 1)),
        1: (Action("F", 1, 1), Action("F", 1, 0)),
    }


def test_backward_before_its_own_forward_deadlocks():
    schedule = Schedule.parse(["F0 F1 B0 B1", "B0 F0 F1 B1"])
    with pytest.raises(Deadlock, match="rank 1 waits at B0@1 for F0@1 on rank 1"):
        simulate(schedule)


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gpipe(0, 4), "num_stages must be a positive integer, got 0"),
        (lambda: one_f_one_b(2, 0), "num_microbatches must be a positive integer, got 0"),
        (lambda: one_f_one_b(2.0, 4), "num_stages must be a positive integer"),
        (lambda: interleaved_one_f_one_b(4, 6, 2), "num_microbatches=6 on num_stages=4 ranks"),
        (lambda: interleaved_one_f_one_b(2, 4, 0), "stages_per_rank must be a positive integer"),
    ],
)
def test_bad_schedule_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_f_one_b_runs_with_fewer_microbatches_than_stages():
    schedule = one_f_one_b(4, 2)  # warmup capped at m: GPipe's order on the first ranks
    assert schedule.format_rank(0) == "F0 F1 B0 B1"
    assert simulate(schedule).bubble_fraction == pytest.approx(bubble_formula(4, 2))


@pytest.mark.parametrize(
    "text, match",
    [
        ("rank 0: F0 F1 B0\nrank 1: F0 F1 B0 B1", "rank 0 never runs B1@0"),
        ("rank 0: F0 F0 B0\nrank 1: F0 B0", "rank 0 runs F0@0 twice"),
        ("rank 0: F0 B0 F1@1 B1\nrank 1: F0 B0 F1 B1", r"rank 0 runs F1@1, which is not its work"),
        ("rank 0: F0 X0", "cannot read action 'X0'"),
        ("rank 1: F0 B0", "line 0 is for rank 1"),
    ],
)
def test_malformed_schedules_are_rejected(text, match):
    with pytest.raises(ValueError, match=match):
        Schedule.parse(text)


def test_simulate_rejects_bad_costs():
    with pytest.raises(ValueError, match="forward_cost has 2 per-stage costs, the schedule has 3 stages"):
        simulate(gpipe(3, 2), forward_cost=[1, 1])
    with pytest.raises(ValueError, match="backward_cost must be >= 0"):
        simulate(gpipe(3, 2), backward_cost=-1)
    with pytest.raises(ValueError, match="schedule must be an optimized.pipeline.Schedule"):
        simulate("F0 B0")
