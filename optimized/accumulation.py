"""Gradient accumulation weighted by tokens: k micro-batches give exactly the gradient of one big batch.

The loss of a batch is the mean over its real (scored) tokens, n = number of targets != ignore_index:
    L = (1 / n) * sum over micro-batches j of sum over scored tokens t of j of CE_t
so micro-batch j is backpropagated as (its summed token loss) / n, n counted over the WHOLE batch first. The common
shortcut, backpropagating mean_j / k (the mean of micro-batch means), weights a token of a heavily padded
micro-batch more than one of a full micro-batch: a different objective, not a rounding difference, whenever the
micro-batches hold different numbers of real tokens.

Data parallel: with `process_group`, n is the token count of the batch summed over all ranks (one all-reduce of a
scalar), and each rank's loss is multiplied by the group size, because a data-parallel wrapper (torch DDP,
optimized.data_parallel.DataParallel) AVERAGES gradients over the group: the average of size * sum_r / n over ranks
is sum over all tokens / n. `no_sync` (e.g. `ddp.no_sync`) wraps the backward of every micro-batch but the last,
so the gradients are all-reduced once per batch instead of once per micro-batch.

    loss = accumulate_gradients(ddp_model, split(batch, 4), no_sync=ddp_model.no_sync, process_group=None or pg)
    opt.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Targets equal to this are not scored (torch.nn.functional.cross_entropy's default)."""

Batch = tuple[Tensor, Tensor]


def count_tokens(micro_batches: Sequence[Batch], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of scored targets in all micro-batches, as an int64 tensor (no host sync)."""
    counts = [(targets != ignore_index).sum() for _, targets in micro_batches]
    return torch.stack(counts).sum()


def _summed_loss(model: nn.Module, idx: Tensor, targets: Tensor) -> Tensor:
    return model(idx, targets, reduction="sum")[1]


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    *,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    process_group: dist.ProcessGroup | None = None,
    num_tokens: int | Tensor | None = None,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] = _summed_loss,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Forward and backward every micro-batch, each weighted by its share of the batch's scored tokens; add the
    gradients to `.grad` and return the batch's token-mean loss (a detached scalar, the same on every rank).

    micro_batches: (idx, targets) pairs; any number of rows each, any padding.
    no_sync: a context-manager factory entered around every backward but the last (data parallel's `no_sync`).
    process_group: count tokens over this data-parallel group and undo its gradient averaging (see module doc).
        Requires an initialised default process group; None means a single process.
    num_tokens: the scored-token count of the whole batch (of all ranks, with process_group) if the caller knows
        it: skips the counting and its all-reduce.
    loss_fn: (model, idx, targets) -> SUMMED loss over scored tokens; default model(idx, targets, reduction="sum").
    scale_loss: applied to each weighted micro-batch loss before backward (e.g. a GradScaler's `scale`).
    """
    if not micro_batches:
        raise ValueError("micro_batches must hold at least one (idx, targets) pair, got none")
    if num_tokens is not None and not (int(num_tokens) >= 0 and float(num_tokens) == int(num_tokens)):
        raise ValueError(f"num_tokens must be an integer >= 0 (scored tokens of the whole batch), got {num_tokens!r}")
    first = micro_batches[0][1]
    group_size = 1
    if num_tokens is None:
        n = count_tokens(micro_batches, ignore_index).to(first.device)
        if process_group is not None:
            group_size = dist.get_world_size(process_group)
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=process_group)
    else:
        n = torch.as_tensor(num_tokens, device=first.device)
        if process_group is not None:
            group_size = dist.get_world_size(process_group)
    denom = n.clamp(min=1).to(torch.float32)  # a batch with no scored token contributes 0, not NaN
    total = torch.zeros((), device=first.device)
    last = len(micro_batches) - 1
    for j, (idx, targets) in enumerate(micro_batches):
        context = no_sync() if (no_sync is not None and j < last) else contextlib.nullcontext()
        with context:
            loss_sum = loss_fn(model, idx, targets)
            loss = loss_sum / denom if group_size == 1 else loss_sum * group_size / denom
            (scale_loss(loss) if scale_loss is not None else loss).backward()
        total = total + loss_sum.detach()
    mean = total / denom
    if process_group is not None and group_size > 1:
        dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=process_group)
    return mean
