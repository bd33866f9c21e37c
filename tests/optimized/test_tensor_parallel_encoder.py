"""optimized.tensor_parallel on a causal LM made of torch's own layers (nn.TransformerEncoder, whose self-attention is
an nn.MultiheadAttention with a bare in_proj_weight), parallelised with the ready plan (`parallelize(model)` ->
transformer_encoder_plan: self_attn "mha", linear1 colwise, linear2 rowwise) on 2 and 3 gloo ranks against the same
model in one process, float64: the logits and every all-gathered gradient, with the causal mask and a key padding
mask, batch_first True and False, post- and pre-norm layers; a differently initialised parallel model loading the
unsplit state dict; eval under no_grad (where torch's fused and nested-tensor encoder paths run on the dense model);
the attention alone with a per-head 3-D bool mask and cross-attention. Bad input: heads not divisible by the TP
degree, need_weights=True, the style on a module that is not an nn.MultiheadAttention or with its children planned."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from conformance.launch import spawn
from optimized.tensor_parallel import ParallelMultiheadAttention, gather_full, load_full, parallelize, plan_for

TIMEOUT = 120.0
VOCAB = 40


class EncoderLM(nn.Module):
    """A causal LM on torch's nn.TransformerEncoder: embedding, causal encoder, head (biases everywhere)."""

    def __init__(self, heads: int = 6, width: int = 24, batch_first: bool = True, norm_first: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first, self.norm_first = batch_first, norm_first
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, nhead=heads, dim_feedforward=36, dropout=0.0,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(width, VOCAB)
        with torch.no_grad():  # nn.MultiheadAttention zeroes its biases: make them count
            for p in self.parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.1)

    def forward(self, idx: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)  # (T, T)
        x = self.embed(idx)  # (B, T, C)
        x = x if self.batch_first else x.transpose(0, 1)
        x = self.encoder(x, mask=mask, src_key_padding_mask=key_padding_mask, is_causal=True)
        return self.head(x if self.batch_first else x.transpose(0, 1))  # (B, T, V)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (3, 7), generator=gen)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True  # right padding: every query keeps an unmasked key
    pad[2, 6:] = True
    return idx, pad


def _train_errors(dense: nn.Module) -> dict[str, float]:
    tp = parallelize(copy.deepcopy(dense))
    fresh = parallelize(EncoderLM(batch_first=dense.batch_first, norm_first=dense.norm_first, seed=5).double())
    load_full(fresh, dense.state_dict())  # a checkpoint of the unsplit model, by its own names
    errors = {f"load_full:{n}": (p - dense.get_parameter(n)).abs().max().item() for n, p in gather_full(fresh).items()}
    idx, pad = _inputs()
    weights = torch.randn(3, 7, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for kpm in (None, pad):
        dense.zero_grad()
        tp.zero_grad()
        want = dense(idx, kpm)
        (want * weights).sum().backward()
        got = tp(idx, kpm)  # the head is whole: every rank has the full logits
        (got * weights).sum().backward()
        key = "pad" if kpm is not None else "nopad"
        errors[f"{key}:logits"] = (got - want).abs().max().item()
        grads = gather_full(tp, grads=True)
        dense_grads = {n: p.grad for n, p in dense.named_parameters()}
        assert grads.keys() == dense_grads.keys()
        for name, g in grads.items():
            errors[f"{key}:{name}"] = ((g - dense_grads[name]).abs().max() / dense_grads[name].abs().max()).item()
    # eval under no_grad: the dense model takes torch's fused/nested paths, the parallel one its plain forward
    dense.eval()
    tp.eval()
    with torch.no_grad():
        keep = ~pad.unsqueeze(-1)  # the nested path writes zeros at padded positions
        errors["eval:logits"] = ((tp(idx, pad) - dense(idx, pad)) * keep).abs().max().item()
        # padding without an attention mask: the dense encoder runs on nested tensors
        x = dense.embed(idx) if dense.batch_first else dense.embed(idx).transpose(0, 1)
        keep = keep if dense.batch_first else keep.transpose(0, 1)
        diff = tp.encoder(x, src_key_padding_mask=pad) - dense.encoder(x, src_key_padding_mask=pad)
        errors["eval:encoder_padding_only"] = (diff * keep).abs().max().item()
    return errors


def _worker() -> dict:
    t = dist.get_world_size()
    errors = {}
    for batch_first, norm_first in ((True, False), (False, True)):
        dense = EncoderLM(batch_first=batch_first, norm_first=norm_first).double()
        assert plan_for(dense) == {"encoder.layers.*.self_attn": "mha", "encoder.layers.*.linear1": "colwise",
                                   "encoder.layers.*.linear2": "rowwise"}
        for k, e in _train_errors(dense).items():
            errors[f"batch_first={batch_first},norm_first={norm_first}:{k}"] = e
    # the attention alone: a per-head (B*H, T, S) bool mask (True = masked out) with padding, and cross-attention
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(24, 6, batch_first=True).double()
    par = ParallelMultiheadAttention.from_dense(mha)
    assert par.local_heads == 6 // t and par.in_proj_weight.shape == (3 * 24 // t, 24)
    x, mem = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 4, 24, dtype=torch.float64)
    per_head = torch.rand(2 * 6, 5, 5) < 0.4
    per_head[..., 0] = False
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    pairs = {"per_head_mask": ((x, x, x), dict(attn_mask=per_head, key_padding_mask=pad)),
             "cross": ((x, mem, mem), {})}
    for name, (args, kw) in pairs.items():
        want = mha(*args, need_weights=False, **kw)[0]
        errors[name] = (par(*args, need_weights=False, **kw)[0] - want).abs().max().item()
    return errors


