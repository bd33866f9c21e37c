"""Check `mixed_precision`: the seed's "FP16 + FP32 mixed computation: memory halved, 1.5-2x faster".

1. Equivalence. Mixed-precision training of the tiny GPT (optimized.mixed_precision: autocast bf16; autocast fp16 +
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from conformance.checks import CheckSpec, Context
from conformance.claims import Verdict
from conformance.figure import Figure, Panel, Series
from conformance.measure import PeakLiveBytes, cuda_peak_bytes, model_state_bytes, saved_tensor_bytes, time_fn
from conformance.result import Metric, Result
from conformance.tolerance import GRADIENT_FACTOR, Equivalence, allclose, bitwise, combine, error_ratio
from optimized.precision import MasterWeightOptimizer, amp_step, amp_train, make_grad_scaler
from reference.clipping import clip_grad_norm
from reference.data import make_batches
from reference.loss_scaling import DynamicLossScaler
from reference.model import GPT, GPTConfig
from reference.training import train

SPEC = CheckSpec(
    name="mixed_precision", technique="mixed precision", reference="reference.training.train (fp32)",
    optimized="optimized.mixed_precision", order=30, peers=("torch.amp.GradScaler",),
    claims=("mixed_precision.memory", "mixed_precision.speed"),
)
LR = 3e-3
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Sizes:
    config: GPTConfig
    batch_size: int
    seq_len: int
    steps: int


def _sizes(ctx: Context, purpose: str) -> Sizes:
    """Small for equivalence and memory; for speed on CUDA a model large enough to be compute bound."""
    if purpose == "speed" and ctx.device.type == "cuda":
        width, layers, seq = (512, 4, 256) if ctx.quick else (1024, 8, 512)
        cfg = GPTConfig(vocab_size=8192, block_size=seq, n_layer=layers, n_head=width // 64, n_embd=width)
        return Sizes(cfg, 8, seq, 0)
    if purpose == "speed" and not ctx.quick:  # CPU: one GPT-2-like layer, enough work to time the matmuls
        return Sizes(GPTConfig(vocab_size=64, block_size=128, n_layer=1, n_head=4, n_embd=256), 8, 128, 0)
    cfg = GPTConfig(vocab_size=37, block_size=64, n_layer=2, n_head=4, n_embd=32 if ctx.quick else 64)
    return Sizes(cfg, 4 if ctx.quick else 8, 13 if ctx.quick else 32, 8 if ctx.quick else 30)


def _batches(s: Sizes, device: torch.device, n: int = 3):
    return [(i.to(device), t.to(device)) for i, t in make_batches(
        n, batch_size=s.batch_size, seq_len=s.seq_len, vocab_size=s.config.vocab_size, task="copy", seed=3)]


def _model(s: Sizes, device: torch.device, dtype: torch.dtype = torch.float32) -> GPT:
    return GPT(s.config).to(device=device, dtype=dtype)


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
    idx, targets = _batches(s, device, 1)[0]

    def run(model, autocast):
        with torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext():
            logits, loss = model(idx, targets)
        loss.backward()
        return logits, [(n, p.grad) for n, p in model.named_parameters()]

    ref_logits, ref_grads = run(_model(s, device, torch.float64), False)
    base_logits, base_grads = run(_model(s, device, dtype), False)
    opt_logits, opt_grads = run(_model(s, device), True)
    parts = [error_ratio(opt_logits, ref_logits, base_logits, name="logits", dtype=dtype)]
    parts += [error_ratio(o, r, b, name=f"grad {n}", factor=GRADIENT_FACTOR, dtype=dtype)
              for (n, o), (_, r), (_, b) in zip(opt_grads, ref_grads, base_grads, strict=True)]
    return combine(f"autocast {SHORT[dtype]} forward+backward vs fp64", parts)


def _equivalence(ctx: Context) -> list[Result]:
    s, device = _sizes(ctx, "equivalence"), ctx.device
    batches = _batches(s, device)
    runs = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        model = _model(s, device, dtype)
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
        model = _model(s, device)
        scaler = make_grad_scaler(dtype, device.type)
        history = amp_train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=s.steps,
                            dtype=dtype, scaler=scaler)
        parts = [_forward_error_ratio(s, device, dtype), trajectory(history.loss, dtype)]
        metrics = final_params(list(model.parameters())) if dtype == torch.bfloat16 else []
        skipped = sum(history.skipped)
        rows.append(SPEC.row(
            ctx, f"autocast {SHORT[dtype]}{' + GradScaler' if scaler else ''} vs fp32 training",
            optimized=f"optimized.mixed_precision.amp_train(dtype={SHORT[dtype]})",
            peer="torch.amp.GradScaler" if scaler else None,
            equivalence=combine(f"autocast {SHORT[dtype]}", parts), metrics=metrics,
            notes=notes + f" Skipped steps: {skipped}; final loss {history.loss[-1]:.4f} vs fp32 {ref32[-1]:.4f}."))
    for dtype in (torch.bfloat16, torch.float16):
        model = _model(s, device, dtype)
        losses, skipped, masters = _master_train(model, batches, s.steps, dtype)
        parts = [trajectory(losses, dtype)]
        metrics = final_params(masters) if dtype == torch.bfloat16 else []
        rows.append(SPEC.row(
            ctx, f"{SHORT[dtype]} weights + fp32 master copy vs fp32 training",
            optimized=f"optimized.mixed_precision.MasterWeightOptimizer(AdamW, dtype={SHORT[dtype]})",
            equivalence=combine(f"master weights {SHORT[dtype]}", parts), metrics=metrics,
            notes=notes + f" Dynamic loss scale from 2^16; skipped steps: {sum(skipped)}; final loss "
            f"{losses[-1]:.4f} vs fp32 {ref32[-1]:.4f}."))
    return rows


# ---- 1b. the loss scaler's paths: overflow, skip, growth, unscale before clipping, with SGD -------------------------

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
    model = _model(s, device)
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


def _scaler_rows(ctx: Context) -> list[Result]:
    """amp_train (autocast fp16 + GradScaler) and MasterWeightOptimizer (fp32 weights, so the arithmetic is the
    spec's) with SGD and clipping, overflows injected, against the reference loop: the skipped steps and the scale
    sequence exactly, the fp16 loss within one fp16 ulp per step, the master-weight parameters to fp32 defaults."""
    s, device = _sizes(ctx, "equivalence"), ctx.device
    s = dataclasses.replace(s, steps=min(s.steps, SCALER_STEPS))
    batches = _batches(s, device)
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

    model = _model(s, device)
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
    rows.append(SPEC.row(
        ctx, "autocast fp16 + GradScaler: overflow skips, scale, clipping, SGD",
        optimized="optimized.mixed_precision.amp_train(fp16, max_grad_norm)", peer="torch.amp.GradScaler",
        reference="reference.loss_scaling.DynamicLossScaler + reference.clipping (fp32)",
        equivalence=combine("fp16 GradScaler path", parts),
        notes=notes + f" Scales {history.scale}; skipped {history.skipped}."))

    # Unclipped: clipping at every step would absorb a constant factor on the gradients just as AdamW does.
    ref = _reference_scaled_run(s, device, batches, None)
    model = _model(s, device)
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
    rows.append(SPEC.row(
        ctx, "MasterWeightOptimizer: overflow skips, scale, unscale, SGD",
        optimized="optimized.mixed_precision.MasterWeightOptimizer(SGD, fp32 weights)",
        reference="reference.loss_scaling.DynamicLossScaler + reference.clipping (fp32)",
        equivalence=combine("master-weight loss scaling", parts),
        notes=notes + " Here unclipped (clipping every step would hide a wrong unscale factor). fp32 weights: the "
        "same arithmetic as the reference up to the norm's summation order, so the parameters are held to fp32 "
        "defaults."))
    return rows


# ---- 2. memory ------------------------------------------------------------------------------------------------------


def _saved_breakdown(model: GPT, idx, targets, dtype: torch.dtype | None) -> dict[str, int]:
    """Bytes saved for backward by one forward (+ loss), total (conformance.measure) and split: half-precision
    copies of parameters (found by value), other half-precision tensors, fp32 tensors, the rest (masks, indices)."""
    params = list(model.parameters())
    autocast = torch.autocast(idx.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def forward():
        with autocast:
            return model(idx, targets)[1]

    _, total = saved_tensor_bytes(forward, exclude=params)
    seen: dict[int, tuple[str, int]] = {}
    param_keys = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in param_keys or key in seen:
            return t
        nbytes = t.untyped_storage().nbytes()
        if t.dtype in (torch.float16, torch.bfloat16):
            # The whole storage (a saved weight is often a transposed view of autocast's cast copy).
            base = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
            is_copy = any(p.numel() == base.numel() and torch.equal(p.detach().to(t.dtype).reshape(-1), base)
                          for p in params)
            seen[key] = ("weight_copies" if is_copy else "half", nbytes)
        elif t.dtype == torch.float32:
            seen[key] = ("fp32", nbytes)
        else:
            seen[key] = ("other", nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    split = {k: sum(b for kind, b in seen.values() if kind == k) for k in ("weight_copies", "half", "fp32", "other")}
    split["total"] = total
    return split


def _step_peak(model: GPT, batch, dtype: torch.dtype, device: torch.device) -> int:
    """Peak bytes allocated during one full training step (after a warm-up step created the AdamW state)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = make_grad_scaler(dtype, device.type)
    amp_step(model, opt, batch, dtype=dtype, scaler=scaler)
    if device.type == "cuda":
        _, peak = cuda_peak_bytes(amp_step, model, opt, batch, dtype=dtype, scaler=scaler)
        return peak
    with PeakLiveBytes() as tracker:
        amp_step(model, opt, batch, dtype=dtype, scaler=scaler)
    return tracker.peak


def _model_state_per_param(s: Sizes, device: torch.device, batch) -> dict[str, float]:
    """Bytes per parameter after one step: params + grads + optimizer state (+ fp32 masters)."""
    out = {}
    model = _model(s, device)
    n = model.num_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    amp_step(model, opt, batch, dtype=torch.float32)
    out["fp32"] = model_state_bytes(model.parameters(), optimizer=opt).total / n
    model = _model(s, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    amp_step(model, opt, batch, dtype=torch.bfloat16)
    out["autocast"] = model_state_bytes(model.parameters(), optimizer=opt).total / n
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = _model(s, device, half)
    mwo = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=half, lr=LR)
    for _ in range(2):  # the first step creates the AdamW state; the second shows what step() adds on top
        mwo.zero_grad()
        mwo.scale_loss(model(*batch)[1]).backward()
        with PeakLiveBytes() as tracker:
            mwo.step()
    state = model_state_bytes(model.parameters(), optimizer=mwo.optimizer, optimizer_tensors=mwo.master_params())
    out["master"] = state.total / n
    out["master_params"] = state.kind_total("params") / n
    out["master_grads"] = state.kind_total("grads") / n
    out["master_optimizer"] = state.kind_total("optimizer") / n
    out["master_step_transient"] = tracker.peak / n
    out["master_dtype"] = SHORT[half]
    return out


def _wide_sizes(ctx: Context) -> Sizes:
    """A GPT-2-like layer (64-wide heads) with many more tokens than its width, as in pretraining, so activations
    dominate the saved bytes rather than the loss's logits or autocast's weight copies."""
    width, layers, batch, seq = (256, 1, 8, 128) if ctx.quick else (512, 2, 8, 256)
    cfg = GPTConfig(vocab_size=64, block_size=seq, n_layer=layers, n_head=width // 64, n_embd=width)
    return Sizes(cfg, batch, seq, 0)


def _memory(ctx: Context) -> list[Result]:
    s, device = _sizes(ctx, "memory"), ctx.device
    s = Sizes(s.config, s.batch_size, 32 if ctx.quick else 64, s.steps)
    wide = _wide_sizes(ctx)
    half_dtypes = (torch.bfloat16, torch.float16)
    saved = {}
    for label, sz in (("tiny", s), ("wide", wide)):
        batch = _batches(sz, device, 1)[0]
        saved[label, "fp32"] = _saved_breakdown(_model(sz, device), *batch, None)
        for dt in half_dtypes:
            saved[label, f"autocast {SHORT[dt]}"] = _saved_breakdown(_model(sz, device), *batch, dt)
        # Master-weight style: the model itself in bf16, no autocast, no weight copies.
        saved[label, "bf16 model"] = _saved_breakdown(_model(sz, device, torch.bfloat16), *batch, None)
    ratio = {k: v["total"] / saved[k[0], "fp32"]["total"] for k, v in saved.items()}
    batch = _batches(s, device, 1)[0]
    peaks = {dt: _step_peak(_model(s, device), batch, dt, device) for dt in (torch.float32, *half_dtypes)}
    state = _model_state_per_param(s, device, batch)
    n = _model(s, device).num_parameters()
    shape = {"tiny": f"tiny GPT ({n} params, {s.config.n_layer} layers, width {s.config.n_embd}, batch "
                     f"{s.batch_size}x{s.seq_len})",
             "wide": f"GPT {wide.config.n_layer} layer(s), width {wide.config.n_embd}, {wide.config.n_head} heads, "
                     f"batch {wide.batch_size}x{wide.seq_len}"}

    metrics = []
    for label in ("tiny", "wide"):
        fp32, auto = saved[label, "fp32"], saved[label, "autocast bf16"]
        metrics += [
            Metric(f"saved for backward, fp32, {label}", fp32["total"], "bytes"),
            Metric(f"saved, autocast bf16 / fp32, {label}", ratio[label, "autocast bf16"], "fraction", "50%"),
            Metric(f"saved, autocast fp16 / fp32, {label}", ratio[label, "autocast fp16"], "fraction", "50%"),
            Metric(f"  autocast bf16 without its weight copies / fp32, {label}",
                   (auto["total"] - auto["weight_copies"]) / fp32["total"], "fraction", "50%"),
            Metric(f"  autocast bf16 split: bf16 activations / weight copies / fp32 tensors, {label}",
                   auto["half"], "bytes"),
            Metric("    weight copies", auto["weight_copies"], "bytes"),
            Metric("    fp32 (residual stream, LayerNorm, loss)", auto["fp32"], "bytes"),
            Metric(f"saved, bf16 model (master-weight style) / fp32, {label}", ratio[label, "bf16 model"],
                   "fraction", "50%"),
        ]
    metrics += [Metric(f"peak of a training step, autocast {SHORT[dt]} / fp32, tiny", peaks[dt] / peaks[torch.float32],
                       "fraction", "50%") for dt in half_dtypes]
    copies = saved["tiny", "autocast bf16"]["weight_copies"] / n
    metrics += [
        Metric("model state, fp32 AdamW", state["fp32"], "B/param", "16"),
        Metric("model state, autocast over fp32 weights", state["autocast"], "B/param", "16"),
        Metric("  + transient bf16 weight copies (saved for backward)", copies, "B/param"),
        Metric(f"model state, {state['master_dtype']} weights + fp32 master (params/grads/optimizer "
               f"{state['master_params']:.2f}/{state['master_grads']:.2f}/{state['master_optimizer']:.2f})",
               state["master"], "B/param", "16 (2+2+12)"),
        Metric("  + transient inside MasterWeightOptimizer.step()", state["master_step_transient"], "B/param"),
        Metric("model state, master weights / fp32", state["master"] / state["fp32"], "fraction", "50%"),
    ]
    model_half, auto_half = ratio["wide", "bf16 model"], min(ratio["wide", "autocast bf16"],
                                                               ratio["wide", "autocast fp16"])
    measured = (f"the model computing in bf16 (half weights + fp32 master copy) saves {model_half:.0%} of fp32's "
                f"bytes for backward on the wide layer; autocast over fp32 weights saves {auto_half:.0%} there and "
                f"{ratio['tiny', 'autocast bf16']:.0%} on the tiny GPT")
    if min(model_half, auto_half) <= 0.55:
        verdict = Verdict.HOLDS_UNDER_CONDITIONS
        says = f"holds only for the activations saved for backward, and only where they are all half precision: " \
               f"{measured}"
    else:
        verdict = Verdict.DOES_NOT_HOLD
        says = f"does not hold even for the activations saved for backward: {measured}"
    notes = (
        f"The 50% {says}. Model-state memory is NOT halved: {state['fp32']:.3f} B/param for fp32 AdamW "
        f"(4 param + 4 grad + 8 moments), {state['autocast']:.3f} under autocast (the same fp32 state, plus "
        f"{copies:.2f} B/param of half weight copies while a graph is alive), {state['master']:.3f} with "
        f"{state['master_dtype']} weights and fp32 masters (2 + 2 + 4 master + 8 moments; the 0.0x over 16 are "
        f"AdamW's step counters). MasterWeightOptimizer.step() adds {state['master_step_transient']:.1f} B/param "
        "for a moment: the fp32 gradient copies (4) and AdamW's foreach temporaries. Under autocast the saved "
        "bytes stay above half because the residual stream, LayerNorm inputs and the loss's logits stay fp32 and "
        "autocast saves a half copy of every matmul weight. Saved bytes: conformance.measure.saved_tensor_bytes "
        "(parameters excluded), split by dtype with a saved-tensor hook; step peaks: "
        + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "conformance.measure.PeakLiveBytes")
        + f"; model state: conformance.measure.model_state_bytes. Shapes: {shape['tiny']}; {shape['wide']}."
    )
    figures = [_memory_figure(s, device)] if not ctx.quick else []
    return [SPEC.row(ctx, "memory: activations and model state",
                     optimized="optimized.mixed_precision (autocast, master weights)", memory=metrics,
                     claim="mixed_precision.memory", verdict=verdict, notes=notes, figures=figures)]


def _memory_figure(s: Sizes, device: torch.device) -> Figure:
    """Saved-for-backward bytes vs sequence length: fp32, autocast bf16 (fp16 saves the same bytes), and the model
    computing in bf16 (the master-weight style), beside half of fp32."""
    lengths = [8, 16, 32, 63]
    series = {"fp32": [], "autocast bf16 (fp32 weights)": [], "bf16 model (fp32 master copy)": []}
    for t in lengths:
        sz = Sizes(s.config, s.batch_size, t, s.steps)
        idx, targets = _batches(sz, device, 1)[0]
        mib = 2.0**20
        series["fp32"].append(_saved_breakdown(_model(sz, device), idx, targets, None)["total"] / mib)
        series["autocast bf16 (fp32 weights)"].append(
            _saved_breakdown(_model(sz, device), idx, targets, torch.bfloat16)["total"] / mib)
        series["bf16 model (fp32 master copy)"].append(
            _saved_breakdown(_model(sz, device, torch.bfloat16), idx, targets, None)["total"] / mib)
    lines = [Series(lengths, ys, label=label, marker="o") for label, ys in series.items()]
    lines.append(Series(lengths, [y / 2 for y in series["fp32"]], label="50% of fp32 (the claim)", linestyle="--",
                        color="gray"))
    return Figure("mixed_precision_saved_bytes", [Panel(
        series=lines, xlabel="sequence length", ylabel="saved for backward (MiB)",
        title=f"tiny GPT, batch {s.batch_size}, {device.type}")], size=(5, 3.5))


# ---- 3. speed -------------------------------------------------------------------------------------------------------


def _speed(ctx: Context) -> list[Result]:
    s, device = _sizes(ctx, "speed"), ctx.device
    batch = _batches(s, device, 1)[0]
    reps, warmup = (3, 1) if ctx.quick else (10, 3)
    cuda = device.type == "cuda"

    def timed(dtype: torch.dtype) -> float:
        model = _model(s, device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        scaler = make_grad_scaler(dtype, device.type)
        return time_fn(lambda: amp_step(model, opt, batch, dtype=dtype, scaler=scaler), warmup=warmup, reps=reps,
                       device=device).median_s

    tf32_before = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        times = {"fp32": timed(torch.float32)}
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            times["fp32 (TF32)"] = timed(torch.float32)
            torch.backends.cuda.matmul.allow_tf32 = False
        times["bf16"] = timed(torch.bfloat16)
        times["fp16"] = timed(torch.float16)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32_before
    if not all(math.isfinite(v) and v > 0 for v in times.values()):
        raise RuntimeError(f"step times must be finite and positive, got {times}")
    metrics = [Metric(f"step time, {k}", v, "s") for k, v in times.items()]
    ratios = {dt: times["fp32"] / times[dt] for dt in ("bf16", "fp16")}
    metrics += [Metric(f"speed-up, autocast {dt} vs fp32", r, "x", "1.5-2x") for dt, r in ratios.items()]
    if cuda:
        metrics += [Metric(f"speed-up, autocast {dt} vs fp32 with TF32", times["fp32 (TF32)"] / times[dt], "x")
                    for dt in ("bf16", "fp16")]
    best = max(ratios.values())
    where = (f"GPT {s.config.n_layer} layers, width {s.config.n_embd}, batch {s.batch_size}x{s.seq_len}; "
             f"median of {reps} steps after {warmup} warm-up, each a full amp_step (zero_grad, forward, backward, "
             "AdamW; fp16 with GradScaler)")
    if not cuda:
        verdict = Verdict.NOT_MEASURABLE
        notes = (f"Measured on CPU, off the claim's hardware (GPUs with half-precision tensor cores): best "
                 f"speed-up {best:.2f}x. CPUs without native bf16/fp16 matmul (AMX, AVX512-BF16) convert and "
                 f"run slower in half precision. {where}.")
    else:
        tf32_best = max(times["fp32 (TF32)"] / times[dt] for dt in ("bf16", "fp16"))
        if best >= 1.5 and tf32_best >= 1.5:
            verdict = Verdict.HOLDS
        elif best >= 1.5:
            verdict = Verdict.HOLDS_UNDER_CONDITIONS
        else:
            verdict = Verdict.DOES_NOT_HOLD
        notes = (f"{torch.cuda.get_device_name(device)}: best {best:.2f}x against true fp32 (TF32 off), "
                 f"{tf32_best:.2f}x against fp32 with TF32 matmuls (torch.backends.cuda.matmul.allow_tf32 was "
                 f"{tf32_before} before the check). {where}.")
    return [SPEC.row(ctx, "speed: fp32 vs autocast step time", optimized="optimized.mixed_precision.amp_step",
                     speed=metrics, claim="mixed_precision.speed", verdict=verdict, notes=notes)]


def run(ctx: Context) -> list[Result]:
    return (SPEC.guarded(ctx, "equivalence", _equivalence) + SPEC.guarded(ctx, "loss scaling", _scaler_rows)
            + SPEC.guarded(ctx, "memory", _memory)
            + SPEC.guarded(ctx, "speed", _speed))
