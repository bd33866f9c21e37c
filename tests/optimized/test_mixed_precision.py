"""optimized.mixed_precision held to reference.training (fp32, float64) and to torch.amp.GradScaler.

Two kinds of bound appear, both derived from the low dtype's precision rather than tuned to the measurements:

* The error-ratio rule (conformance.tolerance.error_ratio, the FlashAttention rule): against a float64 reference,
  mixed precision may be at most 2x (outputs) or 3x (gradients) as wrong as the naive computation done entirely
  in the same low dtype (the model cast to bf16/fp16, no fp32 anywhere), plus a floor of 4 ulps. Mixed precision
  keeps more in fp32 than the naive version, so it must not be worse than it by more than that factor.
* The loss-trajectory bound |L_mixed(t) - L_fp32(t)| <= 2 * u * L_fp32(t) at every step t, with u the unit
  roundoff of the half dtype (bf16: 2^-8, fp16: 2^-11). A loss held in that dtype cannot be resolved more finely
  than u * L; two trajectories that stay within two such units of each other are the same training run seen at the
  dtype's resolution, while a bug (a wrong scale, a missed unscale, a skipped step, accumulation weighted wrongly)
  moves the loss by far more within a few steps (see test_trajectory_bound_catches_small_bugs).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conformance.tolerance import GRADIENT_FACTOR, allclose, assert_equivalent, combine, error_ratio
from optimized.clipping import clip_grad_norm_
from optimized.mixed_precision import (
    MasterWeightOptimizer,
    amp_step,
    amp_train,
    check_autocast,
    make_grad_scaler,
)
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.training import train

CONFIG = GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32)
STEPS = 10
LR = 3e-3
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _batches(device="cpu"):
    return [(i.to(device), t.to(device)) for i, t in
            make_batches(3, batch_size=4, seq_len=13, vocab_size=CONFIG.vocab_size, task="copy", seed=3)]


def _model(dtype=torch.float32, device="cpu"):
    return GPT(CONFIG).to(device=device, dtype=dtype)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.view(-1).view(torch.uint8).equal(b.view(-1).view(torch.uint8))


def _trajectory_bound(mixed: list[float], fp32: list[float], dtype: torch.dtype) -> None:
    u = UNIT_ROUNDOFF[dtype]
    for t, (a, b) in enumerate(zip(mixed, fp32, strict=True)):
        assert abs(a - b) <= 2 * u * abs(b), f"step {t}: mixed {a:.6f} vs fp32 {b:.6f}, bound {2 * u * abs(b):.3g}"


@pytest.fixture(scope="module")
def runs():
    """The reference runs every trajectory test compares against: fp32 and float64 reference.training, and the
    naive low-precision baselines (model cast to bf16 / fp16, trained by the same reference loop)."""
    batches = _batches()
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64), ("naive_bf16", torch.bfloat16)):
        model = _model(dtype)
        history = train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=STEPS)
        out[name] = (history, model)
    return out


# ---- autocast over fp32 weights --------------------------------------------------------------------------------


def test_amp_step_in_fp32_is_the_reference_loop():
    """dtype=float32 (autocast off): the helper's loop is reference.training's loop (token-weighted accumulation,
    clipping, LR schedule), equal to fp32 tolerance; only the clipping norm's summation order differs. Sequences of
    varying length make micro-batches score different numbers of tokens, so a mean of micro-batch means fails."""
    batches = make_batches(3, batch_size=4, seq_len=13, vocab_size=CONFIG.vocab_size, seed=5, vary_length=True)
    ref_model, opt_model = _model(), _model()
    kwargs = dict(steps=4, max_grad_norm=0.5, accumulation_steps=2, lr_lambda=lambda s: 1.0 / (1 + s))
    ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=LR), batches, **kwargs)
    got = amp_train(opt_model, torch.optim.AdamW(opt_model.parameters(), lr=LR), batches, dtype=torch.float32,
                    **kwargs)
    assert got.lr == ref.lr and got.skipped == [False] * 4 and got.scale == [None] * 4
    assert_equivalent(allclose(torch.tensor(got.loss), torch.tensor(ref.loss), name="loss"))
    assert_equivalent(allclose(torch.tensor(got.grad_norm), torch.tensor(ref.grad_norm), name="grad norm"))
    assert_equivalent(combine("params", [allclose(a, b, name=n) for (n, a), b in
                                         zip(opt_model.named_parameters(), ref_model.parameters(), strict=True)]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_gradients_obey_the_error_ratio_rule(dtype):
    """One forward + backward at the initial weights: autocast over fp32 weights vs the float64 model, with the
    model cast entirely to `dtype` as the naive baseline. Logits within 2x, gradients within 3x the naive error."""
    idx, targets = _batches()[0]

    def grads_and_logits(model, autocast):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits, loss = model(idx, targets)
        loss.backward()
        return logits, [p.grad for p in model.parameters()]

    ref_logits, ref_grads = grads_and_logits(_model(torch.float64), False)
    base_logits, base_grads = grads_and_logits(_model(dtype), False)
    opt_logits, opt_grads = grads_and_logits(_model(), True)
    assert opt_logits.dtype == dtype  # the lm_head matmul really ran in the half dtype
    assert_equivalent(error_ratio(opt_logits, ref_logits, base_logits, name="logits", dtype=dtype))
    names = [n for n, _ in _model().named_parameters()]
    assert_equivalent(combine("grads", [
        error_ratio(o, r, b, name=n, factor=GRADIENT_FACTOR, dtype=dtype)
        for n, o, r, b in zip(names, opt_grads, ref_grads, base_grads, strict=True)]))


def test_amp_bf16_trains_like_fp32(runs):
    """bf16 autocast without a scaler: loss trajectory within 2 bf16 units of the fp32 reference at every step,
    and its distance from the float64 run's losses at most 2x the naive bf16 run's. (Final parameters are not
    judged: AdamW turns a near-zero gradient's rounding into a step of +-lr either way; see
    conformance/checks/mixed_precision.py.)"""
    model = _model()
    history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), _batches(), steps=STEPS,
                        dtype=torch.bfloat16)
    assert history.scale == [None] * STEPS and not any(history.skipped)
    assert history.loss[-1] < 0.9 * history.loss[0]  # it learns
    _trajectory_bound(history.loss, runs["fp32"][0].loss, torch.bfloat16)
    ref_hist, _ = runs["fp64"]
    base_hist, _ = runs["naive_bf16"]
    assert_equivalent(error_ratio(torch.tensor(history.loss), torch.tensor(ref_hist.loss),
                                  torch.tensor(base_hist.loss), name="loss trajectory", dtype=torch.bfloat16))


def test_amp_fp16_with_grad_scaler_trains_like_fp32(runs):
    """fp16 autocast + torch.amp.GradScaler on CPU (CPU autocast supports fp16 in torch >= 2.3): trajectory within
    2 fp16 units of fp32 at every step, the default scale 2^16 never overflows on this model (no step skipped)."""
    model = _model()
    scaler = make_grad_scaler(torch.float16, "cpu")
    history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), _batches(), steps=STEPS,
                        dtype=torch.float16, scaler=scaler)
    assert history.scale == [2.0**16] * STEPS and not any(history.skipped)
    _trajectory_bound(history.loss, runs["fp32"][0].loss, torch.float16)


@pytest.mark.parametrize("bug", ["learning rate 20% too high", "first update lost"])
def test_trajectory_bound_catches_small_bugs(runs, bug):
    """The 2u bound is not vacuous: bf16 AMP with a small optimization bug leaves it within the 10 steps (the
    correct run stays below 0.1u on this model and data)."""
    model = _model()
    lr, lr_lambda = (1.2 * LR, None) if bug.startswith("learning") else (LR, lambda s: 0.0 if s == 0 else 1.0)
    history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=lr), _batches(), steps=STEPS,
                        dtype=torch.bfloat16, lr_lambda=lr_lambda)
    with pytest.raises(AssertionError):
        _trajectory_bound(history.loss, runs["fp32"][0].loss, torch.bfloat16)


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
    batch = _batches()[0]
    models = [_model() for _ in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    scalers = [make_grad_scaler(torch.float16, "cpu") for _ in models]
    result = amp_step(models[0], opts[0], batch, dtype=torch.float16, scaler=scalers[0], max_grad_norm=0.05)
    _manual_amp_loop(models[1], opts[1], batch, scalers[1], 0.05)
    _manual_amp_loop(models[2], opts[2], batch, scalers[2], 0.05, unscale_first=False)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert _bitwise_equal(a.detach(), b.detach())
    assert not all(torch.equal(a, c) for a, c in zip(models[0].parameters(), models[2].parameters(), strict=True))
    # The true norm: an fp32 backward of the same batch at the same (initial) weights.
    fresh = _model()
    fresh(*batch)[1].backward()
    true_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in fresh.parameters()])))
    assert result.grad_norm > 0.05  # clipping was active
    # fp16 rounding moves the norm by well under 5%; a norm of still-scaled gradients would be 2^16 times larger.
    assert abs(result.grad_norm / true_norm - 1) < 0.05


def _poison_once(param: torch.Tensor, value: float):
    """Make the next gradient of `param` non-finite (as an fp16 overflow would), once."""
    state = {"armed": True}

    def hook(grad):
        if state["armed"]:
            state["armed"] = False
            return torch.full_like(grad, value)
        return grad

    return param.register_hook(hook)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_amp_step_overflow_skips_and_backs_off(value):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = make_grad_scaler(torch.float16, "cpu", growth_interval=3)
    batches = _batches()
    amp_step(model, opt, batches[0], dtype=torch.float16, scaler=scaler)
    before = copy.deepcopy(model.state_dict())
    handle = _poison_once(model.blocks[1].mlp.fc_in.weight, value)
    result = amp_step(model, opt, batches[1], dtype=torch.float16, scaler=scaler)
    handle.remove()
    assert result.skipped and result.scale == 2.0**16 and scaler.get_scale() == 2.0**15
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not amp_step(model, opt, batches[2], dtype=torch.float16, scaler=scaler).skipped
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- MasterWeightOptimizer ---------------------------------------------------------------------------------------


def _plain_and_master_fp32(max_grad_norm):
    """Two fp32 models with two param groups each: one under AdamW (+ optimized clipping), one under
    MasterWeightOptimizer(AdamW) with dynamic loss scaling 2^16 and the same clipping."""
    def groups(model):
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": LR / 3}]

    plain_model, master_model = _model(), _model()
    plain = torch.optim.AdamW(groups(plain_model), lr=LR)
    master = MasterWeightOptimizer(groups(master_model), torch.optim.AdamW, lr=LR, max_grad_norm=max_grad_norm)
    return plain_model, plain, master_model, master


@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_master_weights_with_fp32_params_equal_the_plain_optimizer_exactly(max_grad_norm):
    """Scaling by S = 2^16 and unscaling by 2^-16 are exact in fp32, so every parameter matches bitwise after each
    step, with two param groups and a LambdaLR schedule driving the wrapper's param_groups."""
    plain_model, plain, master_model, master = _plain_and_master_fp32(max_grad_norm)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (plain, master)]
    for step in range(4):
        idx, targets = _batches()[step % 3]
        plain.zero_grad()
        plain_model(idx, targets)[1].backward()
        if max_grad_norm is not None:
            clip_grad_norm_([p for g in plain.param_groups for p in g["params"]], max_grad_norm)
        plain.step()
        master.zero_grad()
        master.scale_loss(master_model(idx, targets)[1]).backward()
        master.step()
        for s in schedules:
            s.step()
        assert not master.last_step_skipped and master.loss_scale == 2.0**16
        for (n, a), b in zip(master_model.named_parameters(), plain_model.parameters(), strict=True):
            assert _bitwise_equal(a.detach(), b.detach()), (step, n)
    assert [g["lr"] for g in master.optimizer.param_groups] == [g["lr"] for g in plain.param_groups]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_skip_on_overflow_and_back_off(dtype):
    """An inf in a half-precision gradient: model, masters and AdamW state unchanged, S halves, tracker resets."""
    model = _model(dtype)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=dtype, lr=LR, growth_interval=3)
    batches = _batches()
    opt.scale_loss(model(*batches[0])[1]).backward()
    opt.step()
    opt.zero_grad()
    assert opt.growth_tracker == 1 and not opt.last_step_skipped
    params_before = [p.detach().clone() for p in model.parameters()]
    masters_before = [m.detach().clone() for m in opt.master_params()]
    steps_before = [s["step"].clone() for s in opt.optimizer.state.values()]
    handle = _poison_once(model.blocks[0].attn.q_proj.weight, float("inf"))
    opt.scale_loss(model(*batches[1])[1]).backward()
    handle.remove()
    opt.step()
    opt.zero_grad()
    assert opt.last_step_skipped and opt.loss_scale == 2.0**15 and opt.growth_tracker == 0
    assert all(_bitwise_equal(p.detach(), b) for p, b in zip(model.parameters(), params_before, strict=True))
    assert all(_bitwise_equal(m.detach(), b) for m, b in zip(opt.master_params(), masters_before, strict=True))
    assert [s["step"] for s in opt.optimizer.state.values()] == steps_before
    assert all(m.grad is None for m in opt.master_params())  # fp32 gradient copies are freed
    opt.scale_loss(model(*batches[2])[1]).backward()
    opt.step()
    assert not opt.last_step_skipped and opt.growth_tracker == 1
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params_before, strict=True))


