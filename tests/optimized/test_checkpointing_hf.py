"""Activation checkpointing on transformers' models, built from tiny configs (never downloaded): Llama (GQA), Mistral
(GQA, sliding window), Gemma-2 (softcapping, sliding and global layers) and GPT-2, with attn_implementation="eager"
and the project's attention (optimized.attention.register_transformers).

With the config's default use_cache=True and no flag from the user: gradients bitwise those of the unwrapped model
under "full" and "selective" (fp32 on CPU: recomputation runs the same ops again); bytes saved for backward ordered
full < selective < none; generation after applying unchanged; a filled KV cache in a recorded forward refused under
"full" (recomputation would append its keys twice) and read once under "selective" (the cache is updated outside
the recomputed core)."""

from __future__ import annotations

import copy

import pytest
import torch

from conformance.measure import saved_tensor_bytes
from optimized.checkpointing import apply_activation_checkpointing, checkpointed_modules

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "gemma2", "gpt2")
VOCAB = 64


def _attention(kind: str) -> str:
    if kind == "eager":
        return "eager"
    from optimized.attention import register_transformers

    return register_transformers()


def _config(family: str, attention: str = "eager", **overrides):
    """A two-layer config of `family`, width 32, 4 query heads (2 KV heads where the family has GQA), no dropout."""
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, attn_implementation=_attention(attention))
    if family == "llama":
        return transformers.LlamaConfig(**shape, **overrides)
    if family == "mistral":
        return transformers.MistralConfig(**shape, sliding_window=5, **overrides)
    if family == "gemma2":
        return transformers.Gemma2Config(**shape, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                                         attn_logit_softcapping=20.0, final_logit_softcapping=15.0, **overrides)
    assert family == "gpt2", family
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   attn_implementation=shape["attn_implementation"],
                                   **{"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **overrides})


def _model(config, policy: str = "none"):
    """The causal LM of `config`, weights from seed 0 whatever the policy, in training mode."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().train()
    return model if policy == "none" else apply_activation_checkpointing(model, policy)


def _tokens(batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _grads(model, idx: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one forward + backward, called as a user would: no use_cache flag."""
    torch.manual_seed(123)  # the dropout masks, where the config has dropout
    loss = model(idx, labels=idx, **kwargs).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _assert_bitwise(got, expected, what: str) -> None:
    (loss, grads), (loss0, grads0) = got, expected
    assert torch.equal(loss, loss0), f"{what}: loss {loss.item()} vs {loss0.item()}"
    for i, (a, b) in enumerate(zip(grads, grads0, strict=True)):
        assert torch.equal(a, b), f"{what}: gradient {i} differs by {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("attention", ["eager", "project"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_are_bitwise_with_the_default_cache_and_no_flag(family, attention):
    config = _config(family, attention)
    assert config.use_cache, "the point: the config's default turns the KV cache on"
    idx = _tokens()
    expected = _grads(_model(config), idx)
    for policy in ("full", "selective"):
        model = _model(config, policy)
        _assert_bitwise(_grads(model, idx), expected, f"{family}, {attention}, {policy}")
        assert model.config.use_cache and model.config._attn_implementation == config._attn_implementation
    assert len(checkpointed_modules(model)) == config.num_hidden_layers  # one attention module per layer


def test_dropout_masks_are_drawn_again_in_recomputation():
    config = _config("gpt2", attn_pdrop=0.3, resid_pdrop=0.3, embd_pdrop=0.3)
    idx = _tokens()
    expected = _grads(_model(config), idx)
    for policy in ("full", "selective"):
        _assert_bitwise(_grads(_model(config, policy), idx), expected, policy)


@pytest.mark.parametrize("attention", ["eager", "project"])
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_bytes_are_ordered_full_selective_none(family, attention):
    config = _config(family, attention)
    idx = _tokens(seq=48)  # T > 3 head_dim: the probabilities outweigh q, k, v (GPT-2 keeps its fused qkv)
    saved = {}
    for policy in ("none", "selective", "full"):
        model = _model(config, policy)
        _, saved[policy] = saved_tensor_bytes(lambda m=model: m(idx, labels=idx).loss,
                                              exclude=list(model.parameters()))
    assert saved["full"] < saved["selective"] < saved["none"], saved


@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_after_applying_is_unchanged(family, policy):
    config = _config(family)
    prompt = _tokens(batch=1, seq=5, seed=1)
    model, plain = _model(config, policy), _model(config)
    _grads(model, _tokens())  # a training step's forward and backward first
    for m in (model, plain):
        m.eval()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **options), plain.generate(prompt, **options))
    with torch.no_grad():  # no recomputation without autograd: the cache is filled as before
        assert model(prompt).cache.get_seq_length() == prompt.shape[1]


def _prefilled(model, prefix: torch.Tensor):
    with torch.no_grad():
        return model(prefix, use_cache=True).cache


@pytest.mark.parametrize("family", FAMILIES)
def test_a_filled_cache_is_refused_by_full_and_read_once_by_selective(family):
    config = _config(family)
    prefix, idx = _tokens(batch=2, seq=4, seed=2), _tokens(batch=2, seq=5, seed=3)
    plain = _model(config)
    expected = _grads(plain, idx, cache=_prefilled(plain, prefix))

    full = _model(config, "full")
    cache = _prefilled(full, prefix)
    with pytest.raises(ValueError, match=r"cache.* already holds 4 positions .* append them a second time"):
        full(idx, labels=idx, cache=cache)
    assert cache.get_seq_length() == 4, "refused before the cache was touched"

    selective = _model(config, "selective")
    cache = _prefilled(selective, prefix)
    _assert_bitwise(_grads(selective, idx, cache=cache), expected, "selective, prefilled cache")
    assert cache.get_seq_length() == 9, "appended once"


def test_layers_names_copies_and_refusals():
    config = _config("llama")
    full = _model(config, "full")
    assert checkpointed_modules(full) == ["model.layers.0", "model.layers.1"]
    selective = _model(config, "selective")
    assert checkpointed_modules(selective) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    twin = copy.deepcopy(selective)  # the config view survives a copy, and follows the copy's own config
    assert checkpointed_modules(twin) == checkpointed_modules(selective)
    assert twin.model.layers[0].self_attn.config.model_config is twin.config
    idx = _tokens()
    _assert_bitwise(_grads(twin, idx), _grads(_model(config), idx), "deepcopy of selective")
    partial = apply_activation_checkpointing(_model(config), "full", layers=["model.layers.1"])
    _assert_bitwise(_grads(partial, idx), _grads(_model(config), idx), "only layer 1")

    with pytest.raises(ValueError, match="'model.layers.0' is already checkpointed"):
        apply_activation_checkpointing(selective, "full")
    enabled = _model(config)
    enabled.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_enable.*gradient_checkpointing_disable"):
        apply_activation_checkpointing(enabled, "full")
    with pytest.raises(ValueError, match="reorder_and_upcast_attn=True.*use policy='full'"):
        apply_activation_checkpointing(_model(_config("gpt2", reorder_and_upcast_attn=True)), "selective")
    assert checkpointed_modules(enabled) == []
