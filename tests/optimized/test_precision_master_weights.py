"""optimized.precision.master_weights: MasterWeightOptimizer held bitwise to the recipe written out (fp32 copy,
unscale, clip, fp32 step, round), to the plain optimizer on fp32 parameters, and to fp32 training within the
trajectory bound of precision_workload.py."""

from __future__ import annotations

import copy

import pytest
import torch

from conformance.tolerance import assert_equivalent, bitwise
from optimized.clipping import clip_grad_norm_
from optimized.precision import MasterWeightOptimizer
from tests.optimized.precision_workload import LR, STEPS, assert_trains_like_fp32, poison_once, tiny_batches, tiny_model


def _plain_and_master_fp32(max_grad_norm):
    """Two fp32 models with two param groups each: one under AdamW (+ optimized clipping), one under
    MasterWeightOptimizer(AdamW) with dynamic loss scaling 2^16 and the same clipping."""
    def groups(model):
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": LR / 3}]

    plain_model, master_model = tiny_model(), tiny_model()
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
        idx, targets = tiny_batches()[step % 3]
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
            assert_equivalent(bitwise(a, b, name=f"{n}, step {step}"))
    assert [g["lr"] for g in master.optimizer.param_groups] == [g["lr"] for g in plain.param_groups]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_skip_on_overflow_and_back_off(dtype):
    """An inf in a half-precision gradient: model, masters and AdamW state unchanged, S halves, tracker resets."""
    model = tiny_model(dtype)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=dtype, lr=LR, growth_interval=3)
    batches = tiny_batches()
    opt.scale_loss(model(*batches[0])[1]).backward()
    opt.step()
    opt.zero_grad()
    assert opt.growth_tracker == 1 and not opt.last_step_skipped
    params_before = [p.detach().clone() for p in model.parameters()]
    masters_before = [m.detach().clone() for m in opt.master_params()]
    steps_before = [s["step"].clone() for s in opt.optimizer.state.values()]
    handle = poison_once(model.blocks[0].attn.q_proj.weight, float("inf"))
    opt.scale_loss(model(*batches[1])[1]).backward()
    handle.remove()
    opt.step()
    opt.zero_grad()
    assert opt.last_step_skipped and opt.loss_scale == 2.0**15 and opt.growth_tracker == 0
    assert all(bitwise(p.detach(), b).passed for p, b in zip(model.parameters(), params_before, strict=True))
    assert all(bitwise(m.detach(), b).passed for m, b in zip(opt.master_params(), masters_before, strict=True))
    assert [s["step"] for s in opt.optimizer.state.values()] == steps_before
    assert all(m.grad is None for m in opt.master_params())  # fp32 gradient copies are freed
    opt.scale_loss(model(*batches[2])[1]).backward()
    opt.step()
    assert not opt.last_step_skipped and opt.growth_tracker == 1
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params_before, strict=True))


def test_master_weights_clip_the_unscaled_fp32_gradients():
    """fp16 params, S = 2^16, clipping to 0.05: the update equals the recipe written out (fp32 copy of the fp16
    gradient, times fp32(1/S), clip, AdamW on an fp32 copy, round to fp16) bitwise, and last_grad_norm is the norm
    of the true gradients."""
    model = tiny_model(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.float16, lr=LR,
                                max_grad_norm=0.05)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    expected_opt = torch.optim.AdamW(masters, lr=LR)
    idx, targets = tiny_batches()[0]
    opt.scale_loss(model(idx, targets)[1]).backward()
    for m, p in zip(masters, model.parameters(), strict=True):
        m.grad = p.grad.float() * torch.tensor(2.0**-16)
    true_norm = torch.nn.utils.clip_grad_norm_(masters, 0.05)
    expected_opt.step()
    opt.step()
    assert float(true_norm) > 0.05 and float(opt.last_grad_norm) == float(true_norm)
    for m, p in zip(masters, model.parameters(), strict=True):
        assert_equivalent(bitwise(p.detach(), m.detach().half()))
    for a, b in zip(opt.master_params(), masters, strict=True):
        assert_equivalent(bitwise(a.detach(), b.detach()))


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


def test_master_weights_bf16_train_like_fp32():
    """A bf16 model under MasterWeightOptimizer(AdamW): trajectory within 2 bf16 units of fp32 at every step, and
    the bf16 weights are the fp32 masters rounded (the masters, not the bf16 copy, are what AdamW updates)."""
    model = tiny_model(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.bfloat16, lr=LR)
    losses = []
    for step in range(STEPS):
        idx, targets = tiny_batches()[step % 3]
        opt.zero_grad()
        loss = model(idx, targets)[1]
        opt.scale_loss(loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert_trains_like_fp32(losses, torch.bfloat16)
    for weight, master in zip(model.parameters(), opt.master_params(), strict=True):
        assert master.dtype == torch.float32
        assert torch.equal(weight.detach(), master.detach().to(torch.bfloat16))


def test_master_weights_state_dict_resumes_exactly():
    batches = tiny_batches()

    def run(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            opt.scale_loss(model(*batches[step % 3])[1]).backward()
            opt.step()

    model = tiny_model(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, lr=LR, init_scale=4.0, growth_interval=2)
    run(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    run(model, opt, range(3, 5))
    resumed_model = tiny_model(torch.bfloat16)  # fresh weights: the masters in the state dict restore them
    resumed = MasterWeightOptimizer(resumed_model.parameters(), torch.optim.AdamW, lr=LR, init_scale=4.0,
                                    growth_interval=2)
    resumed.load_state_dict(saved)
    assert resumed.loss_scale == 8.0 and resumed.growth_tracker == 1
    run(resumed_model, resumed, range(3, 5))
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert_equivalent(bitwise(a.detach(), b.detach()))
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


# ---- bad input -------------------------------------------------------------------------------------------------------


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


# ---- CUDA ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_master_weights_fp16_step_matches_the_recipe():
    model = tiny_model(torch.float16, "cuda")
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.float16, lr=LR,
                                max_grad_norm=0.05)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    expected_opt = torch.optim.AdamW(masters, lr=LR)
    opt.scale_loss(model(*tiny_batches("cuda")[0])[1]).backward()
    for m, p in zip(masters, model.parameters(), strict=True):
        m.grad = p.grad.float() * torch.tensor(2.0**-16, device="cuda")
    torch.nn.utils.clip_grad_norm_(masters, 0.05)
    expected_opt.step()
    opt.step()
    for m, p in zip(masters, model.parameters(), strict=True):
        assert_equivalent(bitwise(p.detach(), m.detach().half()))
