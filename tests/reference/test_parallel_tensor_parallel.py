"""reference/parallel/tensor_parallel.py: Megatron tensor parallelism (and sequence parallelism) on simulated ranks
computes what the unsharded model computes, in both model families."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import one_thread, reference_run, step_reference
from conformance.tolerance import within_spread
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.optimizers import AdamW
from reference.parallel import tensor_parallel as tp

LR, WD = 1e-2, 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _config(family: str, world_size: int) -> GPTConfig:
    """6 query heads cover t = 1, 2, 3; key/value heads 3 (t = 1, 3) or 2 (t = 2): GQA either way."""
    shape = dict(vocab_size=32, block_size=12, n_layer=2, n_head=6, n_kv_head=2 if world_size == 2 else 3, n_embd=24)
    return GPTConfig.llama(**shape) if family == "llama" else GPTConfig(**shape)


def _batches(vary_length: bool = True) -> list:
    return make_batches(3, batch_size=2, seq_len=12, vocab_size=32, seed=0, vary_length=vary_length)  # t | T = 12


cases = dict(world_size=st.sampled_from([1, 2, 3]), family=st.sampled_from(["gpt2", "llama"]),
             sequence_parallel=st.booleans())


@settings(max_examples=8)
@given(**cases)
def test_one_step_equals_the_reference(world_size, family, sequence_parallel):
    config, batch = _config(family, world_size), _batches()[0]
    ref, spread = step_reference(lambda: GPT(config), batch)
    models = tp.shard_model(GPT(config).double(), world_size)
    loss = tp.forward_backward(models, batch, sequence_parallel=sequence_parallel)
    got = {**tp.gather_parameters(models, grads=True), "loss": torch.tensor([loss], dtype=torch.float64)}
    result = within_spread(got, ref, spread, name=f"TP x{world_size} {family} sp={sequence_parallel}")
    assert result.passed, str(result)


@settings(max_examples=8)
@given(**cases)
def test_adamw_steps_equal_the_reference_and_replicas_agree(world_size, family, sequence_parallel):
    config, batches = _config(family, world_size), _batches()
    ref = reference_run(lambda: GPT(config), batches, lr=LR, weight_decay=WD)
    models = tp.shard_model(GPT(config).double(), world_size)
    optimizers = [AdamW(m.parameters(), lr=LR, weight_decay=WD) for m in models]
    losses = [tp.train_step(models, optimizers, b, sequence_parallel=sequence_parallel) for b in batches]
    got = {**tp.gather_parameters(models), "loss": torch.tensor(losses, dtype=torch.float64)}
    result = within_spread(got, ref.final, ref.run_spread, name=f"TP x{world_size} {family} sp={sequence_parallel}")
    assert result.passed, str(result)
    for m in models[1:]:  # replicated parameters: the same gradient on every rank, so the same update
        for (name, a), (_, b) in zip(m.named_parameters(), models[0].named_parameters(), strict=True):
            assert tp.split_dim(name) is not None or torch.equal(a, b), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sharding_then_gathering_is_exact(family):
    model = GPT(_config(family, 3))
    full = tp.gather_parameters(tp.shard_model(model, 3))
    for name, p in model.named_parameters():
        assert torch.equal(full[name], p), name


def test_forgotten_partial_gradient_reduction_leaves_the_band(monkeypatch):
    """The yardstick can fail: under sequence parallelism the norms' gradients are partial sums over the ranks'
    tokens; without their all-reduce (here: no replicated parameter lies in the region) the gradients are wrong."""
    config, batch = _config("gpt2", 2), _batches(vary_length=False)[0]  # every rank's tokens scored
    ref, spread = step_reference(lambda: GPT(config), batch)
    models = tp.shard_model(GPT(config).double(), 2)
    monkeypatch.setattr(tp, "in_sequence_region", lambda name: False)
    loss = tp.forward_backward(models, batch, sequence_parallel=True)
    got = {**tp.gather_parameters(models, grads=True), "loss": torch.tensor([loss], dtype=torch.float64)}
    result = within_spread(got, ref, spread, name="no all-reduce of the region's gradients")
    assert not result.passed and result.max_error > 1e3 * spread.value


def test_indivisible_shapes_are_refused():
    with pytest.raises(ValueError, match="n_kv_head=3"):
        tp.shard_model(GPT(_config("llama", 3)), 2)
    models = tp.shard_model(GPT(_config("gpt2", 3)), 3)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="T=4 over 3 ranks"):
        tp.forward(models, idx, idx, sequence_parallel=True)
