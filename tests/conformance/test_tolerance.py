"""The tolerance rules pass correct results and fail wrong ones."""

import pytest
import torch

from conformance.tolerance import (
    GRADIENT_FACTOR,
    allclose,
    assert_equivalent,
    bitwise,
    combine,
    default_tolerances,
    dtype_floor,
    error_ratio,
    nudge_,
    rounding_spread,
    step_by_step,
    within_spread,
)


def _softmax_case(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g, dtype=torch.float64) * 4
    ref = torch.softmax(x, -1)
    base = torch.softmax(x.to(dtype), -1)  # the naive computation in the low dtype
    return x, ref, base


def test_error_ratio_passes_a_correct_low_precision_result():
    x, ref, base = _softmax_case(torch.bfloat16)
    # A different but correct bf16 computation: exp / sum done in fp32, rounded once at the end.
    xf = x.float()
    e = torch.exp(xf - xf.amax(-1, keepdim=True))
    opt = (e / e.sum(-1, keepdim=True)).to(torch.bfloat16)
    eq = error_ratio(opt, ref, base, name="softmax bf16")
    assert eq.passed, eq
    assert eq.baseline_error > 0 and eq.max_error <= eq.bound


def test_error_ratio_fails_a_wrong_result():
    x, ref, base = _softmax_case(torch.bfloat16)
    wrong = torch.softmax(x.to(torch.bfloat16) * 1.1, -1)  # a 10% scale bug
    eq = error_ratio(wrong, ref, base, name="softmax with a scale bug", factor=GRADIENT_FACTOR)
    assert not eq.passed
    with pytest.raises(AssertionError, match="softmax with a scale bug"):
        assert_equivalent(eq)


def test_error_ratio_floor_keeps_an_exact_baseline_usable():
    ref = torch.ones(10, dtype=torch.float64)
    base = torch.ones(10, dtype=torch.float16)  # exact: baseline error 0
    opt = base.clone()
    opt[0] = 1 + torch.finfo(torch.float16).eps  # one ulp off
    assert error_ratio(opt, ref, base).passed
    opt[0] = 1.01
    assert not error_ratio(opt, ref, base).passed


def test_error_ratio_floor_scales_with_what_cancelled_in_float32():
    # The H200 case: one visible key, so the exact dQ is 0 and the naive float32 path cancels exactly, while FA2's
    # D = rowsum(dO ∘ O) differs from dP by rounding at the size of dP (~5 here): 3.1e-7 is that rounding, not a bug.
    ref = torch.zeros(16, dtype=torch.float64)
    base = torch.zeros(16)
    opt = torch.zeros(16)
    opt[3] = 3.1e-7
    assert not error_ratio(opt, ref, base).passed  # one ulp at magnitude 1: 1.2e-7
    assert error_ratio(opt, ref, base, cancellation=5.0).passed  # plus one float32 ulp at 5: 7.2e-7
    opt[3] = 1e-5  # a real error stays one
    assert not error_ratio(opt, ref, base, cancellation=5.0).passed
    with pytest.raises(ValueError, match="cancellation must be >= 0"):
        error_ratio(opt, ref, base, cancellation=-1.0)


def test_error_ratio_rejects_nan():
    ref = torch.zeros(3, dtype=torch.float64)
    opt = torch.tensor([0.0, float("nan"), 0.0])
    assert not error_ratio(opt, ref, opt.clone().zero_()).passed


def test_allclose_uses_torch_testing_defaults():
    e = torch.ones(5)
    assert allclose(e + 1e-6, e).passed
    assert not allclose(e + 1e-4, e).passed
    assert allclose(torch.tensor([float("nan"), float("inf")]), torch.tensor([float("nan"), float("inf")])).passed
    assert not allclose(torch.tensor([float("nan")]), torch.tensor([0.0])).passed
    with pytest.raises(ValueError, match="shapes differ"):
        allclose(torch.ones(2), torch.ones(3), name="x")


def test_bitwise_and_combine():
    a = torch.randn(4)
    assert bitwise(a, a.clone()).passed
    assert not bitwise(a, a + 1e-7 * a.abs().max()).passed or a.abs().max() == 0
    parts = [allclose(a, a), allclose(a + 1, a, name="off")]
    c = combine("all", parts)
    assert not c.passed and "off" in c.rule and c.max_error == pytest.approx(1.0)


def test_step_by_step_holds_each_step_within_the_spread():
    ref = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}]
    spread = rounding_spread({"w": torch.tensor([1.0, 0.0])}, [{"w": torch.tensor([1.0, 1e-7])}], origin="test")
    noisy = [{"w": torch.tensor([1.0, 1e-6])}, {"w": torch.tensor([2.0, -1e-6])}]  # 10x the spread: allowed
    assert all(p.passed for p in step_by_step([1.0, 0.5], noisy, [1.0, 0.5], ref, name="run", spread=spread))
    wrong = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.1, 0.0])}]
    parts = step_by_step([1.0, 0.5], wrong, [1.0, 0.5], ref, name="run", spread=spread)
    assert [p.passed for p in parts] == [True, False] and "run step 1" in parts[1].name and "w" in parts[1].rule
    loss_off = step_by_step([1.0, 0.5 + 1e-5], ref, [1.0, 0.5], ref, name="run", spread=spread)
    assert [p.passed for p in loss_off] == [True, False]
    with pytest.raises(ValueError, match="steps differ"):
        step_by_step([1.0], noisy, [1.0, 0.5], ref, name="run", spread=spread)


