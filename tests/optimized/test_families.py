"""optimized.families: each family recognised on a tiny model of it (the project's GPT, transformers' Llama, Gemma,
Gemma 2, Mistral, Qwen2, GPT-2, a model on nn.TransformerEncoder), an unknown model refused with the known families
listed, and the techniques that ask the registry refusing what they would silently get wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimized.families import FAMILIES, family_of
from optimized.pipeline import split
from optimized.tensor_parallel import plan_for
from reference.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)


def _hf(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                                                    n_positions=32))
    config, model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
                     "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                     "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    extra = {"head_dim": 8} if kind.startswith("gemma") else {}
    return model(config(**TINY, **extra))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)


@pytest.mark.parametrize("kind", ["llama", "gemma", "gemma2", "mistral", "qwen2", "gpt2"])
def test_transformers_models_are_recognised_by_their_family(kind):
    assert family_of(_hf(kind)).name == kind


def test_the_projects_gpt_and_an_encoder_are_recognised():
    for mlp in ("gelu", "swiglu"):
        assert family_of(GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, mlp=mlp))).name == "gpt"
    assert family_of(_Encoder()).name == "transformer_encoder"


def test_an_unknown_model_is_refused_with_every_known_family_listed():
    with pytest.raises(ValueError, match=r"no ready thing for Linear \(known families: gpt \(.*\); do this") as info:
        family_of(nn.Linear(2, 2), context="no ready thing", purpose="do this")
    assert all(f"{f.name} (" in str(info.value) for f in FAMILIES)


def test_the_paths_of_each_family_name_modules_of_its_models():
    for kind in ("llama", "gemma", "gemma2", "mistral", "qwen2", "gpt2"):
        model, family = _hf(kind), family_of(_hf(kind))
        for path in (family.token_embedding, family.layers, family.final_norm, family.head):
            model.get_submodule(path)
        layer = f"{family.layers}.0"
        for name in family.attention_in + (family.attention_out,):
            model.get_submodule(f"{layer}.{family.attention}.{name}")
        for name in family.mlp_in + (family.mlp_out,):
            model.get_submodule(f"{layer}.{family.mlp}.{name}")


def test_techniques_refuse_what_a_family_does_inside_its_forward():
    with pytest.raises(ValueError, match=r"Gemma.*scales its rows by sqrt\(hidden_size\)"):
        plan_for(_hf("gemma"))
    with pytest.raises(ValueError, match=r"Gemma 2.*soft-caps its logits.*different masks"):
        split(_hf("gemma2"), 2)
    qwen = _hf("qwen2")
    assert len(split(qwen, 2)) == 2  # no sliding layer: every layer takes the causal mask
    qwen.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"Qwen2.*different masks"):
        split(qwen, 2)


def test_mistral_stages_use_its_sliding_window():
    model = _hf("mistral").double().eval()
    model.config.sliding_window = 3
    idx = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    x = idx
    for stage in split(model, 2):
        x = stage(x)
    torch.testing.assert_close(x, model(idx).logits, rtol=0, atol=1e-12)
