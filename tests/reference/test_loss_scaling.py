"""DynamicLossScaler against torch.amp.GradScaler("cpu"), driven side by side through scripted iterations.

Each iteration computes loss = sum(p * c_t) on two bitwise-equal copies of the parameters, so the gradient is exactly
S * c_t: injecting inf or NaN into c_t, or a huge finite value that overflows only once multiplied by S, scripts
the overflow of each step. After every step the two scalers must agree on the scale, the growth tracker, the
skip decision (same parameters after step), the unscaled gradients (bitwise) and state_dict.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.loss_scaling import DynamicLossScaler

FP32_MAX = torch.finfo(torch.float32).max
EVENTS = ("ok", "inf", "nan", "overflow", "tiny")


def _coeffs(shape: tuple[int, ...], event: str, step: int) -> torch.Tensor:
    """The gradient of loss = sum(p * c) w.r.t. p is c (times S once scaled): the event picks c."""
    gen = torch.Generator().manual_seed(1000 + step)
    c = torch.randn(shape, generator=gen)
    flat = c.view(-1)
    if event == "inf":
        flat[step % flat.numel()] = float("inf")
    elif event == "nan":
        flat[step % flat.numel()] = float("nan")
    elif event == "overflow":
        flat[step % flat.numel()] = 1e36  # finite, but 1e36 * S overflows fp32 for any S >= 2^9
    elif event == "tiny":
        c = c * 1e-30
    return c


class Pair:
    """The same parameters, optimizer and iteration, once under the reference and once under torch."""

    def __init__(self, shapes, dtype=torch.float32, optimizers=1, **scaler_kwargs):
        gen = torch.Generator().manual_seed(7)
        base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        self.params = {k: [b.clone().requires_grad_() for b in base] for k in ("ref", "torch")}
        chunks = {k: [ps[i::optimizers] for i in range(optimizers)] for k, ps in self.params.items()}
        self.opts = {k: [torch.optim.SGD(c, lr=0.1, momentum=0.9) for c in cs] for k, cs in chunks.items()}
        self.scalers = {"ref": DynamicLossScaler(**scaler_kwargs),
                        "torch": torch.amp.GradScaler("cpu", **scaler_kwargs)}

    def backward(self, events_per_param):
        for k, params in self.params.items():
            for p in params:
                p.grad = None
            loss = sum((p * _coeffs(p.shape, e, i).to(p.dtype)).sum() for i, (p, e) in enumerate(
                zip(params, events_per_param, strict=True)))
            self.scalers[k].scale(loss).backward()

    def step(self, unscale_first=False, clip=None):
        for k in ("ref", "torch"):
            scaler = self.scalers[k]
            for opt in self.opts[k]:
                if unscale_first:
                    scaler.unscale_(opt)
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
                scaler.step(opt)

    def update(self):
        for s in self.scalers.values():
            s.update()

    def assert_same(self, where):
        ref, tor = self.scalers["ref"], self.scalers["torch"]
        assert ref.get_scale() == tor.get_scale(), where
        assert ref.state_dict() == tor.state_dict(), where
        for a, b in zip(self.params["ref"], self.params["torch"], strict=True):
            assert a.detach().view(-1).view(torch.uint8).equal(b.detach().view(-1).view(torch.uint8)), where
            if a.grad is not None:
                assert torch.equal(torch.nan_to_num(a.grad, nan=7.0), torch.nan_to_num(b.grad, nan=7.0)), where


def _run(pair: Pair, script: list[str], *, unscale_first=False, clip=None):
    n = len(pair.params["ref"])
    for t, event in enumerate(script):
        events = ["ok"] * n
        events[t % n] = event  # the event lands in one parameter (so in one optimizer when there are several)
        pair.backward(events)
        pair.step(unscale_first=unscale_first, clip=clip)
        # The skip decision of every optimizer, read from torch's private record (the test may peek).
        ref_skips = [pair.scalers["ref"].found_inf(o) for o in pair.opts["ref"]]
        torch_skips = [bool(sum(v.item() for v in pair.scalers["torch"]._found_inf_per_device(o).values()))
                       for o in pair.opts["torch"]]
        assert ref_skips == torch_skips, (t, event, ref_skips, torch_skips)
        if event in ("inf", "nan"):
            assert any(ref_skips), (t, event)
        pair.update()
        pair.assert_same(f"step {t} event {event}")


@settings(max_examples=25, deadline=None)
@given(
    script=st.lists(st.sampled_from(EVENTS), min_size=1, max_size=12),
    growth_interval=st.sampled_from([1, 2, 3, 2000]),
    factors=st.sampled_from([(2.0, 0.5), (3.0, 0.3), (1.5, 0.25)]),
    init_scale=st.sampled_from([2.0**16, 1.0, 3.0e38, FP32_MAX / 2, 1000.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    unscale_first=st.booleans(),
)
def test_matches_grad_scaler_on_scripted_sequences(script, growth_interval, factors, init_scale, dtype, unscale_first):
    pair = Pair([(3, 5), (7,)], dtype=dtype, init_scale=init_scale, growth_factor=factors[0],
                backoff_factor=factors[1], growth_interval=growth_interval)
    _run(pair, script, unscale_first=unscale_first, clip=1.0 if unscale_first else None)


@settings(max_examples=10, deadline=None)
@given(script=st.lists(st.sampled_from(EVENTS), min_size=1, max_size=10), growth_interval=st.sampled_from([1, 2, 5]))
def test_matches_grad_scaler_with_three_optimizers(script, growth_interval):
    """An inf in one optimizer's grads skips only that optimizer's step; the scale backs off for all."""
    pair = Pair([(3,), (5, 2), (7,), (11,)], optimizers=3, growth_interval=growth_interval)
    _run(pair, script)


def test_skip_backoff_and_growth_by_hand():
    """The rule written out: inf -> skip, S/2, n=0; two clean steps with growth_interval=2 -> S*2, n=0."""
    pair = Pair([(4,)], init_scale=8.0, growth_interval=2)
    before = pair.params["ref"][0].detach().clone()
    pair.backward(["inf"])
    pair.step()
    assert pair.scalers["ref"].found_inf(pair.opts["ref"][0]) is True
    pair.update()
    assert torch.equal(pair.params["ref"][0].detach(), before)  # skipped
    assert pair.scalers["ref"].state_dict()["scale"] == 4.0 and pair.scalers["ref"].get_growth_tracker() == 0
    pair.assert_same("after inf")
    for expected_scale, expected_n in ((4.0, 1), (8.0, 0), (8.0, 1)):
        pair.backward(["ok"])
        pair.step()
        pair.update()
        assert (pair.scalers["ref"].get_scale(), pair.scalers["ref"].get_growth_tracker()) == (expected_scale,
                                                                                                 expected_n)
        pair.assert_same("clean")
    assert not torch.equal(pair.params["ref"][0].detach(), before)


def test_growth_refused_at_the_fp32_limit_resets_tracker():
    """S * growth would be inf: S stays, n still resets to 0 (torch's _amp_update_scale_)."""
    pair = Pair([(4,)], init_scale=FP32_MAX, growth_interval=1)
    pair.backward(["tiny"])  # tiny grads so S * grad stays finite
    pair.step()
    pair.update()
    ref = pair.scalers["ref"]
    assert ref.get_scale() == FP32_MAX and math.isfinite(ref.get_scale()) and ref.get_growth_tracker() == 0
    pair.assert_same("at limit")


@pytest.mark.parametrize("growth_interval", [1, 3])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_scale_zero_after_persistent_overflow_follows_grad_scaler(growth_interval, unscale_first):
    """Overflow after overflow takes S through fp32's subnormals to exactly 0; from there torch neither divides by
    zero nor recovers: 1/S = inf, zero scaled gradients unscale to NaN and pass the inf check (the step is taken,
    with NaN gradients), backoff and growth leave S at 0. The reference makes every one of those decisions."""
    pair = Pair([(3, 5), (7,)], init_scale=2.0**-140, growth_interval=growth_interval)
    script = ["inf"] * 12 + ["ok", "nan", "ok", "ok", "overflow", "ok"]
    _run(pair, script, unscale_first=unscale_first)
    ref = pair.scalers["ref"]
    assert ref.get_scale() == 0.0 == pair.scalers["torch"].get_scale()
    assert all(p.isnan().all() for p in pair.params["ref"])  # torch's outcome too: the run is lost, visibly


def test_non_power_of_two_backoff_rounds_like_torch():
    """S * 0.3 is formed in float64 and rounded once to fp32 (not computed in fp32)."""
    pair = Pair([(4,)], init_scale=7.0, backoff_factor=0.3)
    pair.backward(["inf"])
    pair.step()
    pair.update()
    assert pair.scalers["ref"].get_scale() == torch.tensor(7.0 * 0.3, dtype=torch.float64).float().item()
    assert pair.scalers["ref"].get_scale() != (torch.tensor(7.0) * 0.3).item()
    pair.assert_same("backoff 0.3")


def test_state_dict_round_trip_mid_run_continues_identically():
    pair = Pair([(3, 5)], growth_interval=3)
    _run(pair, ["ok", "inf", "ok", "ok"])
    fresh_ref, fresh_torch = DynamicLossScaler(), torch.amp.GradScaler("cpu")
    fresh_ref.load_state_dict(pair.scalers["ref"].state_dict())
    fresh_torch.load_state_dict(pair.scalers["torch"].state_dict())
    assert fresh_ref.state_dict() == fresh_torch.state_dict() == pair.scalers["torch"].state_dict()
    # The reference loads torch's state dict and continues in step with torch.
    cross = DynamicLossScaler()
    cross.load_state_dict(pair.scalers["torch"].state_dict())
    pair.scalers["ref"] = cross
    _run(pair, ["ok", "ok", "nan", "ok"])


def test_get_scale_before_first_scale_is_init_scale():
    ref, tor = DynamicLossScaler(init_scale=123.0), torch.amp.GradScaler("cpu", init_scale=123.0)
    assert ref.get_scale() == tor.get_scale() == 123.0
    assert ref.state_dict() == tor.state_dict()


def test_update_with_new_scale_keeps_tracker():
    pair = Pair([(4,)], growth_interval=5)
    _run(pair, ["ok", "ok"])
    pair.backward(["ok"])
    pair.step()
    for s in pair.scalers.values():
        s.update(0.1)
    assert pair.scalers["ref"].get_scale() == torch.tensor(0.1).item()
    pair.assert_same("new_scale")


# ---- the calls in the wrong order: torch refuses, so does the reference -----------------------------------------


@pytest.fixture(params=["ref", "torch"])
def kind(request) -> str:
    """Every wrong-order test runs twice: on the reference scaler ("ref") and on torch.amp.GradScaler ("torch")."""
    return request.param


def _fresh(kind="ref", grad_dtype=torch.float32, **scaler_kwargs):
    """(scaler, p, opt): the reference scaler (kind "ref") or torch.amp.GradScaler on CPU ("torch"), a parameter of
    three ones in `grad_dtype` and SGD over it."""
    scaler = DynamicLossScaler(**scaler_kwargs) if kind == "ref" else torch.amp.GradScaler("cpu", **scaler_kwargs)
    p = torch.ones(3, dtype=grad_dtype, requires_grad=True)
    return scaler, p, torch.optim.SGD([p], lr=0.1)


def _scaled_backward(kind="ref", **scaler_kwargs):
    """`_fresh`, after the backward of the scaled loss p.sum(): where unscale_ and step may be called."""
    scaler, p, opt = _fresh(kind, **scaler_kwargs)
    scaler.scale(p.sum()).backward()
    return scaler, p, opt


def test_unscale_twice_is_an_error(kind):
    scaler, _, opt = _scaled_backward(kind)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)


