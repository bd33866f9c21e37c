"""Style 1, PyTorch AMP: autocast over fp32 weights, for a plain training loop (`amp_step`, `amp_train`).

The parameters, their gradients and the optimizer state stay fp32; inside `torch.autocast` the matmuls run on
half-precision copies of their inputs (the weight copies are cached for the forward and saved for backward), so the
activations saved for backward are mostly half precision. fp16 has a 5-bit exponent and needs loss scaling
(torch.amp.GradScaler: Micikevicius et al. 2018, arXiv 1710.03740, Sec. 3.2); bf16 has fp32's 8-bit exponent and
needs none. Per step:
    zero_grad -> forward + loss under autocast -> backward of (S * loss) -> unscale (g / S) ->
    optional clip of the TRUE gradients -> step unless a gradient is inf/NaN -> move S.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from optimized.accumulation import Batch, LossFn, accumulate_gradients, batch_device, gpt_loss
from optimized.clipping import clip_grad_norm_, global_grad_norm
from optimized.precision.autocast import autocast_context, check_autocast
from optimized.precision.scaler import check_grad_scaler


@dataclass(frozen=True)
class StepResult:
    """What one mixed-precision step did."""

    loss: float
    """Token-mean loss of the whole batch (unscaled)."""
    grad_norm: float
    """Global 2-norm of the true (unscaled) gradients before clipping; inf/NaN on an overflow step."""
    scale: float | None
    """The loss scale this step used (None without a scaler)."""
    skipped: bool
    """True when the optimizer step was skipped because a gradient was inf/NaN."""


@dataclass
class AmpHistory:
    """Per-step record of `amp_train` (the fields of reference.training.History, plus the loss scale)."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    scale: list[float | None] = field(default_factory=list)
    """Loss scale used by each step (None without a scaler)."""
    skipped: list[bool] = field(default_factory=list)
    """Whether each step's update was skipped on overflow."""


def _micro_batches(batch: Batch, accumulation_steps: int) -> list[Batch]:
    """`batch` ((idx, targets) or a dict of tensors) cut into equal row chunks."""
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    mapping = isinstance(batch, Mapping)
    tensors = list(batch.values()) if mapping else list(batch)
    rows = tensors[0].size(0)
    if rows % accumulation_steps:
        raise ValueError(
            f"batch size {rows} must be divisible by accumulation_steps={accumulation_steps} "
            f"(micro-batches of equal rows)"
        )
    pieces = zip(*(t.chunk(accumulation_steps) for t in tensors), strict=True)
    return [dict(zip(batch.keys(), p, strict=True)) if mapping else tuple(p) for p in pieces]


def amp_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    dtype: torch.dtype = torch.bfloat16,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    accumulation_steps: int = 1,
    loss_fn: LossFn = gpt_loss,
) -> StepResult:
    """One optimizer step with forward + loss under torch.autocast(dtype); dtype=torch.float32 turns autocast off.

    loss_fn(model, micro_batch) -> (summed token loss, scored tokens), run under autocast: `gpt_loss` (default, the
    tiny GPT's `model(idx, targets, reduction="sum")`) or `optimized.accumulation.causal_lm_loss` for any model
    returning logits or a transformers ModelOutput (batch (idx, targets) or a dict with "labels"). Micro-batches are
    token-weighted (optimized.accumulation.accumulate_gradients): each backward runs on its summed loss divided by
    the scored tokens of the whole batch, so accumulation gives the gradient of the batch's token mean.
    fp16 needs `scaler` (a torch.amp.GradScaler); bf16 and fp32 refuse one. The gradients are unscaled before the
    optional clipping, so `max_grad_norm` caps the true gradient norm."""
    device_type = batch_device(batch).type
    if dtype != torch.float32:
        check_autocast(device_type, dtype)
    check_grad_scaler(dtype, scaler)
    if max_grad_norm is not None and (not max_grad_norm > 0 or math.isnan(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    micro_batches = _micro_batches(batch, accumulation_steps)

    optimizer.zero_grad(set_to_none=True)

    def autocast_loss(model: nn.Module, micro_batch: Batch):
        with autocast_context(device_type, dtype):
            loss_sum, count = loss_fn(model, micro_batch)
        return loss_sum, count

    mean = accumulate_gradients(model, micro_batches, loss_fn=autocast_loss,
                                scale_loss=scaler.scale if scaler is not None else None)

    scale = scaler.get_scale() if scaler is not None else None
    if scaler is not None:
        scaler.unscale_(optimizer)  # true gradients from here on: clipping must see them
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if max_grad_norm is not None:
        norm = clip_grad_norm_(params, max_grad_norm)
    else:
        norm = global_grad_norm([p.grad for p in params])
    if scaler is not None:
        scaler.step(optimizer)  # skips optimizer.step() when unscale_ found an inf/NaN
        scaler.update()
        # An overflow multiplies the scale by backoff_factor < 1; a clean step keeps or grows it (accelerate's test).
        skipped = scaler.get_scale() < scale
    else:
        optimizer.step()
        skipped = False
    return StepResult(float(mean), float(norm), scale, skipped)


def amp_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    *,
    steps: int,
    dtype: torch.dtype = torch.bfloat16,
    scaler: torch.amp.GradScaler | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None,
    accumulation_steps: int = 1,
    loss_fn: LossFn = gpt_loss,
) -> AmpHistory:
    """`amp_step` for `steps` steps, cycling through `batches`; `lr_lambda(step)` multiplies each group's initial LR.

    The same loop as reference.training.train, with autocast and loss scaling added."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not batches:
        raise ValueError("batches must hold at least one batch")
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history = AmpHistory()
    for step in range(steps):
        if lr_lambda is not None:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_lambda(step)
        history.lr.append(float(optimizer.param_groups[0]["lr"]))
        result = amp_step(model, optimizer, batches[step % len(batches)], dtype=dtype, scaler=scaler,
                          max_grad_norm=max_grad_norm, accumulation_steps=accumulation_steps, loss_fn=loss_fn)
        history.loss.append(result.loss)
        history.grad_norm.append(result.grad_norm)
        history.scale.append(result.scale)
        history.skipped.append(result.skipped)
    return history
