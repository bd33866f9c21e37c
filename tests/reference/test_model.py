"""The tiny GPT: shapes, deterministic init, GQA, loss masking, bad configs, and that it learns."""

import pytest
import torch

from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig, token_loss
from reference.training import train


def _config(**kw):
    base = dict(vocab_size=16, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def test_shapes_and_tied_head():
    model = GPT(_config())
    idx = torch.randint(0, 16, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, 16) and loss is None
    assert model.lm_head.weight is model.wte.weight
    untied = GPT(_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() == model.num_parameters() + 16 * 32


def test_init_is_deterministic_from_the_seed():
    a, b, c = GPT(_config(seed=3)), GPT(_config(seed=3)), GPT(_config(seed=4))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert torch.equal(a.blocks[0].ln_1.weight, torch.ones(32))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_projections(n_kv_head):
    model = GPT(_config(n_kv_head=n_kv_head))
    attn = model.blocks[0].attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 8 * n_kv_head
    logits, _ = model(torch.randint(0, 16, (2, 7)))
    assert torch.isfinite(logits).all()


def test_causality_future_tokens_do_not_change_the_past():
    model = GPT(_config())
    idx = torch.randint(0, 16, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 16
    assert torch.allclose(model(idx)[0][:, :6], model(changed)[0][:, :6], atol=1e-6)


def test_loss_is_the_mean_over_scored_tokens():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :3] = IGNORE_INDEX
    kept = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(token_loss(logits, targets), expected)
    assert torch.allclose(token_loss(logits, targets, "sum"), expected * kept.sum())
    assert token_loss(logits, torch.full((2, 5), IGNORE_INDEX)).item() == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "n_embd=30 must be divisible by n_head=4"),
        (dict(n_head=4, n_kv_head=3), "n_head=4 must be divisible by n_kv_head=3"),
        (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)


def test_too_long_a_sequence_is_refused():
    with pytest.raises(ValueError, match="T=17 exceeds GPTConfig.block_size=16"):
        GPT(_config())(torch.zeros(1, 17, dtype=torch.long))


def test_loss_falls_on_the_copy_task_within_100_steps():
    torch.manual_seed(0)
    model = GPT(_config(n_kv_head=2))
    batches = make_batches(8, batch_size=16, seq_len=16, vocab_size=16, seed=0)
    history = train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), batches, steps=100, max_grad_norm=1.0)
    first, last = sum(history.loss[:5]) / 5, sum(history.loss[-5:]) / 5
    # log(14) = 2.64 is chance over the 14 content tokens; learning the copy drives the loss well below it.
    assert first > 2.4 and last < 0.75 * first, (first, last)


# --- the Llama-style family ------------------------------------------------------------------------------------------


def _llama(**kw):
    base = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig.llama(**base)


def test_llama_family_has_no_biases_no_position_table_and_an_untied_head():
    model = GPT(_llama())
    names = [n for n, _ in model.named_parameters()]
    assert model.wpe is None and model.lm_head.weight is not model.wte.weight
    assert not [n for n in names if n.endswith("bias")], names
    assert "blocks.0.mlp.fc_gate.weight" in names and "blocks.0.ln_1.weight" in names
    logits, loss = model(torch.randint(0, 32, (2, 9)), torch.randint(0, 32, (2, 9)))
    assert logits.shape == (2, 9, 32) and torch.isfinite(loss)


def test_llama_family_equals_hf_llama_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    cfg = _llama()
    ours = GPT(cfg).double()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        attn_implementation="eager")).double()
    names = {"model.embed_tokens": "wte", "model.norm": "ln_f", "lm_head": "lm_head"}
    for i in range(2):
        for hf_name, our in (("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
                             ("self_attn.v_proj", "attn.v_proj"), ("self_attn.o_proj", "attn.out_proj"),
                             ("mlp.gate_proj", "mlp.fc_gate"), ("mlp.up_proj", "mlp.fc_in"),
                             ("mlp.down_proj", "mlp.fc_out"), ("input_layernorm", "ln_1"),
                             ("post_attention_layernorm", "ln_2")):
            names[f"model.layers.{i}.{hf_name}"] = f"blocks.{i}.{our}"
    with torch.no_grad():
        for hf_name, our in names.items():
            hf.get_submodule(hf_name).weight.copy_(ours.get_submodule(our).weight)
    idx = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(0))
    # HF computes the rotary angles in fp32 even for a float64 model: agreement to fp32's rounding, not float64's
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_on_the_distance_only():
    from reference.model import rotary

    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    qs, ks = rotary(q.expand(1, 1, 12, 8), 10000.0), rotary(k.expand(1, 1, 12, 8), 10000.0)
    scores = (qs[0, 0] @ ks[0, 0].T)  # (12, 12): q at t, k at s
    torch.testing.assert_close(scores.diagonal(3)[:-1], scores.diagonal(3)[1:])
    assert not torch.allclose(scores.diagonal(0)[0], scores.diagonal(3)[0])


def test_the_loss_is_pluggable():
    calls = []

    def loss(logits, targets, reduction):
        calls.append(reduction)
        return token_loss(logits, targets, reduction) * 2

    idx = torch.randint(0, 16, (2, 5))
    plain, plugged = GPT(_config()), GPT(_config(), loss=loss)
    torch.testing.assert_close(plugged(idx, idx, "sum")[1], 2 * plain(idx, idx, "sum")[1])
    assert calls == ["sum"]


@pytest.mark.parametrize("config", [_config(), _llama()], ids=["gpt2", "llama"])
@pytest.mark.parametrize(
    "idx, message",
    [
        (torch.tensor([[1, 16, 2]]), r"idx holds token id 16, outside \[0, vocab_size=16\)"),
        (torch.tensor([[1, -1, 2]]), r"idx holds token id -1, outside \[0, vocab_size=16\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"idx must hold at least one token, got shape \(2, 0\)"),
        (torch.zeros(1, 17, dtype=torch.long), "T=17 exceeds GPTConfig.block_size=16"),
        (torch.zeros(1, 3), "idx must be a .B, T. int64 tensor"),
    ],
)
def test_bad_ids_get_an_error_naming_idx(config, idx, message):
    config.vocab_size = 16
    with pytest.raises(ValueError, match=message):
        GPT(config)(idx)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(norm="batchnorm"), "GPTConfig.norm must be one of"), (dict(mlp="relu"), "GPTConfig.mlp must be one of"),
     (dict(n_embd=12, n_head=4, n_kv_head=4), "head_dim=3 must be even")],
)
def test_bad_family_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _llama(**kwargs)
