"""Data parallelism in one process: N replicas, N slices of every batch, gradients summed by an all-reduce.

PyTorch DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
arXiv 2006.15704, Sec. 2-3): every rank holds a full replica of the model, runs forward and backward on its own
slice of the batch, and before the optimizer step the ranks all-reduce their gradients, so every replica applies
the same update to the same weights and the replicas never drift apart.

The math. A batch of B sequences is cut into N slices of B/N rows; slice r goes to rank r. The loss one process
would compute on the whole batch is the token mean

    L = (1 / n) * sum_r sum_{t in slice r} CE_t,        n = scored tokens (targets != IGNORE_INDEX) of the WHOLE batch

so its gradient is a sum over ranks, grad L = sum_r g_r with g_r = grad( (1/n) sum_{t in slice r} CE_t ), and that
sum is exactly what `all_reduce(op="sum")` computes. Every rank needs n, the count of the whole batch (a real run
all-reduces one integer for it). DDP itself averages (each rank's local mean loss, gradients divided by N): that is
the same only when every slice scores the same number of tokens. With padding of uneven length it is a different
loss (a token of a short slice weighs more), not a rounding difference: hence the weighting by n here.

    rank:        0                 1                 2
    batch:   [rows 0..k)      [rows k..2k)      [rows 2k..3k)          (B, T) -> N x (B/N, T)
    forward:  loss_sum_0 / n   loss_sum_1 / n    loss_sum_2 / n
    backward: g_0              g_1               g_2
    all-reduce:         g = g_0 + g_1 + g_2 on every rank
    step:     AdamW(g)         AdamW(g)          AdamW(g)              the same update everywhere

    replicas = make_replicas(GPT(config), world_size=3)
    optimizers = [AdamW(r.parameters(), lr=1e-3) for r in replicas]
    for batch in batches:
        loss = train_step(replicas, optimizers, batch)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reference.clipping import clip_grad_norm
from reference.model import IGNORE_INDEX
from reference.parallel import ranks

Batch = tuple[Tensor, Tensor]


def make_replicas(model: nn.Module, world_size: int) -> list[nn.Module]:
    """One copy of `model` per rank (DDP broadcasts rank 0's weights at wrap: every replica starts equal)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return [copy.deepcopy(model) for _ in range(world_size)]


def slice_batch(batch: Batch, world_size: int) -> list[Batch]:
    """Rank r's rows of (idx, targets): the r-th of `world_size` equal slices along the batch dimension."""
    idx, targets = batch
    if idx.size(0) % world_size:
        raise ValueError(f"batch of {idx.size(0)} rows must be divisible by world_size={world_size} "
                         f"(every rank gets B/N rows)")
    return list(zip(idx.chunk(world_size), targets.chunk(world_size), strict=True))  # N x ((B/N, T), (B/N, T))


def scored_tokens(batch: Batch) -> int:
    """n: targets that count in the loss, in the WHOLE batch (at least 1, so an all-padding batch divides by 1)."""
    return max(int((batch[1] != IGNORE_INDEX).sum()), 1)


def forward_backward(replicas: Sequence[nn.Module], batch: Batch) -> Tensor:
    """Every rank's forward and backward on its slice, token-weighted by the whole batch; gradients are added to
    each replica's `.grad` (local, not yet reduced). Returns the whole batch's token-mean loss (detached)."""
    n = scored_tokens(batch)
    partial_losses = []
    for replica, (idx, targets) in zip(replicas, slice_batch(batch, len(replicas)), strict=True):
        _, loss_sum = replica(idx, targets, reduction="sum")  # sum of CE over this slice's scored tokens
        (loss_sum / n).backward()  # g_r: this rank's share of grad L
        partial_losses.append(loss_sum.detach() / n)
    return ranks.all_reduce(partial_losses)[0]  # L = sum_r loss_sum_r / n


def all_reduce_gradients(replicas: Sequence[nn.Module]) -> None:
    """Replace every replica's gradient by the sum over ranks (DDP does this in buckets, overlapped with backward:
    Li et al. Sec. 3.2.3; one collective per parameter is the same arithmetic)."""
    per_rank = [dict(r.named_parameters()) for r in replicas]  # tied weights appear once, under their first name
    for name in per_rank[0]:
        grads = [params[name].grad for params in per_rank]
        if any(g is None for g in grads):
            raise ValueError(f"parameter {name!r} got no gradient on some rank; every rank must use every parameter")
        for params, reduced in zip(per_rank, ranks.all_reduce(grads), strict=True):
            params[name].grad = reduced


def train_step(replicas: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], batch: Batch, *,
               max_grad_norm: float | None = None) -> float:
    """One data-parallel optimizer step (reference.training.train_step, on N ranks). Returns the batch's loss.

    Clipping needs no collective here: after the all-reduce every replica holds the whole gradient, so each
    computes the same global norm."""
    if len(optimizers) != len(replicas):
        raise ValueError(f"need one optimizer per replica: {len(optimizers)} optimizers, {len(replicas)} replicas")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = forward_backward(replicas, batch)
    all_reduce_gradients(replicas)
    for replica, opt in zip(replicas, optimizers, strict=True):
        if max_grad_norm is not None:
            clip_grad_norm(replica.parameters(), max_grad_norm)
        opt.step()
    return float(loss)
