"""optimized.schedules: LRScheduler classes equal to the reference multipliers and to transformers, per group."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimized import schedules as O
from reference import schedules as S

transformers_opt = pytest.importorskip("transformers.optimization")

BASE_LRS = (0.3, 0.007)  # two param groups with their own base LR


def make_opt(cls=torch.optim.AdamW):
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5))
    return cls([{"params": [p], "lr": BASE_LRS[0]}, {"params": [q], "lr": BASE_LRS[1]}])


def lrs_over(sched, opt, steps):
    """The lr of each group in force at optimizer step 0, 1, ..., steps-1."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


CASES = [
    # (optimized class kwargs, reference function, transformers factory + kwargs or None)
    ("linear_warmup_decay", dict(warmup_steps=7, total_steps=31),
     ("get_linear_schedule_with_warmup", dict(num_warmup_steps=7, num_training_steps=31))),
    ("linear_warmup_decay", dict(warmup_steps=0, total_steps=13),
     ("get_linear_schedule_with_warmup", dict(num_warmup_steps=0, num_training_steps=13))),
    ("linear_warmup_decay", dict(warmup_steps=13, total_steps=13),
     ("get_linear_schedule_with_warmup", dict(num_warmup_steps=13, num_training_steps=13))),
    ("cosine_with_warmup", dict(warmup_steps=5, total_steps=29),
     ("get_cosine_schedule_with_warmup", dict(num_warmup_steps=5, num_training_steps=29))),
    ("cosine_with_warmup", dict(warmup_steps=3, total_steps=17, num_cycles=1.5, min_lr_ratio=0.1),
     ("get_cosine_with_min_lr_schedule_with_warmup",
      dict(num_warmup_steps=3, num_training_steps=17, num_cycles=1.5, min_lr_rate=0.1))),
    ("constant_with_warmup", dict(warmup_steps=11),
     ("get_constant_schedule_with_warmup", dict(num_warmup_steps=11))),
    ("inverse_sqrt", dict(warmup_steps=6), ("get_inverse_sqrt_schedule", dict(num_warmup_steps=6))),
    ("warmup_stable_decay", dict(warmup_steps=4, stable_steps=9, decay_steps=7, min_lr_ratio=0.05,
                                 decay_type="1-sqrt"),
     ("get_wsd_schedule", dict(num_warmup_steps=4, num_stable_steps=9, num_decay_steps=7, min_lr_ratio=0.05,
                               decay_type="1-sqrt"))),
    ("cosine_annealing", dict(t_max=19, min_lr_ratio=0.1), None),
]


@pytest.mark.parametrize("name, kwargs, peer", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_scheduler_equals_reference_and_peer_every_step_past_the_end(name, kwargs, peer):
    steps = 2 * 41
    opt = make_opt()
    mine = lrs_over(O.build_scheduler(opt, name, **kwargs), opt, steps)
    spec = [[b * S.SCHEDULES[name](s, **kwargs) for b in BASE_LRS] for s in range(steps)]
    assert mine == spec  # the same closed form, the same float operations
    if peer is None:  # CosineAnnealingLR with eta_min per group is the closed form with min_lr_ratio * base_lr
        assert kwargs["min_lr_ratio"] * BASE_LRS[0] == pytest.approx(mine[kwargs["t_max"]][0])
        return
    factory, peer_kwargs = peer
    opt2 = make_opt()
    theirs = lrs_over(getattr(transformers_opt, factory)(opt2, **peer_kwargs), opt2, steps)
    for s, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-18), s


def test_cosine_annealing_matches_torch_chainable_with_eta_min_zero():
    opt, opt2 = make_opt(), make_opt()
    mine = lrs_over(O.CosineAnnealing(opt, t_max=10, min_lr_ratio=0.0), opt, 40)
    theirs = lrs_over(torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10), opt2, 40)
    for a, b in zip(mine, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-13, abs=1e-15)  # the chainable form drifts by ~1e-15


@settings(max_examples=10, deadline=None)
@given(stop=st.integers(0, 30), name=st.sampled_from(["linear_warmup_decay", "cosine_with_warmup",
                                                      "warmup_stable_decay"]))
def test_state_dict_round_trip_resumes_exactly(stop, name):
    kwargs = dict(warmup_stable_decay=dict(warmup_steps=3, stable_steps=10, decay_steps=8)).get(
        name, dict(warmup_steps=5, total_steps=23))
    opt = make_opt()
    whole = lrs_over(O.build_scheduler(opt, name, **kwargs), opt, 35)
    opt = make_opt()
    sched = O.build_scheduler(opt, name, **kwargs)
    first = lrs_over(sched, opt, stop)
    saved_sched, saved_opt = sched.state_dict(), opt.state_dict()
    opt = make_opt()
    opt.load_state_dict(saved_opt)
    resumed = O.build_scheduler(opt, name, **kwargs)
    resumed.load_state_dict(saved_sched)
    assert resumed.last_epoch == stop
    assert first + lrs_over(resumed, opt, 35 - stop) == whole


def test_step_with_epoch_jumps_to_the_closed_form():
    opt = make_opt(torch.optim.SGD)
    sched = O.LinearWarmupDecay(opt, warmup_steps=4, total_steps=20)
    with pytest.warns(UserWarning):
        sched.step(12)
    assert [g["lr"] for g in opt.param_groups] == [b * 8 / 16 for b in BASE_LRS]


