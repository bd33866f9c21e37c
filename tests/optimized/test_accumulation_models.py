"""accumulate_gradients and amp_step on models nobody here wrote (transformers' Llama with GQA and GPT-2, a causal
LM on torch.nn.TransformerEncoder) through `loss_fn=causal_lm_loss`, against a hand-written loop: the summed
cross-entropy of every micro-batch divided by the scored tokens of the whole batch, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimized.accumulation import accumulate_gradients, causal_lm_loss
from optimized.precision import amp_step
from tests.optimized.test_pipeline_models import VOCAB, _model

transformers = pytest.importorskip("transformers")


def _hand_written(model, micro_batches, hf_labels: bool) -> torch.Tensor:
    """The loop a user would write: sum of per-token losses / tokens of the whole batch."""
    if hf_labels:
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    else:
        n = sum(int((t != -100).sum()) for _, t in micro_batches)
    total = 0.0
    for b in micro_batches:
        if hf_labels:
            logits = model(input_ids=b["input_ids"]).logits[:, :-1]
            targets = b["labels"][:, 1:]
        else:
            out = model(b[0])
            logits, targets = (out.logits if hasattr(out, "logits") else out), b[1]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum") / n
        loss.backward()
        total += loss.item()
    return torch.tensor(total, dtype=torch.float64)


def _batch(rows: int = 4, hf_labels: bool = False):
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, VOCAB, (rows, 8), generator=gen)
    if hf_labels:
        labels = idx.clone()
        labels[0, :6] = -100  # padding: the micro-batches score different numbers of tokens
        return {"input_ids": idx, "labels": labels}
    targets = torch.randint(0, VOCAB, (rows, 8), generator=gen)
    targets[0, :6] = -100
    return idx, targets


def _rows(batch, start: int, stop: int):
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[0][start:stop], batch[1][start:stop]


@pytest.mark.parametrize("family, hf_labels", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True),
                                               ("encoder", False)])
def test_accumulation_and_amp_step_equal_a_hand_written_loop(family, hf_labels):
    batch = _batch(hf_labels=hf_labels)
    micro = [_rows(batch, 0, 1), _rows(batch, 1, 4)]  # uneven rows, uneven padding
    ours, theirs = _model(family), _model(family)
    loss = accumulate_gradients(ours, micro, loss_fn=causal_lm_loss)
    want = _hand_written(theirs, micro, hf_labels)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)

    # amp_step (fp32: autocast off) = the same accumulation, then the optimizer step
    stepped = _model(family)
    opt = torch.optim.SGD(stepped.parameters(), lr=0.1)
    result = amp_step(stepped, opt, batch, dtype=torch.float32, accumulation_steps=2, loss_fn=causal_lm_loss)
    reference = _model(family)
    want = _hand_written(reference, [_rows(batch, 0, 2), _rows(batch, 2, 4)], hf_labels)
    assert abs(result.loss - want.item()) < 1e-12
    with torch.no_grad():
        for (name, p), q in zip(stepped.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q - 0.1 * q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_amp_step_in_bf16_equals_the_same_loop_under_autocast():
    """bf16 autocast on HF Llama (fp32 weights): amp_step gives the loss and update of the hand-written loop run
    under the same autocast, to fp32 rounding (the loop sums its losses in Python floats)."""
    batch = _batch()
    stepped, reference = _model("llama").float(), _model("llama").float()
    opt = torch.optim.SGD(stepped.parameters(), lr=0.1)
    result = amp_step(stepped, opt, batch, dtype=torch.bfloat16, accumulation_steps=2, loss_fn=causal_lm_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _hand_written(reference, [_rows(batch, 0, 2), _rows(batch, 2, 4)], hf_labels=False)
    assert result.loss == pytest.approx(want.item(), rel=1e-6)
    with torch.no_grad():
        for (name, p), q in zip(stepped.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q - 0.1 * q.grad, rtol=1e-6, atol=1e-7, msg=name)
