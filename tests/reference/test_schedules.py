"""reference.schedules against transformers' schedules and torch's CosineAnnealingLR, at every step."""

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import schedules as S
from reference.data import make_batches
from reference.training import train
from tests.models import tiny_gpt

transformers_opt = pytest.importorskip("transformers.optimization")


def lambda_of(factory, **kwargs):
    """The multiplier of a transformers LambdaLR factory as a function of the step."""
    p = torch.nn.Parameter(torch.zeros(1))
    sched = factory(torch.optim.SGD([p], lr=1.0), **kwargs)
    return lambda step: sched.lr_lambdas[0](step)


@st.composite
def warmup_total(draw):
    total = draw(st.integers(1, 60))
    warmup = draw(st.one_of(st.just(0), st.just(total), st.integers(0, total)))
    return warmup, total


def past_end(total):
    return range(0, 2 * total + 3)  # every step of training, then as many again past the end


@settings(max_examples=20, deadline=None)
@given(wt=warmup_total())
def test_linear_warmup_decay_equals_transformers(wt):
    warmup, total = wt
    theirs = lambda_of(transformers_opt.get_linear_schedule_with_warmup, num_warmup_steps=warmup,
                       num_training_steps=total)
    for step in past_end(total):
        assert S.linear_warmup_decay(step, warmup_steps=warmup, total_steps=total) == theirs(step), step


@settings(max_examples=20, deadline=None)
@given(wt=warmup_total(), cycles=st.sampled_from([0.5, 0.25, 1.0, 1.5]), r=st.sampled_from([0.0, 0.1, 0.5]))
def test_cosine_with_warmup_equals_transformers(wt, cycles, r):
    warmup, total = wt
    if r == 0.0:
        theirs = lambda_of(transformers_opt.get_cosine_schedule_with_warmup, num_warmup_steps=warmup,
                           num_training_steps=total, num_cycles=cycles)
    else:
        theirs = lambda_of(transformers_opt.get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=warmup,
                           num_training_steps=total, num_cycles=cycles, min_lr_rate=r)
    for step in past_end(total):
        mine = S.cosine_with_warmup(step, warmup_steps=warmup, total_steps=total, num_cycles=cycles, min_lr_ratio=r)
        assert mine == pytest.approx(theirs(step), rel=1e-12, abs=1e-15), step


def test_cosine_with_warmup_climbs_back_after_total_steps():
    """Documented behaviour (transformers' too): the half cosine keeps going past total_steps."""
    f = partial(S.cosine_with_warmup, warmup_steps=10, total_steps=110)
    assert f(110) == pytest.approx(0.0, abs=1e-15)
    assert f(160) == pytest.approx(0.5) and f(210) == pytest.approx(1.0)


@settings(max_examples=20, deadline=None)
@given(warmup=st.integers(0, 40))
def test_constant_and_inverse_sqrt_equal_transformers(warmup):
    const = lambda_of(transformers_opt.get_constant_schedule_with_warmup, num_warmup_steps=warmup)
    isqrt = lambda_of(transformers_opt.get_inverse_sqrt_schedule, num_warmup_steps=warmup)
    for step in range(3 * warmup + 5):
        assert S.constant_with_warmup(step, warmup_steps=warmup) == const(step)
        assert S.inverse_sqrt(step, warmup_steps=warmup) == isqrt(step)


def test_inverse_sqrt_is_sqrt_of_warmup_over_step():
    for step in range(16, 200):
        assert S.inverse_sqrt(step, warmup_steps=16) == pytest.approx(math.sqrt(16 / step), rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(w=st.integers(0, 20), s=st.integers(0, 20), d=st.integers(0, 20), r=st.sampled_from([0.0, 0.1]),
       wt=st.sampled_from(["linear", "cosine", "1-sqrt"]), dt=st.sampled_from(["linear", "cosine", "1-sqrt"]))
def test_warmup_stable_decay_equals_transformers(w, s, d, r, wt, dt):
    theirs = lambda_of(transformers_opt.get_wsd_schedule, num_warmup_steps=w, num_stable_steps=s,
                       num_decay_steps=d, min_lr_ratio=r, warmup_type=wt, decay_type=dt)
    for step in range(w + s + d + 5):
        mine = S.warmup_stable_decay(step, warmup_steps=w, stable_steps=s, decay_steps=d, min_lr_ratio=r,
                                     warmup_type=wt, decay_type=dt)
        assert mine == theirs(step), step


@settings(max_examples=20, deadline=None)
@given(t_max=st.integers(1, 50), r=st.sampled_from([0.0, 0.1, 0.5]))
def test_cosine_annealing_is_torch_closed_form_and_chainable_follows_it(t_max, r):
    """torch's chainable CosineAnnealingLR (each lr from the previous one) agrees with the closed form to ~1e-15
    up to t_max. Past t_max both continue the cosine with period 2 t_max (the lr climbs back to base_lr at
    2 t_max); the chainable form stays within ~1e-13 of it over three more periods."""
    base = 0.3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=base * r)
    for step in range(7 * t_max):
        mine = base * S.cosine_annealing(step, t_max=t_max, min_lr_ratio=r)
        closed = base * r + (base - base * r) * (1 + math.cos(math.pi * step / t_max)) / 2  # torch's formula
        assert mine == pytest.approx(closed, rel=1e-14, abs=1e-16)
        assert opt.param_groups[0]["lr"] == pytest.approx(mine, rel=0, abs=1e-15 if step <= t_max else 1e-13)
        opt.step()
        sched.step()
    assert S.cosine_annealing(2 * t_max, t_max=t_max, min_lr_ratio=r) == pytest.approx(1.0)


def test_plugs_into_the_reference_training_loop():
    model = tiny_gpt()
    batches = make_batches(2, batch_size=2, seq_len=8, vocab_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hist = train(model, opt, batches, steps=6, lr_lambda=S.get_schedule("linear_warmup_decay", warmup_steps=2,
                                                                        total_steps=6))
    assert hist.lr == pytest.approx([0.0, 0.25, 0.5, 0.375, 0.25, 0.125])


@pytest.mark.parametrize("call, match", [
    (lambda: S.linear_warmup_decay(0, warmup_steps=11, total_steps=10), "warmup_steps"),
    (lambda: S.cosine_with_warmup(0, warmup_steps=-1, total_steps=10), "warmup_steps"),
    (lambda: S.cosine_with_warmup(0, warmup_steps=1, total_steps=0), "total_steps"),
    (lambda: S.cosine_with_warmup(0, warmup_steps=1, total_steps=10, min_lr_ratio=1.5), "min_lr_ratio"),
    (lambda: S.cosine_with_warmup(0, warmup_steps=1, total_steps=10, num_cycles=0.0), "num_cycles"),
    (lambda: S.cosine_annealing(-1, t_max=10), "step"),
    (lambda: S.cosine_annealing(1.5, t_max=10), "step"),
    (lambda: S.cosine_annealing(0, t_max=0), "t_max"),
    (lambda: S.inverse_sqrt(0, warmup_steps=2, timescale=0), "timescale"),
    (lambda: S.warmup_stable_decay(0, warmup_steps=1, stable_steps=1, decay_steps=1, decay_type="exp"), "decay_type"),
    (lambda: S.get_schedule("cosine"), "unknown schedule"),
    (lambda: S.get_schedule("linear_warmup_decay", warmup_steps=20, total_steps=10), "warmup_steps"),
])
def test_bad_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()
