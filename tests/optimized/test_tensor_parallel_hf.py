"""optimized.tensor_parallel on models nobody here wrote: transformers' LlamaForCausalLM (RoPE, RMSNorm, SwiGLU,
GQA) and GPT2LMHeadModel (Conv1D, fused c_attn, tied head), tiny random configs built from a config (no download),
parallelised with the ready plans (`parallelize(model)`) on 2 and 3 gloo ranks, against the same model in one
process, float64: the gathered logits, the loss through the model's own `labels=` path (the vocab-parallel loss
installed as its loss_function, against the float64 shifted cross-entropy) and every all-gathered gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from conformance.launch import spawn
from optimized.tensor_parallel import gather_from_region, gather_full, parallelize, plan_for

transformers = pytest.importorskip("transformers")

TIMEOUT = 120.0


def _model(family: str, t: int):
    """A tiny random model whose heads and vocabulary divide by t (GQA 2:1 for Llama)."""
    heads = 2 * t
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=8 * heads, intermediate_size=24 * t,
                                       num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=t,
                                       max_position_embeddings=32, attn_implementation="eager")
        return transformers.LlamaForCausalLM(cfg).double()
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=8 * heads, n_layer=2, n_head=heads, n_positions=32,
                                  bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).double()


def _worker(family: str) -> dict:
    t = dist.get_world_size()
    dense = _model(family, t)
    tp = parallelize(copy.deepcopy(dense))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 11), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    want = dense(ids)
    # transformers' own ForCausalLMLoss computes in fp32 (`logits.float()`): the float64 reference is spelled out
    want.loss = torch.nn.functional.cross_entropy(want.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1))
    want.loss.backward()
    got = tp(ids, labels=labels)
    got.loss.backward()
    logits = gather_from_region(got.logits)  # (B, T, V) from this rank's (B, T, V/t)
    grads = gather_full(tp, grads=True)
    errors = {"logits": (logits - want.logits).abs().max().item(), "loss": abs(got.loss.item() - want.loss.item())}
    dense_grads = {n: p.grad for n, p in dense.named_parameters()}
    assert grads.keys() == dense_grads.keys()
    for name, g in grads.items():
        errors[name] = (g - dense_grads[name]).abs().max().item() / dense_grads[name].abs().max().item()
    local_vocab = got.logits.size(-1)
    return {"errors": errors, "local_vocab": local_vocab, "plan": sorted(plan_for(dense))}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ready_plan_equals_one_process(family, world_size):
    results = spawn(_worker, world_size, family, timeout=TIMEOUT)
    for rank, res in enumerate(results):
        assert res["local_vocab"] == 96 // world_size
        bad = {k: e for k, e in res["errors"].items() if not e < 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def _llama_style_worker() -> dict:
    """The project's GPT in its Llama-style family (RMSNorm, RoPE, SwiGLU with a shared f for gate and up, GQA 4:2,
    untied head), float64, through parallelize(model) and its pluggable loss."""
    from reference.model import GPT, GPTConfig

    cfg = GPTConfig.llama(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    dense = GPT(cfg).double()
    tp = parallelize(copy.deepcopy(dense))
    gen = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, 32, (2, 9), generator=gen), torch.randint(0, 32, (2, 9), generator=gen)
    want_logits, want = dense(idx, targets)
    want.backward()
    logits, got = tp(idx, targets)
    got.backward()
    errors = {"logits": (gather_from_region(logits) - want_logits).abs().max().item(),
              "loss": abs(got.item() - want.item())}
    for name, g in gather_full(tp, grads=True).items():
        ref = dict(dense.named_parameters())[name].grad
        errors[name] = ((g - ref).abs().max() / ref.abs().max()).item()
    return errors


def test_llama_style_project_gpt_equals_one_process():
    for rank, errors in enumerate(spawn(_llama_style_worker, 2, timeout=TIMEOUT)):
        bad = {k: e for k, e in errors.items() if not e < 1e-10}
        assert not bad and len(errors) > 10, f"rank {rank}: {bad}"


def _fused_gqa_worker() -> list[float]:
    """A fused [q; k; v] projection with GQA widths (32, 16, 16), as nn.Linear and as Conv1D storage: each rank's
    output is its slice of q, of k and of v; unshard gives back the full weight."""
    from optimized.tensor_parallel import ColumnParallelLinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 64).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    rank, t = dist.get_rank(), dist.get_world_size()
    want = torch.cat([part.chunk(t, dim=-1)[rank] for part in dense(x).split((32, 16, 16), dim=-1)], dim=-1)
    layer = ColumnParallelLinear.from_dense(dense, sections=(32, 16, 16))
    errors = [(layer(x) - want).abs().max().item()]
    parts = [torch.empty_like(layer.weight) for _ in range(t)]
    dist.all_gather(parts, layer.weight.detach().contiguous())
    errors.append((layer.unshard("weight", parts) - dense.weight).abs().max().item())
    conv = transformers.pytorch_utils.Conv1D(64, 16).double()
    with torch.no_grad():
        conv.weight.copy_(dense.weight.t())
        conv.bias.copy_(dense.bias)
    errors.append((ColumnParallelLinear.from_dense(conv, sections=(32, 16, 16))(x) - want).abs().max().item())
    return errors


def test_fused_gqa_projection_splits_each_section():
    for errors in spawn(_fused_gqa_worker, 2, timeout=TIMEOUT):
        assert max(errors) < 1e-14, errors
