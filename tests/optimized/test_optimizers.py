"""optimized.optimizers: build_optimizer's choices and groups, and the foreach Lion against the reference Lion."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimized.optimizers import Lion, build_optimizer, param_groups
from reference import optimizers as ref
from reference.data import make_batches
from reference.model import GPT
from tests.models import tiny_config

CFG = tiny_config()


def train_steps(model, opt, steps=5):
    batches = make_batches(steps, batch_size=2, seq_len=8, vocab_size=CFG.vocab_size, seed=3)
    losses = []
    for idx, targets in batches:
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_groups_exempt_biases_and_norm_weights_and_list_tied_weights_once():
    model = GPT(CFG)
    decay, exempt = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in exempt["params"])
    assert any(names[id(p)].endswith("ln_1.weight") for p in exempt["params"])
    assert any(names[id(p)] == "wte.weight" for p in decay["params"])  # lm_head is tied to it: listed once
    n_all = len(decay["params"]) + len(exempt["params"])
    assert n_all == len(list(model.parameters()))
    custom = param_groups(model, 0.1, no_decay=lambda name, p: p.dim() < 2 or name.startswith("w"))
    assert not any(names[id(p)].startswith("w") for p in custom[0]["params"])


def test_build_optimizer_picks_foreach_on_cpu_and_fused_on_request():
    model = GPT(CFG)
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] and not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    fused = build_optimizer(model, "AdamW", lr=1e-3, fused=True)
    assert fused.defaults["fused"]
    assert isinstance(build_optimizer(model, "lion", lr=1e-4), Lion)
    assert isinstance(build_optimizer(model.parameters(), "sgd", lr=0.1, momentum=0.9), torch.optim.SGD)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lion"])
@pytest.mark.parametrize("fused", [False, True])
def test_built_optimizer_trains_like_the_reference(name, fused):
    if name == "lion" and fused:
        pytest.skip("no fused Lion")
    kw = dict(sgd=dict(lr=0.1, momentum=0.9, weight_decay=0.01), adam=dict(lr=3e-3, weight_decay=0.01),
              adamw=dict(lr=3e-3, weight_decay=0.1), lion=dict(lr=3e-4, weight_decay=0.1))[name]
    ref_cls = dict(sgd=ref.SGD, adam=ref.Adam, adamw=ref.AdamW, lion=ref.Lion)[name]
    model_opt, model_ref = GPT(CFG), GPT(CFG)
    opt = build_optimizer(model_opt, name, fused=fused, **kw)
    groups = param_groups(model_ref, kw["weight_decay"])
    losses_opt = train_steps(model_opt, opt)
    losses_ref = train_steps(model_ref, ref_cls(groups, **{k: v for k, v in kw.items() if k != "weight_decay"}))
    torch.testing.assert_close(torch.tensor(losses_opt), torch.tensor(losses_ref))
    for p, q in zip(model_opt.parameters(), model_ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 if name != "lion" else 3e-4)


@settings(max_examples=15, deadline=None)
@given(lr=st.sampled_from([1e-4, 1e-2, 0.3]),
       betas=st.tuples(st.sampled_from([0.0, 0.9, 0.95]), st.sampled_from([0.0, 0.9, 0.99])),
       wd=st.sampled_from([0.0, 0.1, 1.0]))
def test_foreach_lion_is_bitwise_the_reference_lion(lr, betas, wd):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (2, 3, 1)]
    mine = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    spec = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    mine_opt, spec_opt = Lion(mine, lr=lr, betas=betas, weight_decay=wd), ref.Lion(spec, lr=lr, betas=betas,
                                                                                    weight_decay=wd)
    for t in range(20):
        for ps in (mine, spec):
            g = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) + 0.3 * p.detach() ** 3
        mine_opt.step()
        spec_opt.step()
    for a, b in zip(mine, spec, strict=True):
        assert torch.equal(a, b)
    # state dicts interchange: the same keys, and the reference Lion resumes from the foreach Lion's state
    spec_opt.load_state_dict(mine_opt.state_dict())
    assert all(torch.equal(spec_opt.state[b]["exp_avg"], mine_opt.state[a]["exp_avg"])
               for a, b in zip(mine, spec, strict=True))


def test_lion_mixed_dtypes_go_to_separate_buckets():
    p32 = torch.nn.Parameter(torch.randn(4))
    p64 = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    for p in (p32, p64):
        p.grad = torch.ones_like(p)
    before = [p32.detach().clone(), p64.detach().clone()]
    Lion([p32, p64], lr=0.1).step()
    assert torch.equal(p32.detach(), before[0] - 0.1) and torch.equal(p64.detach(), before[1] - 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="adagrad", lr=0.1), "name"),
    (dict(name="adamw", lr=-1.0), "lr"),
    (dict(name="adamw", lr=math.nan), "lr"),
    (dict(name="adamw", lr=0.1, betas=(0.9, 1.0)), "betas"),
    (dict(name="adam", lr=0.1, weight_decay=-0.1), "weight_decay"),
    (dict(name="sgd", lr=0.1, momentum=-0.5), "momentum"),
    (dict(name="lion", lr=0.1, fused=True), "fused"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(GPT(CFG), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_build_optimizer_is_fused_on_cuda_and_trains_like_the_reference(name):
    kw = dict(sgd=dict(lr=0.1, momentum=0.9, weight_decay=0.01), adam=dict(lr=3e-3, weight_decay=0.01),
              adamw=dict(lr=3e-3, weight_decay=0.1))[name]
    ref_cls = dict(sgd=ref.SGD, adam=ref.Adam, adamw=ref.AdamW)[name]
    model_opt, model_ref = GPT(CFG).cuda(), GPT(CFG).cuda()
    opt = build_optimizer(model_opt, name, **kw)
    assert opt.defaults["fused"]
    batches = make_batches(5, batch_size=2, seq_len=8, vocab_size=CFG.vocab_size, seed=3)
    spec = ref_cls(param_groups(model_ref, kw["weight_decay"]), **{k: v for k, v in kw.items() if k != "weight_decay"})
    for model, o in ((model_opt, opt), (model_ref, spec)):
        for idx, targets in batches:
            o.zero_grad(set_to_none=True)
            model(idx.cuda(), targets.cuda())[1].backward()
            o.step()
    for p, q in zip(model_opt.parameters(), model_ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, option, message",
    [
        ("lion", {"amsgrad": True}, "amsgrad does not apply to 'lion'"),
        ("adam", {"momentum": 0.9}, "momentum does not apply to 'adam'"),
        ("sgd", {"betas": (0.9, 0.99)}, "betas does not apply to 'sgd'"),
        ("lion", {"eps": 1e-6}, "eps does not apply to 'lion'"),
        ("adamw", {"nesterov": True}, "nesterov does not apply to 'adamw'"),
    ],
)
def test_options_that_do_not_apply_are_refused(name, option, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(torch.nn.Linear(2, 2), name, lr=1e-3, **option)


# ---- bad inputs: every argument, each an error naming it, the value and what is allowed -----------------------------

NAN, INF = math.nan, math.inf


def _refused(call, name, shown):
    """call() raises an error that opens with the argument's name, says what is allowed, and shows the value."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(name) and " must " in message and repr(shown) in message, message
    assert isinstance(info.value, TypeError) or not isinstance(shown, (str, type(None), list, tuple)), \
        "a wrong type is also a TypeError"


