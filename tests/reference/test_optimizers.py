"""reference.optimizers against torch.optim: the same trajectory over 20 steps, and state_dicts that interchange."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import optimizers as ref

SHAPES = [(7, 5), (13,), (3, 1, 2), (1,)]  # primes, N != M, a scalar-like tensor
STEPS = 20


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def run(opt_factory, steps: int = STEPS, params=None, seed: int = 1, start: int = 0):
    """Run `steps` steps; the gradient of step t is noise_t + 0.3 * p**3 (depends on the parameters, so any
    difference in a trajectory feeds back into the next gradients)."""
    params = params if params is not None else make_params()
    opt = opt_factory(params)
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + 0.3 * p.detach() ** 3
        opt.step()
    return params, opt


def bits_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


hparams_sgd = st.fixed_dictionaries({
    "lr": st.sampled_from([0.0, 1e-3, 0.05, 0.3]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "dampening": st.sampled_from([0.0, 0.1]),
    "weight_decay": st.sampled_from([0.0, 1e-2, 0.3]),
    "nesterov": st.booleans(),
}).filter(lambda h: not h["nesterov"] or (h["momentum"] > 0 and h["dampening"] == 0))

hparams_adam = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-4, 1e-2, 0.3]),
    "betas": st.tuples(st.sampled_from([0.0, 0.8, 0.9]), st.sampled_from([0.0, 0.95, 0.999])),
    "eps": st.sampled_from([1e-8, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 1e-2, 0.5]),
    "amsgrad": st.booleans(),
})


@settings(max_examples=15, deadline=None)
@given(h=hparams_sgd)
def test_sgd_matches_torch(h):
    mine, _ = run(lambda ps: ref.SGD(ps, **h))
    loop, _ = run(lambda ps: torch.optim.SGD(ps, foreach=False, **h))
    multi, _ = run(lambda ps: torch.optim.SGD(ps, foreach=True, **h))
    assert bits_equal(mine, loop)
    for a, b in zip(mine, multi, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_defaults_are_torchs(name):
    """Default hyperparameters are torch.optim's (AdamW's weight decay 1e-2, Adam's 0)."""
    p = torch.zeros(2, requires_grad=True)
    mine, theirs = getattr(ref, name)([p]).defaults, getattr(torch.optim, name)([p]).defaults
    assert {k: theirs[k] for k in mine} == mine


@settings(max_examples=15, deadline=None)
@given(h=hparams_adam, decoupled=st.booleans())
def test_adam_and_adamw_match_torch(h, decoupled):
    mine_cls, torch_cls = (ref.AdamW, torch.optim.AdamW) if decoupled else (ref.Adam, torch.optim.Adam)
    mine, mine_opt = run(lambda ps: mine_cls(ps, **h))
    loop, loop_opt = run(lambda ps: torch_cls(ps, foreach=False, **h))
    multi, _ = run(lambda ps: torch_cls(ps, foreach=True, **h))
    assert bits_equal(mine, loop)
    for a, b in zip(mine, multi, strict=True):
        torch.testing.assert_close(a, b)
    for p_mine, p_loop in zip(mine, loop, strict=True):
        s_mine, s_loop = mine_opt.state[p_mine], loop_opt.state[p_loop]
        assert set(s_mine) == set(s_loop)
        for key in s_loop:
            assert torch.equal(s_mine[key], s_loop[key]), key


def test_adam_l2_and_adamw_decoupled_differ_only_with_weight_decay():
    same_a, _ = run(lambda ps: ref.Adam(ps, lr=0.01, weight_decay=0.0))
    same_w, _ = run(lambda ps: ref.AdamW(ps, lr=0.01, weight_decay=0.0))
    assert bits_equal(same_a, same_w)
    l2, _ = run(lambda ps: ref.Adam(ps, lr=0.01, weight_decay=0.5))
    decoupled, _ = run(lambda ps: ref.AdamW(ps, lr=0.01, weight_decay=0.5))
    assert max(float((a - b).detach().abs().max()) for a, b in zip(l2, decoupled, strict=True)) > 1e-3


def test_lion_update_is_sign_of_interpolation():
    """One Lion step from zero state moves every coordinate by exactly lr (times the decay), against sign(g)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    p.grad = torch.tensor([0.3, -0.1, 0.0, -5.0])
    opt = ref.Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    opt.step()
    expected = torch.tensor([1.0, -2.0, 3.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0, 0.0, -1.0])
    assert torch.equal(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.3, -0.1, 0.0, -5.0]))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("direction", ["torch->reference", "reference->torch"])
def test_state_dict_interchanges_with_torch(name, direction):
    """Ten steps in one implementation, save, load into the other, ten more steps: the trajectory of twenty steps
    in one implementation, bit for bit."""
    kw = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
          "adam": dict(lr=0.01, weight_decay=0.01, amsgrad=True),
          "adamw": dict(lr=0.01, weight_decay=0.1)}[name]
    mine_cls = {"sgd": ref.SGD, "adam": ref.Adam, "adamw": ref.AdamW}[name]
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    first, second = (torch_cls, mine_cls) if direction == "torch->reference" else (mine_cls, torch_cls)
    extra = lambda cls: {"foreach": False} if cls is torch_cls else {}
    whole, _ = run(lambda ps: first(ps, **kw, **extra(first)), steps=20)
    params, opt = run(lambda ps: first(ps, **kw, **extra(first)), steps=10)
    saved = opt.state_dict()
    resumed = second(params, **kw, **extra(second))
    resumed.load_state_dict(saved)
    run(lambda ps: resumed, steps=10, params=params, start=10)
    assert bits_equal(params, whole)


def test_closure_and_missing_grads():
    p, q = make_params()[:2]
    opt = ref.Adam([p, q], lr=0.1)
    q_before = q.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and torch.equal(q.detach(), q_before) and q not in opt.state


@pytest.mark.parametrize("bad, match", [
    (lambda ps: ref.SGD(ps, lr=-0.1), "lr"),
    (lambda ps: ref.SGD(ps, lr=math.nan), "lr"),
    (lambda ps: ref.SGD(ps, lr=0.1, nesterov=True), "nesterov"),
    (lambda ps: ref.Adam(ps, lr=math.inf), "lr"),
    (lambda ps: ref.Adam(ps, betas=(0.9, 1.0)), "betas"),
    (lambda ps: ref.AdamW(ps, betas=(-0.1, 0.9)), "betas"),
    (lambda ps: ref.AdamW(ps, weight_decay=-1.0), "weight_decay"),
    (lambda ps: ref.Adam(ps, eps=-1e-8), "eps"),
    (lambda ps: ref.Lion(ps, betas=(0.9, 1.5)), "betas"),
])
def test_bad_hyperparameters_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        bad(make_params())
