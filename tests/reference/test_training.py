"""The fp32 reference loop: token-weighted accumulation, the mean-of-means bug, reproducibility, data."""

import copy

import pytest
import torch

from reference.data import make_batch, make_batches
from reference.model import IGNORE_INDEX
from reference.training import accumulate_gradients, split_batch, train
from tests.models import tiny_gpt


def _model():
    return tiny_gpt(seed=1)


def _uneven_batch():
    idx, targets = make_batches(1, batch_size=8, seq_len=16, vocab_size=16, seed=5, vary_length=True)[0]
    counts = (targets != IGNORE_INDEX).sum(1)
    assert len(set(counts.tolist())) > 1  # uneven padding is what makes the two losses differ
    return idx, targets


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulation_equals_one_big_batch(k):
    batch = _uneven_batch()
    big, acc = _model(), _model()
    loss_big = accumulate_gradients(big, [batch])
    loss_acc = accumulate_gradients(acc, split_batch(batch, k))
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-6, atol=0)
    # Summing k partial gradients rounds differently from one pass: rtol 1e-6, with an absolute floor of 1e-6 of
    # the model's largest gradient entry for elements near zero (the key bias's gradient is zero in exact math).
    scale = max(g.abs().max().item() for g in _grads(big))
    for g_acc, g_big in zip(_grads(acc), _grads(big), strict=True):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-6, atol=1e-6 * scale)


def test_mean_of_micro_batch_means_differs():
    batch = _uneven_batch()
    big, wrong = _model(), _model()
    accumulate_gradients(big, [batch])
    micro = split_batch(batch, 4)
    for idx, targets in micro:
        _, mean = wrong(idx, targets)
        (mean / len(micro)).backward()
    diff = max((a - b).abs().max().item() for a, b in zip(_grads(wrong), _grads(big), strict=True))
    assert diff > 1e-4, "the mean of means should differ from the token mean under uneven padding"


def test_two_runs_are_bitwise_equal():
    batches = make_batches(3, batch_size=4, seq_len=16, vocab_size=16, seed=2, vary_length=True)
    runs = []
    for _ in range(2):
        model = _model()
        h = train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches, steps=5, max_grad_norm=0.5,
                  accumulation_steps=2, lr_lambda=lambda s: min(1.0, (s + 1) / 3))
        runs.append((h, copy.deepcopy(model.state_dict())))
    (h1, s1), (h2, s2) = runs
    assert h1.loss == h2.loss and h1.grad_norm == h2.grad_norm
    assert h1.lr == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2])
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_data_structure_and_determinism():
    g = torch.Generator().manual_seed(0)
    idx, targets = make_batch(batch_size=3, seq_len=10, vocab_size=12, generator=g, task="reverse")
    assert idx.shape == targets.shape == (3, 10)
    for b in range(3):
        content = idx[b, :5]
        assert idx[b, 5] == 1  # SEP
        assert torch.equal(targets[b, 5:10], content.flip(0))
        assert (targets[b, :5] == IGNORE_INDEX).all()
    a = make_batches(2, batch_size=2, seq_len=8, vocab_size=9, seed=7, task="modadd", vary_length=True)
    b = make_batches(2, batch_size=2, seq_len=8, vocab_size=9, seed=7, task="modadd", vary_length=True)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b, strict=True) for x, y in zip(ba, bb, strict=True))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: split_batch((torch.zeros(6, 4), torch.zeros(6, 4)), 4), "batch size 6 must be divisible"),
        (lambda: split_batch((torch.zeros(6, 4), torch.zeros(6, 4)), 0), "accumulation_steps must be >= 1"),
        (lambda: make_batches(1, batch_size=2, seq_len=8, vocab_size=9, task="sort"), "task must be one of"),
        (lambda: make_batches(1, batch_size=2, seq_len=8, vocab_size=2), "vocab_size must be an integer >= 3"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
