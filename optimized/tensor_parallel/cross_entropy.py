"""Vocab-parallel cross-entropy (Megatron-LM, arXiv 1909.08053, Sec. 3, "Input and output embedding").

With the output head column-parallel by vocabulary, rank i holds the logits of ids [i V/t, (i+1) V/t). The loss
needs only three numbers per token from the other ranks: the softmax's max and sum of exponentials, and the target's
logit (all-reduced), so no rank ever holds the full (B, T, V) logits.

Two adapters put it behind a model's pluggable loss (what `parallelize` installs for a "vocab_head"):
    VocabParallelLoss        the project's GPT: model.loss(logits, targets, reduction)
    VocabParallelCausalLMLoss transformers: model.loss_function(logits, labels, vocab_size, num_items_in_batch, ...),
                             labels shifted by one inside, as transformers' ForCausalLMLoss does
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from optimized.distributed.groups import group_rank_and_size
from optimized.tensor_parallel.regions import group_size

IGNORE_INDEX = -100
"""Targets equal to this are not scored (torch.nn.functional.cross_entropy's convention)."""


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split by vocabulary (Megatron's vocab_parallel_cross_entropy).

        loss_n = log sum_v exp(z_nv - m_n) - (z_n,target - m_n),   m_n = max_v z_nv
    m_n (all-reduce max), sum_v exp(.) and the target logit (one all-reduce sum of both) are the only traffic.
    Backward needs no communication: d loss_n / d z_nv = softmax_nv - [v == target_n] on each rank's slice."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, vocab_start: int, ignore_index: int, group) -> Tensor:
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, V/t), at least fp32
        multi = group_size(group) > 1
        m = z.max(dim=-1).values  # (N,)
        if multi:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)  # (N, V/t)
        valid = targets != ignore_index  # (N,)
        local_t = targets - vocab_start  # (N,)
        mine = valid & (local_t >= 0) & (local_t < z.size(-1))  # (N,)
        local_t = local_t.masked_fill(~mine, 0)
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)  # (N,)
        exp_z = z.exp_()  # (N, V/t)
        stats = torch.stack([exp_z.sum(dim=-1), target_z])  # (2, N)
        if multi:
            dist.all_reduce(stats, group=group)
        sum_exp, target_z = stats[0], stats[1]
        loss = (sum_exp.log() - target_z).masked_fill(~valid, 0.0)  # (N,)
        softmax = exp_z.div_(sum_exp.unsqueeze(-1))  # (N, V/t)
        ctx.save_for_backward(softmax, local_t, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        softmax, local_t, mine, valid = ctx.saved_tensors
        g = grad_loss * valid  # (N,)
        grad = softmax * g.unsqueeze(-1)  # (N, V/t)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(g * mine).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    process_group: dist.ProcessGroup | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of vocab-split logits (..., V/t) (rank i holds ids [i V/t, (i+1) V/t)) against targets (...).

    reduction "mean": over the tokens whose target is not `ignore_index` (0 when there is none); "sum"; "none":
    per token, (...). Equals F.cross_entropy on the gathered logits, computed in fp32, without gathering them.
    A target outside [0, V) other than ignore_index raises, as F.cross_entropy does, on every rank before any
    collective (every rank holds all targets)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the last dim "
                         f"{tuple(logits.shape[:-1])}")
    rank, t = group_rank_and_size(process_group)
    vocab = logits.size(-1) * t
    scored = targets[targets != ignore_index]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= vocab):
        bad = int(scored.min()) if int(scored.min()) < 0 else int(scored.max())
        raise ValueError(f"targets: target {bad} is outside [0, V={vocab}) and is not ignore_index={ignore_index}")
    loss = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.size(-1)),  # (N, V/t)
        targets.reshape(-1),  # (N,)
        rank * logits.size(-1),
        ignore_index,
        process_group,
    )
    if reduction == "none":
        return loss.view(targets.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


class VocabParallelLoss:
    """The project GPT's pluggable loss (logits (B, T, V/t), targets (B, T), reduction) -> loss, by vocab-parallel
    cross-entropy over `process_group`."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        self.process_group, self.ignore_index = process_group, ignore_index

    def __call__(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.process_group, ignore_index=self.ignore_index,
                                            reduction=reduction)


class VocabParallelCausalLMLoss:
    """transformers' `model.loss_function` contract (ForCausalLMLoss): labels (B, T) shifted left by one inside,
    the loss summed and divided by `num_items_in_batch` when given, else the mean over scored tokens."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    def __call__(self, logits: Tensor, labels: Tensor, vocab_size: int | None = None,
                 num_items_in_batch: Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                 shift_labels: Tensor | None = None, **kwargs) -> Tensor:
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T): the next token
        shift_labels = shift_labels.to(logits.device)
        if num_items_in_batch is None:
            return vocab_parallel_cross_entropy(logits, shift_labels, self.process_group, ignore_index=ignore_index)
        total = vocab_parallel_cross_entropy(logits, shift_labels, self.process_group, ignore_index=ignore_index,
                                             reduction="sum")
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
