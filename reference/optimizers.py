"""Optimizers, one parameter at a time: SGD, Adam, AdamW, Lion.

Each is a `torch.optim.Optimizer` whose `step` is a plain loop over parameters, the update rule written out with
the paper beside it. SGD, Adam and AdamW perform the very operations of torch.optim's for-loop implementations
(`foreach=False`) in the same order, so their results are bitwise equal, and they keep torch's state keys
("momentum_buffer"; "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") so a state_dict saved by one loads into the
other. Notation: p the parameter, g its gradient, t the step count (from 1), lr the learning rate, λ the weight decay.

Adam vs AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101): Adam's `weight_decay` is L2 regularisation, λp added
to the gradient, so it passes through the adaptive denominator and a weight with large gradients is barely decayed.
AdamW decays the weight directly, p <- p (1 - lr λ), outside the adaptive update: every weight shrinks at the same
rate. The two coincide only when λ = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _check_lr(lr: float) -> None:
    if isinstance(lr, Tensor) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


def _check_betas(betas: tuple[float, float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")


class _LoopOptimizer(torch.optim.Optimizer):
    """Shared `step`: evaluate the closure, then call `_update(p, grad, state, group)` for each parameter with a
    gradient."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, p.grad, self.state[p], group)
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError


class SGD(_LoopOptimizer):
    """Stochastic gradient descent with momentum (Polyak 1964; Sutskever et al. 2013, ICML, Sec. 2).

        g <- g + λ p                                   (L2 weight decay)
        b <- g                                         (first step)
        b <- μ b + (1 - dampening) g                   (later steps)
        d <- g + μ b  if nesterov  else  b             (no momentum: d = g)
        p <- p - lr d
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        _check_lr(lr)
        _check_nonneg("momentum", momentum)
        _check_nonneg("dampening", dampening)
        _check_nonneg("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov needs momentum > 0 and dampening == 0, got momentum={momentum}, "
                             f"dampening={dampening}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

    def _update(self, p, grad, state, group):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd != 0:
            grad = grad.add(p, alpha=wd)
        if mu != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(mu).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=mu) if group["nesterov"] else buf
        p.add_(grad, alpha=-lr)


class Adam(_LoopOptimizer):
    """Adam (Kingma & Ba 2015, arXiv 1412.6980, Algorithm 1) with L2 weight decay and AMSGrad (Reddi et al. 2018).

        g <- g + λ p                                   (L2: the decay enters the moments)
        m <- β1 m + (1 - β1) g                         (first moment; written lerp(m, g, 1 - β1))
        v <- β2 v + (1 - β2) g²                        (second moment)
        v̂ <- max(v̂, v)  if amsgrad  else  v
        p <- p - lr / (1 - β1^t) * m / (sqrt(v̂) / sqrt(1 - β2^t) + eps)

    The bias corrections 1 - β^t undo the moments' initialisation at zero; eps sits outside the corrected square
    root, as in torch (the paper's ε̂ form differs by the factor sqrt(1 - β2^t)).
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        _check_lr(lr)
        _check_betas(betas)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)

    def _update(self, p, grad, state, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = torch.tensor(0.0)  # a float32 CPU scalar, as torch keeps it
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        if wd != 0:
            if self.decoupled_weight_decay:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            exp_avg_sq = state["max_exp_avg_sq"]
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2): Adam with decoupled weight decay.

        p <- p (1 - lr λ)                              (before the Adam update, outside the moments)
        then the Adam update of `Adam` on the raw gradient g.

    Adam's arguments (betas, eps and amsgrad by keyword); only the default weight decay differs: λ = 1e-2, as in
    torch.optim.AdamW.
    """

    decoupled_weight_decay = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, weight_decay: float = 1e-2,
                 **adam_options: Any) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **adam_options)


class Lion(_LoopOptimizer):
    """Lion, EvoLved Sign Momentum (Chen et al. 2023, arXiv 2302.06675, Algorithm 2).

        c <- β1 m + (1 - β1) g                         (interpolate, then take the sign)
        p <- p (1 - lr λ) - lr sign(c)                 (decoupled decay; every coordinate moves by exactly lr)
        m <- β2 m + (1 - β2) g                         (written lerp(m, g, 1 - β2))

    One state tensor ("exp_avg") instead of Adam's two. The update has unit size per coordinate, so Lion wants an
    lr 3-10x smaller and a λ 3-10x larger than AdamW (paper, Sec. 5).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        _check_lr(lr)
        _check_betas(betas)
        _check_nonneg("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def _update(self, p, grad, state, group):
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg = state["exp_avg"]
        update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
        if wd != 0:
            p.mul_(1 - lr * wd)
        p.add_(update, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)
