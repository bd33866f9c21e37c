"""optimized.clipping and reference.clipping against torch.nn.utils.clip_grad_norm_; the sharded global norm on
2 and 3 ranks against the single-process norm of the whole gradient."""

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.launch import spawn
from conformance.measure import CollectiveCounter
from optimized.clipping import clip_grad_norm_, clip_grads_with_norm_, clip_sharded_grad_norm_, global_grad_norm
from reference.clipping import clip_grad_norm, clip_grad_value

NORMS = [1.0, 2.0, 3.0, math.inf]
SHAPES = [(7, 5), (13,), (1,), (3, 2, 2), (11, 3)]


def make_params(seed=0, scale=1.0, dtype=torch.float32, special=None):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in SHAPES:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
        p.grad = (torch.randn(s, generator=gen) * scale).to(dtype)
        params.append(p)
    if special is not None:
        params[1].grad[4] = special
    return params


def grads(params):
    return [p.grad.clone() for p in params]


@settings(max_examples=20, deadline=None)
@given(norm_type=st.sampled_from(NORMS), max_norm=st.sampled_from([0.1, 1.0, 5.0, 1e4]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), foreach=st.sampled_from([None, True, False]))
def test_clip_equals_torch(norm_type, max_norm, scale, foreach):
    theirs, mine, spec = (make_params(scale=scale) for _ in range(3))
    t = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    m = clip_grad_norm_(mine, max_norm, norm_type, foreach=foreach)
    r = clip_grad_norm(spec, max_norm, norm_type)
    assert torch.equal(m, t)  # the same kernels in the same order for fp32
    for a, b in zip(grads(mine), grads(theirs), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(r, t)
    for a, b in zip(grads(spec), grads(theirs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradients_like_torch(norm_type, special):
    theirs, mine, spec = (make_params(special=special) for _ in range(3))
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    m = clip_grad_norm_(mine, 1.0, norm_type)
    r = clip_grad_norm(spec, 1.0, norm_type)
    expected_nan = math.isnan(special)
    for total in (t, m, r):
        assert math.isnan(total) if expected_nan else math.isinf(total)
    torch.testing.assert_close(grads(mine), grads(theirs), equal_nan=True)
    torch.testing.assert_close(grads(spec), grads(theirs), equal_nan=True)
    for params, fn in ((make_params(special=special), clip_grad_norm_), (make_params(special=special),
                                                                          clip_grad_norm)):
        before = grads(params)
        with pytest.raises(RuntimeError, match="non-finite"):
            fn(params, 1.0, norm_type, error_if_nonfinite=True)
        torch.testing.assert_close(grads(params), before, equal_nan=True)  # raised before touching anything


def test_fp16_norm_does_not_overflow_where_torch_does():
    """The fp16 gradient's norm (~1e5) exceeds fp16's max (65504): torch returns inf and zeroes the gradients;
    the fp32 accumulation here returns the true norm and clips correctly."""
    theirs = make_params(scale=1e4, dtype=torch.float16)
    mine = make_params(scale=1e4, dtype=torch.float16)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in mine]))
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    m = clip_grad_norm_(mine, 1.0)
    assert math.isinf(t) and all(float(g.abs().max()) == 0.0 for g in grads(theirs))
    assert m.dtype == torch.float32 and float(m) == pytest.approx(float(exact), rel=1e-6)
    clipped = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads(mine)]))
    assert float(clipped) == pytest.approx(1.0, rel=2e-3)  # fp16 rounding of the scaled gradients


def test_mixed_dtypes_and_no_grads():
    params = make_params()
    params[0] = torch.nn.Parameter(params[0].detach().double())
    params[0].grad = torch.randn_like(params[0])
    params[2].grad = None
    expected = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]))
    total = clip_grad_norm_(params, 1e9)
    assert total.dtype == torch.float64 and float(total) == pytest.approx(float(expected), rel=1e-6)
    assert float(clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0


def test_clip_grad_value():
    params = make_params(scale=3.0)
    expected = [g.clamp(-0.5, 0.5) for g in grads(params)]
    clip_grad_value(params, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(grads(params), expected, strict=True))


@pytest.mark.parametrize("call, match", [
    (lambda ps: clip_grad_norm_(ps, 0.0), "max_norm"),
    (lambda ps: clip_grad_norm_(ps, -1.0), "max_norm"),
    (lambda ps: clip_grad_norm_(ps, math.nan), "max_norm"),
    (lambda ps: clip_grad_norm_(ps, 1.0, norm_type=0.5), "norm_type"),
    (lambda ps: clip_grad_norm(ps, 0.0), "max_norm"),
    (lambda ps: clip_grad_norm(ps, 1.0, norm_type=-2), "norm_type"),
    (lambda ps: clip_grad_value(ps, 0.0), "clip_value"),
    (lambda ps: global_grad_norm([p.grad for p in ps], norm_type=0.0), "norm_type"),
    (lambda ps: clip_grads_with_norm_([p.grad for p in ps], -2.0, torch.tensor(1.0)), "max_norm"),
])
def test_bad_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_params())


