"""ZeroOptimizer under faults: inf/NaN gradients, fp16 loss scaling (own and torch.amp.GradScaler), released ZeRO-3
parameters read outside a gather, ranks holding different models, and torch's clip_grad_norm_ on sharded gradients.
Checkpoints under faults: test_zero_checkpoint_faults.py.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conformance.launch import spawn
from optimized.data_parallel import DataParallel
from optimized.mixed_precision import MasterWeightOptimizer
from optimized.zero import ZeroOptimizer
from optimized.zero.gather import ReleasedParameterError
from reference.data import make_batches
from reference.model import GPT, GPTConfig

CFG = dict(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=10, seed=0)
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
CONFIGS = [dict(stage=1), dict(stage=2), dict(stage=3), dict(stage=2, offload=True),
           dict(stage=3, offload=True, param_dtype=torch.bfloat16)]


def _model() -> GPT:
    return GPT(GPTConfig(**CFG))


def _local(batch, opt):
    idx, targets = batch
    return idx.chunk(opt.world_size)[opt.rank], targets.chunk(opt.world_size)[opt.rank]


def _params(model, opt) -> list[torch.Tensor]:
    with opt.gathered_parameters():
        return [p.detach().float().clone() for p in model.parameters()]


# --- inf / NaN gradients --------------------------------------------------------------------------------------------


def _inf_worker(configs: list[dict]) -> list[dict]:
    return [_inf_run(config) for config in configs]


def _inf_run(config: dict) -> dict:
    """Steps on batches 0, 1, 2 where step 1 has an inf gradient on rank 1 only, against steps on 0, 2."""
    batches = make_batches(3, batch_size=4, seq_len=6, vocab_size=CFG["vocab_size"], seed=3)
    out = {}
    for poisoned in (True, False):
        model = _model()
        opt = ZeroOptimizer(model, torch.optim.AdamW, bucket_cap_mb=0.001, **config, **ADAMW)
        skipped, unchanged = [], None
        for step, batch in enumerate(batches):
            if step == 1 and not poisoned:
                continue
            loss = model(*_local(batch, opt))[1]
            if step == 1 and opt.rank == 1:
                loss = loss * float("inf")
            before = _params(model, opt)
            state_before = copy.deepcopy(opt.optimizer.state_dict()["state"])
            loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            skipped.append(opt.last_step_skipped)
            if step == 1:
                after = opt.optimizer.state_dict()["state"]
                unchanged = all(torch.equal(a, b) for a, b in zip(before, _params(model, opt), strict=True)) and all(
                    torch.equal(v, after[i][k]) for i, s in state_before.items() for k, v in s.items())
        out["poisoned" if poisoned else "clean"] = (_params(model, opt), skipped, unchanged, opt.skipped_steps)
    return out


def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank():
    """Every stage, offload, bf16: the inf step changes nothing on any rank and the run then equals a run that
    never saw it, bitwise."""
    per_rank = spawn(_inf_worker, 2, CONFIGS, timeout=120)
    for c, config in enumerate(CONFIGS):
        for rank, result in enumerate(r[c] for r in per_rank):
            params, skipped, unchanged, count = result["poisoned"]
            clean = result["clean"][0]
            assert skipped == [False, True, False] and count == 1, (config, rank)
            assert unchanged, (config, rank)
            assert all(torch.equal(a, b) for a, b in zip(params, clean, strict=True)), (config, rank)


def _accumulation_worker() -> list[list[torch.Tensor]]:
    """Stage 1, two micro-batches per step: reduced after each backward, or only after the second (no_sync)."""
    batches = make_batches(4, batch_size=4, seq_len=6, vocab_size=CFG["vocab_size"], seed=4)
    out = []
    for use_no_sync in (False, True):
        model = _model()
        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
        for first, second in zip(batches[::2], batches[1::2], strict=True):
            with opt.no_sync() if use_no_sync else contextlib.nullcontext():
                (model(*_local(first, opt))[1] / 2).backward()
            (model(*_local(second, opt))[1] / 2).backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
        out.append(_params(model, opt))
    return out


def test_stage1_accumulation_with_and_without_no_sync_agree():
    for without, with_no_sync in spawn(_accumulation_worker, 2, timeout=60):
        for a, b in zip(without, with_no_sync, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_sync_is_refused_where_gradients_are_sharded():
    opt = ZeroOptimizer(_model(), torch.optim.AdamW, stage=2, **ADAMW)
    with pytest.raises(RuntimeError, match="no_sync\\(\\) is for stage 1"), opt.no_sync():
        pass


# --- fp16 loss scaling ----------------------------------------------------------------------------------------------


def _fp16_run(kind: str, overflow_at: int) -> tuple[list[torch.Tensor], list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():  # fp16-representable start: both keep the same fp32 masters
        for p in model.parameters():
            p.copy_(p.half())
    data = [(torch.randn(5, 6), torch.randn(5, 3)) for _ in range(4)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) if "scaler" in kind else None
    if kind.startswith("zero"):
        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, param_dtype=torch.float16,
                            loss_scale=None if scaler else "dynamic", init_scale=2.0**8, growth_interval=2, **ADAMW)
        masters = lambda: [m.detach().clone() for g in opt.param_groups for m in g["params"]]  # noqa: E731
        scale = opt.scale_loss
    else:
        model.half()
        opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.float16,
                                    loss_scale=None if scaler else "dynamic", init_scale=2.0**8, growth_interval=2,
                                    **ADAMW)
        masters = lambda: [torch.cat([m.detach().reshape(-1) for m in opt.master_params()])]  # noqa: E731
        scale = opt.scale_loss
    scales = []
    for step, (x, y) in enumerate(data):
        loss = ((model(x.half()).float() - y) ** 2).mean() * (float("inf") if step == overflow_at else 1.0)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            scale(loss).backward()
            opt.step()
            scales.append(opt.loss_scale)
        opt.zero_grad()
    return [torch.cat([m.reshape(-1) for m in masters()])], scales


@pytest.mark.parametrize("with_grad_scaler", [False, True])
def test_fp16_zero_trains_with_dynamic_loss_scaling_like_master_weights(with_grad_scaler):
    """fp16 ZeRO-2 (one process) and MasterWeightOptimizer, both with torch.amp.GradScaler or both with their own
    dynamic scale: the same scales (an overflow at step 1 backs off, then growth) and the same fp32 masters."""
    suffix = "+scaler" if with_grad_scaler else ""
    zero, zero_scales = _fp16_run("zero" + suffix, overflow_at=1)
    mwo, mwo_scales = _fp16_run("mwo" + suffix, overflow_at=1)
    assert zero_scales == mwo_scales == [256.0, 128.0, 128.0, 256.0]
    torch.testing.assert_close(zero[0], mwo[0], rtol=1e-6, atol=1e-7)


def _grad_scaler_worker() -> tuple[list[float], list[torch.Tensor]]:
    """2 ranks, GradScaler: an overflow on rank 1 only must back off the scale on both ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=3, param_dtype=torch.float16, **ADAMW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    scales = []
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step * 10 + opt.rank))
        loss = model(x.half()).float().pow(2).mean()
        if step == 1 and opt.rank == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return scales, _params(model, opt)


