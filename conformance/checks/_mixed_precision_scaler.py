"""Rows 1b of the `mixed_precision` check: the loss scaler's paths (overflow, skip, growth, unscale before
clipping) with SGD, amp_train and MasterWeightOptimizer against reference.loss_scaling.DynamicLossScaler in fp32."""

from __future__ import annotations

import dataclasses
import math

import torch

from conformance.checks import CheckSpec, Context
from conformance.checks import _mixed_precision_workload as workload
from conformance.checks._mixed_precision_workload import UNIT_ROUNDOFF, Sizes
from conformance.result import Result
from conformance.tolerance import allclose, bitwise, combine
from optimized.precision import MasterWeightOptimizer, amp_train, make_grad_scaler
from reference.clipping import clip_grad_norm
from reference.loss_scaling import DynamicLossScaler

OVERFLOW_STEPS = (2, 5)
"""Steps whose gradients are made inf (the loss itself stays finite): each must be skipped and back the scale off."""
SCALER = dict(init_scale=2.0**10, growth_interval=2)
"""A small growth interval so that the scale also grows within the run, not only backs off."""
SCALER_STEPS = 10
"""Steps of the scaler rows, at either size. The fp32 reference knows only the injected overflows: the scale must stay
where this model's fp16 gradients cannot overflow on their own. It grows at most 2x per growth_interval steps, so
after 10 steps it is at most 2^10 x 2^5 = 2^15, half of fp16's largest value (65504 ~ 2^16) per unit of gradient;
a 30-step run reached 2^18 and overflowed genuinely (steps 22, 25, 28), which no fp32 reference can predict."""
SGD_LR, CLIP = 0.5, 0.5
"""SGD (unlike AdamW, which absorbs any constant factor on the gradients) moves by the gradient itself, so a wrong
unscale shows; the clip threshold is below the gradient norm (~1-4), so clipping is active at every step."""


