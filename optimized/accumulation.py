"""Gradient accumulation weighted by tokens: k micro-batches give exactly the gradient of one big batch.

The loss of a batch is the mean over its real (scored) tokens, n = number of targets != ignore_index:
    L = (1 / n) * sum over micro-batches j of sum over scored tokens t of j of CE_t
so micro-batch j is backpropagated as (its summed token loss) / n, n counted over the WHOLE batch first. The common
shortcut, backpropagating mean_j / k (the mean of micro-batch means), weights a token of a heavily padded
micro-batch more than one of a full micro-batch: a different objective, not a rounding difference, whenever the
micro-batches hold different numbers of real tokens.

Any model, through `loss_fn(model, micro_batch) -> (summed loss, scored tokens)`:
    gpt_loss        the project's GPT, micro-batch (idx, targets): model(idx, targets, reduction="sum") (default)
    causal_lm_loss  any model returning logits, a tuple starting with them, or a transformers ModelOutput (.logits);
                    micro-batch (idx, targets) with targets aligned to idx, or a dict with "labels" (transformers'
                    convention: labels are the inputs, shifted by one inside)
n is counted from the micro-batches before any forward (`count_tokens`: the targets, or labels[..., 1:]) or given as
`num_tokens`; the counts loss_fn returns must add up to it (a loss_fn that scores other tokens is an error).

Data parallel: with `process_group`, n is the token count of the batch summed over all ranks (one all-reduce of a
scalar), and each rank's loss is multiplied by the group size, because a data-parallel wrapper (torch DDP,
optimized.data_parallel.DataParallel) AVERAGES gradients over the group: the average of size * sum_r / n over ranks
is sum over all tokens / n. `no_sync` (e.g. `ddp.no_sync`) wraps the backward of every micro-batch but the last,
so the gradients are all-reduced once per batch instead of once per micro-batch.

    micro_batches = list(zip(idx.chunk(4), targets.chunk(4)))  # 4 micro-batches of (idx, targets)
    loss = accumulate_gradients(ddp_model, micro_batches, no_sync=ddp_model.no_sync, process_group=None or pg)
    loss = accumulate_gradients(hf_model, micro_batches, loss_fn=causal_lm_loss)
    opt.step()
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Targets equal to this are not scored (torch.nn.functional.cross_entropy's default)."""

Batch = Any
"""A micro-batch: (idx, targets), or a dict of tensors with "labels" (transformers), or what a custom loss_fn takes."""
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor | int]]


def _scored(batch: Batch) -> Tensor | None:
    """The targets a micro-batch scores, in the convention of the ready loss functions; None if unknown."""
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), Tensor):
        return batch["labels"][..., 1:]  # transformers shifts: position t predicts label t + 1
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def count_tokens(micro_batches: Sequence[Batch], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of scored targets in all micro-batches, as an int64 tensor (no host sync)."""
    counts = []
    for j, batch in enumerate(micro_batches):
        targets = _scored(batch)
        if targets is None:
            raise ValueError(f"micro_batches[{j}] is a {type(batch).__name__} without targets to count: pass "
                             f"num_tokens= (the scored tokens of the whole batch), or micro-batches (idx, targets) "
                             f"or dicts with 'labels'")
        counts.append((targets != ignore_index).sum())
    return torch.stack(counts).sum()


def gpt_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """The project's GPT: (model(idx, targets, reduction="sum")'s loss, scored targets)."""
    idx, targets = batch
    return model(idx, targets, reduction="sum")[1], (targets != IGNORE_INDEX).sum()


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a tuple starting with it, or a transformers ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"cannot find logits in the model's output of type {type(output).__name__}: return a tensor, "
                     f"a tuple starting with the logits, or an object with .logits; or pass your own loss_fn")


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Any causal LM: summed cross-entropy (at least fp32) of its logits and the scored-token count.

    batch (idx, targets): model(idx) scored against targets aligned with idx. batch a dict with "labels": the other
    entries are the model's keyword arguments, and logits[:, t] is scored against labels[:, t + 1] (transformers)."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = logits_of(model(**inputs))[..., :-1, :]  # (B, T-1, V)
        targets = batch["labels"][..., 1:]  # (B, T-1)
    else:
        idx, targets = batch
        logits = logits_of(model(idx))  # (B, T, V)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),  # (N, V)
        targets.reshape(-1).to(logits.device),  # (N,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (targets != IGNORE_INDEX).sum()


def batch_device(batch: Batch) -> torch.device:
    values = batch.values() if isinstance(batch, Mapping) else batch
    return next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    *,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    process_group: dist.ProcessGroup | None = None,
    num_tokens: int | Tensor | None = None,
    loss_fn: LossFn = gpt_loss,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Forward and backward every micro-batch, each weighted by its share of the batch's scored tokens; add the
    gradients to `.grad` and return the batch's token-mean loss (a detached scalar, the same on every rank).

    micro_batches: what loss_fn takes ((idx, targets) pairs by default); any number of rows each, any padding.
    no_sync: a context-manager factory entered around every backward but the last (data parallel's `no_sync`).
    process_group: count tokens over this data-parallel group and undo its gradient averaging (see module doc).
        Requires an initialised default process group; None means a single process.
    num_tokens: the scored-token count of the whole batch (of all ranks, with process_group) if the caller knows
        it: skips the counting and its all-reduce.
    loss_fn: (model, micro_batch) -> (SUMMED loss over scored tokens, their count); `gpt_loss` (default) or
        `causal_lm_loss` for any model returning logits.
    scale_loss: applied to each weighted micro-batch loss before backward (e.g. a GradScaler's `scale`).
    """
    if not micro_batches:
        raise ValueError("micro_batches must hold at least one micro-batch, got none")
    if num_tokens is not None:
        value = float(num_tokens) if isinstance(num_tokens, (int, float, Tensor)) and not isinstance(
            num_tokens, bool) and (not isinstance(num_tokens, Tensor) or num_tokens.numel() == 1) else None
        if value is None or not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"num_tokens must be an integer >= 0 (scored tokens of the whole batch), got "
                             f"{num_tokens!r}")
    device = batch_device(micro_batches[0])
    group_size = 1 if process_group is None else dist.get_world_size(process_group)
    local = None
    if num_tokens is None:
        local = count_tokens(micro_batches, ignore_index).to(device)
        n = local.clone()
        if process_group is not None:
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=process_group)
    else:
        n = torch.as_tensor(num_tokens, device=device)
    denom = n.clamp(min=1).to(torch.float32)  # a batch with no scored token contributes 0, not NaN
    total = torch.zeros((), device=device)
    scored = torch.zeros((), dtype=torch.long, device=device)
    last = len(micro_batches) - 1
    for j, batch in enumerate(micro_batches):
        context = no_sync() if (no_sync is not None and j < last) else contextlib.nullcontext()
        with context:
            loss_sum, count = loss_fn(model, batch)
            loss = loss_sum / denom if group_size == 1 else loss_sum * group_size / denom
            (scale_loss(loss) if scale_loss is not None else loss).backward()
        total = total + loss_sum.detach()
        scored = scored + torch.as_tensor(count, device=device)
    if local is not None and int(scored) != int(local):
        raise ValueError(f"loss_fn scored {int(scored)} tokens but the micro-batches hold {int(local)} scored targets "
                         f"(count_tokens): the loss would be divided by the wrong count; pass num_tokens= or a "
                         f"loss_fn that scores the targets count_tokens counts")
    mean = total / denom
    if process_group is not None and group_size > 1:
        dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=process_group)
    return mean