BAD_BUILD = [
    # (name, keyword arguments over a valid call, the argument named, the value shown)
    ("adamw", dict(betas=0.9), "betas", 0.9),
    ("adamw", dict(betas=(0.9,)), "betas", (0.9,)),
    ("adamw", dict(betas=(0.9, 0.99, 0.999)), "betas", (0.9, 0.99, 0.999)),
    ("adamw", dict(betas=(0.9, 1.0)), "betas", (0.9, 1.0)),
    ("adamw", dict(betas=(0.9, NAN)), "betas", (0.9, NAN)),
    ("adamw", dict(betas=(True, 0.99)), "betas", (True, 0.99)),
    ("adamw", dict(betas="ab"), "betas", "ab"),
    ("adamw", dict(weight_decay=None), "weight_decay", None),
    ("adamw", dict(weight_decay=True), "weight_decay", True),
    ("adamw", dict(weight_decay="0.1"), "weight_decay", "0.1"),
    ("adamw", dict(weight_decay=INF), "weight_decay", INF),
    ("adamw", dict(weight_decay=-0.1), "weight_decay", -0.1),
    ("adamw", dict(lr=True), "lr", True),
    ("adamw", dict(lr=None), "lr", None),
    ("adamw", dict(lr="1e-3"), "lr", "1e-3"),
    ("adamw", dict(lr=NAN), "lr", NAN),
    ("adamw", dict(lr=INF), "lr", INF),
    ("adamw", dict(lr=-1.0), "lr", -1.0),
    ("adamw", dict(eps=None), "eps", None),
    ("adamw", dict(eps=False), "eps", False),
    ("adamw", dict(eps=-1e-8), "eps", -1e-8),
    ("adamw", dict(eps=NAN), "eps", NAN),
    ("adam", dict(amsgrad="yes"), "amsgrad", "yes"),
    ("adam", dict(amsgrad=1), "amsgrad", 1),
    ("sgd", dict(momentum=None), "momentum", None),
    ("sgd", dict(momentum=True), "momentum", True),
    ("sgd", dict(momentum=NAN), "momentum", NAN),
    ("sgd", dict(momentum=-0.5), "momentum", -0.5),
    ("sgd", dict(momentum=0.9, nesterov=1), "nesterov", 1),
    ("sgd", dict(nesterov=True), "nesterov", True),  # nesterov needs a momentum
    ("adamw", dict(fused=1), "fused", 1),
    ("adamw", dict(fused="auto"), "fused", "auto"),
    ("adamw", dict(no_decay="biases"), "no_decay", "biases"),
    ("adma", {}, "name", "adma"),
    (None, {}, "name", None),
    (["adam"], {}, "name", ["adam"]),
]


