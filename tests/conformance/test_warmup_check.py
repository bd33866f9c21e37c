"""The warmup check's measures: the largest spike and the helps / hurts rule, on hand-made loss curves."""

import math

from conformance.checks.warmup import Arm, effect, largest_spike


def test_largest_spike_is_the_rise_above_the_best_loss_so_far():
    assert largest_spike([4.0, 3.0, 5.5, 2.0, 2.5]) == 2.5
    assert largest_spike([4.0, 3.0, 2.0]) == 0.0  # monotone: no spike
    assert largest_spike([4.0]) == 0.0
    assert largest_spike([4.0, math.nan, 1.0]) == math.inf


def test_effect_counts_failures_first_then_compares_median_spikes():
    smooth = [4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1]
    spiky = [4.0, 7.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1]
    stuck = [4.0, 6.0, 4.1, 4.0, 4.1, 4.0, 4.0, 4.1, 4.0, 4.0]
    assert effect(Arm([smooth, smooth]), Arm([stuck, smooth])) == "helps"  # one failure fewer
    assert effect(Arm([stuck, smooth]), Arm([smooth, smooth])) == "hurts"
    assert effect(Arm([smooth, smooth]), Arm([spiky, spiky])) == "helps"  # same failures, smaller spikes
    assert effect(Arm([spiky, spiky]), Arm([smooth, smooth])) == "hurts"
    assert effect(Arm([spiky]), Arm([spiky])) == "no clear difference"
    assert effect(Arm([smooth]), Arm([smooth])) == "no clear difference"  # no spike on either side
    assert Arm([stuck, smooth]).failed == 1 and Arm([[4.0, math.inf]]).failed == 1
