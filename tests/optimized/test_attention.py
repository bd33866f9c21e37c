"""FlashAttention-2 in PyTorch (`blocked`) and the dispatch of `flash_attention`, held to the naive spec."""

import functools
import logging
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conformance.checks._attention_cases import Case, compare, compare_fn
from conformance.tolerance import assert_equivalent
from optimized.attention import (
    BACKENDS,
    BackendUnavailable,
    blocked_attention,
    flash_attention,
    select_backend,
    unsupported,
)
from reference.attention import attention
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.training import train

PRIMES_AND_ODD = [1, 2, 3, 7, 13, 31, 64, 97, 127, 129, 211, 300]


@st.composite
def problems(draw, max_len=300):
    """Shapes and options: primes and non-multiples of every tile size, N != M, GQA, both alignments, padding
    with fully masked rows, odd head dims."""
    kv_heads = draw(st.integers(1, 2))
    n = draw(st.one_of(st.sampled_from(PRIMES_AND_ODD), st.integers(1, max_len)))
    m = draw(st.one_of(st.sampled_from(PRIMES_AND_ODD), st.integers(1, max_len)))
    padding = draw(st.booleans())
    return Case(
        name="drawn",
        B=draw(st.integers(1, 3)),
        H=kv_heads * draw(st.integers(1, 3)),
        Hkv=kv_heads,
        N=n,
        M=m,
        d=draw(st.sampled_from([1, 3, 8, 13, 16, 33])),
        is_causal=draw(st.booleans()),
        causal_alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        padding=padding,
    )


def _tiles(draw_block, length):
    """A tile size that leaves at most 8 tiles along `length` (the Python loop's cost)."""
    return max(draw_block, math.ceil(length / 8))


def _grads(fn, q, k, v, d_out, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), d_out))


@settings(max_examples=15, deadline=None)
@given(case=problems(), block_q=st.integers(1, 64), block_k=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_blocked_equals_the_reference_in_float64(case, block_q, block_k, seed):
    q, k, v, d_out, mask = case.inputs(seed)
    opts = case.options(mask)
    block = dict(block_q=_tiles(block_q, case.N), block_k=_tiles(block_k, case.M))
    got = _grads(functools.partial(blocked_attention, **block), q, k, v, d_out, **opts)
    want = _grads(attention, q, k, v, d_out, **opts)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=8, deadline=None)
@given(case=problems(max_len=100), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       block=st.sampled_from([16, 32, 37]), seed=st.integers(0, 2**16))
def test_blocked_in_low_precision_by_the_error_rule(case, dtype, block, seed):
    fn = functools.partial(blocked_attention, block_q=block, block_k=block)
    assert_equivalent(compare_fn(fn, case, dtype=dtype, device=torch.device("cpu"), seed=seed))


@settings(max_examples=10, deadline=None)
@given(case=problems(max_len=200), seed=st.integers(0, 2**16))
def test_sdpa_where_it_serves_by_the_error_rule(case, seed):
    q, k, v, _, mask = case.inputs(seed)
    assume(unsupported("sdpa", q.float(), k.float(), v.float(), **case.options(mask)) is None)
    assert_equivalent(compare("sdpa", case, dtype=torch.float32, device=torch.device("cpu"), seed=seed))


