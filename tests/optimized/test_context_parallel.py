"""Ring attention on 2, 3 and 4 gloo ranks equals one-process attention (reference.attention.attention): out, dq,
dk, dv in float64 on both sides within 10x the reference's own rounding spread (the reference on inputs nudged by
one ulp: conformance.checks._reference_runs.input_spread), causal or not, GQA ratios 1, 2 and 6, both layouts; in
bf16 and fp16 by the FlashAttention error rule. Plus the
layouts and the schedule as data, bytes sent, bad input raised on every rank before K/V moves, and no hang when one
rank raises."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import input_spread
from conformance.launch import RankError, spawn
from conformance.measure import CollectiveCounter
from conformance.tolerance import assert_equivalent, within_spread
from optimized.context_parallel import (
    LAYOUTS,
    local_positions,
    ring_attention,
    ring_schedule,
    schedule_work,
    shard_sequence,
)
from reference import memory
from reference.attention import attention
from reference.model import GPTConfig

TIMEOUT = 240.0


def _case(B, H, Hkv, N, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, dout = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)  # (B, H, N, d)
    k, v = torch.randn(B, Hkv, N, d, generator=g), torch.randn(B, Hkv, N, d, generator=g)  # (B, Hkv, N, d)
    return q, k, v, dout


def _one_process(q, k, v, dout, *, causal, scale=None) -> dict[str, torch.Tensor]:
    """reference.attention.attention on the whole sequence: out, dq, dk, dv."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, is_causal=causal, scale=scale)  # (B, H, N, d)
    out.backward(dout)
    return dict(zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], strict=True))


def _check_one(B, H, Hkv, N, d, causal, layout, seed=0, scale=None):
    """Run one case on this rank in float64; raise AssertionError naming the case on a mismatch. Returns bytes
    sent."""
    rank, world = dist.get_rank(), dist.get_world_size()
    full = [t.double() for t in _case(B, H, Hkv, N, d, seed)]
    expected, spread = input_spread(lambda *t: _one_process(*t, causal=causal, scale=scale), full,
                                    origin="float64 attention and its gradients")

    def mine(t):
        return shard_sequence(t, rank=rank, world_size=world, layout=layout)

    # (B, H, n, d) views of (B, n, H, d) memory, as the model's projections give them
    q, k, v = (mine(t).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in full[:3])
    with CollectiveCounter() as counter:
        out = ring_attention(q, k, v, is_causal=causal, scale=scale, layout=layout)  # (B, H, n, d)
        out.backward(mine(full[3]))
    case = f"rank {rank}/{world} B={B} H={H} Hkv={Hkv} N={N} d={d} causal={causal} layout={layout}"
    got = dict(zip(("out", "dq", "dk", "dv"), (out.detach(), q.grad, k.grad, v.grad), strict=True))
    assert_equivalent(within_spread(got, {n: mine(e) for n, e in expected.items()}, spread, name=case))
    return counter.payload_bytes("batch_isend_irecv")


def _grid_worker():
    sent = {}
    for layout in LAYOUTS:
        for causal in (False, True):
            for Hkv in (6, 3, 1):  # GQA ratios 1, 2, 6
                N = 4 * dist.get_world_size() if layout == "zigzag" else 3 * dist.get_world_size()
                sent[layout, causal, Hkv] = _check_one(2, 6, Hkv, N, 4, causal, layout, seed=Hkv)
    if dist.get_world_size() == 3:  # a ring over a subgroup: group ranks 0, 1 are global ranks 2, 1
        group = dist.new_group([2, 1])
        if dist.get_rank() != 0:
            g = torch.Generator().manual_seed(5)
            q, k, v = (torch.randn(1, 2, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))  # (B, H, N, d)
            me = dist.get_rank(group)
            local = [shard_sequence(t, rank=me, world_size=2, layout="zigzag") for t in (q, k, v)]
            out = ring_attention(*local, is_causal=True, process_group=group, layout="zigzag")
            expected, spread = input_spread(lambda *t: {"out": attention(*t, is_causal=True)}, (q, k, v),
                                            origin="float64 attention")
            assert_equivalent(within_spread(
                {"out": out}, {"out": shard_sequence(expected["out"], rank=me, world_size=2, layout="zigzag")},
                spread, name="ring over a subgroup"))
    if dist.get_world_size() == 4:
        sent["most K/V blocks held"] = _most_blocks_held()
    return sent


