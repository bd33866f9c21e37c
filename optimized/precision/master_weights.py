"""Style 2: half-precision weights with an fp32 master copy inside the optimizer (`MasterWeightOptimizer`).

Micikevicius et al. 2018 (arXiv 1710.03740, Sec. 3.1); Megatron-LM's Float16Optimizer; the layout ZeRO shards
(arXiv 1910.02054, Sec. 3). The model holds fp16/bf16 parameters and computes in them; the optimizer holds an fp32
copy of each and steps that:
    g32 = fp32(g16) / S;  found_inf = any(!isfinite(g32));  optional clip of g32;
    unless found_inf:  fp32 step of (master, g32);  p16 = round(master)
    move S (the GradScaler rule: back off on overflow, grow after `growth_interval` clean steps)
A tiny update (lr * g much below the ulp of a half-precision weight) is lost when added to the half weight but kept
in the fp32 master, which is the point of the copy.

Memory per parameter with Adam: 2 (half param) + 2 (half grad) + 4 (master) + 8 (Adam) = 16 bytes resident, as
fp32 training; from the end of backward to the end of step() the fp32 gradient copies add 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optimized.clipping import clip_grad_norm_, global_grad_norm
from optimized.distributed.hooks import GradReadyHooks
from optimized.precision.autocast import HALF_DTYPES
from optimized.precision.scaler import LossScale, unscale_and_check_


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


def _by_device_dtype(pairs: list[tuple[Tensor, Tensor]]) -> dict[tuple[torch.device, torch.dtype], list]:
    out: dict[tuple[torch.device, torch.dtype], list] = {}
    for p, m in pairs:
        out.setdefault((p.device, p.dtype), []).append((p, m))
    return out