def test_grad_scaler_skips_and_backs_off_on_every_rank():
    (scales0, params0), (scales1, params1) = spawn(_grad_scaler_worker, 2, timeout=60)
    assert scales0 == scales1 == [256.0, 128.0, 128.0]
    assert all(torch.equal(a, b) for a, b in zip(params0, params1, strict=True))


# --- released parameters and sharded gradients ----------------------------------------------------------------------


def test_released_zero3_parameters_raise_a_clear_error():
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=3, **ADAMW)
    p = model.wte.weight
    assert "released by ZeRO-3" in repr(p) and tuple(p.shape) == (23, 10) and p.requires_grad
    for use in (lambda: p.sum(), lambda: p.data, lambda: copy.deepcopy(model), lambda: model.state_dict(),
                lambda: torch.save(model.state_dict(keep_vars=True), os.devnull), lambda: p + 1):
        with pytest.raises(ReleasedParameterError, match=r"'wte\.weight' is released .*gathered_parameters"):
            use()
    with opt.gathered_parameters():
        state = model.state_dict()
        twin = copy.deepcopy(model)
        assert torch.equal(state["wte.weight"], twin.wte.weight)
    assert GPT(GPTConfig(**CFG)).load_state_dict(state, strict=True)  # a real, loadable state dict


class _External(nn.Module):
    """A parameter-free parent whose forward reads its child's weight without calling the child."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.child = nn.Linear(4, 3)

    def forward(self, x):
        return nn.functional.linear(x, self.child.weight, self.child.bias)


def test_a_parameter_used_outside_its_module_needs_registration_and_then_trains():
    x = torch.randn(5, 4)
    reference = _External()
    reference(x).square().sum().backward()
    model = _External()
    opt = ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1)
    with pytest.raises(ReleasedParameterError, match=r"'child.weight' .*register_external_parameter"):
        model(x)
    opt.register_external_parameter(model, model.child.weight)
    opt.register_external_parameter(model, model.child.bias)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    with opt.gathered_parameters():
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_clip_grad_norm_on_sharded_gradients_raises(stage):
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, **ADAMW)
    batches = make_batches(2, batch_size=2, seq_len=6, vocab_size=CFG["vocab_size"], seed=0)
    for batch in batches:  # twice: the stand-in .grad must not break the next backward
        model(*batch)[1].backward()
    with pytest.raises(RuntimeError, match=r"ZeroOptimizer.clip_grad_norm_"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert float(opt.clip_grad_norm_(1.0)) > 0
    opt.step()


# --- ranks that disagree --------------------------------------------------------------------------------------------


def _mismatch_worker(wrapper: str) -> str:
    width = 5 if dist.get_rank() == 1 else 4
    model = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
    try:
        if wrapper == "zero":
            ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3)
        else:
            DataParallel(model)
    except ValueError as e:
        return str(e)
    return "accepted"


@pytest.mark.parametrize("wrapper", ["zero", "dp"])
def test_ranks_holding_different_models_are_named_at_wrap(wrapper):
    for message in spawn(_mismatch_worker, 3, wrapper, timeout=60):
        assert "parameter 0 is '0.weight' shape (4, 3)" in message and "(5, 3)" in message
        assert "rank(s) [1] differ from rank 0" in message


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match="'wte.weight' is on the meta device"):
        ZeroOptimizer(model, torch.optim.AdamW, stage=1, lr=1e-3)
