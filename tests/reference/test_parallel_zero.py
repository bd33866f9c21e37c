"""reference/parallel/zero.py: ZeRO-1/2/3 on simulated ranks trains as one process, and holds the bytes the memory
model says each rank holds."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import one_thread, reference_run
from conformance.tolerance import within_spread
from reference import memory
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.parallel import zero

LR, WD = 1e-2, 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _config(tie: bool) -> GPTConfig:
    # Ψ = 9535 tied (divides by none of 2, 3, 4: the last slices carry padding) or 10260 untied (divides by all)
    return GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=5, n_kv_head=1, n_embd=25, mlp_ratio=2,
                     tie_embeddings=tie)


def _batches(seed: int = 0) -> list:
    return make_batches(3, batch_size=12, seq_len=12, vocab_size=29, seed=seed, vary_length=True)


def _spec_run(config: GPTConfig, batches: list, world_size: int, stage: int, rank: int) -> dict[str, torch.Tensor]:
    spec = zero.Zero(GPT(config).double(), world_size, stage, lr=LR, weight_decay=WD)
    losses = [spec.train_step(batch) for batch in batches]
    return {**spec.full_parameters(rank), "loss": torch.tensor(losses, dtype=torch.float64)}


@settings(max_examples=10)
@given(world_size=st.sampled_from([1, 2, 3, 4]), stage=st.sampled_from(zero.STAGES), tie=st.booleans(),
       data=st.data())
def test_equals_one_process_within_rounding_spread(world_size, stage, tie, data):
    config, batches = _config(tie), _batches()
    rank = data.draw(st.integers(0, world_size - 1), label="rank")
    ref = reference_run(lambda: GPT(config), batches, lr=LR, weight_decay=WD)
    result = within_spread(_spec_run(config, batches, world_size, stage, rank), ref.final, ref.run_spread,
                           name=f"ZeRO-{stage} x{world_size}, rank {rank}")
    assert result.passed, str(result)


@pytest.mark.parametrize("stage", zero.STAGES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_bytes_equal_the_memory_model(world_size, stage):
    """fp32, after one step: parameters, gradients and AdamW state (m, v of the owned elements, a 4-byte step)."""
    spec = zero.Zero(GPT(_config(tie=True)), world_size, stage)
    spec.train_step(_batches()[0])
    psi = spec.numel
    assert psi % world_size or world_size == 1  # the padding is exercised
    for rank in range(world_size):
        expected = memory.zero_rank_bytes([psi], world_size=world_size, rank=rank, stage=stage,
                                          precision=memory.FP32, scalar_state_bytes=4)
        got = spec.rank_bytes(rank)
        assert got == dict(params=expected.params, grads=expected.grads, optimizer=expected.optimizer), rank


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_partition_covers_the_flat_vector_once(world_size):
    spec = zero.Zero(GPT(_config(tie=True)), world_size, stage=3)
    owned = [zero.owned_numel(spec.numel, world_size, r) for r in range(world_size)]
    assert sum(owned) == spec.numel
    assert 0 < world_size * spec.shard - spec.numel < world_size  # padding: fewer than N elements
    bounds = [lo for _, lo, _ in spec.layers] + [spec.layers[-1][2]]
    assert bounds[0] == 0 and bounds[-1] == spec.numel
    assert all(hi == bounds[i + 1] for i, (_, _, hi) in enumerate(spec.layers))  # each layer starts where one ends


def test_unreduced_gradients_leave_the_band(monkeypatch):
    """The yardstick can fail: ZeRO-2 whose reduce-scatter forgets the sum (rank r keeps its own gradient's chunk)."""
    config, batches = _config(tie=True), _batches()
    ref = reference_run(lambda: GPT(config), batches, lr=LR, weight_decay=WD)
    monkeypatch.setattr(zero.ranks, "reduce_scatter",
                        lambda shards, dim=0: [s.chunk(len(shards))[r] for r, s in enumerate(shards)])
    result = within_spread(_spec_run(config, batches, 2, 2, 0), ref.final, ref.run_spread, name="no reduction")
    assert not result.passed and result.max_error > 1e3 * ref.run_spread.value


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="stage must be one of"):
        zero.Zero(GPT(_config(tie=True)), 2, stage=0)
    with pytest.raises(ValueError, match="world_size must be"):
        zero.Zero(GPT(_config(tie=True)), 0, stage=1)
