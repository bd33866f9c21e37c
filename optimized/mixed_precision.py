"""Mixed-precision training for a plain PyTorch loop, in the two styles people use.

1. Autocast over fp32 weights (PyTorch AMP): `amp_step` / `amp_train`. The parameters, their gradients and the
   optimizer state stay fp32; inside `torch.autocast` the matmuls run on half-precision copies of their inputs
   (the weight copies are cached for the forward and saved for backward), so the activations saved for backward
   are mostly half precision. fp16 has a 5-bit exponent and needs loss scaling (torch.amp.GradScaler:
   Micikevicius et al. 2018, arXiv 1710.03740, Sec. 3.2); bf16 has fp32's 8-bit exponent and needs none.
   Per step:  zero_grad -> forward + loss under autocast -> backward of (S * loss) -> unscale (g / S) ->
   optional clip of the TRUE gradients -> step unless a gradient is inf/NaN -> move S.

2. Half-precision weights with an fp32 master copy inside the optimizer: `MasterWeightOptimizer` (Micikevicius
   et al. Sec. 3.1; Megatron-LM's Float16Optimizer; the layout ZeRO shards, arXiv 1910.02054 Sec. 3). The model
   holds fp16/bf16 parameters and computes in them; the optimizer holds an fp32 copy of each and steps that:
       g32 = fp32(g16) / S;  found_inf = any(!isfinite(g32));  optional clip of g32;
       unless found_inf:  fp32 step of (master, g32);  p16 = round(master)
       move S (the GradScaler rule: back off on overflow, grow after `growth_interval` clean steps)
   A tiny update (lr * g much below the ulp of a half-precision weight) is lost when added to the half weight but
   kept in the fp32 master, which is the point of the copy.

Memory per parameter with Adam (bytes, "ZeRO accounting" counts params + grads + optimizer state):
    fp32 training                        4 + 4 + 8 = 16
    autocast over fp32 weights           4 + 4 + 8 = 16, plus 2 per matmul weight for its half copy while a
                                                          forward's graph is alive
    MasterWeightOptimizer (this file)    2 + 2 + (4 master + 8 Adam) = 16 resident; from the end of backward to
                                                          the end of step() the fp32 gradient copies add 4
Model state is not halved by any of them: only the activations saved for backward are (conformance measures it).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from optimized.accumulation import Batch, LossFn, accumulate_gradients, batch_device, gpt_loss
from optimized.clipping import clip_grad_norm_, global_grad_norm
from optimized.distributed.hooks import GradReadyHooks

HALF_DTYPES = (torch.float16, torch.bfloat16)
IGNORE_INDEX = -100  # the targets convention of torch.nn.functional.cross_entropy



# ---- validation shared by both styles ------------------------------------------------------------------------------


def check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Raise ValueError unless `torch.autocast(device_type, dtype)` really runs in `dtype` on this machine.

    torch.autocast with a dtype the device does not support warns and silently runs in fp32 (CPU) or raises a
    RuntimeError (CUDA bf16 before Ampere); here both become one clear error before any work is done."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 for autocast, got {dtype}")
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"device type {device_type!r} has no autocast support")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError as err:
            raise ValueError(f"{device_type} has no {dtype} autocast support here: {err}") from err
    if not enabled:
        raise ValueError(f"{device_type} has no {dtype} autocast support here (torch would disable autocast)")


def make_grad_scaler(dtype: torch.dtype, device_type: str = "cuda", **kwargs: Any) -> torch.amp.GradScaler | None:
    """The scaler `dtype` needs: torch.amp.GradScaler(device_type, **kwargs) for fp16, None for bf16 and fp32."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device_type, **kwargs)
    if dtype in (torch.bfloat16, torch.float32):
        if kwargs:
            raise ValueError(f"{dtype} takes no loss scaler, so no scaler arguments; got {sorted(kwargs)}")
        return None
    raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")