@pytest.mark.parametrize("world_size", [2, 3])
def test_encoder_lm_equals_one_process(world_size):
    for rank, errors in enumerate(spawn(_worker, world_size, timeout=TIMEOUT)):
        bad = {k: e for k, e in errors.items() if not e < 1e-10}
        assert not bad and len(errors) > 40, f"rank {rank}: {bad}"


def _attention_worker(heads_per_rank: int, head_dim: int, B: int, T: int, S: int, batch_first: bool, mask: str,
                      bias: bool) -> dict[str, float]:
    """ParallelMultiheadAttention alone vs nn.MultiheadAttention: output, input and parameter gradients; and built
    from scratch, its shards are the slices of the whole layer drawn from the same seed."""
    t, rank = dist.get_world_size(), dist.get_rank()
    H = heads_per_rank * t
    E = H * head_dim
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first).double()
    with torch.no_grad():
        for p in mha.parameters():
            if p.dim() == 1:
                p.normal_()
    par = ParallelMultiheadAttention.from_dense(mha)
    q = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
    kv = q if S == T else torch.randn(B, S, E, dtype=torch.float64, requires_grad=True)
    kw = {"causal": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64),
                         is_causal=True),
          "bool2d": dict(attn_mask=(torch.rand(T, S) < 0.5).index_fill(1, torch.tensor([0]), False)),
          "float3d": dict(attn_mask=torch.randn(B * H, T, S, dtype=torch.float64)),
          "padding": dict(key_padding_mask=(torch.rand(B, S) < 0.5).index_fill(1, torch.tensor([0]), False)),
          "none": {}}[mask]
    weight = torch.randn(B, T, E, dtype=torch.float64)
    errors, grads = {}, {}
    for name, module in (("dense", mha), ("parallel", par)):
        x, mem = (q, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1))
        y = module(x, mem, mem, need_weights=False, **kw)[0]
        y = y if batch_first else y.transpose(0, 1)  # (B, T, E)
        (y * weight).sum().backward()
        grads[name] = {"output": y.detach(), "query grad": q.grad.clone(), "key grad": kv.grad.clone()}
        q.grad = kv.grad = None
    grads["parallel"].update({f"{n} grad": g for n, g in gather_full(par, grads=True).items()})
    grads["dense"].update({f"{n} grad": p.grad for n, p in mha.named_parameters()})
    for name, want in grads["dense"].items():
        errors[name] = ((grads["parallel"][name] - want).abs().max() / want.abs().max().clamp(min=1e-300)).item()
    single = dist.new_group([rank])
    whole = gather_full(ParallelMultiheadAttention(E, H, bias, seed=3, process_group=single))
    for name, p in gather_full(ParallelMultiheadAttention(E, H, bias, seed=3)).items():
        errors[f"init {name}"] = (p - whole[name]).abs().max().item()
    return errors


@settings(max_examples=2, deadline=None)
@given(
    world_size=st.sampled_from([2, 3]),
    heads_per_rank=st.integers(1, 2),
    head_dim=st.integers(1, 4),
    B=st.integers(1, 3), T=st.integers(1, 5), S=st.integers(1, 5),  # batch, target and source lengths
    batch_first=st.booleans(),
    mask=st.sampled_from(["none", "causal", "bool2d", "float3d", "padding"]),
    bias=st.booleans(),
)
@example(world_size=3, heads_per_rank=2, head_dim=3, B=2, T=4, S=4, batch_first=False, mask="float3d", bias=True)
@example(world_size=2, heads_per_rank=1, head_dim=2, B=3, T=3, S=5, batch_first=True, mask="padding", bias=False)
def test_attention_equals_nn_multihead_attention(world_size, heads_per_rank, head_dim, B, T, S, batch_first, mask,
                                                 bias):
    S = T if mask == "causal" else S  # the causal mask is square
    errors = spawn(_attention_worker, world_size, heads_per_rank, head_dim, B, T, S, batch_first, mask, bias,
                   timeout=TIMEOUT)
    for rank, errs in enumerate(errors):
        bad = {k: e for k, e in errs.items() if not e < 1e-10}
        assert not bad and len(errs) >= 6, f"rank {rank}: {bad}"


def _bad_input_worker() -> list[str]:
    messages = []
    with pytest.raises(ValueError, match=r"num_heads=3 must be divisible by the tensor-parallel size 2") as err:
        parallelize(EncoderLM(heads=3).double())  # refused before any collective: the test would hang otherwise
    messages.append(str(err.value))
    tp = parallelize(EncoderLM().double())
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="need_weights=False") as err:
        tp.encoder.layers[0].self_attn(x, x, x)  # nn.MultiheadAttention's default need_weights=True
    messages.append(str(err.value))
    with pytest.raises(ValueError, match="needs a torch.nn.MultiheadAttention, got Linear"):
        parallelize(EncoderLM().double(), {"encoder.layers.*.linear1": "mha"})
    with pytest.raises(ValueError, match="drop .*out_proj"):
        parallelize(EncoderLM().double(), {"encoder.layers.*.self_attn": "mha",
                                           "encoder.layers.*.self_attn.out_proj": "rowwise"})
    return messages


def test_bad_input_is_refused_before_any_collective():
    for messages in spawn(_bad_input_worker, 2, timeout=TIMEOUT):
        assert len(messages) == 2
