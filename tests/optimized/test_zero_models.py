"""ZeroOptimizer on models nobody here wrote: HF LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, 4:2 GQA, untied head)
and GPT2LMHeadModel (tied head, Conv1D), built from tiny configs (never downloaded), and a causal LM on
torch.nn.TransformerEncoder (whose nn.MultiheadAttention reads out_proj.weight outside out_proj's forward).

On 2 gloo ranks, each with half of every batch: ZeRO 1/2/3 and 3+offload (Llama's stage 3 with HF gradient
checkpointing), with a frozen parameter, two parameter groups and clipping, against one-process AdamW +
torch.nn.utils.clip_grad_norm_ on the whole batch, both in float64 and within 10x the reference's own rounding spread
(its re-runs from initial weights nudged by one ulp: conformance.tolerance), the same on any machine; the consolidated
checkpoint loads with strict=True into a fresh model and equals the gathered parameters bitwise.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conformance.launch import spawn
from conformance.tolerance import NUDGE_SEEDS, assert_equivalent, nudge_, rounding_spread, within_spread
from optimized.zero import ZeroOptimizer, consolidate

pytest.importorskip("transformers")

ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
STEPS = 3
CONFIGS = [dict(stage=1), dict(stage=2, bucket_cap_mb=0.001), dict(stage=3, bucket_cap_mb=0.001),
           dict(stage=3, offload=True)]
LLAMA_CONFIGS = [*CONFIGS[:2], dict(stage=3, bucket_cap_mb=0.001, gradient_checkpointing=True), CONFIGS[3]]
"""For Llama, stage 3 runs with HF gradient checkpointing (forwards recomputed inside backward)."""


def _hf(family: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
        model.model.norm.weight.requires_grad_(False)
    else:
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager")
        model.transformer.ln_f.bias.requires_grad_(False)
    return model


class EncoderLM(nn.Module):
    """A causal LM on torch's own nn.TransformerEncoder."""

    def __init__(self, vocab: int = 64, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        # No biases in the layers: the key bias has an exactly zero gradient (softmax ignores it), and AdamW would
        # turn its rounding noise, which differs between one batch and two halves, into full-size steps.
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, bias=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.head.bias.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        T = input_ids.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(T)  # (T, T)
        logits = self.head(self.encoder(self.embed(input_ids), mask=mask, is_causal=True))  # (B, T, V)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})


def _build(family: str) -> nn.Module:
    """The model in float64: the claim is algorithmic, and AdamW turns float32 rounding into machine-dependent ~lr
    steps."""
    return (EncoderLM() if family == "encoder" else _hf(family)).double()


def _groups(model: nn.Module) -> list[dict]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2]},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 10), generator=gen) for _ in range(STEPS)]


def _reference(family: str, nudge_seed: int | None = None) -> dict[str, torch.Tensor]:
    model = _build(family)
    if nudge_seed is not None:
        nudge_(model.parameters(), seed=nudge_seed)
    opt = torch.optim.AdamW(_groups(model), **ADAMW)
    for ids in _batches():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _zero_worker(family: str, configs: list[dict], root: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, config in enumerate(configs):
        config = dict(config)
        model = _build(family)
        if config.pop("gradient_checkpointing", False):
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        opt = ZeroOptimizer(model, torch.optim.AdamW, param_groups=_groups(model), **config, **ADAMW)
        for ids in _batches():
            local = ids.chunk(opt.world_size)[opt.rank]
            model(input_ids=local, labels=local).loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
        opt.save_checkpoint(os.path.join(root, f"{family}-{i}"))
        with opt.gathered_parameters():
            out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("family, configs", [
    ("llama", LLAMA_CONFIGS), ("gpt2", CONFIGS), ("encoder", [dict(stage=3, bucket_cap_mb=0.001)]),
])
def test_foreign_models_under_zero_match_one_process_adamw(family, configs, tmp_path):
    reference = _reference(family)
    spread = rounding_spread(reference, [_reference(family, seed) for seed in NUDGE_SEEDS],
                             origin=f"AdamW x{STEPS} in float64 from initial weights nudged by one ulp")
    ranks = spawn(_zero_worker, 2, family, configs, str(tmp_path), timeout=180)
    for c, config in enumerate(configs):
        for rank, results in enumerate(ranks):
            ours = results[c]
            assert list(ours) == list(reference)
            assert_equivalent(within_spread(ours, reference, spread, name=f"{family} {config} rank {rank}"))
        state, _ = consolidate(tmp_path / f"{family}-{c}")
        fresh = _build(family)
        fresh.load_state_dict(state, strict=True)
        for k, v in ranks[0][c].items():
            assert fresh.state_dict()[k].equal(v), f"consolidated {k}"
