"""optimized.precision.amp (autocast over fp32 weights: amp_step, amp_train) held to reference.training (fp32,
float64) and to torch's documented AMP recipe. The bounds are explained in precision_workload.py."""

from __future__ import annotations

import copy

import pytest
import torch

from conformance.tolerance import allclose, assert_equivalent, bitwise, combine, error_ratio
from optimized.precision import amp_step, amp_train, make_grad_scaler
from reference.data import make_batches
from reference.training import train
from tests.optimized.precision_workload import (
    CONFIG,
    LR,
    STEPS,
    assert_trains_like_fp32,
    poison_once,
    reference_runs,
    tiny_batches,
    tiny_model,
    trajectory_bound,
)


def test_amp_step_in_fp32_is_the_reference_loop():
    """dtype=float32 (autocast off): the helper's loop is reference.training's loop (token-weighted accumulation,
    clipping, LR schedule), equal to fp32 tolerance; only the clipping norm's summation order differs. Sequences of
    varying length make micro-batches score different numbers of tokens, so a mean of micro-batch means fails."""
    batches = make_batches(3, batch_size=4, seq_len=13, vocab_size=CONFIG.vocab_size, seed=5, vary_length=True)
    ref_model, opt_model = tiny_model(), tiny_model()
    kwargs = dict(steps=4, max_grad_norm=0.5, accumulation_steps=2, lr_lambda=lambda s: 1.0 / (1 + s))
    ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=LR), batches, **kwargs)
    got = amp_train(opt_model, torch.optim.AdamW(opt_model.parameters(), lr=LR), batches, dtype=torch.float32,
                    **kwargs)
    assert got.lr == ref.lr and got.skipped == [False] * 4 and got.scale == [None] * 4
    assert_equivalent(allclose(torch.tensor(got.loss), torch.tensor(ref.loss), name="loss"))
    assert_equivalent(allclose(torch.tensor(got.grad_norm), torch.tensor(ref.grad_norm), name="grad norm"))
    assert_equivalent(combine("params", [allclose(a, b, name=n) for (n, a), b in
                                         zip(opt_model.named_parameters(), ref_model.parameters(), strict=True)]))


def test_amp_bf16_trains_like_fp32():
    """bf16 autocast without a scaler: loss trajectory within 2 bf16 units of the fp32 reference at every step,
    and its distance from the float64 run's losses at most 2x the naive bf16 run's. (Final parameters are not
    judged: AdamW turns a near-zero gradient's rounding into a step of +-lr either way; see
    conformance/checks/mixed_precision.py.)"""
    model = tiny_model()
    history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), tiny_batches(), steps=STEPS,
                        dtype=torch.bfloat16)
    assert history.scale == [None] * STEPS and not any(history.skipped)
    assert history.loss[-1] < 0.9 * history.loss[0]  # it learns
    assert_trains_like_fp32(history.loss, torch.bfloat16)
    ref_hist = reference_runs()["fp64"]
    base_hist = reference_runs()["naive_bf16"]
    assert_equivalent(error_ratio(torch.tensor(history.loss), torch.tensor(ref_hist.loss),
                                  torch.tensor(base_hist.loss), name="loss trajectory", dtype=torch.bfloat16))


def test_amp_fp16_with_grad_scaler_trains_like_fp32():
    """fp16 autocast + torch.amp.GradScaler on CPU (CPU autocast supports fp16 in torch >= 2.3): trajectory within
    2 fp16 units of fp32 at every step, the default scale 2^16 never overflows on this model (no step skipped)."""
    model = tiny_model()
    scaler = make_grad_scaler(torch.float16, "cpu")
    history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), tiny_batches(), steps=STEPS,
                        dtype=torch.float16, scaler=scaler)
    assert history.scale == [2.0**16] * STEPS and not any(history.skipped)
    assert_trains_like_fp32(history.loss, torch.float16)


