"""The divergence localizer names the step, parameter, module and aten op where a bug was injected, and nothing
where two runs differ only by rounding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conformance.divergence import (
    Divergence,
    OpDivergence,
    StepDivergence,
    first_divergence,
    relative_band,
    table_band,
)
from conformance.localize import first_layer, first_op, localize
from reference.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
BUGGY = "blocks.1.mlp.fc_in"
BUG = 1 + 1e-3


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))


def _gpt(dtype=torch.float64) -> GPT:
    return GPT(CFG).to(dtype)


def _nudge(tensor: torch.Tensor) -> None:
    """One ulp up, every entry: float64 rounding noise, no bug."""
    tensor.copy_(torch.nextafter(tensor, torch.full_like(tensor, float("inf"))))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(perturb=None, steps: int = 4):
    """A 4-step float64 AdamW run: parameters after each step, and each step's gradients.
    perturb(step, model) runs after each update, before the parameters are taken."""
    model = _gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    states, grads = [], []
    for step in range(1, steps + 1):
        idx = _ids(step)
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        if perturb is not None:
            with torch.no_grad():
                perturb(step, model)
        states.append(_state(model))
    return states, grads


@pytest.fixture(scope="module")
def reference_run():
    return _train()


def _scale_the_buggy_weight_at_step_2(step: int, model: nn.Module) -> None:
    if step == 2:
        model.get_parameter(f"{BUGGY}.weight").mul_(BUG)


@pytest.fixture(scope="module")
def buggy_states():
    """The parameters after each step of a run whose BUGGY weight is scaled by BUG after step 2's update."""
    return _train(_scale_the_buggy_weight_at_step_2)[0]


# ----------------------------------------------------------------------------------------------------- steps
def test_first_divergence_names_the_step_and_the_parameter(reference_run, buggy_states):
    found = first_divergence(buggy_states, reference_run[0], start=1)
    assert found is not None and found.layer is None and found.op is None
    assert (found.step.step, found.step.name, found.step.kind) == (2, f"{BUGGY}.weight", "parameter")
    assert found.step.error > found.step.bound > 0
    assert str(found).startswith(f"step 2, parameter {BUGGY}.weight: err ")


def test_first_divergence_is_none_for_the_same_run_and_for_rounding_noise(reference_run):
    assert first_divergence(*[reference_run[0]] * 2) is None
    assert first_divergence(reference_run[1], reference_run[1], kind="gradient") is None

    def noise(step, model):
        if step == 2:
            for p in model.parameters():
                _nudge(p)

    states, grads = _train(noise)
    assert any(not torch.equal(a, b) for a, b in zip(states[3].values(), reference_run[0][3].values(), strict=True))
    assert first_divergence(states, reference_run[0]) is None
    assert first_divergence(grads, reference_run[1], kind="gradient") is None


def test_first_parameter_is_in_the_model_order_not_the_dict_order(reference_run):
    late, early = f"{BUGGY}.weight", "blocks.0.attn.q_proj.weight"

    def two_bugs(step, model):
        if step == 3:
            model.get_parameter(late).mul_(BUG)
            model.get_parameter(early).mul_(BUG)

    states, _ = _train(two_bugs)
    shuffled = [dict(reversed(s.items())) for s in states]
    reference = [dict(reversed(s.items())) for s in reference_run[0]]
    assert first_divergence(shuffled, reference).step.name == late  # the dict's order: late comes first
    found = first_divergence(shuffled, reference, order=_gpt(), start=1)
    assert (found.step.step, found.step.name) == (3, early)


def test_gradient_divergence_and_explicit_bounds(reference_run):
    grads = copy.deepcopy(reference_run[1])
    grads[1]["ln_f.weight"] *= BUG
    found = first_divergence(grads, reference_run[1], kind="gradient", start=1)
    assert (found.step.step, found.step.name, found.step.kind) == (2, "ln_f.weight", "gradient")
    err = found.step.error
    table = {(s, n): 0.0 for s, g in enumerate(grads, start=1) for n in g}
    table[(2, "ln_f.weight")] = 2 * err
    assert first_divergence(grads, reference_run[1], band=table_band(table), start=1) is None
    table[(2, "ln_f.weight")] = err / 2
    assert first_divergence(grads, reference_run[1], band=table_band(table), start=1).step.name == "ln_f.weight"
    loose = lambda step, name, a, e: (True, 0.0, 1.0)
    assert first_divergence(grads, reference_run[1], band=loose) is None


def test_float32_steps_need_a_band_or_a_float64_reference():
    ref = [{"w": torch.ones(3)}]
    with pytest.raises(ValueError, match="float64_reference"):
        first_divergence([{"w": torch.ones(3)}], ref)
    ref64 = [{"w": torch.ones(3, dtype=torch.float64) + 1e-9}]  # the float32 reference's own spread: ~1e-9
    assert first_divergence([{"w": torch.ones(3)}], ref, float64_reference=ref64) is None
    found = first_divergence([{"w": torch.ones(3) * BUG}], ref, float64_reference=ref64)
    assert found.step.name == "w" and "error ratio" in found.step.rule
    with pytest.raises(ValueError, match="names differ"):
        first_divergence([{"v": torch.ones(3)}], ref, band=lambda *a: (True, 0, 0))
    with pytest.raises(ValueError, match="2 steps"):
        first_divergence(ref * 2, ref)


