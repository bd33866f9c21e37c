"""The warmup check's measures: the largest spike and the helps / hurts rule, on hand-made loss curves."""

import math

from conformance.checks.warmup import Arm, effect, largest_spike, verdict
from conformance.claims import Verdict


def test_largest_spike_is_the_rise_above_the_best_loss_so_far():
    assert largest_spike([4.0, 3.0, 5.5, 2.0, 2.5]) == 2.5
    assert largest_spike([4.0, 3.0, 2.0]) == 0.0  # monotone: no spike
    assert largest_spike([4.0]) == 0.0
    assert largest_spike([4.0, math.nan, 1.0]) == math.inf


def test_effect_counts_failures_first_then_compares_median_spikes():
    smooth = [4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1]
    spiky = [4.0, 7.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1]
    stuck = [4.0, 6.0, 4.1, 4.0, 4.1, 4.0, 4.0, 4.1, 4.0, 4.0]
    assert effect(Arm([smooth, smooth]), Arm([stuck, smooth])) == "helps: fewer failed runs"
    assert effect(Arm([stuck, smooth]), Arm([smooth, smooth])) == "hurts: more failed runs"
    assert effect(Arm([smooth, smooth]), Arm([spiky, spiky])) == "helps: smaller spikes"  # same failures
    assert effect(Arm([spiky, spiky]), Arm([smooth, smooth])) == "hurts: larger spikes"
    assert effect(Arm([spiky]), Arm([spiky])) == "no clear difference"
    assert effect(Arm([smooth]), Arm([smooth])) == "no clear difference"  # no spike on either side
    assert Arm([stuck, smooth]).failed == 1 and Arm([[4.0, math.inf]]).failed == 1


def test_verdict_needs_help_at_the_top_lr_and_no_failure_left_for_holds():
    helps, none, hurts = "helps: smaller spikes", "no clear difference", "hurts: larger spikes"
    assert verdict({0.01: none, 0.1: helps}, {0.01: 0, 0.1: 0}) == Verdict.HOLDS
    assert verdict({0.01: none, 0.1: helps}, {0.01: 0, 0.1: 2}) == Verdict.HOLDS_UNDER_CONDITIONS  # still fails
    assert verdict({0.01: hurts, 0.1: helps}, {0.01: 0, 0.1: 0}) == Verdict.HOLDS_UNDER_CONDITIONS
    assert verdict({0.01: helps, 0.1: none}, {0.01: 0, 0.1: 0}) == Verdict.HOLDS_UNDER_CONDITIONS
    assert verdict({0.01: none, 0.1: none}, {0.01: 0, 0.1: 0}) == Verdict.DOES_NOT_HOLD
