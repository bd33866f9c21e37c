"""optimized.precision.scaler: the GradScaler a dtype needs (and the ones it refuses), and LossScale moving exactly
as torch.amp.GradScaler's scale does under the same overflow pattern."""

from __future__ import annotations

import pytest
import torch

from optimized.precision import MasterWeightOptimizer, amp_step, make_grad_scaler
from tests.optimized.precision_workload import poison_once, tiny_batches, tiny_model


def test_master_weights_scale_follows_grad_scaler():
    """The loss scale and tracker move exactly as torch.amp.GradScaler's under the same overflow pattern."""
    model = tiny_model(torch.float16)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.SGD, lr=0.01, init_scale=8.0, growth_interval=2)
    twin = torch.ones(3, requires_grad=True)
    twin_opt = torch.optim.SGD([twin], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    idx, targets = tiny_batches()[0]
    for step, overflow in enumerate([False, False, True, False, True, True, False, False, False]):
        opt.zero_grad()
        handle = poison_once(model.wte.weight, float("inf")) if overflow else None
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


def test_grad_scaler_with_bf16_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="GradScaler is for fp16 only"):
        amp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), tiny_batches()[0], dtype=torch.bfloat16,
                 scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="no scaler arguments"):
        make_grad_scaler(torch.bfloat16, "cpu", init_scale=2.0)
    assert make_grad_scaler(torch.bfloat16) is None and make_grad_scaler(torch.float32) is None
    with pytest.raises(ValueError, match="dtype must be"):
        make_grad_scaler(torch.float64)


def test_fp16_without_an_enabled_scaler_is_refused():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs a torch.amp.GradScaler"):
        amp_step(model, opt, tiny_batches()[0], dtype=torch.float16)
    # torch.amp.GradScaler() defaults to "cuda" and disables itself (with a warning) on a machine without CUDA.
    with pytest.raises(ValueError, match="disabled"):
        amp_step(model, opt, tiny_batches()[0], dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", enabled=False))