def _most_blocks_held() -> tuple[int, int]:
    """The most tensors received from the ring alive at once, in forward and in backward (K and V, or dK and dV,
    are two tensors per block)."""
    import optimized.context_parallel as cp

    original, live, most = cp._ring_exchange, [], [0]

    def counting(send, group, rank, world_size):
        recv, works = original(send, group, rank, world_size)
        live.extend(weakref.ref(t) for t in recv)
        most[0] = max(most[0], sum(r() is not None for r in live))
        return recv, works

    cp._ring_exchange = counting
    try:
        q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))  # (B, H, n, d)
        out = ring_attention(q, k, v, is_causal=True, layout="zigzag")
        forward, most[0], live[:] = most[0], 0, []
        out.sum().backward()
        return forward, most[0]
    finally:
        cp._ring_exchange = original


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_attention_equals_one_process_attention(world_size):
    for results in spawn(_grid_worker, world_size, timeout=TIMEOUT):
        if world_size == 4:  # the block in hand and the one arriving; backward also the travelling dK/dV
            forward, backward = results.pop("most K/V blocks held")
            assert (forward, backward) == (2 * 2, 2 * 2 + 2 * 2)
        for (layout, causal, Hkv), sent in results.items():
            N = (4 if layout == "zigzag" else 3) * world_size
            config = GPTConfig(n_head=6, n_kv_head=Hkv, n_embd=24, block_size=N)
            forward, backward = memory.ring_attention_bytes_sent(config, 2, N, cp=world_size, element_bytes=8)
            assert sent == forward + backward, (layout, causal, Hkv)


def _low_precision_worker():
    """bf16 / fp16 inputs: the FlashAttention rule against float64, the naive attention in the same dtype as base."""
    from conformance.tolerance import GRADIENT_FACTOR, error_ratio

    rank, world = dist.get_rank(), dist.get_world_size()
    full = _case(2, 4, 2, 8 * world, 16, seed=3)
    results = {}
    for dtype, causal in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)):
        grads = {}
        for kind, cast in (("ref", torch.double), ("base", dtype)):
            leaves = [t.to(cast).requires_grad_() for t in full[:3]]
            out = attention(*leaves, is_causal=causal)  # (B, H, N, d)
            out.backward(full[3].to(cast))
            grads[kind] = [out.detach()] + [t.grad for t in leaves]

        def mine(t):
            return shard_sequence(t, rank=rank, world_size=world, layout="zigzag")

        q, k, v = (mine(t).to(dtype).requires_grad_() for t in full[:3])
        out = ring_attention(q, k, v, is_causal=causal, layout="zigzag")
        out.backward(mine(full[3]).to(dtype))
        for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), strict=True)):
            factor = {} if name == "out" else {"factor": GRADIENT_FACTOR}
            eq = error_ratio(got, mine(grads["ref"][i]), mine(grads["base"][i]), name=name, **factor)
            results[dtype, causal, name] = (eq.passed, str(eq))
    return results


def test_low_precision_meets_the_flash_attention_error_rule():
    for results in spawn(_low_precision_worker, 2, timeout=TIMEOUT):
        for key, (passed, text) in results.items():
            assert passed, (key, text)


def _drawn_worker(case):
    return _check_one(**case)


@settings(max_examples=3, deadline=None)
@given(world_size=st.sampled_from([2, 3]), B=st.integers(1, 2), heads=st.sampled_from([(2, 1), (4, 2), (3, 3)]),
       chunk=st.integers(1, 5), d=st.sampled_from([1, 3, 8]), causal=st.booleans(), layout=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([None, 0.3]))
def test_drawn_shapes(world_size, B, heads, chunk, d, causal, layout, scale):
    N = chunk * world_size * (2 if layout == "zigzag" else 1)
    case = dict(B=B, H=heads[0], Hkv=heads[1], N=N, d=d, causal=causal, layout=layout, seed=chunk, scale=scale)
    spawn(_drawn_worker, world_size, case, timeout=TIMEOUT)


def _block_worker():
    """A transformer block with ring attention on each rank's tokens, its parameter gradients summed over the ranks,
    against the same block with one-process attention on the whole sequence; float64 on both sides, within 10x the
    one-process block's rounding spread (its input and output gradient nudged by one ulp)."""
    import functools

    from reference.model import Block

    rank, world = dist.get_rank(), dist.get_world_size()
    config = GPTConfig(n_head=4, n_kv_head=2, n_embd=32, block_size=64)
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(2, 8 * world, 32, generator=g, dtype=torch.float64) for _ in range(2))  # (B, N, C)
    torch.manual_seed(0)
    whole = Block(config, attention).to(torch.float64)

    def one_process(x, w):
        whole.zero_grad(set_to_none=True)
        out = whole(x)
        (out * w).sum().backward()
        return {"out": out.detach(), **{n: p.grad.clone() for n, p in whole.named_parameters()}}

    expected, spread = input_spread(one_process, (x, w), origin="float64 transformer block and its gradients")
    for layout in LAYOUTS:
        torch.manual_seed(0)
        mine = Block(config, functools.partial(ring_attention, layout=layout)).to(torch.float64)

        def shard(t, layout=layout):
            return shard_sequence(t, rank=rank, world_size=world, layout=layout, dim=1)

        out = mine(shard(x))  # (B, n, C)
        (out * shard(w)).sum().backward()
        for p in mine.parameters():
            dist.all_reduce(p.grad)
        got = {"out": out.detach(), **{n: p.grad for n, p in mine.named_parameters()}}
        assert_equivalent(within_spread(got, {**expected, "out": shard(expected["out"])}, spread, name=layout))


