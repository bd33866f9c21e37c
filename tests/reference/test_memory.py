"""The memory model: the ZeRO paper's numbers, the exact per-rank bytes, the tiny GPT's parameters and activations.

Activation formulas are held to what autograd actually saves (conformance.measure.saved_tensor_bytes) for one
block of reference.model.GPT, with the naive reference attention and with torch's CPU FlashAttention kernel.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from conformance.measure import saved_tensor_bytes
from reference import memory
from reference.model import GPT, Block, GPTConfig

GB = 1e9


def test_the_zero_papers_example():
    """ZeRO Fig. 1: Ψ = 7.5B, Nd = 64, mixed-precision Adam (K = 12): 120, 31.4, 16.6, 1.9 GB per device."""
    got = [memory.model_state_bytes(7.5e9, world_size=64, stage=s).device / GB for s in (0, 1, 2, 3)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


def test_the_seeds_4x_and_8x_are_limits_of_the_mixed_precision_accounting():
    assert memory.memory_reduction_limit(1) == 4.0 and memory.memory_reduction_limit(2) == 8.0
    assert memory.memory_reduction_limit(3) == math.inf
    assert memory.memory_reduction_limit(1, memory.FP32) == 2.0 and memory.memory_reduction_limit(2, memory.FP32) == 4.0
    assert memory.memory_reduction(64, 1) == pytest.approx(16 / (4 + 12 / 64))  # 3.82x, below the limit
    assert memory.memory_reduction(64, 2) == pytest.approx(16 / (2 + 14 / 64))  # 7.21x
    assert memory.memory_reduction(64, 3) == pytest.approx(64.0)
    assert memory.memory_reduction(1, 2) == 1.0  # one rank: nothing to shard


def test_communication_is_2psi_for_dp_and_stages_1_2_and_3psi_for_stage_3():
    assert [memory.communication_elements(10.0, s) for s in (0, 1, 2, 3)] == [20.0, 20.0, 20.0, 30.0]


def test_offload_moves_the_optimizer_and_an_fp32_gradient_slice_to_the_host():
    m = memory.model_state_bytes(1000, world_size=4, stage=2, offload=True)
    assert (m.params, m.grads, m.optimizer) == (2000, 0, 0)  # bf16 parameters only
    assert (m.host_grads, m.host_optimizer) == (1000, 3000)  # (4 + 12) Ψ / Nd
    f = memory.model_state_bytes(1000, world_size=4, stage=1, precision=memory.FP32, offload=True)
    assert (f.params, f.grads, f.host_optimizer) == (4000, 4000, 3000)  # host: fp32 master copy + m + v
    with pytest.raises(ValueError, match="offload needs a ZeRO stage"):
        memory.model_state_bytes(1000, stage=0, offload=True)


def test_tensor_and_pipeline_parallel_divide_psi_first():
    a = memory.model_state_bytes(8e9, world_size=8, stage=2, tp=2, pp=4)
    b = memory.model_state_bytes(1e9, world_size=8, stage=2)
    assert a == b
    assert memory.layers_per_stage(10, 4) == 3 and memory.layers_per_stage(8, 4) == 2


@settings(max_examples=40, deadline=None)
@given(numels=st.lists(st.integers(1, 5000), min_size=1, max_size=3), world=st.integers(1, 4),
       stage=st.sampled_from([1, 2, 3]), mixed=st.booleans(), offload=st.booleans())
def test_exact_bytes_add_up_to_the_papers_formula_plus_padding(numels, world, stage, mixed, offload):
    """Summed over ranks, the optimizer state is exactly K·Ψ (padding never holds state); per rank, the exact
    bytes are the paper's formula plus at most the padding, which is under Nd elements per flat buffer."""
    precision = memory.MIXED if mixed else memory.FP32
    psi = sum(numels)
    ranks = [memory.zero_rank_bytes(numels, world_size=world, rank=r, stage=stage, precision=precision,
                                    offload=offload) for r in range(world)]
    paper = memory.model_state_bytes(psi, world_size=world, stage=stage, precision=precision, offload=offload)
    total_opt = sum(r.optimizer + r.host_optimizer for r in ranks)
    assert total_opt == (precision.optimizer if not offload else 4 + precision.optimizer - precision.master) * psi
    assert sum(memory.owned_numel(n, world, r) for n in numels for r in range(world)) == psi
    slack = len(numels) * world * (precision.param + precision.grad)  # padding elements x bytes, generous
    for r in ranks:
        assert paper.params <= r.params <= paper.params + slack
        assert r.grads <= paper.grads + slack


@pytest.mark.parametrize("config", [
    GPTConfig(), GPTConfig(vocab_size=37, n_head=5, n_embd=25, bias=False),
    GPTConfig(n_kv_head=2, tie_embeddings=False),
    GPTConfig(n_layer=3, n_head=4, n_kv_head=1, mlp_ratio=2),
])
def test_gpt_parameter_count(config):
    assert memory.gpt_parameters(config) == GPT(config).num_parameters()


def test_tensor_parallel_splits_the_projections_and_the_vocabulary_and_replicates_the_rest():
    config = GPTConfig(n_head=4, n_kv_head=2, n_embd=64)
    whole, half = memory.gpt_parameters(config), memory.gpt_parameters(config, tp=2)
    c, b = config.n_embd, 1
    replicated = config.n_layer * (2 * (c + c * b) + 2 * c * b) + config.block_size * c + 2 * c
    assert 2 * half - replicated == whole
    odd = GPTConfig(vocab_size=65, n_head=4, n_embd=64, tie_embeddings=False)
    one_row = dataclasses.replace(odd, vocab_size=1)
    # wte and the untied head each keep ceil(65 / 4) = 17 of their 65 rows on every one of 4 ranks
    assert memory.gpt_parameters(odd, tp=4) - memory.gpt_parameters(one_row, tp=4) == 2 * (17 - 1) * 64
    with pytest.raises(ValueError, match="tp=3 must divide"):
        memory.gpt_parameters(config, tp=3)


