"""The one-process ring-attention spec: equal to reference.attention on the whole sequence, and a whole model with
its sequence split (RoPE and learned positions at global positions) equal to one process, in float64 within the
reference's own rounding spread."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import input_spread, one_thread, step_reference
from conformance.tolerance import assert_equivalent, within_spread
from reference.attention import attention
from reference.data import make_batches
from reference.model import GPT, GPTConfig, rotary
from reference.parallel.context_parallel import (
    LAYOUTS,
    context_parallel_loss,
    positions_of,
    ring_attention,
    rotary_at,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny float64 problems: a second thread only waits at every op (2 busy cores)
        yield


@given(n=st.integers(1, 40), c=st.integers(1, 5), layout=st.sampled_from(LAYOUTS))
def test_positions_cover_the_sequence_once(n, c, layout):
    pos = positions_of(n, c, layout)
    assert len(pos) == c
    assert torch.equal(torch.cat(pos).sort().values, torch.arange(n))
    if layout == "zigzag" and n % (2 * c) == 0:
        half = n // (2 * c)  # rank r: chunks r and 2c-1-r
        assert pos[0].tolist() == list(range(half)) + list(range(n - half, n))


def test_rotary_at_global_positions_is_the_models_rotary():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(rotary_at(x, torch.arange(9), 500.0), rotary(x, 500.0))
    # A slice rotated at its global positions is the slice of the whole rotated sequence.
    torch.testing.assert_close(rotary_at(x[:, :, 4:], torch.arange(4, 9), 500.0), rotary(x, 500.0)[:, :, 4:])


def _one_process(q, k, v, dout, causal):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, is_causal=causal)  # (B, H, N, d)
    out.backward(dout)
    return dict(zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], strict=True))


def _ring(q, k, v, dout, causal, c, layout):
    pos = positions_of(q.size(2), c, layout)
    leaves = [[t[:, :, p].detach().clone().requires_grad_() for p in pos] for t in (q, k, v)]
    outs = ring_attention(*leaves, pos, is_causal=causal)
    torch.autograd.backward(outs, [dout[:, :, p] for p in pos])
    got = {}
    for name, parts in (("out", [o.detach() for o in outs]), ("dq", [t.grad for t in leaves[0]]),
                        ("dk", [t.grad for t in leaves[1]]), ("dv", [t.grad for t in leaves[2]])):
        full = torch.empty(parts[0].shape[:2] + (q.size(2), q.size(3)), dtype=q.dtype)  # (B, heads, N, d)
        for p, part in zip(pos, parts, strict=True):
            full[:, :, p] = part
        got[name] = full
    return got


@given(n=st.sampled_from([1, 2, 7, 13, 16, 23]), c=st.sampled_from([1, 2, 3, 4]), layout=st.sampled_from(LAYOUTS),
       causal=st.booleans(), heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]), d=st.sampled_from([4, 5]))
def test_ring_attention_equals_attention_on_the_whole_sequence(n, c, layout, causal, heads, d):
    g = torch.Generator().manual_seed(n * 31 + c)
    (H, Hkv), B = heads, 2
    q, dout = (torch.randn(B, H, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, Hkv, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    ref, spread = input_spread(functools.partial(_one_process, causal=causal), (q, k, v, dout), origin="attention")
    got = _ring(q, k, v, dout, causal, c, layout)
    assert_equivalent(within_spread(got, ref, spread, name=f"ring c={c} {layout} causal={causal} N={n}"))


def _config(family: str, block_size: int) -> GPTConfig:
    if family == "llama":  # RoPE: the positions enter inside attention
        return GPTConfig.llama(vocab_size=32, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                               seed=2)
    return GPTConfig(vocab_size=32, block_size=block_size, n_layer=2, n_head=2, n_embd=16, seed=2)  # learned wpe


@settings(max_examples=12)
@given(family=st.sampled_from(["llama", "gpt2"]), c=st.sampled_from([2, 3, 4]), layout=st.sampled_from(LAYOUTS),
       n=st.sampled_from([7, 11, 16]))
def test_model_with_its_sequence_split_equals_one_process(family, c, layout, n):
    config = _config(family, n)
    batch = make_batches(1, batch_size=2, seq_len=n, vocab_size=32, seed=c, vary_length=True)[0]
    ref, spread = step_reference(lambda: GPT(config), batch)
    model = GPT(config).double()
    loss = context_parallel_loss(model, *batch, world_size=c, layout=layout)
    loss.backward()
    got = {name: p.grad for name, p in model.named_parameters()}
    got["loss"] = loss.detach().reshape(1)
    assert_equivalent(within_spread(got, ref, spread, name=f"{family} c={c} {layout} N={n}"))