def test_a_transformer_block_over_the_ring_equals_one_process():
    spawn(_block_worker, 2, timeout=TIMEOUT)


# --- the layouts and the schedule as data ------------------------------------------------------------------------


def test_layouts_partition_the_sequence():
    for world in (1, 2, 3, 4):
        for layout in LAYOUTS:
            N = 4 * world
            every = torch.cat([local_positions(N, rank=r, world_size=world, layout=layout) for r in range(world)])
            assert sorted(every.tolist()) == list(range(N))
    assert local_positions(8, rank=1, world_size=2, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert local_positions(8, rank=0, world_size=2, layout="zigzag").tolist() == [0, 1, 6, 7]


def test_zigzag_balances_causal_work_and_the_schedule_covers_every_visible_pair():
    for world in (2, 3, 4):
        N = 8 * world
        contiguous = schedule_work(world, N, layout="contiguous")
        zigzag = schedule_work(world, N, layout="zigzag")
        assert sum(contiguous) == sum(zigzag) == N * (N + 1) // 2  # the causal triangle, each pair once
        assert len(set(zigzag)) == 1  # every rank the same work
        assert contiguous == sorted(contiguous) and contiguous[-1] > contiguous[0]
        assert schedule_work(world, N, is_causal=False) == [N * N // world] * world
    # The first step of rank 1 of 2, zigzag: its own two chunks causally; the second: both key chunks of rank 0 seen
    # only by the late chunk.
    steps = ring_schedule(0, 2, 4, layout="zigzag", is_causal=True)
    assert [(m.q0, m.q1, m.k0, m.k1, m.causal) for m in steps[1]] == [(2, 4, 0, 4, False)]


def test_bytes_sent_formula():
    config = GPTConfig(n_head=4, n_kv_head=2, n_embd=32, block_size=64)
    fwd, bwd = memory.ring_attention_bytes_sent(config, 2, 64, cp=4)
    block = 2 * 2 * 16 * 2 * 8 * 4  # K and V, (B, Hkv, s/P, d), fp32
    assert (fwd, bwd) == (3 * block, 3 * block + 4 * block)
    assert memory.ring_attention_bytes_sent(config, 2, 64, cp=1) == (0, 0)
    one = memory.context_parallel_activation_bytes_per_layer(config, 2, 64, cp=1)
    assert memory.context_parallel_activation_bytes_per_layer(config, 2, 64, cp=4) * 4 == one


# --- bad input, one failing rank ----------------------------------------------------------------------------------


def _bad_input_worker():
    rank = dist.get_rank()
    alone = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    q = torch.randn(1, 2, 4, 3)
    messages = {}

    def attempt(name, fn):
        try:
            fn()
        except ValueError as e:
            messages[name] = str(e)

    attempt("layout", lambda: ring_attention(q, q, q, layout="zig"))
    attempt("odd zigzag", lambda: ring_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], layout="zigzag"))
    attempt("lengths", lambda: ring_attention(q[:, :, :4 - rank], q[:, :, :4 - rank], q[:, :, :4 - rank]))
    attempt("causal", lambda: ring_attention(q, q, q, is_causal=bool(rank)))
    attempt("kv length", lambda: ring_attention(q, q[:, :, :2], q[:, :, :2]))
    attempt("not a member", lambda: ring_attention(q, q, q, process_group=alone[1 - rank]))
    attempt("shard", lambda: shard_sequence(torch.zeros(1, 1, 5, 1), rank=rank, world_size=2))
    # A one-rank group is plain attention.
    q64 = q.double()
    alone_out = ring_attention(q64, q64, q64, is_causal=True, process_group=alone[rank])
    expected, spread = input_spread(lambda t: {"out": attention(t, t, t, is_causal=True)}, (q64,),
                                    origin="float64 attention")
    assert_equivalent(within_spread({"out": alone_out}, expected, spread, name="one-rank ring"))
    return messages


def test_bad_input_is_named_on_every_rank_before_any_kv_moves():
    expected = {
        "layout": "layout must be one of",
        "odd zigzag": "positive multiple of 2",
        "lengths": r"ranks disagree on n: .*local lengths n per rank: \[4, 3\]",
        "causal": "ranks disagree on is_causal",
        "kv length": "same tokens as q",
        "not a member": "is not a member",
        "shard": "sequence length 5 must be a positive multiple of 2",
    }
    for messages in spawn(_bad_input_worker, 2, timeout=TIMEOUT):
        assert messages.keys() == expected.keys()
        for name, pattern in expected.items():
            assert re.search(pattern, messages[name]), (name, messages[name])


def test_without_a_process_group_it_is_a_clear_error():
    q = torch.randn(1, 1, 2, 2)
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        ring_attention(q, q, q)


def _one_rank_raises_worker():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails before the ring")
    q = torch.randn(1, 2, 4, 3)
    return ring_attention(q, q, q)


def test_a_rank_that_raises_fails_every_rank_instead_of_hanging():
    with pytest.raises(RankError, match="rank 1 fails before the ring"):
        spawn(_one_rank_raises_worker, 2, timeout=60.0)
