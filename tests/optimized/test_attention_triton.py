"""The Triton kernels, held to the naive spec: under TRITON_INTERPRET=1 on CPU (small shapes; tests/conftest.py sets
it when no CUDA device is visible), and on CUDA (the `gpu` tests, larger shapes, every dtype and head dim)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._attention_cases import Case, compare
from conformance.tolerance import assert_equivalent
from optimized.attention import BackendUnavailable, flash_attention
from optimized.attention._inputs import Problem
from reference.attention import attention

kernels = pytest.importorskip("optimized.attention.triton.launch", reason="triton is not installed")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if kernels.interpreted():
        return torch.device("cpu")
    pytest.skip("no CUDA device, and TRITON_INTERPRET=1 was not set before triton compiled the kernels")


SMALL = [
    Case("bottom-right causal, padded, GQA 2:1, N=24 < M=40", B=1, H=2, Hkv=1, N=24, M=40, d=16, is_causal=True,
         causal_alignment="bottom_right", padding=True),
    Case("top-left causal, N=37 > M=21, d=5", B=2, H=2, Hkv=2, N=37, M=21, d=5, is_causal=True),
    Case("non-causal MQA, N=1, d=72", B=1, H=3, Hkv=1, N=1, M=17, d=72),
    Case("bottom-right causal, N=33 > M=10 (empty rows)", B=1, H=1, Hkv=1, N=33, M=10, d=16, is_causal=True,
         causal_alignment="bottom_right"),
]


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_triton_float32_by_the_error_rule(case):
    assert_equivalent(compare("triton", case, dtype=torch.float32, device=_device()))


@pytest.mark.parametrize("case", SMALL[:2], ids=[c.name for c in SMALL[:2]])
def test_triton_float16_by_the_error_rule(case):
    assert_equivalent(compare("triton", case, dtype=torch.float16, device=_device()))


@settings(max_examples=5, deadline=None)
@given(kv_heads=st.integers(1, 2), group=st.integers(1, 2), N=st.integers(1, 40), M=st.integers(1, 40),
       d=st.sampled_from([5, 16, 33]), is_causal=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]),
       padding=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_drawn_shapes_by_the_error_rule(kv_heads, group, N, M, d, is_causal, alignment, padding, seed):
    case = Case("drawn", B=1, H=kv_heads * group, Hkv=kv_heads, N=N, M=M, d=d, is_causal=is_causal,
                causal_alignment=alignment, padding=padding)
    assert_equivalent(compare("triton", case, dtype=torch.float32, device=_device(), seed=seed))


def test_triton_lse_is_logsumexp_of_the_reference_scores():
    device = _device()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 19, 16, generator=gen)
    k = torch.randn(1, 1, 23, 16, generator=gen)
    _, lse = flash_attention(q.to(device), k.to(device), k.to(device), is_causal=True, scale=0.2,
                             causal_alignment="bottom_right", return_lse=True, backend="triton")
    s = 0.2 * q.double() @ k.double().transpose(-2, -1)  # (1, 2, 19, 23): every query sees a key (M > N)
    keep = torch.arange(23).view(1, 23) <= torch.arange(19).view(19, 1) + 4
    want = torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)
    torch.testing.assert_close(lse.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_triton_backward_is_bitwise_reproducible():
    device = _device()
    case = SMALL[0]
    q, k, v, d_out, mask = (t.to(device) if t is not None else None for t in case.inputs(3))
    runs = []
    for _ in range(2):
        q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
        out = flash_attention(q32, k32, v32, backend="triton", **case.options(mask))
        runs.append((out, *torch.autograd.grad(out, (q32, k32, v32), d_out.float())))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_triton_takes_the_strided_layout_the_model_passes():
    device = _device()
    x = torch.randn(2, 20, 3, 16, device=device)  # (B, T, H, d), as the GPT's projections produce
    q = x.transpose(1, 2)  # (B, H, T, d), not contiguous
    torch.testing.assert_close(flash_attention(q, q, q, is_causal=True, backend="triton"),
                               attention(q, q, q, is_causal=True), rtol=1e-5, atol=1e-5)


def test_triton_refuses_what_it_cannot_serve():
    device = _device()
    q = torch.randn(1, 1, 4, 300, device=device)
    with pytest.raises(BackendUnavailable, match="head dims up to 256"):
        flash_attention(q, q, q, backend="triton")
    with pytest.raises(BackendUnavailable, match="float64|float16"):
        flash_attention(q[..., :8].double(), q[..., :8].double(), q[..., :8].double(), backend="triton")
    if device.type == "cpu":
        b = q[..., :8].bfloat16()
        with pytest.raises(BackendUnavailable, match="interpreter has no bfloat16"):
            flash_attention(b, b, b, backend="triton")
    # Limits of the launch, from the problem alone: the grid's second axis, 32-bit offsets within the output.
    small = q[..., :16]
    tall = Problem(B=1, H=1, Hkv=1, N=2**24, M=16, d=128, scale=1.0, causal_offset=None)
    assert "pass 2^31 elements per head" in kernels.unsupported(small, tall)
    wide = Problem(B=70000, H=1, Hkv=1, N=16, M=16, d=16, scale=1.0, causal_offset=None)
    assert "above CUDA's 65535" in kernels.unsupported(small, wide)
    with pytest.raises(ValueError, match="row stride .* is not below"):
        strided = torch.empty(kernels.MAX_ROW_STRIDE * 2, device=device).as_strided((1, 1, 2, 16),
                                                                                  (0, 0, kernels.MAX_ROW_STRIDE, 1))
        kernels.triton_attention(strided, small, small)


GPU_CASES = [
    Case("causal GQA 8:2, N=M=1000, d=64", B=2, H=8, Hkv=2, N=1000, M=1000, d=64, is_causal=True),
    Case("bottom-right padded, N=257 < M=1031, d=128", B=2, H=4, Hkv=4, N=257, M=1031, d=128, is_causal=True,
         causal_alignment="bottom_right", padding=True),
    Case("non-causal N=300 > M=97, d=256", B=1, H=2, Hkv=1, N=300, M=97, d=256),
    Case("bottom-right N=333 > M=100, d=40", B=1, H=2, Hkv=2, N=333, M=100, d=40, is_causal=True,
         causal_alignment="bottom_right"),
    Case("top-left N=M=1, d=16", B=3, H=2, Hkv=1, N=1, M=1, d=16, is_causal=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_triton_on_cuda_by_the_error_rule(case, dtype):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs compute capability >= 8.0")
    assert_equivalent(compare("triton", case, dtype=dtype, device=torch.device("cuda")))


@pytest.mark.gpu
def test_triton_backward_on_cuda_is_bitwise_reproducible():
    case = GPU_CASES[0]
    q, k, v, d_out, _ = (t.cuda().half() if t is not None else None for t in case.inputs(1))
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*leaves, is_causal=True, backend="triton")
        runs.append((out, *torch.autograd.grad(out, leaves, d_out)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


def test_inputs_reach_the_kernels_in_the_one_layout_they_are_built_for():
    # Head dim zero-padded to a power of two, strides multiples of 16 elements, 16-byte aligned: the layout the
    # ahead-of-time build covers (tests/tools/test_triton_build.py).
    x = torch.randn(2, 3, 20, 64)
    assert kernels.aligned(x, 64) is x
    y = x.transpose(1, 2).contiguous().transpose(1, 2)  # the model's (B, T, H, d) seen as (B, H, T, d)
    assert kernels.aligned(y, 64) is y  # its strides are multiples of 16 already: no copy
    for t, block_d in ((x[..., :40], 64), (x[:, :, 1:, :].narrow(-1, 1, 16), 16), (x[..., ::2], 32)):
        a = kernels.aligned(t, block_d)
        assert a.shape == (*t.shape[:-1], block_d)
        assert a.stride(-1) == 1 and all(s % 16 == 0 for s in a.stride()[:-1]) and a.data_ptr() % 16 == 0
        assert torch.equal(a[..., : t.shape[-1]], t) and not a[..., t.shape[-1]:].any()