@pytest.mark.parametrize("bug", ["learning rate 20% too high", "first update lost"])
def test_trajectory_bound_catches_small_bugs(bug):
    """The 2u bound is not vacuous: bf16 AMP with a small optimization bug leaves it within the 10 steps (the
    correct run stays below 0.1u on this model and data)."""
    model = tiny_model()
    lr, lr_lambda = (1.2 * LR, None) if bug.startswith("learning") else (LR, lambda s: 0.0 if s == 0 else 1.0)
    history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=lr), tiny_batches(), steps=STEPS,
                        dtype=torch.bfloat16, lr_lambda=lr_lambda)
    with pytest.raises(AssertionError):
        assert_trains_like_fp32(history.loss, torch.bfloat16)


def _manual_amp_loop(model, opt, batch, scaler, max_norm, unscale_first=True):
    """The order torch's AMP recipe documents: scale, backward, unscale_, clip, step, update."""
    idx, targets = batch
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss_sum = model(idx, targets, reduction="sum")
    n = int((targets != -100).sum())
    scaler.scale(loss_sum / n).backward()
    if unscale_first:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(opt)
    scaler.update()


def test_amp_step_unscales_before_clipping():
    """amp_step with fp16 + GradScaler + clipping equals the documented recipe (unscale_ then clip) bitwise, reports
    the true gradient norm (not S times it), and differs from clipping the still-scaled gradients."""
    batch = tiny_batches()[0]
    models = [tiny_model() for _ in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    scalers = [make_grad_scaler(torch.float16, "cpu") for _ in models]
    result = amp_step(models[0], opts[0], batch, dtype=torch.float16, scaler=scalers[0], max_grad_norm=0.05)
    _manual_amp_loop(models[1], opts[1], batch, scalers[1], 0.05)
    _manual_amp_loop(models[2], opts[2], batch, scalers[2], 0.05, unscale_first=False)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert_equivalent(bitwise(a.detach(), b.detach()))
    assert not all(torch.equal(a, c) for a, c in zip(models[0].parameters(), models[2].parameters(), strict=True))
    # The true norm: an fp32 backward of the same batch at the same (initial) weights.
    fresh = tiny_model()
    fresh(*batch)[1].backward()
    true_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in fresh.parameters()])))
    assert result.grad_norm > 0.05  # clipping was active
    # fp16 rounding moves the norm by well under 5%; a norm of still-scaled gradients would be 2^16 times larger.
    assert abs(result.grad_norm / true_norm - 1) < 0.05


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_amp_step_overflow_skips_and_backs_off(value):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = make_grad_scaler(torch.float16, "cpu", growth_interval=3)
    batches = tiny_batches()
    amp_step(model, opt, batches[0], dtype=torch.float16, scaler=scaler)
    before = copy.deepcopy(model.state_dict())
    handle = poison_once(model.blocks[1].mlp.fc_in.weight, value)
    result = amp_step(model, opt, batches[1], dtype=torch.float16, scaler=scaler)
    handle.remove()
    assert result.skipped and result.scale == 2.0**16 and scaler.get_scale() == 2.0**15
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not amp_step(model, opt, batches[2], dtype=torch.float16, scaler=scaler).skipped
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- bad input -------------------------------------------------------------------------------------------------------


def test_amp_step_bad_arguments():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        amp_step(model, opt, tiny_batches()[0], max_grad_norm=0.0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        amp_step(model, opt, tiny_batches()[0], accumulation_steps=3)
    with pytest.raises(ValueError, match="steps"):
        amp_train(model, opt, tiny_batches(), steps=-1)


# ---- CUDA ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_fp16_autocast_with_grad_scaler_trains_like_fp32():
    """The seed's recipe on its own hardware: fp16 autocast + GradScaler("cuda") vs fp32 on the same GPU, TF32 off
    so the fp32 run is true fp32. Trajectory within 2 fp16 units."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        batches = tiny_batches("cuda")
        ref_model = tiny_model(device="cuda")
        ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=LR), batches, steps=STEPS)
        model = tiny_model(device="cuda")
        history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=STEPS,
                            dtype=torch.float16, scaler=make_grad_scaler(torch.float16, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert not any(history.skipped)
    trajectory_bound(history.loss, ref.loss, torch.float16)
