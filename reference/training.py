"""The ground-truth training loop: fp32, one process, the whole batch. Every parallel technique is held to it.

One optimizer step on a batch of B sequences, optionally split into k micro-batches (gradient accumulation):

    loss = (1 / n_tokens) * sum over micro-batches j of sum over scored tokens t in j of CE_t
    n_tokens = number of targets != IGNORE_INDEX in the WHOLE batch

Each micro-batch's backward is run on `sum_j CE_t / n_tokens`, so the accumulated gradient is exactly the gradient
of the batch's token mean. Averaging micro-batch means instead, (1/k) * sum_j mean_j, weights a token of a short
(heavily padded) micro-batch more than one of a long micro-batch: a different loss, not a rounding difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reference.clipping import clip_grad_norm
from reference.model import IGNORE_INDEX

Batch = tuple[Tensor, Tensor]


@dataclass
class History:
    """Per-step record of a training run."""

    loss: list[float] = field(default_factory=list)
    """Token-mean loss of each step's whole batch, before the update."""
    grad_norm: list[float] = field(default_factory=list)
    """Global 2-norm of the gradients before clipping."""
    lr: list[float] = field(default_factory=list)
    """Learning rate of the first parameter group used by each step."""


def split_batch(batch: Batch, accumulation_steps: int) -> list[Batch]:
    """Split (idx, targets) of B rows into `accumulation_steps` equal micro-batches along the batch dimension."""
    idx, targets = batch
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    if idx.size(0) % accumulation_steps:
        raise ValueError(
            f"batch size {idx.size(0)} must be divisible by accumulation_steps={accumulation_steps} "
            f"(micro-batches of equal rows)"
        )
    return list(zip(idx.chunk(accumulation_steps), targets.chunk(accumulation_steps), strict=True))


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Batch]) -> Tensor:
    """Forward and backward every micro-batch, weighting each token by 1 / (scored tokens in all micro-batches).

    Returns the token-mean loss of the whole batch (a detached scalar). Gradients are added to `.grad`."""
    n_tokens = sum(int((t != IGNORE_INDEX).sum()) for _, t in micro_batches)
    denom = max(n_tokens, 1)
    total = torch.zeros(())
    for idx, targets in micro_batches:
        _, loss_sum = model(idx, targets, reduction="sum")
        (loss_sum / denom).backward()
        total = total + loss_sum.detach()
    return total / denom


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    max_grad_norm: float | None = None,
    accumulation_steps: int = 1,
) -> tuple[float, float]:
    """One optimizer step on `batch`. Returns (loss, global gradient 2-norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, split_batch(batch, accumulation_steps))
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is not None:
        norm = clip_grad_norm(params, max_grad_norm)
    else:
        norm = torch.stack([p.grad.detach().pow(2).sum() for p in params]).sum().sqrt() if params else torch.zeros(())
    optimizer.step()
    return float(loss), float(norm)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    *,
    steps: int,
    lr_lambda: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None,
    accumulation_steps: int = 1,
) -> History:
    """Train for `steps` steps, cycling through `batches`. `lr_lambda(step)` multiplies each group's initial LR."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not batches:
        raise ValueError("batches must hold at least one batch")
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history = History()
    for step in range(steps):
        if lr_lambda is not None:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_lambda(step)
        history.lr.append(float(optimizer.param_groups[0]["lr"]))
        loss, norm = train_step(
            model,
            optimizer,
            batches[step % len(batches)],
            max_grad_norm=max_grad_norm,
            accumulation_steps=accumulation_steps,
        )
        history.loss.append(loss)
        history.grad_norm.append(norm)
    return history
