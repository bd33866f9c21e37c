"""Seeded synthetic batches with structure a tiny GPT can learn, so a falling loss means real learning.

Every sequence is `content SEP answer`, padded to `seq_len + 1` tokens; the model reads tokens [0, T) and predicts
tokens [1, T]. Only the answer is scored (targets elsewhere are IGNORE_INDEX = -100): the content is random and
cannot be predicted, the answer is a function of it.

Tasks (content c of length L, token ids drawn from [FIRST_CONTENT, vocab_size)):
    copy     answer = c
    reverse  answer = c reversed
    modadd   answer = (c + c[0]) mod (vocab_size - FIRST_CONTENT), shifted back into the content range

With `vary_length=True` each sequence draws its own L in [1, max], so batches carry uneven padding: the case where
the mean of micro-batch means differs from the token mean of the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reference.model import IGNORE_INDEX

PAD = 0
SEP = 1
FIRST_CONTENT = 2
TASKS = ("copy", "reverse", "modadd")


def _integer(name: str, value: Any, minimum: int, allowed: str = "") -> int:
    """An int (not a bool, not a float such as 2.0) >= minimum, or an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must {allowed or f'be an integer >= {minimum}'}, got {value!r}")
    return value


def make_batch(
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator,
    task: str = "copy",
    vary_length: bool = False,
) -> tuple[Tensor, Tensor]:
    """One batch: idx (B, T) int64 and targets (B, T) int64 with IGNORE_INDEX where nothing is scored."""
    _integer("batch_size", batch_size, 1)
    _integer("seq_len", seq_len, 2, "be an integer >= 2 (content, SEP, answer)")
    _integer("vocab_size", vocab_size, FIRST_CONTENT + 1,
             f"be an integer >= {FIRST_CONTENT + 1} (ids 0..{FIRST_CONTENT - 1} are PAD and SEP)")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(vary_length, bool):
        raise ValueError(f"vary_length must be True or False, got {vary_length!r}")
    max_len = seq_len // 2  # content + SEP + answer = 2L + 1 <= seq_len + 1
    n_content = vocab_size - FIRST_CONTENT
    seqs = torch.full((batch_size, seq_len + 1), PAD, dtype=torch.long)  # (B, T+1)
    targets = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b in range(batch_size):
        L = int(torch.randint(1, max_len + 1, (1,), generator=generator)) if vary_length else max_len
        c = torch.randint(0, n_content, (L,), generator=generator)  # (L,)
        if task == "copy":
            answer = c
        elif task == "reverse":
            answer = c.flip(0)
        else:
            answer = (c + c[0]) % n_content
        seqs[b, :L] = c + FIRST_CONTENT
        seqs[b, L] = SEP
        seqs[b, L + 1 : 2 * L + 1] = answer + FIRST_CONTENT
        # Position t predicts token t + 1: positions L .. 2L-1 predict the answer.
        targets[b, L : 2 * L] = seqs[b, L + 1 : 2 * L + 1]
    return seqs[:, :-1].contiguous(), targets  # (B, T), (B, T)


def make_batches(
    num_batches: int,
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int = 0,
    task: str = "copy",
    vary_length: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """`num_batches` batches from one generator seeded by `seed`: the same arguments always give the same data."""
    _integer("num_batches", num_batches, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    return [
        make_batch(
            batch_size=batch_size,
            seq_len=seq_len,
            vocab_size=vocab_size,
            generator=gen,
            task=task,
            vary_length=vary_length,
        )
        for _ in range(num_batches)
    ]
