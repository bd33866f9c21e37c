"""Check `mixed_precision`: the seed's "FP16 + FP32 mixed computation: memory halved, 1.5-2x faster".

1. Equivalence. Mixed-precision training of the tiny GPT (optimized.precision: autocast bf16; autocast fp16 +
   torch.amp.GradScaler; half-precision weights under MasterWeightOptimizer) is held to fp32 reference.training:
   the loss may differ by at most one ulp of the half dtype (2u * L, u its unit roundoff) at every step, and the
   autocast forward and gradients at the initial weights obey the error-ratio rule against float64 (2x logits, 3x
   gradients). The final parameters' distance from the float64 run is reported beside the naive bf16 run's, not
   judged: AdamW's sign-like first steps turn a near-zero gradient's rounding into a full step of +-lr either way,
   so after T steps either run may sit up to ~2·lr·T from float64 in any entry, and which of two correct runs is
   further is chance (on the H200 autocast's worst entry was 0.0112 against a 2x-naive bound of 0.0105; on CPU
   entries of autocast's biases sit up to 33x further than the naive run's and pass only by the floor).
2. Memory (claim mixed_precision.memory, "50%"). Measured with conformance.measure:
   - bytes saved for backward by one forward, fp32 vs autocast bf16 / fp16 vs the model itself in bf16 (the
     master-weight style), on the tiny GPT and on a wider GPT-2-like layer with many tokens; autocast's bytes split
     by dtype, with the half copies of the weights (autocast casts each matmul weight and saves the copy) apart;
   - peak live bytes of a whole training step (forward, backward, AdamW) of the tiny GPT, fp32 vs autocast;
   - model-state bytes per parameter: fp32 AdamW (4 + 4 + 8), autocast over fp32 weights (the same, plus the
     transient half weight copies), MasterWeightOptimizer (2 + 2 + 4 master + 8 Adam).
   The verdict says which memory the 50% is true for.
3. Speed (claim mixed_precision.speed, "1.5-2x"). fp32 vs autocast step time in the same run (median after
   warm-up). On CUDA the fp32 baseline is timed with TF32 off (the claim's baseline) and on (what torch may use);
   on CPU the ratio is reported and the claim, made for GPUs with half-precision tensor cores, is not measurable.

This file builds the rows of 1; beside it, private to the check: _mixed_precision_scaler.py (the loss scaler's
paths: overflow skips, scale, unscale before clipping), _mixed_precision_claims.py (2 and 3) and
_mixed_precision_workload.py (the model, sizes and batches all of them use).
"""

from __future__ import annotations

import contextlib

import torch

from conformance.checks import CheckSpec, Context, _mixed_precision_claims, _mixed_precision_scaler
from conformance.checks import _mixed_precision_workload as workload
from conformance.checks._mixed_precision_workload import LR, SHORT, UNIT_ROUNDOFF, Sizes
from conformance.result import Metric, Result
from conformance.tolerance import GRADIENT_FACTOR, Equivalence, allclose, combine, error_ratio
from optimized.precision import MasterWeightOptimizer, amp_train, make_grad_scaler
from reference.model import GPT
from reference.training import train

SPEC = CheckSpec(
    name="mixed_precision", technique="mixed precision", reference="reference.training.train (fp32)",
    optimized="optimized.precision", order=30, peers=("torch.amp.GradScaler",),
    claims=("mixed_precision.memory", "mixed_precision.speed"),
)


# ---- 1. equivalence -------------------------------------------------------------------------------------------------


