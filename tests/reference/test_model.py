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