# ---- the sharded norm: every rank holds a disjoint slice of each sharded gradient, plus replicated ones ----

REPLICATED = {1, 2}  # indices of SHAPES held in full by every rank (e.g. LayerNorm weights under TP)


def _shards(full, rank, world):
    """Rank's slice of each sharded gradient (flattened, torch.chunk: uneven, possibly empty on world size 3)."""
    out = []
    for i, g in enumerate(full):
        if i in REPLICATED:
            continue
        chunks = g.flatten().chunk(world)
        out.append(chunks[rank] if rank < len(chunks) else g.new_empty(0))
    return out


def _sharded_case(norm_type, special):
    rank, world = dist.get_rank(), dist.get_world_size()
    full = grads(make_params(seed=5))
    if special is not None and rank == world - 1:  # a non-finite value in the last rank's shard only
        _shards(full, rank, world)[0][0] = special
    sharded = _shards(full, rank, world)
    replicated = [full[i] for i in sorted(REPLICATED)]
    with CollectiveCounter() as counter:
        total = global_grad_norm(sharded, replicated, norm_type=norm_type)
    clipped_total = clip_sharded_grad_norm_(sharded, replicated, max_norm=0.5, norm_type=norm_type)
    return float(total), float(clipped_total), counter.count("all_reduce"), sharded, replicated


def _sharded_worker():
    """Every case in one launch (a launch costs seconds): norm types 1, 2, inf; then NaN / inf on one rank."""
    cases = [(p, None) for p in (1.0, 2.0, math.inf)] + [(math.inf, math.nan), (math.inf, math.inf), (2.0, math.nan)]
    return {repr(case): _sharded_case(*case) for case in cases}  # repr: a NaN key would not match itself


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_norm_on_ranks_equals_single_process_norm(world):
    """One launch per world size checks every case (a launch costs seconds; a fixture would be rebuilt on each
    xdist worker)."""
    results = spawn(_sharded_worker, world, timeout=120)
    for norm_type in (1.0, 2.0, math.inf):
        full = make_params(seed=5)
        original = grads(full)
        expected = torch.nn.utils.get_total_norm(original, norm_type)
        torch.nn.utils.clip_grad_norm_(full, 0.5, norm_type)
        clipped = grads(full)
        for rank, by_case in enumerate(results):
            total, clipped_total, n_collectives, shards, replicated = by_case[repr((norm_type, None))]
            assert total == pytest.approx(float(expected), rel=1e-6), (norm_type, rank)  # replicated counted once
            assert clipped_total == total and n_collectives == 1
            torch.testing.assert_close(shards, _shards(clipped, rank, world))
            torch.testing.assert_close(replicated, [clipped[i] for i in sorted(REPLICATED)])
        if norm_type != math.inf:  # counting the replicated gradients once per rank would give another norm
            doubled = torch.nn.utils.get_total_norm(original + [original[i] for i in REPLICATED] * (world - 1),
                                                    norm_type)
            assert float(doubled) > 1.01 * results[0][repr((norm_type, None))][0]
    # A NaN / inf on the last rank only: gloo's MAX all-reduce alone returns a finite max when the NaN is not on
    # rank 0; the packed NaN flag makes every rank see it.
    for norm_type, special in [(math.inf, math.nan), (math.inf, math.inf), (2.0, math.nan)]:
        for by_case in results:
            total = by_case[repr((norm_type, special))][0]
            assert math.isnan(total) if math.isnan(special) else total == math.inf, (norm_type, special)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", NORMS)
