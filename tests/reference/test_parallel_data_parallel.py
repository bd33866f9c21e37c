"""reference/parallel/data_parallel.py: N simulated replicas train exactly as one process on the whole batch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import one_thread, reference_run
from conformance.tolerance import within_spread
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.optimizers import AdamW
from reference.parallel import data_parallel as dp

LR, WD = 1e-2, 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():  # tiny float64 models: a second thread only waits (see _reference_runs.one_thread)
        yield


def _config(family: str) -> GPTConfig:
    shape = dict(vocab_size=32, block_size=12, n_layer=2, n_head=4, n_kv_head=2, n_embd=16)
    return GPTConfig.llama(**shape) if family == "llama" else GPTConfig(**shape)


def _batches(seed: int) -> list:
    # 12 rows divide by 1, 2, 3, 4 ranks; uneven padding, so the ranks score different numbers of tokens
    return make_batches(3, batch_size=12, seq_len=12, vocab_size=32, seed=seed, vary_length=True)


def _spec_run(config: GPTConfig, batches: list, world_size: int) -> dict[str, torch.Tensor]:
    replicas = dp.make_replicas(GPT(config).double(), world_size)
    optimizers = [AdamW(r.parameters(), lr=LR, weight_decay=WD) for r in replicas]
    losses = [dp.train_step(replicas, optimizers, batch) for batch in batches]
    final = {n: p.detach().clone() for n, p in replicas[-1].named_parameters()}
    return {**final, "loss": torch.tensor(losses, dtype=torch.float64)}


@settings(max_examples=8)
@given(world_size=st.sampled_from([1, 2, 3, 4]), family=st.sampled_from(["gpt2", "llama"]), seed=st.integers(0, 3))
def test_equals_one_process_within_rounding_spread(world_size, family, seed):
    config, batches = _config(family), _batches(seed)
    ref = reference_run(lambda: GPT(config), batches, lr=LR, weight_decay=WD)
    result = within_spread(_spec_run(config, batches, world_size), ref.final, ref.run_spread,
                           name=f"data parallel x{world_size}")
    assert result.passed, str(result)


def test_replicas_stay_bitwise_equal():
    replicas = dp.make_replicas(GPT(_config("gpt2")).double(), 3)
    optimizers = [AdamW(r.parameters(), lr=LR, weight_decay=WD) for r in replicas]
    for batch in _batches(0):
        dp.train_step(replicas, optimizers, batch, max_grad_norm=0.5)
    for replica in replicas[1:]:
        for (_, a), (_, b) in zip(replica.named_parameters(), replicas[0].named_parameters(), strict=True):
            assert torch.equal(a, b)


def test_forgotten_all_reduce_leaves_the_band(monkeypatch):
    """The yardstick can fail: replicas that never sum their gradients drift ~1e6 spreads away."""
    config, batches = _config("gpt2"), _batches(0)
    ref = reference_run(lambda: GPT(config), batches, lr=LR, weight_decay=WD)
    monkeypatch.setattr(dp, "all_reduce_gradients", lambda replicas: None)
    result = within_spread(_spec_run(config, batches, 2), ref.final, ref.run_spread, name="no all-reduce")
    assert not result.passed and result.max_error > 1e3 * ref.run_spread.value


def test_uneven_batch_is_refused():
    idx = torch.zeros(5, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="divisible by world_size=2"):
        dp.slice_batch((idx, idx), 2)
    with pytest.raises(ValueError, match="world_size"):
        dp.make_replicas(GPT(_config("gpt2")), 0)