def _check_scaler(dtype: torch.dtype, scaler: torch.amp.GradScaler | None) -> None:
    if dtype == torch.float16:
        if scaler is None:
            raise ValueError(
                "dtype=torch.float16 needs a torch.amp.GradScaler (fp16 gradients underflow without loss scaling); "
                "pass scaler=make_grad_scaler(torch.float16, device_type)"
            )
        if not scaler.is_enabled():
            raise ValueError(
                "scaler is disabled (torch.amp.GradScaler('cuda') disables itself without CUDA); build it for the "
                "device you train on: torch.amp.GradScaler(device_type)"
            )
    elif scaler is not None:
        raise ValueError(
            f"a GradScaler is for fp16 only; dtype={dtype} has fp32's exponent range and trains without loss "
            f"scaling: pass scaler=None"
        )


# ---- style 1: autocast over fp32 weights ---------------------------------------------------------------------------


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
    _check_scaler(dtype, scaler)
    if max_grad_norm is not None and (not max_grad_norm > 0 or math.isnan(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    micro_batches = _micro_batches(batch, accumulation_steps)

    optimizer.zero_grad(set_to_none=True)

    def autocast_loss(model: nn.Module, micro_batch: Batch):
        with torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
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


# ---- the loss scale and the overflow check: one piece for MasterWeightOptimizer and optimized.zero -------------------


def unscale_and_check_(grads: list[Tensor], inv_scale: Tensor, found_inf: Tensor) -> Tensor:
    """g *= inv_scale for every gradient, and found_inf (float32, 0-d) += 1 if any element is inf/NaN.

    The kernel GradScaler.unscale_ uses (one pass per device); inv_scale = 1 only checks."""
    for device, device_grads in _by_device(grads).items():
        device_found = found_inf.to(device)
        torch._amp_foreach_non_finite_check_and_unscale_(device_grads, device_found, inv_scale.to(device))
        if device_found is not found_inf:
            found_inf += device_found.to(found_inf.device)
    return found_inf


class LossScale:
    """The loss scale S of Micikevicius et al. 2018 (arXiv 1710.03740, Sec. 3.2) with GradScaler's update rule.

    loss_scale: "dynamic" (back off by `backoff_factor` on an overflow step, grow by `growth_factor` after
    `growth_interval` clean steps in a row), a fixed float S, or None (S = 1)."""

    def __init__(self, loss_scale: str | float | None, *, init_scale: float, growth_factor: float,
                 backoff_factor: float, growth_interval: int, device: torch.device) -> None:
        if isinstance(loss_scale, str):
            if loss_scale != "dynamic":
                raise ValueError(f"loss_scale must be 'dynamic', a float > 0 or None, got {loss_scale!r}")
        elif loss_scale is not None and (isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
                                         or not (math.isfinite(loss_scale) and loss_scale > 0)):
            raise ValueError(f"loss_scale must be 'dynamic', a finite float > 0 or None, got {loss_scale!r}")
        self.dynamic = loss_scale == "dynamic"
        if self.dynamic:
            if not (math.isfinite(init_scale) and init_scale > 0):
                raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
            if not growth_factor > 1.0:
                raise ValueError(f"growth_factor must be > 1.0, got {growth_factor!r}")
            if not 0.0 < backoff_factor < 1.0:
                raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
            if not isinstance(growth_interval, int) or growth_interval < 1:
                raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        start = init_scale if self.dynamic else (1.0 if loss_scale is None else float(loss_scale))
        self.scale = torch.full((), start, dtype=torch.float32, device=device)
        """S, a 0-d float32 tensor."""
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        """Consecutive clean steps since S last changed."""

    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * S: call backward on this."""
        return loss * self.scale.to(loss.device)

    def inv_scale(self) -> Tensor:
        """1 / S, computed in float64 as GradScaler does."""
        return self.scale.double().reciprocal().float()

    def update(self, found_inf: Tensor) -> None:
        """Move S by the GradScaler rule after a step whose gradients had (found_inf > 0) or had no inf/NaN."""
        if self.dynamic:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf.to(self.scale.device),
                                     self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])


# ---- style 2: half-precision weights, fp32 master copy in the optimizer --------------------------------------------


def _as_groups(params: Iterable[Tensor] | Iterable[dict]) -> list[dict]:
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of Tensors or of param-group dicts, got a single Tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: MasterWeightOptimizer needs at least one parameter")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    for g in groups:
        g["params"] = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
    return groups


class MasterWeightOptimizer(torch.optim.Optimizer):
    """An fp32 optimizer stepping fp32 master copies of half-precision model parameters, with loss scaling.

        opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.bfloat16, lr=3e-4)
        loss = model(idx, targets)[1]
        opt.scale_loss(loss).backward()
        opt.step()            # unscale, check, clip, fp32 step, copy back; skipped on overflow
        opt.zero_grad()

    params: the model's parameters (or param-group dicts); they keep their dtype and receive the rounded masters.
    optimizer_class: a torch.optim.Optimizer class built over the fp32 masters with `optimizer_kwargs`.
    dtype: when given, every parameter must have this dtype (a guard against handing fp32 weights to what should be
        an fp16 setup). None accepts any floating dtype; fp32 parameters then train exactly as `optimizer_class`.
    loss_scale: "dynamic" (the GradScaler rule, with init_scale / growth_factor / backoff_factor /
        growth_interval), a fixed float S, or None (S = 1). The inf/NaN check and skip happen in every case.
    max_grad_norm: clip the global 2-norm of the unscaled fp32 gradients to this (None: no clipping).

    `param_groups` are the inner optimizer's groups (holding the masters): LR schedulers work unchanged.
    After each step: `last_grad_norm` (pre-clip norm of the true gradients) and `last_step_skipped`."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        dtype: torch.dtype | None = None,
        loss_scale: str | float | None = "dynamic",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        max_grad_norm: float | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        if dtype is not None and dtype not in (*HALF_DTYPES, torch.float32):
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16, torch.float32 or None, got {dtype}")
        if max_grad_norm is not None and (not max_grad_norm > 0 or math.isnan(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.dtype = dtype
        self.max_grad_norm = max_grad_norm
        self.model_params: list[list[Tensor]] = []
        """The model's parameters, group by group, aligned with `param_groups` (which hold the masters)."""

        given = _as_groups(params)
        first = next((p for g in given for p in g["params"]), None)
        self.scaler = LossScale(loss_scale, init_scale=init_scale, growth_factor=growth_factor,
                                backoff_factor=backoff_factor, growth_interval=growth_interval,
                                device=first.device if first is not None else torch.device("cpu"))
        """S and its update rule (shared with optimized.zero.ZeroOptimizer)."""
        self._copied: dict[int, tuple[int, int]] = {}  # id(master) -> (id, version) of the model grad it copies
        groups = [self._master_group(g) for g in given]
        self._hooks = GradReadyHooks([p for g in given for p in g["params"] if p.requires_grad], lambda p: None,
                                     self._end_of_backward)
        self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        """The fp32 optimizer over the masters."""
        self._registering = True  # Optimizer.__init__ calls add_param_group for groups that are already built
        super().__init__(self.optimizer.param_groups, self.optimizer.defaults)
        self._registering = False
        self.param_groups = self.optimizer.param_groups  # one list: what a scheduler writes, the fp32 step reads
        self.state = self.optimizer.state
        self.last_grad_norm: Tensor | None = None
        self.last_step_skipped: bool | None = None

    def _master_group(self, group: dict) -> dict:
        """Check the group's model params, remember them, and return the group over their fp32 copies."""
        params = group["params"]
        seen = {id(p) for ps in self.model_params for p in ps}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) appears more than once in the param groups")
            seen.add(id(p))
            if not p.is_floating_point():
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is {p.dtype}; only floating params train")
            if self.dtype is not None and p.dtype != self.dtype:
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}) is {p.dtype} but dtype={self.dtype} was asked for: "
                    f"cast the model first (model.to({self.dtype})) or pass dtype=None"
                )
        self.model_params.append(params)
        masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in params]
        return {**group, "params": masters}

    def _end_of_backward(self) -> None:
        """Give the masters their fp32 gradients as soon as backward ends, so that torch.amp.GradScaler.unscale_
        (which reads `param_groups`, i.e. the masters) finds, unscales and checks them."""
        self._master_grads()

    @torch.no_grad()
    def _master_grads(self) -> list[tuple[Tensor, Tensor]]:
        """(model param, master) for every parameter with a gradient; the master's fp32 .grad copied from the
        model's unless it already holds this gradient (an fp32 model's gradient is used in place, no copy)."""
        pairs = []
        for params, group in zip(self.model_params, self.param_groups, strict=True):
            for p, m in zip(params, group["params"], strict=True):
                if p.grad is None:
                    continue
                pairs.append((p, m))
                stamp = (id(p.grad), p.grad._version)
                if m.grad is None or self._copied.get(id(m)) != stamp:
                    m.grad = p.grad.detach().to(torch.float32)
                    self._copied[id(m)] = (id(p.grad), p.grad._version)
        return pairs

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of MODEL parameters: their fp32 masters join the inner optimizer."""
        if self._registering:
            super().add_param_group(param_group)
            return
        group = _as_groups([param_group])[0]
        self.optimizer.add_param_group(self._master_group(group))
        self._hooks.add([p for p in group["params"] if p.requires_grad])

    # ---- the loss scale ---------------------------------------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        """The current S."""
        return float(self.scaler.scale)

    @property
    def growth_tracker(self) -> int:
        """Consecutive clean steps since S last changed (dynamic scaling)."""
        return int(self.scaler.growth_tracker)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * S: call backward on this."""
        return self.scaler.scale_loss(loss)

    # ---- the step ---------------------------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model parameters' gradients (the masters' fp32 gradients only live inside step())."""
        for params in self.model_params:
            for p in params:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach().zero_()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Unscale the fp32 copies of the gradients, check them, clip, step the masters, round them into the
        model. On inf/NaN the update is skipped (model, masters and optimizer state untouched) and S backs off."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = self._master_grads()
        if not pairs:
            raise RuntimeError("step() found no gradient on any parameter: call scale_loss(loss).backward() first")
        grads = [m.grad for _, m in pairs]
        # 1-2. fp32 gradients, unscaled and checked in one pass (the kernel GradScaler uses).
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scaler.scale.device)
        unscale_and_check_(grads, self.scaler.inv_scale(), found_inf)
        # 3. Optional clipping of the true gradients (its norm is inf/NaN on an overflow step: harmless, skipped).
        if self.max_grad_norm is not None:
            self.last_grad_norm = clip_grad_norm_([m for _, m in pairs], self.max_grad_norm)
        else:
            self.last_grad_norm = global_grad_norm(grads)
        # 4. fp32 step and copy back, unless a gradient overflowed.
        self.last_step_skipped = bool(found_inf.item())
        if not self.last_step_skipped:
            self.optimizer.step()
            for group in _by_device_dtype(pairs).values():
                torch._foreach_copy_([p for p, _ in group], [m for _, m in group])
        # 5. Move S by the GradScaler rule, and free the fp32 gradient copies.
        self.scaler.update(found_inf)
        for _, m in pairs:
            m.grad = None
        self._copied.clear()
        return loss

    # ---- checkpoints ------------------------------------------------------------------------------------------------

    def master_params(self) -> list[Tensor]:
        """The fp32 master copies, in parameter order."""
        return [m for group in self.param_groups for m in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, the fp32 masters (the half model cannot restore them) and the loss scale."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "master_params": [m.detach().clone() for m in self.master_params()],
            **self.scaler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state_dict(); the model parameters are set to the rounded restored masters."""
        masters = self.master_params()
        saved = state_dict["master_params"]
        if len(saved) != len(masters) or any(s.shape != m.shape for s, m in zip(saved, masters, strict=True)):
            raise ValueError(
                f"state_dict holds {len(saved)} master params of shapes {[tuple(s.shape) for s in saved]}, this "
                f"optimizer has {len(masters)} of shapes {[tuple(m.shape) for m in masters]}"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for m, s in zip(masters, saved, strict=True):
                m.copy_(s)
            for p, m in zip([p for ps in self.model_params for p in ps], masters, strict=True):
                p.copy_(m)
        self.scaler.load_state_dict(state_dict)


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


def _by_device_dtype(pairs: list[tuple[Tensor, Tensor]]) -> dict[tuple[torch.device, torch.dtype], list]:
    out: dict[tuple[torch.device, torch.dtype], list] = {}
    for p, m in pairs:
        out.setdefault((p.device, p.dtype), []).append((p, m))
    return out
