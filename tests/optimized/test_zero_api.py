"""ZeroOptimizer on one process (no process group): bad input, the flat layout, PyTorch conventions.

The multi-rank behaviour is in test_zero.py; here every rank is rank 0 of 1, so the tests are fast.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimized.zero import ZeroOptimizer
from optimized.zero.partition import FlatLayout
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.training import accumulate_gradients

CFG = GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=5, n_embd=25)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 13), min_size=1, max_size=3), min_size=1, max_size=6),
       world=st.integers(1, 4), data=st.data())
def test_layout_slices_cover_every_element_once(shapes, world, data):
    layout = FlatLayout.build(0, torch.float32, [((f"p{i}",), tuple(s)) for i, s in enumerate(shapes)], world)
    assert layout.padded_numel % world == 0 and 0 <= layout.padded_numel - layout.numel < world
    owned = [layout.owned_range(r) for r in range(world)]
    assert owned[0][0] == 0 and all(a[1] <= b[0] for a, b in zip(owned, owned[1:], strict=False))
    assert sum(hi - lo for lo, hi in owned) == layout.numel
    lo = data.draw(st.integers(0, layout.numel))
    hi = data.draw(st.integers(lo, layout.numel))
    pieces = list(layout.pieces(lo, hi))
    assert sum(b - a for _, a, b in pieces) == hi - lo  # the pieces tile [lo, hi)
    assert all(layout.shard_start(r) <= a < b <= layout.shard_start(r) + layout.shard_numel for r, a, b in pieces)


def _model():
    return GPT(CFG)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=0), "stage must be 1, 2 or 3, got 0"),
    (dict(stage=True), "stage must be 1, 2 or 3, got True"),
    (dict(stage=2, param_dtype=torch.float32), "param_dtype must be None, torch.float16 or torch.bfloat16"),
    (dict(stage=2, param_dtype=torch.float64), "got torch.float64"),
    (dict(stage=1, bucket_cap_mb=0), "bucket_cap_mb must be a finite number > 0, got 0"),
    (dict(stage=1, offload="cpu"), "offload must be True or False"),
    (dict(stage=1, lr=-1.0), "could not run a probe step"),
])
def test_bad_arguments_are_refused_before_any_change(kwargs, match):
    model = _model()
    before = [(p, p.data_ptr()) for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        ZeroOptimizer(model, torch.optim.AdamW, **{"lr": 1e-3, **kwargs})
    assert all(p.data_ptr() == ptr for p, ptr in before)  # the model was not re-pointed


@pytest.mark.parametrize("cls, match", [
    (torch.optim.Adafactor, "Adafactor is not elementwise"),
    (torch.optim.LBFGS, "LBFGS .* could not run a probe step"),
    (torch.nn.Linear, "must be a torch.optim.Optimizer subclass"),
])
def test_an_optimizer_that_is_not_elementwise_is_refused(cls, match):
    with pytest.raises(ValueError, match=match):
        ZeroOptimizer(_model(), cls, stage=1, lr=1e-2)


def test_bad_param_groups_are_named():
    model = _model()
    weights = [p for p in model.parameters() if p.dim() >= 2]
    with pytest.raises(ValueError, match="trainable parameter 'blocks.0.ln_1.weight' is in no group"):
        ZeroOptimizer(model, torch.optim.AdamW, stage=1, param_groups=[{"params": weights}])
    with pytest.raises(ValueError, match="'wte.weight' is in param_groups\\[0\\] and param_groups\\[1\\]"):
        ZeroOptimizer(model, torch.optim.AdamW, stage=1, param_groups=[{"params": weights}, {"params": weights}])
    with pytest.raises(ValueError, match="not a parameter of model"):
        ZeroOptimizer(model, torch.optim.AdamW, stage=1, param_groups=[{"params": [torch.zeros(2)]}])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ZeroOptimizer(model, torch.optim.AdamW, stage=1)


def _train(model, opt, steps, scheduler=None):
    losses = []
    for idx, targets in make_batches(steps, batch_size=3, seq_len=9, vocab_size=CFG.vocab_size, seed=2):
        losses.append(float(accumulate_gradients(model, [(idx, targets)])))
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_any_elementwise_optimizer_and_an_lr_scheduler(stage):
    """SGD with momentum and a LambdaLR, on one rank: the same numbers as plain torch (the update is bitwise the
    same elementwise arithmetic on a flat slice as on the separate tensors)."""
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    ours = _model()
    opt = ZeroOptimizer(ours, torch.optim.SGD, stage=stage, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    assert _train(ours, opt, 4, sched) == _train(ref, ref_opt, 4, ref_sched)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    assert opt.param_groups is opt.optimizer.param_groups
    with opt.gathered_parameters():
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    if stage == 3:  # outside the block nothing is held whole
        assert all(p.untyped_storage().nbytes() == 0 for p in ours.parameters())


def test_clip_grad_norm_checks_its_arguments_and_reports_nonfinite_norms():
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        opt.clip_grad_norm_(0.0)
    with pytest.raises(ValueError, match="norm_type must be >= 1 or inf"):
        opt.clip_grad_norm_(1.0, norm_type=0.5)
    idx, targets = make_batches(1, batch_size=2, seq_len=5, vocab_size=CFG.vocab_size)[0]
    (model(idx, targets)[1] * float("inf")).backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert math.isnan(float(opt.clip_grad_norm_(1.0))) or math.isinf(float(opt.clip_grad_norm_(1.0)))


def test_add_param_group_after_construction_is_refused():
    opt = ZeroOptimizer(_model(), torch.optim.AdamW, stage=1, lr=1e-3)
    with pytest.raises(NotImplementedError, match="param_groups="):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_stage3_inference_gathers_and_frees_each_module():
    ref, ours = _model(), _model()
    opt = ZeroOptimizer(ours, torch.optim.AdamW, stage=3, lr=1e-3)
    idx, _ = make_batches(1, batch_size=2, seq_len=7, vocab_size=CFG.vocab_size)[0]
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], ref(idx)[0])
    assert all(p.untyped_storage().nbytes() == 0 for p in ours.parameters())
    assert opt.model_state_tensors()["params"][0].numel() == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("value", [False, None, 0, "yes"])
def test_zero_grad_refuses_what_it_cannot_do(value):
    """The gradient is sharded, so there is no full-size zero tensor to keep in .grad: set_to_none=False is refused,
    never silently ignored; the gradient buffers are left as they were."""
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, lr=1e-3)
    idx, targets = make_batches(1, batch_size=2, seq_len=8, vocab_size=16, seed=0)[0]
    accumulate_gradients(model, [(idx, targets)])
    before = [g.clone() for g in opt._grads.grads()]
    with pytest.raises(ValueError, match=r"set_to_none must be True"):
        opt.zero_grad(set_to_none=value)
    assert all(torch.equal(a, b) for a, b in zip(before, opt._grads.grads(), strict=True))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