# ----------------------------------------------------------------------------------------------------- layers and ops
def test_a_perturbed_weight_is_named_by_module_and_op():
    reference, model = _gpt(), _gpt()
    with torch.no_grad():
        model.get_parameter(f"{BUGGY}.weight").mul_(BUG)
    found = localize(model, reference, _ids(0))
    layer, op = found.layer, found.op
    assert (layer.module, layer.phase, layer.call, layer.tensor) == (BUGGY, "forward", 0, "output 0")
    assert (op.op, op.module, op.phase, op.mismatch) == ("aten.addmm.default", BUGGY, "forward", None)
    assert layer.error > layer.bound and op.error > op.bound
    assert first_layer(model, reference, _ids(0)).layer == layer and first_layer(model, reference, _ids(0)).op is None
    assert first_op(model, reference, _ids(0)).op == op


def test_identical_models_and_rounding_noise_give_none():
    reference = _gpt()
    assert localize(_gpt(), reference, _ids(0)) is None
    noisy = _gpt()
    with torch.no_grad():
        for p in noisy.parameters():
            _nudge(p)
    assert localize(noisy, reference, _ids(0)) is None


def _split_reduction(linear: nn.Linear) -> None:
    """The same Linear, its inner dimension summed in two halves: equal in exact arithmetic, another rounding."""
    half = linear.in_features // 2
    linear.forward = lambda x: (F.linear(x[..., half:], linear.weight[:, half:])
                                + F.linear(x[..., :half], linear.weight[:, :half], linear.bias))


def test_another_reduction_order_passes_layers_and_parts_the_op_sequences():
    reference, model = _gpt(), _gpt()
    _split_reduction(model.blocks[0].mlp.fc_out)
    assert first_layer(model, reference, _ids(0)) is None
    op = first_op(model, reference, _ids(0)).op  # the ops differ though the values agree: said so, not hidden
    assert op.mismatch is not None and op.module == "blocks.0.mlp.fc_out" and op.phase == "forward"
    assert str(op).startswith("op sequences part at call #")


def test_a_scaled_output_is_named_and_the_op_sequences_part_there():
    reference, model = _gpt(), _gpt()
    model.get_submodule(BUGGY).register_forward_hook(lambda m, args, out: out * BUG)
    found = localize(model, reference, _ids(0))
    assert (found.layer.module, found.layer.phase) == (BUGGY, "forward")
    op = found.op
    assert (op.op, op.module, op.phase) == ("aten.mul.Tensor", BUGGY, "forward")
    assert op.mismatch == "calls aten.gelu.default in blocks.1.mlp (forward)"
    assert op.error is None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `scale` backward: a backward-only bug when scale != 1."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _with_backward_scale(model: GPT, scale: float) -> GPT:
    linear = model.get_submodule(BUGGY)
    linear.forward = lambda x: _ScaleGrad.apply(F.linear(x, linear.weight, linear.bias), scale)
    return model


def test_a_backward_only_bug_is_named_in_backward():
    reference, model = _with_backward_scale(_gpt(), 1.0), _with_backward_scale(_gpt(), BUG)
    found = localize(model, reference, _ids(0))
    assert (found.layer.module, found.layer.phase) == (BUGGY, "backward")
    assert (found.op.op, found.op.module, found.op.phase) == ("aten.mul.Tensor", BUGGY, "backward")
    assert found.op.error > found.op.bound
    assert localize(model, reference, _ids(0), backward=False) is None


def test_float32_models_get_a_band_from_a_float64_copy():
    reference = _gpt(torch.float32)
    assert localize(_gpt(torch.float32), reference, _ids(0)) is None
    reordered = _gpt(torch.float32)
    _split_reduction(reordered.blocks[0].mlp.fc_out)
    assert first_layer(reordered, reference, _ids(0)) is None
    model = _gpt(torch.float32)
    with torch.no_grad():
        model.get_parameter(f"{BUGGY}.weight").mul_(BUG)
    found = localize(model, reference, _ids(0))
    assert (found.layer.module, found.op.op, found.op.module) == (BUGGY, "aten.addmm.default", BUGGY)
    assert "error ratio" in found.layer.rule and found.layer.bound > 1e-9  # float32's spread, not float64's


def test_torch_transformer_encoder_layer():
    torch.manual_seed(0)
    reference = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert localize(copy.deepcopy(reference), reference, x) is None
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.linear1.weight.mul_(BUG)
    found = localize(model, reference, x)
    assert (found.layer.module, found.layer.phase) == ("linear1", "forward")
    assert (found.op.op, found.op.module) == ("aten.addmm.default", "linear1")
    model = copy.deepcopy(reference)
    with torch.no_grad():  # a parameter of the attention itself, used through F.multi_head_attention_forward
        model.self_attn.in_proj_weight.mul_(BUG)
    found = localize(model, reference, x)
    assert found.layer.module == "self_attn" and found.op.module == "self_attn"
    noisy = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.5, batch_first=True).double().train()
    assert localize(copy.deepcopy(noisy), noisy, x) is None  # each run starts from the same seed: the same masks