def test_unscale_after_step_and_step_twice_are_errors(kind):
    scaler, p, opt = _scaled_backward(kind)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called since the last update"):
        scaler.step(opt)
    scaler.update()
    scaler.scale(p.sum()).backward()
    scaler.step(opt)  # a new iteration is fine


def test_calls_before_scale_are_errors(kind):
    scaler, p, opt = _fresh(kind)
    p.sum().backward()
    for call in (lambda: scaler.unscale_(opt), lambda: scaler.step(opt), scaler.update):
        with pytest.raises((RuntimeError, AssertionError)):
            call()


def test_fp16_gradients_are_refused(kind):
    scaler, p, opt = _fresh(kind, torch.float16)
    scaler.scale(p.float().sum()).backward()
    before = p.grad.clone()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt)
    assert torch.equal(p.grad, before)  # refused before touching anything


def test_no_gradients_and_no_checks_are_errors(kind):
    scaler, _, opt = _fresh(kind)
    scaler.scale(torch.ones(()))  # creates the scale; no gradient anywhere
    with pytest.raises((RuntimeError, AssertionError), match="No inf checks"):
        scaler.step(opt)
    fresh, _, _ = _fresh(kind)
    fresh.scale(torch.ones(()))
    with pytest.raises((RuntimeError, AssertionError), match="No inf checks"):
        fresh.update()