def test_master_weights_scale_follows_grad_scaler():
    """The loss scale and tracker move exactly as torch.amp.GradScaler's under the same overflow pattern."""
    model = _model(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.SGD, lr=0.01, init_scale=8.0, growth_interval=2)
    twin = torch.ones(3, requires_grad=True)
    twin_opt = torch.optim.SGD([twin], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    idx, targets = _batches()[0]
    for step, overflow in enumerate([False, False, True, False, True, True, False, False, False]):
        opt.zero_grad()
        handle = _poison_once(model.wte.weight, float("inf")) if overflow else None
        opt.scale_loss(model(idx, targets)[1]).backward()
        if handle:
            handle.remove()
        opt.step()
        twin.grad = None
        scaler.scale((twin * (float("inf") if overflow else 1.0)).sum()).backward()
        scaler.step(twin_opt)
        scaler.update()
        assert opt.last_step_skipped == overflow
        assert (opt.loss_scale, opt.growth_tracker) == (scaler.get_scale(), scaler._get_growth_tracker()), step


def test_master_weights_clip_the_unscaled_fp32_gradients():
    """fp16 params, S = 2^16, clipping to 0.05: the update equals the recipe written out (fp32 copy of the fp16
    gradient, times fp32(1/S), clip, AdamW on an fp32 copy, round to fp16) bitwise, and last_grad_norm is the norm
    of the true gradients."""
    model = _model(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.float16, lr=LR,
                                max_grad_norm=0.05)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    expected_opt = torch.optim.AdamW(masters, lr=LR)
    idx, targets = _batches()[0]
    opt.scale_loss(model(idx, targets)[1]).backward()
    for m, p in zip(masters, model.parameters(), strict=True):
        m.grad = p.grad.float() * torch.tensor(2.0**-16)
    true_norm = torch.nn.utils.clip_grad_norm_(masters, 0.05)
    expected_opt.step()
    opt.step()
    assert float(true_norm) > 0.05 and float(opt.last_grad_norm) == float(true_norm)
    for m, p in zip(masters, model.parameters(), strict=True):
        assert _bitwise_equal(p.detach(), m.detach().half())
    for a, b in zip(opt.master_params(), masters, strict=True):
        assert _bitwise_equal(a.detach(), b.detach())


def test_master_weights_keep_updates_too_small_for_bf16():
    """lr * grad = 1e-3 is below half an ulp of 1.0 in bf16 (2^-9): plain bf16 SGD never moves the weight; the fp32
    master accumulates the updates and the bf16 weight follows once they add up to an ulp."""
    naive = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    kept = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    naive_opt = torch.optim.SGD([naive], lr=1e-3)
    kept_opt = MasterWeightOptimizer([kept], torch.optim.SGD, dtype=torch.bfloat16, loss_scale=None, lr=1e-3)
    for _ in range(10):
        for p, o in ((naive, naive_opt), (kept, kept_opt)):
            o.zero_grad()
            p.sum().backward()  # grad = 1
            o.step()
    assert torch.equal(naive.detach(), torch.ones(4, dtype=torch.bfloat16))
    assert torch.allclose(kept_opt.master_params()[0], torch.full((4,), 0.99), atol=1e-6)
    assert torch.equal(kept.detach(), torch.full((4,), 0.99).bfloat16())


def test_master_weights_bf16_train_like_fp32(runs):
    """A bf16 model under MasterWeightOptimizer(AdamW): trajectory within 2 bf16 units of fp32 at every step, and
    the bf16 weights are the fp32 masters rounded (the masters, not the bf16 copy, are what AdamW updates)."""
    model = _model(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.bfloat16, lr=LR)
    losses = []
    for step in range(STEPS):
        idx, targets = _batches()[step % 3]
        opt.zero_grad()
        loss = model(idx, targets)[1]
        opt.scale_loss(loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
    _trajectory_bound(losses, runs["fp32"][0].loss, torch.bfloat16)
    for weight, master in zip(model.parameters(), opt.master_params(), strict=True):
        assert master.dtype == torch.float32
        assert torch.equal(weight.detach(), master.detach().to(torch.bfloat16))


def test_master_weights_state_dict_resumes_exactly():
    batches = _batches()

    def run(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            opt.scale_loss(model(*batches[step % 3])[1]).backward()
            opt.step()

    model = _model(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, lr=LR, init_scale=4.0, growth_interval=2)
    run(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    run(model, opt, range(3, 5))
    resumed_model = _model(torch.bfloat16)  # fresh weights: the masters in the state dict restore them
    resumed = MasterWeightOptimizer(resumed_model.parameters(), torch.optim.AdamW, lr=LR, init_scale=4.0,
                                    growth_interval=2)
    resumed.load_state_dict(saved)
    assert resumed.loss_scale == 8.0 and resumed.growth_tracker == 1
    run(resumed_model, resumed, range(3, 5))
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert _bitwise_equal(a.detach(), b.detach())
    assert resumed.state_dict()["scale"] == opt.state_dict()["scale"]
    with pytest.raises(ValueError, match="master params"):
        MasterWeightOptimizer([torch.zeros(3, requires_grad=True)], lr=LR).load_state_dict(saved)


def test_master_weights_add_param_group():
    first, second = torch.ones(3, requires_grad=True), torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    opt = MasterWeightOptimizer([first], torch.optim.SGD, lr=0.5)
    opt.add_param_group({"params": [second], "lr": 0.25})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"][0].dtype == torch.float32
    opt.scale_loss(first.sum() + second.float().sum()).backward()
    opt.step()
    assert torch.equal(first.detach(), torch.full((3,), 0.5))
    assert torch.equal(second.detach(), torch.full((2,), 0.75, dtype=torch.bfloat16))
    opt.zero_grad(set_to_none=False)
    assert torch.equal(first.grad, torch.zeros(3)) and torch.equal(second.grad, torch.zeros(2, dtype=torch.bfloat16))


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_grad_scaler_with_bf16_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="GradScaler is for fp16 only"):
        amp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), _batches()[0], dtype=torch.bfloat16,
                 scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="no scaler arguments"):
        make_grad_scaler(torch.bfloat16, "cpu", init_scale=2.0)
    assert make_grad_scaler(torch.bfloat16) is None and make_grad_scaler(torch.float32) is None
    with pytest.raises(ValueError, match="dtype must be"):
        make_grad_scaler(torch.float64)


def test_fp16_without_an_enabled_scaler_is_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs a torch.amp.GradScaler"):
        amp_step(model, opt, _batches()[0], dtype=torch.float16)
    # torch.amp.GradScaler() defaults to "cuda" and disables itself (with a warning) on a machine without CUDA.
    with pytest.raises(ValueError, match="disabled"):
        amp_step(model, opt, _batches()[0], dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_autocast_without_device_support_is_refused(monkeypatch):
    """torch.autocast with an unsupported dtype warns and runs fp32; check_autocast turns that into an error."""
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        check_autocast("cpu", torch.float64)
    check_autocast("cpu", torch.bfloat16)
    check_autocast("cpu", torch.float16)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)  # a device that silently disables it
    model = _model()
    with pytest.raises(ValueError, match="no torch.float16 autocast support"):
        amp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), _batches()[0], dtype=torch.float16,
                 scaler=make_grad_scaler(torch.float16, "cpu"))