def _master_train(model: GPT, batches, steps: int, dtype: torch.dtype) -> tuple[list[float], list[bool], list]:
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=dtype, lr=LR)
    losses, skipped = [], []
    for step in range(steps):
        idx, targets = batches[step % len(batches)]
        opt.zero_grad()
        loss = model(idx, targets)[1]
        opt.scale_loss(loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
        skipped.append(bool(opt.last_step_skipped))
    return losses, skipped, opt.master_params()


def _forward_error_ratio(s: Sizes, device: torch.device, dtype: torch.dtype) -> Equivalence:
    """Autocast forward + backward at the initial weights vs float64, the model cast to `dtype` as naive base."""
    idx, targets = workload.batches(s, device, 1)[0]

    def run(model, autocast):
        with torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext():
            logits, loss = model(idx, targets)
        loss.backward()
        return logits, [(n, p.grad) for n, p in model.named_parameters()]

    ref_logits, ref_grads = run(workload.gpt(s, device, torch.float64), False)
    base_logits, base_grads = run(workload.gpt(s, device, dtype), False)
    opt_logits, opt_grads = run(workload.gpt(s, device), True)
    parts = [error_ratio(opt_logits, ref_logits, base_logits, name="logits", dtype=dtype)]
    parts += [error_ratio(o, r, b, name=f"grad {n}", factor=GRADIENT_FACTOR, dtype=dtype)
              for (n, o), (_, r), (_, b) in zip(opt_grads, ref_grads, base_grads, strict=True)]
    return combine(f"autocast {SHORT[dtype]} forward+backward vs fp64", parts)


def _equivalence(ctx: Context) -> list[Result]:
    s, device = workload.sizes(ctx, "equivalence"), ctx.device
    batches = workload.batches(s, device)
    runs = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        model = workload.gpt(s, device, dtype)
        runs[dtype] = (train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=s.steps).loss,
                       list(model.parameters()))
    ref32, (_, ref64_params), (_, naive_bf16_params) = runs[torch.float32][0], runs[torch.float64], runs[torch.bfloat16]

    def trajectory(losses: list[float], dtype: torch.dtype) -> Equivalence:
        rtol = 2 * UNIT_ROUNDOFF[dtype]  # one ulp of the half dtype at the loss's magnitude
        return allclose(torch.tensor(losses), torch.tensor(ref32), rtol=rtol, atol=0.0,
                        name=f"loss trajectory vs fp32 (<= 1 {SHORT[dtype]} ulp)")

    def final_params(params: list) -> list[Metric]:
        """The largest entry-wise distance from the float64 run's final parameters, this run's and the naive bf16
        run's (reported, not judged: see the module docstring)."""
        def largest(ps: list) -> float:
            return max(float((p.detach().double() - r.detach().double()).abs().max())
                       for p, r in zip(ps, ref64_params, strict=True))
        return [Metric("final params vs fp64, max |error|", largest(params), ""),
                Metric("naive bf16 run's final params vs fp64, max |error|", largest(naive_bf16_params), ""),
                Metric("AdamW's reach in these steps, 2·lr·steps", 2 * LR * s.steps, "")]

    rows = []
    notes = (f"tiny GPT ({sum(p.numel() for p in ref64_params)} params), {s.steps} AdamW steps lr {LR}, "
             f"batch {s.batch_size}x{s.seq_len}, copy task. Loss bound: |L - L_fp32| <= 2u*L_fp32 at every step "
             "(u = 2^-8 bf16, 2^-11 fp16); final params vs the float64 run reported beside the model trained "
             "entirely in bf16, not judged (AdamW turns rounding into +-lr steps; no naive fp16 run: fp16 AdamW "
             "state underflows).")
    for dtype in (torch.bfloat16, torch.float16):
        model = workload.gpt(s, device)
        scaler = make_grad_scaler(dtype, device.type)
        history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=s.steps,
                            dtype=dtype, scaler=scaler)
        parts = [_forward_error_ratio(s, device, dtype), trajectory(history.loss, dtype)]
        metrics = final_params(list(model.parameters())) if dtype == torch.bfloat16 else []
        skipped = sum(history.skipped)
        rows.append(SPEC.row(
            ctx, f"autocast {SHORT[dtype]}{' + GradScaler' if scaler else ''} vs fp32 training",
            optimized=f"optimized.precision.amp_train(dtype={SHORT[dtype]})",
            peer="torch.amp.GradScaler" if scaler else None,
            equivalence=combine(f"autocast {SHORT[dtype]}", parts), metrics=metrics,
            notes=notes + f" Skipped steps: {skipped}; final loss {history.loss[-1]:.4f} vs fp32 {ref32[-1]:.4f}."))
    for dtype in (torch.bfloat16, torch.float16):
        model = workload.gpt(s, device, dtype)
        losses, skipped, masters = _master_train(model, batches, s.steps, dtype)
        parts = [trajectory(losses, dtype)]
        metrics = final_params(masters) if dtype == torch.bfloat16 else []
        rows.append(SPEC.row(
            ctx, f"{SHORT[dtype]} weights + fp32 master copy vs fp32 training",
            optimized=f"optimized.precision.MasterWeightOptimizer(AdamW, dtype={SHORT[dtype]})",
            equivalence=combine(f"master weights {SHORT[dtype]}", parts), metrics=metrics,
            notes=notes + f" Dynamic loss scale from 2^16; skipped steps: {sum(skipped)}; final loss "
            f"{losses[-1]:.4f} vs fp32 {ref32[-1]:.4f}."))
    return rows


def run(ctx: Context) -> list[Result]:
    return (SPEC.guarded(ctx, "equivalence", _equivalence)
            + SPEC.guarded(ctx, "loss scaling", lambda c: _mixed_precision_scaler.rows(c, SPEC))
            + SPEC.guarded(ctx, "memory", lambda c: _mixed_precision_claims.memory_rows(c, SPEC))
            + SPEC.guarded(ctx, "speed", lambda c: _mixed_precision_claims.speed_rows(c, SPEC)))
