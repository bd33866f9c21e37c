"""The attention spec against independent formulations: a per-head loop of the textbook formula, torch SDPA's math
backend with explicit boolean masks, and torch.logsumexp."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.attention import attention, attention_varlen, visible_keys


def _textbook(q, k, v, keep, scale, cap=0.0):
    """softmax(cap(QKᵀ·scale)) V one (b, h, i) at a time, over the keys `keep` allows; zeros for a row with none."""
    B, H, N, d = q.shape
    G = H // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((B, H, N), float("-inf"), dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                js = [j for j in range(k.shape[2]) if keep(b, i, j)]
                if not js:
                    continue
                scores = torch.stack([q[b, h, i] @ k[b, h // G, j] * scale for j in js])
                if cap:
                    scores = cap * torch.tanh(scores / cap)
                weights = torch.exp(scores - scores.max())
                out[b, h, i] = sum(w * v[b, h // G, j] for w, j in zip(weights / weights.sum(), js, strict=True))
                lse[b, h, i] = scores.max() + torch.log(weights.sum())
    return out, lse


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    N=st.integers(1, 7),
    M=st.integers(1, 7),
    d=st.integers(1, 5),
    is_causal=st.booleans(),
    alignment=st.sampled_from(["top_left", "bottom_right"]),
    padded=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.1, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_matches_the_textbook_formula(B, kv_heads, group, N, M, d, is_causal, alignment, padded, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, kv_heads * group, N, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, kv_heads, M, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, kv_heads, M, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, M, generator=gen) < 0.6 if padded else None
    offset = 0 if alignment == "top_left" else M - N

    def keep(b, i, j):
        return (not is_causal or j <= i + offset) and (mask is None or bool(mask[b, j]))

    out, lse = attention(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=mask,
                         causal_alignment=alignment, return_lse=True)
    want_out, want_lse = _textbook(q, k, v, keep, 1 / math.sqrt(d) if scale is None else scale)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("N, M", [(5, 5), (3, 8), (8, 3)])
def test_top_left_causal_and_gqa_match_torch_sdpa(N, M):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, N, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, M, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, M, 4, generator=gen, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), want)


def test_bottom_right_and_padding_match_sdpa_with_an_explicit_mask():
    gen = torch.Generator().manual_seed(1)
    N, M = 4, 9
    q = torch.randn(2, 2, N, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, M, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, M, 8, generator=gen, dtype=torch.float64)
    pad = torch.ones(2, M, dtype=torch.bool)
    pad[1, 2] = pad[0, 0] = False  # every query still sees a key
    i, j = torch.arange(N).unsqueeze(1), torch.arange(M).unsqueeze(0)
    keep = (j <= i + (M - N)).view(1, 1, N, M) & pad.view(2, 1, 1, M)  # (B, 1, N, M)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    got = attention(q, k, v, is_causal=True, causal_alignment="bottom_right", key_padding_mask=pad)
    torch.testing.assert_close(got, want)


def test_a_query_that_sees_no_key_gets_zeros_and_zero_gradients_never_nan():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    # bottom-right with N=6 > M=3: queries 0..2 see no key; batch 0 sees no key at all (padding)
    out, lse = attention(q, k, v, is_causal=True, causal_alignment="bottom_right", key_padding_mask=mask,
                         return_lse=True)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert out[0].abs().max() == 0 and out[1, :, :3].abs().max() == 0
    assert out[1, :, 3:].abs().min() > 0
    assert q.grad[0].abs().max() == 0 and q.grad[1, :, :3].abs().max() == 0
    assert k.grad[0].abs().max() == 0 and v.grad[0].abs().max() == 0
    assert k.grad[1, :, 1].abs().max() == 0  # a padding key gets no gradient
    assert (lse[0] == float("-inf")).all() and (lse[1, :, :3] == float("-inf")).all()
    assert torch.isfinite(lse[1, :, 3:]).all()


def test_lse_is_torch_logsumexp_of_the_scaled_masked_scores():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 8, generator=gen)
    k = torch.randn(1, 2, 7, 8, generator=gen)
    _, lse = attention(q, k, k, is_causal=True, scale=0.3, return_lse=True)
    s = (q @ k.transpose(-2, -1)) * 0.3  # (1, 2, 5, 7)
    s = s.masked_fill(~torch.ones(5, 7, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1))


@pytest.mark.parametrize("dtype, lse_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_dtypes_out_in_input_dtype_lse_in_float32_without_gradient(dtype, lse_dtype):
    q = torch.randn(1, 2, 4, 8, dtype=dtype, requires_grad=True)
    out, lse = attention(q, q, q, return_lse=True)
    assert out.dtype == dtype and lse.dtype == lse_dtype and lse.shape == (1, 2, 4)
    assert out.requires_grad and not lse.requires_grad


def test_gqa_equals_attention_over_repeated_key_value_heads():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 5, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    k_full, v_full = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # head h reads kv head h // 2
    torch.testing.assert_close(attention(q, k, v, is_causal=True), attention(q, k_full, v_full, is_causal=True))


def _bad_inputs():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 6, 8)
    m = torch.ones(2, 6, dtype=torch.bool)
    return [
        ("q must have 4 dimensions", (q[0], k, k), {}),
        ("k must be a floating tensor", (q, k.long(), k), {}),
        ("k.dtype must equal q.dtype", (q, k.double(), k.double()), {}),
        ("k batch size", (q, k[:1], k[:1]), {}),
        ("k head dim", (q, k[..., :4], k[..., :4]), {}),
        ("v shape must equal k shape", (q, k, k[:, :, :3]), {}),
        ("multiple of k/v heads", (q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)), {}),
        ("is_causal must be a bool", (q, k, k), {"is_causal": 1}),
        ("causal_alignment must be one of", (q, k, k), {"causal_alignment": "diagonal"}),
        ("scale must be a finite number", (q, k, k), {"scale": float("nan")}),
        ("key_padding_mask must be a bool tensor", (q, k, k), {"key_padding_mask": m.float()}),
        ("key_padding_mask must have shape", (q, k, k), {"key_padding_mask": m[:, :5]}),
        ("return_lse must be a bool", (q, k, k), {"return_lse": "yes"}),
        ("must be a torch.Tensor", (q.numpy(), k, k), {}),
    ]


@pytest.mark.parametrize("message, args, kwargs", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_raises_value_error_naming_the_argument(message, args, kwargs):
    with pytest.raises(ValueError, match=message):
        attention(*args, **kwargs)


windows = st.tuples(st.integers(-1, 9), st.integers(-1, 9))


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 8), M=st.integers(1, 8), is_causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]), window=windows,
       cap=st.sampled_from([0.0, 0.5, 3.0]), seed=st.integers(0, 2**16))
def test_windows_and_softcap_match_the_textbook_formula(N, M, is_causal, alignment, window, cap, seed):
    gen = torch.Generator().manual_seed(seed)
    q = 4 * torch.randn(1, 2, N, 3, generator=gen, dtype=torch.float64)  # large scores: softcap matters
    k = torch.randn(1, 1, M, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, M, 3, generator=gen, dtype=torch.float64)
    off = 0 if alignment == "top_left" else M - N
    left, right = window

    def keep(b, i, j):  # flash-attn's docstring: keys [i + off - left, i + off + right], causal = right 0
        return ((left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
                and (not is_causal or j <= i + off))

    out, lse = attention(q, k, v, is_causal=is_causal, causal_alignment=alignment, window_size=window,
                         softcap=cap, return_lse=True)
    want_out, want_lse = _textbook(q, k, v, keep, 1 / math.sqrt(3), cap)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_the_causal_masks_of_flash_attns_docstring():
    # flash_attn_varlen_func's docstring: seqlen_q = 2, seqlen_k = 5 and seqlen_q = 5, seqlen_k = 2
    assert visible_keys(2, 5, is_causal=True, causal_alignment="bottom_right").int()[0, 0].tolist() == [
        [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible_keys(5, 2, is_causal=True, causal_alignment="bottom_right").int()[0, 0].tolist() == [
        [0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    # window (1, 0): the diagonal key and one to its left
    assert visible_keys(3, 3, is_causal=False, window_size=(1, 0)).int()[0, 0].tolist() == [
        [1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_softcap_caps_large_scores_and_its_gradient_is_tanhs():
    q = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: attention(q, k, v, softcap=0.7, window_size=(1, 1))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q * 50, k, v))  # scores ~ 50: deep in tanh's saturation
    _, lse = attention(q * 1e4, k, v, softcap=2.0, return_lse=True)
    assert lse.max() <= 2.0 + math.log(4)  # every capped score < 2


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.sampled_from([0, 1, 2, 3, 5, 7]), min_size=1, max_size=5),
       extra=st.lists(st.integers(-3, 3), min_size=5, max_size=5), is_causal=st.booleans(), window=windows,
       cap=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16))
def test_varlen_is_each_document_on_its_own(lengths, extra, is_causal, window, cap, seed):
    lengths_k = [max(0, n + e) for n, e in zip(lengths, extra, strict=False)]  # some documents without keys
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths), 4, 3, generator=gen, dtype=torch.float64)  # (total_q, H, d)
    k = torch.randn(sum(lengths_k), 2, 3, generator=gen, dtype=torch.float64)  # (total_k, Hkv, d)
    v = torch.randn(sum(lengths_k), 2, 3, generator=gen, dtype=torch.float64)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32)
                  for n in (lengths, lengths_k))
    doc_q = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # document of each row
    doc_k = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths_k))
    left, right = window

    def keep(b, i, j):  # same document; causal and window bottom-right aligned within it
        d = int(doc_q[i])
        if int(doc_k[j]) != d:
            return False
        i, j, off = i - int(cu_q[d]), j - int(cu_k[d]), lengths_k[d] - lengths[d]
        return ((left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
                and (not is_causal or j <= i + off))

    out, lse = attention_varlen(q, k, v, cu_q, cu_k, max(lengths), max(lengths_k), is_causal=is_causal,
                                window_size=window, softcap=cap, return_lse=True)
    as_batch = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  (total, H, d) -> (1, H, total, d)
    want_out, want_lse = _textbook(as_batch(q), as_batch(k), as_batch(v), keep, 1 / math.sqrt(3), cap)
    torch.testing.assert_close(out, want_out[0].transpose(0, 1))
    torch.testing.assert_close(lse, want_lse[0])  # (H, total_q), flash-attn's layout


def _bad_varlen():
    q, k = torch.randn(6, 2, 4), torch.randn(7, 1, 4)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    return [
        ("cu_seqlens_q must be a 1-D int32", (q, k, k, cu_q.long(), cu_k, 4, 4), {}),
        ("cu_seqlens_k must start at 0", (q, k, k, cu_q, torch.tensor([1, 3, 7], dtype=torch.int32), 4, 4), {}),
        ("cu_seqlens_q must start at 0, never decrease", (q, k, k, torch.tensor([0, 4, 3, 6], dtype=torch.int32),
                                                           torch.tensor([0, 3, 5, 7], dtype=torch.int32), 4, 4), {}),
        ("end at the packed length 6", (q, k, k, torch.tensor([0, 2, 5], dtype=torch.int32), cu_k, 4, 4), {}),
        ("max_seqlen_q must be an int >= the longest document \\(4\\)", (q, k, k, cu_q, cu_k, 3, 4), {}),
        ("same documents", (q, k, k, cu_q, torch.tensor([0, 7], dtype=torch.int32), 4, 7), {}),
        ("packed \\(total, heads, d\\)", (q[None], k, k, cu_q, cu_k, 4, 4), {}),
        ("window_size must be", (q, k, k, cu_q, cu_k, 4, 4), {"window_size": (-2, 0)}),
        ("softcap must be a finite number >= 0", (q, k, k, cu_q, cu_k, 4, 4), {"softcap": -1.0}),
    ]


def test_varlen_document_without_keys_attends_to_nothing_without_any_mask():
    q = torch.randn(10, 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(5, 1, 4, dtype=torch.float64), torch.randn(5, 1, 4, dtype=torch.float64)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 0, 5], dtype=torch.int32)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, 6, 5, return_lse=True)  # no causal mask, no window
    assert torch.equal(out[:4], torch.zeros(4, 2, 4, dtype=torch.float64))
    assert torch.equal(lse[:, :4], torch.full((2, 4), float("-inf"), dtype=torch.float64))
    alone = attention_varlen(q[4:], k, v, cu_q[1:] - 4, cu_k[1:], 6, 5)
    torch.testing.assert_close(out[4:], alone)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq[:4], torch.zeros(4, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("message, args, kwargs", _bad_varlen(), ids=[b[0][:30] for b in _bad_varlen()])
def test_bad_varlen_input_raises_value_error_naming_the_argument(message, args, kwargs):
    with pytest.raises(ValueError, match=message):
        attention_varlen(*args, **kwargs)


@pytest.mark.parametrize("kwargs, message", [({"window_size": (3,)}, "window_size must be"),
                                             ({"window_size": (0, -5)}, "window_size must be"),
                                             ({"window_size": (1.5, 0)}, "window_size must be"),
                                             ({"softcap": float("inf")}, "softcap must be"),
                                             ({"softcap": -0.5}, "softcap must be")])
def test_bad_window_or_softcap_raises(kwargs, message):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, **kwargs)
