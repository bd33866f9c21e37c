"""Activation checkpointing: gradients bitwise equal to the unwrapped model's (fp32), bytes saved for backward equal
to reference.memory's count for each policy, and the model wrappers it must compose with.

One spawn on 2 gloo ranks runs DataParallel, ZeroOptimizer stage 3 and tensor parallelism with every policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.launch import spawn
from conformance.measure import saved_tensor_bytes
from optimized.checkpointing import apply_activation_checkpointing, checkpointed_modules
from reference import memory
from reference.model import GPT, GPTConfig

POLICIES = ("none", "selective", "full")
FAMILIES = ["gpt"] + (["llama"] if hasattr(GPTConfig, "llama") else [])
"""The tiny GPT and, where reference.model has it, the Llama-style configuration of the same model."""


def _model(config: GPTConfig, policy: str, attention=None) -> GPT:
    model = GPT(config, attention=attention)
    return model if policy == "none" else apply_activation_checkpointing(model, policy)


def _grads(model, idx, targets) -> list[torch.Tensor]:
    _, loss = model(idx, targets)
    loss.backward()
    return [p.grad for p in model.parameters()]


def _batch(config: GPTConfig, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (batch, seq), generator=g)  # (B, T)
    return idx, torch.randint(0, config.vocab_size, (batch, seq), generator=g)  # (B, T)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3, deadline=None)
@given(batch=st.integers(1, 3), seq=st.sampled_from([1, 7, 16]), heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
       n_layer=st.integers(1, 3), flash=st.booleans())
def test_gradients_are_bitwise_those_of_the_unwrapped_model(family, batch, seq, heads, n_layer, flash):
    from optimized.attention import flash_attention

    shape = dict(n_layer=n_layer, n_head=heads[0], n_kv_head=heads[1], n_embd=heads[0] * 4, block_size=16)
    config = GPTConfig.llama(**shape) if family == "llama" else GPTConfig(**shape)
    idx, targets = _batch(config, batch, seq)
    attention = flash_attention if flash else None
    expected = _grads(_model(config, "none", attention), idx, targets)
    for policy in ("selective", "full"):
        got = _grads(_model(config, policy, attention), idx, targets)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), policy


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), seq=st.sampled_from([2, 5, 16]), heads=st.sampled_from([(4, 4), (4, 2), (3, 1)]),
       head_dim=st.sampled_from([4, 8]))
def test_saved_bytes_equal_the_formula_and_are_ordered_full_selective_none(batch, seq, heads, head_dim):
    config = GPTConfig(n_layer=1, n_head=heads[0], n_kv_head=heads[1], n_embd=heads[0] * head_dim, block_size=16)
    saved = {}
    for policy in POLICIES:
        model = _model(config, policy)
        x = torch.randn(batch, seq, config.n_embd, requires_grad=True)  # (B, T, C)
        _, saved[policy] = saved_tensor_bytes(model.blocks[0], x, exclude=list(model.parameters()))
        assert saved[policy] == memory.activation_bytes_per_layer(config, batch, seq, recompute=policy), policy
    assert saved["full"] < saved["selective"] < saved["none"]


def test_pipeline_stages_and_explicit_layer_names():
    from optimized.pipeline.split import split

    config = GPTConfig(n_layer=3)
    idx, targets = _batch(config, 2, 12)
    expected = _grads(GPT(config), idx, targets)
    model = GPT(config)
    stages = split(model, 2)
    for stage in stages:
        apply_activation_checkpointing(stage, "full")
    x = idx
    for stage in stages[:-1]:
        x = stage(x)
    (stages[-1](x, targets) / targets.numel()).backward()
    got = [p.grad for p in model.parameters()]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)  # the summed loss / T differs from mean by rounding
    assert checkpointed_modules(model) == ["blocks.0", "blocks.1", "blocks.2"]

    named = apply_activation_checkpointing(GPT(config), "selective", layers=["blocks.1"])
    assert checkpointed_modules(named) == ["blocks.1.attn"]
    regex = apply_activation_checkpointing(GPT(config), "full", layers=r"blocks\.[02]")
    assert checkpointed_modules(regex) == ["blocks.0", "blocks.2"]
    assert not torch.is_grad_enabled() or regex(idx)[0].shape == (2, 12, config.vocab_size)
    with torch.no_grad():  # no recomputation without autograd: the plain forward runs
        assert torch.equal(regex(idx)[0], GPT(config)(idx)[0])


@pytest.mark.parametrize("call, match", [
    (lambda m: apply_activation_checkpointing(m, "ful"), r"policy must be one of .* \(did you mean 'full'"),
    (lambda m: apply_activation_checkpointing(m, None), "policy must be one of"),
    (lambda m: apply_activation_checkpointing(m, layers=r"block\.\d+"), r"matches no module name"),
    (lambda m: apply_activation_checkpointing(m, layers=["blocks.7"]), r"no module named 'blocks.7'; close"),
    (lambda m: apply_activation_checkpointing(m, layers=[]), "non-empty list of module names"),
    (lambda m: apply_activation_checkpointing(m, layers="(["), "not a valid regular expression"),
    (lambda m: apply_activation_checkpointing(torch.nn.Linear(2, 2)), "found no transformer blocks"),
    (lambda m: apply_activation_checkpointing(m, "selective", layers=["blocks.0.mlp"]),
     "has 0 such attributes and 0 such modules: use policy='full'"),
    (lambda m: apply_activation_checkpointing(apply_activation_checkpointing(m), layers=["blocks.1"]),
     "'blocks.1' is already checkpointed"),
    (lambda m: apply_activation_checkpointing(apply_activation_checkpointing(m, "selective"), "selective"),
     "already checkpointed"),
    (lambda m: apply_activation_checkpointing(apply_activation_checkpointing(m, "selective"), "full"),
     "'blocks.0' is already checkpointed"),
])
def test_bad_input_is_named_and_changes_nothing(call, match):
    model = GPT(GPTConfig())
    with pytest.raises(ValueError, match=match):
        call(model)
    partial = GPT(GPTConfig())
    with pytest.raises(ValueError):
        apply_activation_checkpointing(partial, layers=["blocks.0", "nope"])
    assert checkpointed_modules(partial) == []


# --- with the distributed wrappers, 2 ranks ---------------------------------------------------------------------------


def _distributed_worker():
    import torch.distributed as dist
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from optimized.data_parallel import DataParallel
    from optimized.tensor_parallel import gather_full, megatron_plan, parallelize
    from optimized.zero import ZeroOptimizer

    rank = dist.get_rank()
    config = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    idx, targets = _batch(config, 4, 11, seed=rank)
    out = {}
    for policy in POLICIES:
        dp = DataParallel(_model(config, policy))
        dp(idx, targets)[1].backward()
        out["dp", policy] = [p.grad.clone() for p in dp.parameters()]

        for early_stop in (True, False):  # without early stop the recomputation runs every module's hooks
            model = _model(config, policy)
            zero = ZeroOptimizer(model, torch.optim.AdamW, stage=3, lr=1e-2)
            with set_checkpoint_early_stop(early_stop):
                for step in range(2):
                    zero.zero_grad()
                    model(*_batch(config, 4, 11, seed=10 * step + rank))[1].backward()
                    zero.step()
            with zero.gathered_parameters():
                out["zero3" if early_stop else "zero3, no early stop", policy] = [
                    p.detach().clone() for p in model.parameters()]

        tp = GPT(config)
        tp = parallelize(tp, megatron_plan(tp))
        if policy != "none":
            apply_activation_checkpointing(tp, policy)
        _, loss = tp(idx, targets)
        loss.backward()
        out["tp", policy] = gather_full(tp, grads=True)
    return out


def test_dataparallel_zero3_and_tensor_parallel_gradients_are_bitwise_unchanged():
    for rank, out in enumerate(spawn(_distributed_worker, 2, timeout=240.0)):
        for wrapper in ("dp", "zero3", "zero3, no early stop", "tp"):
            expected = out[wrapper, "none"]
            for policy in ("selective", "full"):
                got = out[wrapper, policy]
                if isinstance(expected, dict):
                    assert got.keys() == expected.keys()
                    got, expected_list = list(got.values()), list(expected.values())
                else:
                    expected_list = expected
                same = all(torch.equal(a, b) for a, b in zip(got, expected_list, strict=True))
                assert same, f"rank {rank}: {wrapper} with policy={policy}"