class _OverflowBackward(torch.autograd.Function):
    """Identity forward; backward makes the gradient inf: an fp16 overflow, on the step the check chooses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def _series(values: list) -> torch.Tensor:
    """Flags or scales as float64, compared bitwise."""
    return torch.tensor(values, dtype=torch.float64)


def _overflowing(loss: torch.Tensor, step: int) -> torch.Tensor:
    return _OverflowBackward.apply(loss) if step in OVERFLOW_STEPS else loss


def _reference_scaled_run(s: Sizes, device: torch.device, batches, clip: float | None) -> dict[str, list]:
    """The spec: fp32 model, reference.loss_scaling.DynamicLossScaler, the same overflows, reference clipping (to
    `clip`; None: the norm is measured, nothing clipped), SGD (torch.optim.SGD for-loop, the peer every side uses)."""
    model = workload.gpt(s, device)
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, foreach=False)
    scaler = DynamicLossScaler(**SCALER)
    out = {"loss": [], "scale": [], "skipped": [], "norm": []}
    for step in range(s.steps):
        idx, targets = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        out["scale"].append(scaler.get_scale())
        loss = model(idx, targets)[1]
        scaler.scale(_overflowing(loss, step)).backward()
        scaler.unscale_(opt)
        norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], math.inf if clip is None else clip)
        out["norm"].append(float(norm))
        scaler.step(opt)
        out["skipped"].append(bool(scaler.found_inf(opt)))
        scaler.update()
        out["loss"].append(float(loss.detach()))
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    """amp_train (autocast fp16 + GradScaler) and MasterWeightOptimizer (fp32 weights, so the arithmetic is the
    spec's) with SGD and clipping, overflows injected, against the reference loop: the skipped steps and the scale
    sequence exactly, the fp16 loss within one fp16 ulp per step, the master-weight parameters to fp32 defaults."""
    s, device = workload.sizes(ctx, "equivalence"), ctx.device
    s = dataclasses.replace(s, steps=min(s.steps, SCALER_STEPS))
    batches = workload.batches(s, device)
    ref = _reference_scaled_run(s, device, batches, CLIP)
    rows = []
    expected_skips = [step in OVERFLOW_STEPS for step in range(s.steps)]
    notes = (f"tiny GPT, {s.steps} SGD steps lr {SGD_LR}, clipped to {CLIP}, dynamic scale {SCALER}; inf gradients "
             f"injected at steps {OVERFLOW_STEPS}. Reference: fp32, reference.loss_scaling.DynamicLossScaler, "
             f"reference.clipping. Expected skips {expected_skips}.")

    calls = iter(range(10**9))

    def loss_fn(model, batch):
        idx, targets = batch
        loss_sum = model(idx, targets, reduction="sum")[1]
        return _overflowing(loss_sum, next(calls)), (targets != -100).sum()

    model = workload.gpt(s, device)
    scaler = make_grad_scaler(torch.float16, device.type, **SCALER)
    history = amp_train(model, torch.optim.SGD(model.parameters(), lr=SGD_LR, foreach=False), batches,
                        steps=s.steps, dtype=torch.float16, scaler=scaler, max_grad_norm=CLIP, loss_fn=loss_fn)
    fp16_rtol = 2 * UNIT_ROUNDOFF[torch.float16]
    parts = [
        bitwise(_series(history.skipped), _series(ref["skipped"]), name="skipped steps vs reference"),
        bitwise(_series(history.scale), _series(ref["scale"]),
                name="loss scale at each step vs reference"),
        bitwise(_series(ref["skipped"]), _series(expected_skips), name="reference skips the injected steps"),
        allclose(torch.tensor(history.loss), torch.tensor(ref["loss"]), rtol=fp16_rtol, atol=0.0,
                 name="loss trajectory vs fp32 reference (<= 1 fp16 ulp)"),
    ]
    rows.append(spec.row(
        ctx, "autocast fp16 + GradScaler: overflow skips, scale, clipping, SGD",
        optimized="optimized.precision.amp_train(fp16, max_grad_norm)", peer="torch.amp.GradScaler",
        reference="reference.loss_scaling.DynamicLossScaler + reference.clipping (fp32)",
        equivalence=combine("fp16 GradScaler path", parts),
        notes=notes + f" Scales {history.scale}; skipped {history.skipped}."))

    # Unclipped: clipping at every step would absorb a constant factor on the gradients just as AdamW does.
    ref = _reference_scaled_run(s, device, batches, None)
    model = workload.gpt(s, device)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.SGD, loss_scale="dynamic", lr=SGD_LR, foreach=False,
                                **SCALER)
    scales, skipped, norms = [], [], []
    for step in range(s.steps):
        idx, targets = batches[step % len(batches)]
        opt.zero_grad()
        scales.append(opt.loss_scale)
        opt.scale_loss(_overflowing(model(idx, targets)[1], step)).backward()
        opt.step()
        skipped.append(bool(opt.last_step_skipped))
        norms.append(float(opt.last_grad_norm))
    clean = [i for i in range(s.steps) if not ref["skipped"][i]]
    parts = [
        bitwise(_series(skipped), _series(ref["skipped"]), name="skipped steps vs reference"),
        bitwise(_series(scales), _series(ref["scale"]),
                name="loss scale at each step vs reference"),
        allclose(torch.tensor([norms[i] for i in clean]), torch.tensor([ref["norm"][i] for i in clean]),
                 name="gradient norm of each clean step vs reference"),
        *[allclose(m, r, name=f"master {i} vs reference") for i, (m, r) in
          enumerate(zip(opt.master_params(), ref["params"], strict=True))],
    ]
    rows.append(spec.row(
        ctx, "MasterWeightOptimizer: overflow skips, scale, unscale, SGD",
        optimized="optimized.precision.MasterWeightOptimizer(SGD, fp32 weights)",
        reference="reference.loss_scaling.DynamicLossScaler + reference.clipping (fp32)",
        equivalence=combine("master-weight loss scaling", parts),
        notes=notes + " Here unclipped (clipping every step would hide a wrong unscale factor). fp32 weights: the "
        "same arithmetic as the reference up to the norm's summation order, so the parameters are held to fp32 "
        "defaults."))
    return rows