def test_clip_on_cuda_equals_torch(norm_type):
    theirs, mine = make_params(scale=3.0), make_params(scale=3.0)
    for p in theirs + mine:
        p.data, p.grad = p.data.cuda(), p.grad.cuda()
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    m = clip_grad_norm_(mine, 1.0, norm_type)
    assert m.device.type == "cuda"
    torch.testing.assert_close(m, t)
    torch.testing.assert_close(grads(mine), grads(theirs))


# ---- bad inputs: every argument, each an error naming it, the value and what is allowed, before a gradient moves ----


def _clip_call(fn):
    return {
        "clip_grad_norm_": lambda ps, **kw: clip_grad_norm_(**{"parameters": ps, "max_norm": 1.0, **kw}),
        "clip_sharded_grad_norm_": lambda ps, **kw: clip_sharded_grad_norm_(
            **{"sharded": [p.grad for p in ps], "max_norm": 1.0, **kw}),
        "global_grad_norm": lambda ps, **kw: global_grad_norm(**{"sharded": [p.grad for p in ps], **kw}),
        "clip_grads_with_norm_": lambda ps, **kw: clip_grads_with_norm_(
            **{"grads": [p.grad for p in ps], "max_norm": 1.0, "total_norm": torch.tensor(3.0), **kw}),
    }[fn]


BAD_CLIP = [
    # (function, keyword arguments over a valid call, the argument named, the value shown)
    *[(fn, {"max_norm": v}, "max_norm", v) for fn in ("clip_grad_norm_", "clip_sharded_grad_norm_",
                                                       "clip_grads_with_norm_")
      for v in ("1", None, True, math.nan, 0.0, -1.0, [1.0])],
    *[(fn, {"norm_type": v}, "norm_type", v) for fn in ("clip_grad_norm_", "clip_sharded_grad_norm_",
                                                         "global_grad_norm")
      for v in ("2", None, True, math.nan, 0.5, -math.inf, "l2")],
    ("clip_grad_norm_", {"error_if_nonfinite": "no"}, "error_if_nonfinite", "no"),
    ("clip_grad_norm_", {"error_if_nonfinite": None}, "error_if_nonfinite", None),
    ("clip_sharded_grad_norm_", {"error_if_nonfinite": 1}, "error_if_nonfinite", 1),
    ("clip_grad_norm_", {"foreach": 1}, "foreach", 1),
    ("clip_grad_norm_", {"parameters": None}, "parameters", None),
    ("clip_grad_norm_", {"parameters": 3}, "parameters", 3),
    ("clip_grad_norm_", {"parameters": [1.0]}, "parameters", 1.0),
    ("global_grad_norm", {"sharded": None}, "sharded", None),
    ("global_grad_norm", {"sharded": [2.0]}, "sharded", 2.0),
    ("global_grad_norm", {"replicated": 3}, "replicated", 3),
    ("global_grad_norm", {"process_group": "world"}, "process_group", "world"),
    ("clip_sharded_grad_norm_", {"process_group": 0}, "process_group", 0),
    ("clip_sharded_grad_norm_", {"replicated": [None, "g"]}, "replicated", "g"),
    ("clip_grads_with_norm_", {"total_norm": 3.0}, "total_norm", 3.0),
    ("clip_grads_with_norm_", {"total_norm": None}, "total_norm", None),
    ("clip_grads_with_norm_", {"grads": None}, "grads", None),
]


@pytest.mark.parametrize("fn, kwargs, argument, shown", BAD_CLIP,
                         ids=[f"{f}-{a}={s!r}" for f, _, a, s in BAD_CLIP])
def test_bad_inputs_are_refused_before_any_gradient_changes(fn, kwargs, argument, shown):
    params = make_params()
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError) as info:
        _clip_call(fn)(params, **kwargs)
    message = str(info.value)
    assert message.startswith(argument) and " must " in message and repr(shown) in message, message
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_norm_type_inf_as_a_string_is_accepted_as_torch_does():
    """torch documents norm_type='inf'; that one string is taken, like float('inf')."""
    params, peers = make_params(), make_params()
    total = clip_grad_norm_(params, 1.0, norm_type="inf")
    expected = torch.nn.utils.clip_grad_norm_(peers, 1.0, norm_type="inf")
    assert torch.equal(total, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, peers, strict=True))
    assert clip_grad_norm_(make_params(), math.inf).item() > 0  # max_norm=inf: measure, never clip