def test_amp_step_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        amp_step(model, opt, _batches()[0], max_grad_norm=0.0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        amp_step(model, opt, _batches()[0], accumulation_steps=3)
    with pytest.raises(ValueError, match="steps"):
        amp_train(model, opt, _batches(), steps=-1)


def test_master_weights_bad_arguments():
    fp32 = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3,\)\) is torch.float32 but dtype=torch.float16"):
        MasterWeightOptimizer(fp32, dtype=torch.float16, lr=0.1)
    with pytest.raises(ValueError, match="loss_scale"):
        MasterWeightOptimizer(fp32, loss_scale="static", lr=0.1)
    with pytest.raises(ValueError, match="loss_scale"):
        MasterWeightOptimizer(fp32, loss_scale=float("inf"), lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        MasterWeightOptimizer(fp32, max_grad_norm=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="backoff_factor"):
        MasterWeightOptimizer(fp32, backoff_factor=1.5, lr=0.1)
    with pytest.raises(TypeError, match="optimizer_class"):
        MasterWeightOptimizer(fp32, object, lr=0.1)
    with pytest.raises(ValueError, match="only floating params"):
        MasterWeightOptimizer([torch.zeros(3, dtype=torch.long)], lr=0.1)
    with pytest.raises(ValueError, match="params is empty"):
        MasterWeightOptimizer([], lr=0.1)
    with pytest.raises(RuntimeError, match="no gradient"):
        MasterWeightOptimizer(fp32, lr=0.1).step()
    with pytest.raises(ValueError, match="more than once"):
        MasterWeightOptimizer([{"params": fp32}, {"params": fp32}], lr=0.1)
    opt = MasterWeightOptimizer(fp32, lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": fp32})


# ---- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_fp16_autocast_with_grad_scaler_trains_like_fp32():
    """The seed's recipe on its own hardware: fp16 autocast + GradScaler("cuda") vs fp32 on the same GPU, TF32 off
    so the fp32 run is true fp32. Trajectory within 2 fp16 units."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        batches = _batches("cuda")
        ref_model = _model(device="cuda")
        ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=LR), batches, steps=STEPS)
        model = _model(device="cuda")
        history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=STEPS,
                            dtype=torch.float16, scaler=make_grad_scaler(torch.float16, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert not any(history.skipped)
    _trajectory_bound(history.loss, ref.loss, torch.float16)


@pytest.mark.gpu
def test_cuda_master_weights_fp16_step_matches_the_recipe():
    model = _model(torch.float16, "cuda")
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.float16, lr=LR,
                                max_grad_norm=0.05)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    expected_opt = torch.optim.AdamW(masters, lr=LR)
    opt.scale_loss(model(*_batches("cuda")[0])[1]).backward()
    for m, p in zip(masters, model.parameters(), strict=True):
        m.grad = p.grad.float() * torch.tensor(2.0**-16, device="cuda")
    torch.nn.utils.clip_grad_norm_(masters, 0.05)
    expected_opt.step()
    opt.step()
    for m, p in zip(masters, model.parameters(), strict=True):
        assert _bitwise_equal(p.detach(), m.detach().half())