def test_nudge_moves_every_nonzero_element_by_exactly_one_ulp_both_ways():
    t = torch.tensor([1.0, -3.0, 0.0, 1e-30] * 64, dtype=torch.float64)
    moved = t.clone()
    nudge_([moved], seed=0)
    assert moved[t == 0].eq(0).all()
    nz = t != 0
    up, down = torch.nextafter(t, torch.tensor(float("inf"), dtype=t.dtype)), torch.nextafter(t, -t.new_tensor(
        float("inf")))
    assert ((moved == up) | (moved == down))[nz].all()
    assert (moved > t).any() and (moved < t).any()
    again = t.clone()
    nudge_([again], seed=0)
    assert again.equal(moved)
    ints = torch.arange(4)
    nudge_([ints])
    assert ints.equal(torch.arange(4))


def test_within_spread_states_the_ratio_and_fails_past_the_factor():
    ref = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    spread = rounding_spread(ref, [{"a": torch.tensor([0.0, 1e-12, 0.0], dtype=torch.float64), "b": ref["b"]}],
                             origin="nudged")
    assert spread.value == 1e-12 and spread.worst == "a"
    ok = within_spread({"a": ref["a"] + 5e-12, "b": ref["b"]}, ref, spread, name="run")
    assert ok.passed and "reached 5x" in ok.rule and "nudged" in ok.rule
    bad = within_spread({"a": ref["a"], "b": ref["b"] + 1e-9}, ref, spread, name="run")
    assert not bad.passed and "b" in bad.rule and bad.bound == pytest.approx(1e-11 + torch.finfo(torch.float64).eps)
    nan = within_spread({"a": ref["a"] * float("nan"), "b": ref["b"]}, ref, spread, name="run")
    assert not nan.passed
    with pytest.raises(ValueError, match="only in the run"):
        within_spread({"a": ref["a"], "b": ref["b"], "c": ref["b"]}, ref, spread, name="run")
    with pytest.raises(ValueError, match="not finite"):
        rounding_spread(ref, [{"a": ref["a"], "b": ref["b"] * float("inf")}], origin="x")


def test_combine_names_a_failing_part_and_allclose_prints_true_comparisons():
    e = torch.tensor([1e3, 0.0])
    ok = allclose(torch.tensor([1e3 + 1e-3, 0.0]), e, name="ok")  # large error, larger bound: passes
    bad = allclose(torch.tensor([1e3, 1e-4]), e, name="bad")  # small error past a small bound
    assert ok.passed and ok.max_error <= ok.bound
    assert not bad.passed and bad.max_error > bad.bound
    c = combine("both", [ok, bad])
    assert not c.passed and "bad" in c.rule and c.max_error > c.bound
    nan = error_ratio(torch.tensor([float("nan")]), torch.zeros(1, dtype=torch.float64), torch.zeros(1))
    assert "worst of 2: " in combine("with nan", [allclose(e, e, name="fine"), nan]).rule
    assert not combine("with nan", [allclose(e, e, name="fine"), nan]).passed


def test_float32_bounds_follow_the_processs_matmul_precision():
    """Under "medium" float32 matmuls may run in bf16 (oneDNN on AMX CPUs): the float32 bounds widen by exactly
    bf16's epsilon over float32's, half-precision floors to bf16's ulp; float64 does not move."""
    before = torch.get_float32_matmul_precision()
    highest = default_tolerances(torch.float32), dtype_floor(torch.float16), dtype_floor(torch.float64)
    try:
        torch.set_float32_matmul_precision("medium")
        rtol, atol = default_tolerances(torch.float32)
        coarser = 2.0**-7 / torch.finfo(torch.float32).eps
        assert rtol == pytest.approx(highest[0][0] * coarser) and atol == pytest.approx(highest[0][1] * coarser)
        assert dtype_floor(torch.float16) == 2.0**-7 and dtype_floor(torch.float64) == highest[2]
        torch.set_float32_matmul_precision("high")
        assert dtype_floor(torch.float32) == 2.0**-10
    finally:
        torch.set_float32_matmul_precision(before)
    assert (default_tolerances(torch.float32), dtype_floor(torch.float16), dtype_floor(torch.float64)) == highest


def test_combine_names_the_first_part_to_fail_when_it_is_not_the_worst():
    e = torch.zeros(1)
    parts = [allclose(e, e, name="step 0"), allclose(e + 1e-3, e, name="step 1"), allclose(e + 1.0, e, name="step 2")]
    c = combine("run", parts)
    assert not c.passed and "worst of 3: step 2; first to fail: step 1" in c.rule
    assert "first to fail" not in combine("run", parts[::2]).rule  # the first failing part is the worst: said once


def test_allclose_says_where_its_default_bound_came_from():
    e = torch.ones(3)
    assert allclose(e, e).rule.endswith("torch.testing's float32 defaults")
    assert "defaults" not in allclose(e, e, rtol=1e-3).rule  # a stated bound is the caller's to explain
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert allclose(e, e).rule.endswith("float32 defaults at matmul precision 'medium'")
    finally:
        torch.set_float32_matmul_precision(before)
