"""Rows 2 and 3 of the `mixed_precision` check: the claims "memory halved" (mixed_precision.memory) and "1.5-2x
faster" (mixed_precision.speed), measured with conformance.measure; the check's docstring says what and how."""

from __future__ import annotations

import contextlib
import math

import torch

from conformance.checks import CheckSpec, Context
from conformance.checks import _mixed_precision_workload as workload
from conformance.checks._mixed_precision_workload import LR, SHORT, Sizes
from conformance.claims import Verdict
from conformance.figure import Figure, Panel, Series
from conformance.measure import PeakLiveBytes, cuda_peak_bytes, model_state_bytes, saved_tensor_bytes, time_fn
from conformance.result import Metric, Result
from optimized.precision import MasterWeightOptimizer, amp_step, make_grad_scaler
from reference.model import GPT, GPTConfig

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
    model = workload.gpt(s, device)
    n = model.num_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    amp_step(model, opt, batch, dtype=torch.float32)
    out["fp32"] = model_state_bytes(model.parameters(), optimizer=opt).total / n
    model = workload.gpt(s, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    amp_step(model, opt, batch, dtype=torch.bfloat16)
    out["autocast"] = model_state_bytes(model.parameters(), optimizer=opt).total / n
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = workload.gpt(s, device, half)
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


def memory_rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    s, device = workload.sizes(ctx, "memory"), ctx.device
    s = Sizes(s.config, s.batch_size, 32 if ctx.quick else 64, s.steps)
    wide = _wide_sizes(ctx)
    half_dtypes = (torch.bfloat16, torch.float16)
    saved = {}
    for label, sz in (("tiny", s), ("wide", wide)):
        batch = workload.batches(sz, device, 1)[0]
        saved[label, "fp32"] = _saved_breakdown(workload.gpt(sz, device), *batch, None)
        for dt in half_dtypes:
            saved[label, f"autocast {SHORT[dt]}"] = _saved_breakdown(workload.gpt(sz, device), *batch, dt)
        # Master-weight style: the model itself in bf16, no autocast, no weight copies.
        saved[label, "bf16 model"] = _saved_breakdown(workload.gpt(sz, device, torch.bfloat16), *batch, None)
    ratio = {k: v["total"] / saved[k[0], "fp32"]["total"] for k, v in saved.items()}
    batch = workload.batches(s, device, 1)[0]
    peaks = {dt: _step_peak(workload.gpt(s, device), batch, dt, device) for dt in (torch.float32, *half_dtypes)}
    state = _model_state_per_param(s, device, batch)
    n = workload.gpt(s, device).num_parameters()
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
    return [spec.row(ctx, "memory: activations and model state",
                     optimized="optimized.precision (autocast, master weights)", memory=metrics,
                     claim="mixed_precision.memory", verdict=verdict, notes=notes, figures=figures)]


def _memory_figure(s: Sizes, device: torch.device) -> Figure:
    """Saved-for-backward bytes vs sequence length: fp32, autocast bf16 (fp16 saves the same bytes), and the model
    computing in bf16 (the master-weight style), beside half of fp32."""
    lengths = [8, 16, 32, 63]
    series = {"fp32": [], "autocast bf16 (fp32 weights)": [], "bf16 model (fp32 master copy)": []}
    for t in lengths:
        sz = Sizes(s.config, s.batch_size, t, s.steps)
        idx, targets = workload.batches(sz, device, 1)[0]
        mib = 2.0**20
        series["fp32"].append(_saved_breakdown(workload.gpt(sz, device), idx, targets, None)["total"] / mib)
        series["autocast bf16 (fp32 weights)"].append(
            _saved_breakdown(workload.gpt(sz, device), idx, targets, torch.bfloat16)["total"] / mib)
        series["bf16 model (fp32 master copy)"].append(
            _saved_breakdown(workload.gpt(sz, device, torch.bfloat16), idx, targets, None)["total"] / mib)
    lines = [Series(lengths, ys, label=label, marker="o") for label, ys in series.items()]
    lines.append(Series(lengths, [y / 2 for y in series["fp32"]], label="50% of fp32 (the claim)", linestyle="--",
                        color="gray"))
    return Figure("mixed_precision_saved_bytes", [Panel(
        series=lines, xlabel="sequence length", ylabel="saved for backward (MiB)",
        title=f"tiny GPT, batch {s.batch_size}, {device.type}")], size=(5, 3.5))


# ---- 3. speed -------------------------------------------------------------------------------------------------------


def speed_rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    s, device = workload.sizes(ctx, "speed"), ctx.device
    batch = workload.batches(s, device, 1)[0]
    reps, warmup = (3, 1) if ctx.quick else (10, 3)
    cuda = device.type == "cuda"

    def timed(dtype: torch.dtype) -> float:
        model = workload.gpt(s, device)
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
    return [spec.row(ctx, "speed: fp32 vs autocast step time", optimized="optimized.precision.amp_step",
                     speed=metrics, claim="mixed_precision.speed", verdict=verdict, notes=notes)]