@pytest.mark.parametrize("name, kwargs, argument, shown", BAD_BUILD,
                         ids=[f"{a}={s!r}" for _, _, a, s in BAD_BUILD])
def test_build_optimizer_refuses_bad_arguments(name, kwargs, argument, shown):
    _refused(lambda: build_optimizer(torch.nn.Linear(2, 2), name, **{"lr": 1e-3, **kwargs}), argument, shown)


def test_a_misspelt_optimizer_name_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"did you mean (one of )?'adam'"):
        build_optimizer(torch.nn.Linear(2, 2), "adma", lr=1e-3)


@pytest.mark.parametrize("model, shown", [(None, None), (torch.zeros(3), None), ([1.0, 2.0], 1.0),
                                          ("params", "params"), ([{"lr": 0.1}], {"lr": 0.1})])
def test_build_optimizer_refuses_what_is_not_parameters(model, shown):
    with pytest.raises(ValueError, match="^model must") as info:
        build_optimizer(model, "sgd", lr=0.1)
    if shown is not None:
        assert repr(shown) in str(info.value)


@pytest.mark.parametrize("kwargs, argument, shown", [
    (dict(lr=True), "lr", True), (dict(lr=None), "lr", None), (dict(betas=0.9), "betas", 0.9),
    (dict(betas=(0.9, 1.5)), "betas", (0.9, 1.5)), (dict(weight_decay=None), "weight_decay", None),
    (dict(weight_decay=NAN), "weight_decay", NAN),
])
def test_lion_refuses_bad_arguments(kwargs, argument, shown):
    _refused(lambda: Lion(torch.nn.Linear(2, 2).parameters(), **kwargs), argument, shown)


@pytest.mark.parametrize("params, shown", [(None, None), (3, 3), ([1.0], 1.0)])
def test_lion_refuses_what_is_not_parameters(params, shown):
    _refused(lambda: Lion(params), "params", shown)


@pytest.mark.parametrize("args, argument, shown", [
    ((None, 0.1), "model", None), ((torch.nn.Linear(2, 2), None), "weight_decay", None),
    ((torch.nn.Linear(2, 2), True), "weight_decay", True), ((torch.nn.Linear(2, 2), 0.1, "x"), "no_decay", "x"),
])
def test_param_groups_refuses_bad_arguments(args, argument, shown):
    _refused(lambda: param_groups(*args), argument, shown)


def test_numbers_of_every_real_type_and_generators_of_groups_are_accepted():
    """What the checks must not refuse: an int lr, numpy scalars, betas as a list, a generator of param groups."""
    np = pytest.importorskip("numpy")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "AdamW", lr=1, betas=[np.float32(0.5), 0.99], weight_decay=np.float64(0.1))
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["betas"] == (0.5, 0.99)
    groups = ({"params": (p for p in [w]), "weight_decay": 0.0} for w in model.parameters())
    opt = build_optimizer(groups, "sgd", lr=0.1, momentum=0.9, nesterov=True)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