def test_closure_is_refused(kind):
    scaler, _, opt = _scaled_backward(kind)
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: None)


def test_scale_of_lists_and_tuples():
    ref, tor = DynamicLossScaler(init_scale=4.0), torch.amp.GradScaler("cpu", init_scale=4.0)
    outs = [torch.tensor(1.5), (torch.tensor(2.0), torch.tensor([3.0, 0.25]))]
    a, b = ref.scale(outs), tor.scale(outs)
    assert type(a) is list and type(a[1]) is tuple
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][1], b[1][1])
    with pytest.raises(ValueError, match="outputs must be a Tensor"):
        ref.scale(3.0)


def test_load_empty_state_dict_is_an_error():
    with pytest.raises(RuntimeError, match="empty"):
        DynamicLossScaler().load_state_dict({})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": float("inf")}, "init_scale"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"backoff_factor": 1.0}, "backoff_factor"),
        ({"backoff_factor": 0.0}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"growth_interval": 2.5}, "growth_interval"),
        ({"growth_interval": True}, "growth_interval"),
        ({"init_scale": True}, "init_scale"),
        ({"init_scale": "65536"}, "init_scale"),
        ({"init_scale": None}, "init_scale"),
        ({"growth_factor": "2"}, "growth_factor"),
        ({"growth_factor": float("nan")}, "growth_factor"),
        ({"growth_factor": float("inf")}, "growth_factor"),
        ({"growth_factor": None}, "growth_factor"),
        ({"backoff_factor": "0.5"}, "backoff_factor"),
        ({"backoff_factor": True}, "backoff_factor"),
        ({"backoff_factor": float("nan")}, "backoff_factor"),
    ],
)
def test_bad_arguments(kwargs, match):
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=rf"^{match} must .*got {re.escape(repr(value))}"):
        DynamicLossScaler(**kwargs)


@pytest.mark.parametrize("new_scale", [True, "2", float("nan"), float("inf"), -1.0, torch.ones(2), [2.0]])
def test_update_refuses_a_scale_that_is_not_one(new_scale):
    scaler, _, opt = _scaled_backward(init_scale=8.0)
    scaler.step(opt)
    with pytest.raises(ValueError, match="^new_scale must be a finite number >= 0"):
        scaler.update(new_scale)
    assert scaler.get_scale() == 8.0


def test_a_tensor_new_scale_is_taken_like_torch():
    pair = Pair([(4,)])
    _run(pair, ["ok"])
    pair.backward(["ok"])
    pair.step()
    for s in pair.scalers.values():
        s.update(torch.tensor(3.0))
    pair.assert_same("tensor new_scale")


def test_something_that_is_not_an_optimizer_is_refused_by_name():
    scaler, p, _ = _scaled_backward()
    with pytest.raises(ValueError, match=r"^optimizer must be a torch.optim.Optimizer .*got \[tensor"):
        scaler.step([p])