def _block_saved_bytes(config: GPTConfig, batch: int, seq: int, attention) -> int:
    torch.manual_seed(0)
    block = Block(config, attention)
    x = torch.randn(batch, seq, config.n_embd, requires_grad=True)
    _, saved = saved_tensor_bytes(block, x, exclude=list(block.parameters()))
    return saved


def _sdpa(q, k, v, is_causal=True):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), seq=st.sampled_from([1, 2, 7, 13, 16]), heads=st.sampled_from([(4, 4), (4, 2), (3, 1),
       (6, 3)]), head_dim=st.sampled_from([4, 5, 8]), bias=st.booleans(), mlp_ratio=st.sampled_from([2, 4]))
def test_activation_bytes_per_layer_equal_what_autograd_saves(batch, seq, heads, head_dim, bias, mlp_ratio):
    from reference.attention import attention

    config = GPTConfig(n_head=heads[0], n_kv_head=heads[1], n_embd=heads[0] * head_dim, bias=bias, mlp_ratio=mlp_ratio,
                       block_size=16)
    naive = memory.activation_bytes_per_layer(config, batch, seq, attention="naive")
    flash = memory.activation_bytes_per_layer(config, batch, seq, attention="flash")
    assert naive == _block_saved_bytes(config, batch, seq, attention)
    assert flash == _block_saved_bytes(config, batch, seq, _sdpa)


def test_naive_attention_memory_is_quadratic_in_sequence_length_and_flash_is_linear():
    config = GPTConfig(n_head=4, n_embd=64, block_size=4096)
    naive = [memory.activation_bytes_per_layer(config, 1, s) for s in (1024, 2048)]
    flash = [memory.activation_bytes_per_layer(config, 1, s, attention="flash") for s in (1024, 2048)]
    assert flash[1] == 2 * flash[0]
    assert naive[1] > 3.5 * naive[0]
    split = memory.activation_bytes_per_layer(config, 2, 16, tp=2)
    assert split < memory.activation_bytes_per_layer(config, 2, 16)


@pytest.mark.parametrize("call, match", [
    (lambda: memory.model_state_bytes(10, stage=4), "stage must be one of"),
    (lambda: memory.model_state_bytes(10, world_size=0), "world_size must be an integer >= 1"),
    (lambda: memory.model_state_bytes(-1), "num_params must be >= 0"),
    (lambda: memory.owned_numel(10, 2, 2), "rank must be in"),
    (lambda: memory.activation_bytes_per_layer(GPTConfig(), 1, 4, attention="linear"), "attention must be"),
    (lambda: memory.zero_rank_bytes([10], world_size=2, rank=0, stage=0), "counts a ZeRO stage"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- activation recomputation and context parallelism ---------------------------------------------------------------


def test_korthikantis_counts_and_their_ordering():
    """Sec. 4-5: sbh(34 + 5as/h) without recomputation, 34·sbh selective, 2·sbh full (t = 1)."""
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B
    none, selective, full = (memory.korthikanti_activation_bytes(s, b, h, a, recompute=r)
                             for r in memory.RECOMPUTE_POLICIES)
    assert (none, selective, full) == (s * b * h * (34 + 5 * a * s / h), 34 * s * b * h, 2 * s * b * h)
    assert memory.korthikanti_activation_bytes(s, b, h, a, tp=8) == s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8))


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 4), seq=st.integers(1, 64), heads=st.sampled_from([(4, 4), (4, 2), (8, 1)]),
       attention=st.sampled_from(["naive", "flash"]))
def test_recompute_policies_keep_strictly_less(batch, seq, heads, attention):
    config = GPTConfig(n_head=heads[0], n_kv_head=heads[1], n_embd=8 * heads[0], block_size=64)
    none, selective, full = (memory.activation_bytes_per_layer(config, batch, seq, attention=attention, recompute=r)
                             for r in memory.RECOMPUTE_POLICIES)
    assert full == 4 * batch * seq * config.n_embd
    assert full < selective <= none
    if attention == "naive":  # the a·b·s² of P is what selective drops (and the mask, and the repeated k, v)
        assert none - selective >= 4 * heads[0] * batch * seq * seq


def test_recompute_flops():
    config = GPTConfig(n_head=4, n_embd=64, block_size=128)
    b, s, h = 2, 128, 64
    total, core = memory.layer_forward_flops(config, b, s)
    assert (total, core) == (24 * b * s * h * h + 4 * b * s * s * h, 4 * b * s * s * h)  # Korthikanti Sec. 5, MHA, 4h
    assert [memory.recompute_flops_per_layer(config, b, s, r) for r in memory.RECOMPUTE_POLICIES] == [0, core, total]


@pytest.mark.parametrize("call, match", [
    (lambda: memory.activation_bytes_per_layer(GPTConfig(), 1, 4, recompute="half"), "recompute must be one of"),
    (lambda: memory.korthikanti_activation_bytes(1, 1, 1, 1, recompute="x"), "recompute must be one of"),
    (lambda: memory.ring_attention_bytes_sent(GPTConfig(), 1, 6, cp=4), "multiple of cp=4"),
    (lambda: memory.context_parallel_activation_bytes_per_layer(GPTConfig(), 1, 8, cp=0), "cp must be an integer"),
])
def test_recompute_and_cp_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