def test_the_error_rule_catches_a_wrong_attention():
    case = Case("causal GQA", B=1, H=4, Hkv=2, N=40, M=40, d=16, is_causal=True)

    def wrong(q, k, v, **kw):  # the other causal alignment
        return blocked_attention(q, k, v, **(kw | {"causal_alignment": "bottom_right"}))

    assert compare_fn(blocked_attention, case, dtype=torch.float32, device=torch.device("cpu")).passed
    off_by_one = Case("N != M", B=1, H=2, Hkv=2, N=30, M=40, d=16, is_causal=True)
    assert not compare_fn(wrong, off_by_one, dtype=torch.float32, device=torch.device("cpu")).passed
    scaled = functools.partial(blocked_attention, scale=1.001 / 4)
    assert not compare_fn(scaled, case, dtype=torch.float32, device=torch.device("cpu")).passed


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_blocked_gradcheck_float64(alignment):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False] * 4])  # batch 1: no key at all
    fn = functools.partial(blocked_attention, is_causal=True, causal_alignment=alignment, key_padding_mask=mask,
                           block_q=2, block_k=3)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_blocked_backward_is_bitwise_reproducible():
    case = Case("padded GQA", B=2, H=4, Hkv=2, N=77, M=53, d=24, is_causal=True, causal_alignment="bottom_right",
                padding=True)
    q, k, v, d_out, mask = case.inputs(5)
    fn = functools.partial(blocked_attention, block_q=16, block_k=16)
    first = _grads(fn, q, k, v, d_out, **case.options(mask))
    second = _grads(fn, q, k, v, d_out, **case.options(mask))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_blocked_keeps_o_and_lse_not_the_score_matrix():
    # Saved for backward: q, k, v, out, lse. Nothing of size N x M.
    q, k, v = (torch.randn(1, 2, 256, 16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = blocked_attention(q, k, v, is_causal=True, block_q=32, block_k=32)
    assert sum(t.numel() for t in saved) == 4 * q.numel() + 2 * 256
    assert max(t.numel() for t in saved) == q.numel()
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_by_the_error_rule(backend, dtype):
    cases = [Case("causal GQA", B=2, H=4, Hkv=2, N=150, M=150, d=32, is_causal=True),
             Case("N > M full", B=1, H=3, Hkv=1, N=131, M=67, d=20),
             Case("top-left N < M", B=1, H=2, Hkv=2, N=41, M=139, d=8, is_causal=True)]
    for case in cases:
        assert_equivalent(compare(backend, case, dtype=dtype, device=torch.device("cpu")))


def test_auto_runs_what_select_backend_names(caplog):
    q, k = torch.randn(1, 4, 33, 16), torch.randn(1, 2, 33, 16)
    mask = torch.ones(1, 33, dtype=torch.bool)
    for kw in ({"is_causal": True}, {"key_padding_mask": mask}, {"return_lse": True},
               {"is_causal": True, "causal_alignment": "bottom_right"}):
        choice = select_backend(q, k, k, **kw)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="optimized.attention"):
            auto = flash_attention(q, k, k, **kw)
        assert f"flash_attention: {choice}" in caplog.messages
        explicit = flash_attention(q, k, k, backend=choice.backend, **kw)
        for a, b in zip(auto if isinstance(auto, tuple) else (auto,),
                        explicit if isinstance(explicit, tuple) else (explicit,), strict=True):
            assert torch.equal(a, b)


def test_select_backend_on_cpu_explains_its_choice():
    q = torch.randn(2, 4, 16, 8)
    k = torch.randn(2, 2, 24, 8)
    choice = select_backend(q, k, k, is_causal=True)
    assert choice.backend == "blocked" and "NaN" in choice.rejected["sdpa"]  # CPU SDPA swallows NaN (nonfinite tests)
    assert unsupported("sdpa", q, k, k, is_causal=True) is None  # an explicit request still runs it
    assert "CUDA" in choice.rejected["flash_attn"]
    padded = select_backend(q, k, k, key_padding_mask=torch.ones(2, 24, dtype=torch.bool))
    assert padded.backend == "blocked"
    assert "padding" in padded.rejected["sdpa"] and "CUDA" in padded.rejected["triton"]
    assert select_backend(q, k, k, is_causal=True, causal_alignment="bottom_right").backend == "blocked"
    assert select_backend(q, k, k, return_lse=True).backend == "blocked"
    # N == M: the two alignments are the same mask, so SDPA serves bottom-right too
    assert unsupported("sdpa", q, q, q, is_causal=True, causal_alignment="bottom_right") is None
    assert "flash_attn" in str(choice) and "sdpa" in str(choice)


def test_an_explicit_backend_that_cannot_serve_raises_saying_why():
    q = torch.randn(1, 2, 8, 8)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(BackendUnavailable, match="'sdpa' cannot serve.*padding"):
        flash_attention(q, q, q, key_padding_mask=mask, backend="sdpa")
    with pytest.raises(BackendUnavailable, match="'sdpa'.*log-sum-exp"):
        flash_attention(q, q, q, return_lse=True, backend="sdpa")
    with pytest.raises(BackendUnavailable, match="'flash_attn' cannot serve.*CUDA"):
        flash_attention(q, q, q, backend="flash_attn")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        flash_attention(q, q, q, backend="cudnn")
    assert unsupported("blocked", q, q, q, key_padding_mask=mask) is None


def test_flash_attn_missing_is_a_clear_reason_not_a_crash():
    reason = unsupported("flash_attn", torch.randn(1, 2, 8, 8), *(torch.randn(1, 2, 8, 8),) * 2)
    assert reason is not None and "CUDA" in reason
    pytest.importorskip("flash_attn", reason="flash-attn is not installed: its backend is skipped")


@pytest.mark.parametrize("fn", [flash_attention, blocked_attention])
def test_bad_input_raises_value_error_before_work(fn):
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 3, 6, 8)
    with pytest.raises(ValueError, match="multiple of k/v heads Hkv=3"):
        fn(q, k, k)
    with pytest.raises(ValueError, match="k must be a floating tensor"):
        fn(q, k.int(), k)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        fn(q, q, q, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal_alignment"):
        fn(q, q, q, causal_alignment="top-left")
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        fn(q[0], q, q)
    with pytest.raises(ValueError, match="v.dtype must equal"):
        fn(q, q, q.half())
    with pytest.raises(ValueError, match="block_q must be a positive integer"):
        blocked_attention(q, q, q, block_q=0)


def test_an_unknown_option_is_a_type_error_naming_it_and_the_options():
    # blocked_attention and select_backend take the options as **options (named once, in _inputs.OPTIONS).
    q = torch.randn(1, 2, 4, 8)
    for fn in (blocked_attention, select_backend):
        with pytest.raises(TypeError, match=r"'is_casual' \(did you mean 'is_causal'\?\); the options are is_causal,"):
            fn(q, q, q, is_casual=True)


def test_import_needs_neither_triton_nor_flash_attn():
    code = ("import sys, torch; import optimized.attention as a; "
            "q = torch.randn(1, 2, 8, 8); a.flash_attention(q, q, q, is_causal=True); "
            "a.flash_attention(q, q, q, return_lse=True); print(sorted({'triton', 'flash_attn'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


GPT_CONFIG = GPTConfig(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def _train_losses(attn) -> list[float]:
    batches = make_batches(4, batch_size=4, seq_len=32, vocab_size=32, seed=3, task="copy")
    model = GPT(GPT_CONFIG, attention=attn)
    return train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches, steps=4).loss


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    return _train_losses(attention)


@pytest.mark.parametrize("backend", ["auto", "blocked"])
def test_the_tiny_gpt_trains_with_flash_attention(backend, reference_losses):
    # Same init, same batches: every step's loss (so every update before it) matches the reference model's.
    losses = _train_losses(functools.partial(flash_attention, backend=backend))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_backend_on_cuda_by_the_error_rule(backend, dtype):
    device = torch.device("cuda")
    cases = [Case("causal GQA", B=2, H=8, Hkv=2, N=1000, M=1000, d=64, is_causal=True),
             Case("bottom-right padded", B=2, H=4, Hkv=4, N=257, M=1031, d=128, is_causal=True,
                  causal_alignment="bottom_right", padding=True),
             Case("N > M full, d=256", B=1, H=2, Hkv=1, N=300, M=97, d=256),
             Case("bottom-right N > M", B=1, H=2, Hkv=2, N=333, M=100, d=40, is_causal=True,
                  causal_alignment="bottom_right")]
    served = 0
    for case in cases:
        q, k, v, _, mask = case.inputs()
        opts = case.options(mask.to(device) if mask is not None else None)
        if unsupported(backend, *(t.to(device, dtype) for t in (q, k, v)), **opts) is None:
            assert_equivalent(compare(backend, case, dtype=dtype, device=device))
            served += 1
    if not served:
        pytest.skip(f"{backend} serves none of the cases in {dtype} on this GPU")
