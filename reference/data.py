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

import torch
from torch import Tensor

from reference.model import IGNORE_INDEX

PAD = 0
SEP = 1
FIRST_CONTENT = 2
TASKS = ("copy", "reverse", "modadd")


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
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (content, SEP, answer), got {seq_len}")
    if vocab_size <= FIRST_CONTENT:
        raise ValueError(f"vocab_size must exceed {FIRST_CONTENT} (PAD and SEP are reserved), got {vocab_size}")
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
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
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