@pytest.mark.parametrize("call, match", [
    (lambda o: O.LinearWarmupDecay(o, warmup_steps=10, total_steps=5), "warmup_steps"),
    (lambda o: O.CosineWithWarmup(o, warmup_steps=1, total_steps=0), "total_steps"),
    (lambda o: O.CosineWithWarmup(o, warmup_steps=1, total_steps=9, min_lr_ratio=-0.1), "min_lr_ratio"),
    (lambda o: O.CosineAnnealing(o, t_max=0), "t_max"),
    (lambda o: O.ConstantWithWarmup(o, warmup_steps=-3), "warmup_steps"),
    (lambda o: O.InverseSqrt(o, warmup_steps=2.5), "warmup_steps"),
    (lambda o: O.WarmupStableDecay(o, 1, 1, 1, warmup_type="step"), "warmup_type"),
    (lambda o: O.build_scheduler(o, "onecycle"), "name must be one of"),
])
def test_bad_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_opt())


# ---- bad inputs: every argument, each an error naming it, the value and what is allowed, before the optimizer moves --

NAN, INF = float("nan"), float("inf")
BAD_SCHEDULES = [
    # (class name, keyword arguments of a valid call, overrides, the argument named, the value shown)
    *[(cls, base, {"warmup_steps": v}, "warmup_steps", v)
      for cls, base in (("ConstantWithWarmup", {"warmup_steps": 2}),
                        ("LinearWarmupDecay", {"warmup_steps": 2, "total_steps": 9}),
                        ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}),
                        ("InverseSqrt", {"warmup_steps": 2}),
                        ("WarmupStableDecay", {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4}))
      for v in (True, 2.0, None, -1, "2", NAN)],
    ("LinearWarmupDecay", {"warmup_steps": 2, "total_steps": 9}, {"total_steps": INF}, "total_steps", INF),
    ("LinearWarmupDecay", {"warmup_steps": 0, "total_steps": 9}, {"total_steps": True}, "total_steps", True),
    ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}, {"num_cycles": True}, "num_cycles", True),
    ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}, {"num_cycles": INF}, "num_cycles", INF),
    ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}, {"num_cycles": 0}, "num_cycles", 0),
    ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}, {"num_cycles": "1"}, "num_cycles", "1"),
    ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}, {"min_lr_ratio": NAN}, "min_lr_ratio", NAN),
    ("CosineWithWarmup", {"warmup_steps": 2, "total_steps": 9}, {"min_lr_ratio": "0.1"}, "min_lr_ratio", "0.1"),
    ("CosineAnnealing", {"t_max": 5}, {"t_max": 1.5}, "t_max", 1.5),
    ("CosineAnnealing", {"t_max": 5}, {"t_max": None}, "t_max", None),
    ("CosineAnnealing", {"t_max": 5}, {"min_lr_ratio": True}, "min_lr_ratio", True),
    ("CosineAnnealing", {"t_max": 5}, {"min_lr_ratio": 1.5}, "min_lr_ratio", 1.5),
    ("InverseSqrt", {"warmup_steps": 2}, {"timescale": 0}, "timescale", 0),
    ("InverseSqrt", {"warmup_steps": 2}, {"timescale": True}, "timescale", True),
    ("InverseSqrt", {"warmup_steps": 2}, {"timescale": 10.0}, "timescale", 10.0),
    ("WarmupStableDecay", {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4}, {"stable_steps": -1},
     "stable_steps", -1),
    ("WarmupStableDecay", {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4}, {"decay_steps": True},
     "decay_steps", True),
    ("WarmupStableDecay", {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4}, {"min_lr_ratio": 2},
     "min_lr_ratio", 2),
    ("WarmupStableDecay", {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4}, {"decay_type": None},
     "decay_type", None),
    ("WarmupStableDecay", {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4}, {"warmup_type": ["linear"]},
     "warmup_type", ["linear"]),
    *[(cls, base, {"last_epoch": v}, "last_epoch", v)
      for cls, base in (("ConstantWithWarmup", {"warmup_steps": 2}), ("CosineAnnealing", {"t_max": 5}))
      for v in (True, -2, 1.0, None)],
]


@pytest.mark.parametrize("cls, base, bad, argument, shown", BAD_SCHEDULES,
                         ids=[f"{c}-{a}={s!r}" for c, _, _, a, s in BAD_SCHEDULES])
def test_bad_inputs_are_refused_before_the_optimizer_changes(cls, base, bad, argument, shown):
    opt = make_opt()
    with pytest.raises(ValueError) as info:
        getattr(O, cls)(opt, **{**base, **bad})
    message = str(info.value)
    assert message.startswith(argument) and " must " in message and repr(shown) in message, message
    assert [g["lr"] for g in opt.param_groups] == list(BASE_LRS) and "initial_lr" not in opt.param_groups[0]


def test_build_scheduler_names_and_the_optimizer_are_checked():
    with pytest.raises(ValueError, match=r"^name must be one of .*got 'cosine' "
                       r"\(did you mean one of 'cosine_with_warmup', 'cosine_annealing'\?\)"):
        O.build_scheduler(make_opt(), "cosine")
    with pytest.raises(ValueError, match=r"^name must be one of .*got \['inverse_sqrt'\]"):
        O.build_scheduler(make_opt(), ["inverse_sqrt"])
    with pytest.raises(ValueError, match=r"^optimizer must be a torch.optim.Optimizer, got None"):
        O.CosineAnnealing(None, t_max=3)