def test_transformers_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    reference = transformers.LlamaModel._from_config(config, attn_implementation="eager").double()
    ids = _ids(0)
    assert localize(copy.deepcopy(reference), reference, ids) is None
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(BUG)
    found = localize(model, reference, ids)
    assert (found.layer.module, found.layer.phase) == ("layers.1.mlp.up_proj", "forward")
    assert (found.op.op, found.op.module) == ("aten.mm.default", "layers.1.mlp.up_proj")


# ----------------------------------------------------------------------------------------------------- the record
def test_the_whole_story_in_one_line(reference_run, buggy_states):
    states = buggy_states
    step = first_divergence(states, reference_run[0], start=1)
    model, reference = _gpt(), _gpt()
    model.load_state_dict(states[1], strict=False)
    reference.load_state_dict(reference_run[0][1], strict=False)
    line = str(localize(model, reference, _ids(2), divergence=step))
    assert "\n" not in line
    assert line.startswith(f"step 2, parameter {BUGGY}.weight: err ")
    assert f"; first layer: {BUGGY} (forward, output 0: err " in line
    assert f"; first op: aten.addmm.default in {BUGGY} (forward, call #" in line
    before = _gpt()
    before.load_state_dict(states[0], strict=False)  # the states before step 2 agree: the update is the culprit
    assert localize(before, copy.deepcopy(before), _ids(2)) is None


def test_sequences_of_different_length_and_record_details():
    torch.manual_seed(0)
    linear = nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    shorter, longer = nn.Sequential(linear), nn.Sequential(linear, nn.Tanh())
    op = first_op(shorter, longer, x, backward=False).op
    assert (op.op, op.call, op.mismatch) == ("end of run", 1, "calls aten.tanh.default in 1 (forward)")
    op = first_op(longer, shorter, x, backward=False).op
    assert (op.op, op.module, op.mismatch) == ("aten.tanh.default", "1", "has ended")
    # the caller's .grad survive, and the whole model is named by its class
    linear.weight.grad = marker = torch.full_like(linear.weight, 7.0)
    other = copy.deepcopy(shorter)
    with torch.no_grad():
        other[0].bias.add_(1.0)
    found = localize(other, shorter, x)
    assert linear.weight.grad is marker
    assert found.layer.module == "0" and found.op.op == "aten.addmm.default"
    assert first_layer(other, shorter, x, band=lambda name, a, e: (True, 0.0, 0.0)) is None
    assert str(Divergence()) == "no divergence"
    assert Divergence(step=StepDivergence(1, "w", "parameter", 1.0, 0.5, "r")).to_dict()["step"]["name"] == "w"
    assert "op sequences part" in str(OpDivergence("aten.mm.default", 3, "m", "forward", None, None, "", "x"))


def test_relative_band_on_edge_cases():
    band = relative_band()
    inf = float("inf")
    assert band("t", torch.tensor([1.0, -inf]), torch.tensor([1.0, -inf])).passed
    assert not band("t", torch.tensor([1.0, 0.0]), torch.tensor([1.0, -inf])).passed
    assert not band("t", torch.ones(2), torch.ones(3)).passed
    assert band("t", torch.tensor([1, 2]), torch.tensor([1, 2])).passed
    assert not band("t", torch.tensor([1, 2]), torch.tensor([1, 3])).passed
    assert band("t", torch.zeros(2), torch.zeros(2)).passed
    with pytest.raises(ValueError, match="rtol"):
        relative_band(-1.0)
    with pytest.raises(ValueError, match="layers and ops"):
        localize(nn.Linear(2, 2), nn.Linear(2, 2), torch.ones(2), layers=False, ops=False)


def test_bfloat16_layers_are_banded_and_unbandable_ops_are_noted():
    config = GPTConfig.llama(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
    reference, model = GPT(config).bfloat16(), GPT(config).bfloat16()
    assert localize(model, reference, _ids(0)) is None
    with torch.no_grad():
        model.get_parameter(f"{BUGGY}.weight").mul_(1.05)  # a bug bf16's own rounding (~4e-3) cannot hide
    found = localize(model, reference, _ids(0))
    assert found.layer.module == BUGGY and found.op is None  # RMSNorm casts to float32; the float64 copy does not
    assert len(found.notes) == 1 and found.notes[0].startswith("ops compared up to call #")
    assert str(found).endswith(found.notes[0])


def test_the_checkpointing_check_names_the_module_where_recomputation_parts(monkeypatch):
    """The checkpointing check's failing dropout row says where: recomputation that does not restore the RNG state
    first differs at the last dropout of the last block, in backward."""
    import optimized.checkpointing as recompute
    from conformance.checks.checkpointing import _where_it_parts

    assert _where_it_parts("full", torch.device("cpu")) == ""  # restored: nothing parts
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: real(*a, **{**k, "preserve_rng_state": False}))
    assert "first layer: blocks.1.mlp.3 (backward" in _where_it_parts("full", torch.device("cpu"))
