"""reference.data: the batches are reproducible and shaped as documented; every bad argument is refused by name."""

import pytest
import torch

from reference.data import FIRST_CONTENT, IGNORE_INDEX, SEP, make_batch, make_batches

VALID = dict(batch_size=3, seq_len=9, vocab_size=11)


def test_same_seed_same_batches_and_answers_are_scored():
    a = make_batches(2, **VALID, seed=4, task="reverse", vary_length=True)
    b = make_batches(2, **VALID, seed=4, task="reverse", vary_length=True)
    for (ia, ta), (ib, tb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
        assert ia.shape == ta.shape == (3, 9) and ia.dtype == ta.dtype == torch.int64
        for row, targets in zip(ia, ta, strict=True):
            L = int((row == SEP).nonzero()[0])
            assert torch.equal(targets[L:2 * L], row[:L].flip(0))  # the scored answer is the content reversed
            assert bool((targets[:L] == IGNORE_INDEX).all()) and bool((row[:L] >= FIRST_CONTENT).all())


NAN = float("nan")
BAD_BATCH = [
    *[("batch_size", v) for v in (1.5, True, 0, -2, None, "4", NAN, 4.0)],
    *[("seq_len", v) for v in (1, 2.0, None, True, "9")],
    *[("vocab_size", v) for v in (2, 10.0, True, None)],
    *[("generator", v) for v in (None, 0, "cpu")],  # ids must not hold an address (xdist compares them)
    *[("task", v) for v in ("cp", None, ["copy"])],
    *[("vary_length", v) for v in (1, None, "yes")],
]


@pytest.mark.parametrize("argument, value", BAD_BATCH, ids=[f"{a}={v!r}" for a, v in BAD_BATCH])
def test_make_batch_refuses_bad_arguments(argument, value):
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError) as info:
        make_batch(**{**VALID, "generator": gen, argument: value})
    message = str(info.value)
    assert message.startswith(f"{argument} must ") and repr(value) in message, message
    assert torch.equal(gen.get_state(), state)  # refused before any number was drawn


BAD_BATCHES = [("num_batches", v) for v in (0, 1.5, True, None)] + [("seed", v) for v in (1.5, None, True, "0")]


@pytest.mark.parametrize("argument, value", BAD_BATCHES, ids=[f"{a}={v!r}" for a, v in BAD_BATCHES])
def test_make_batches_refuses_bad_arguments(argument, value):
    kwargs = {"num_batches": 2, **VALID, "seed": 0, argument: value}
    with pytest.raises(ValueError, match=rf"^{argument} must .*got {value!r}"):
        make_batches(kwargs.pop("num_batches"), **kwargs)
