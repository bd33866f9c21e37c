"""Build the fastest torch optimizer for a model, with the usual parameter groups; plus a foreach Lion.

    opt = build_optimizer(model, "adamw", lr=3e-4, weight_decay=0.1)

Implementation choice (`fused=None`): torch's fused kernels (one kernel for all parameters, Adam/AdamW/SGD) when
every parameter is on CUDA, the multi-tensor `foreach` path elsewhere (a handful of batched ops per step instead of
several ops per parameter). Both compute the for-loop update up to rounding; the conformance check `optimizers`
measures how far from the spec (reference.optimizers) each lands.

Parameter groups: weight decay pulls weights towards zero, which is regularisation for the matrices but only harm
for biases and LayerNorm gains (a gain decayed to 0 switches its channel off). The default `no_decay` rule exempts
every parameter with fewer than 2 dimensions (biases, norm weights) and decays matrices and embeddings, as GPT-2 /
nanoGPT training does; pass your own `no_decay(name, param) -> bool` to change it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from optimized import _validate as check

OPTIMIZERS = ("sgd", "adam", "adamw", "lion")
_DEFAULT_BETAS = {"adam": (0.9, 0.999), "adamw": (0.9, 0.999), "lion": (0.9, 0.99)}


def default_no_decay(name: str, param: Tensor) -> bool:
    """Exempt biases and normalisation weights (every tensor of fewer than 2 dims) from weight decay."""
    return param.dim() < 2


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Callable[[str, Tensor], bool] = default_no_decay,
) -> list[dict[str, Any]]:
    """[{params decayed, weight_decay}, {params exempt, weight_decay 0}], empty groups dropped.

    Trainable parameters only, each once (a tied weight is listed under its first name)."""
    if not isinstance(model, nn.Module):
        raise check.fail("model", model, "an nn.Module")
    weight_decay = check.real("weight_decay", weight_decay, minimum=0.0)
    check.function("no_decay", no_decay)
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _params(model: Any, name: str = "model", allowed: str = "an nn.Module, or ") -> list[Any]:
    """model as a list of parameters or param-group dicts (what torch.optim.Optimizer takes), checked."""
    if isinstance(model, (Tensor, str, bytes)) or not isinstance(model, Iterable):
        raise check.fail(name, model, f"{allowed}an iterable of parameters or param-group dicts")
    groups = list(model)
    for i, g in enumerate(groups):
        if isinstance(g, dict) and "params" in g:
            # Listed once here, so a generator of parameters is not used up before torch reads it.
            groups[i] = {**g, "params": check.tensors(f"{name}[{i}]['params']", g["params"])}
        elif not isinstance(g, Tensor):
            raise check.ArgumentError(f"{name} must hold parameters or param-group dicts with a 'params' entry, got "
                                      f"{g!r} at position {i}")
    return groups


def build_optimizer(
    model: nn.Module | Iterable[Any],
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
    momentum: float = 0.0,
    nesterov: bool = False,
    amsgrad: bool = False,
    fused: bool | None = None,
    no_decay: Callable[[str, Tensor], bool] = default_no_decay,
) -> torch.optim.Optimizer:
    """The optimizer `name` ("sgd", "adam", "adamw", "lion") over `model`'s parameter groups.

    model: an nn.Module (split into decay / no-decay groups by `no_decay`), or parameters / param-group dicts
        passed through unchanged (then `weight_decay` is the default for groups that do not set their own).
    betas: Adam/AdamW default (0.9, 0.999), Lion (0.9, 0.99). eps: Adam/AdamW. momentum, nesterov: SGD.
        amsgrad: Adam/AdamW.
    fused: None picks fused when every parameter is on CUDA (Adam, AdamW, SGD) and foreach otherwise; True demands
        torch's fused kernel (CUDA or CPU; not for Lion); False uses foreach.
    """
    key = check.one_of("name", name, OPTIMIZERS, case_sensitive=False)
    lr = check.real("lr", lr, minimum=0.0)
    weight_decay = check.real("weight_decay", weight_decay, minimum=0.0)
    eps = check.real("eps", eps, minimum=0.0)
    momentum = check.real("momentum", momentum, minimum=0.0)
    check.boolean("nesterov", nesterov)
    check.boolean("amsgrad", amsgrad)
    check.boolean("fused", fused, optional=True)
    check.function("no_decay", no_decay)
    betas_given = betas is not None
    betas = check.pair("betas", betas, minimum=0.0, maximum=1.0, max_open=True) if betas_given else (
        _DEFAULT_BETAS.get(key, (0.9, 0.999)))
    if key == "lion" and fused:
        raise ValueError("fused=True: torch has no fused Lion kernel; use fused=None or False (foreach Lion)")
    # An option the chosen optimizer has no use for is refused, not silently dropped.
    applies = {"betas": ("adam", "adamw", "lion"), "eps": ("adam", "adamw"), "amsgrad": ("adam", "adamw"),
               "momentum": ("sgd",), "nesterov": ("sgd",)}
    given = {"betas": betas_given, "eps": eps != 1e-8, "amsgrad": amsgrad, "momentum": momentum != 0.0,
             "nesterov": nesterov}
    for option, owners in applies.items():
        if given[option] and key not in owners:
            raise ValueError(f"{option} does not apply to {key!r}; it applies to {', '.join(owners)}")
    if nesterov and momentum == 0.0:
        raise check.fail("nesterov", nesterov, "False when momentum is 0 (Nesterov's look-ahead needs a momentum > 0)")

    if isinstance(model, nn.Module):
        groups: list[Any] = param_groups(model, weight_decay, no_decay)
        params = [p for g in groups for p in g["params"]]
    else:
        groups = _params(model)
        params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not params:
        raise ValueError("model has no trainable parameters to optimize")

    on_cuda = all(p.is_cuda for p in params)
    use_fused = bool(fused) if fused is not None else (on_cuda and key != "lion")
    impl: dict[str, Any] = {"fused": True} if use_fused else {"foreach": True}
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **impl)
    if key == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                **impl)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                 **impl)
    return Lion(groups, lr=lr, betas=betas, weight_decay=weight_decay)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, arXiv 2302.06675, Algorithm 2) with multi-tensor (foreach) ops.

        c <- β1 m + (1 - β1) g;   p <- p (1 - lr λ) - lr sign(c);   m <- β2 m + (1 - β2) g

    Each line is one batched op over all parameters of a (device, dtype) bucket. State: "exp_avg" (m).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        lr = check.real("lr", lr, minimum=0.0)
        betas = check.pair("betas", betas, minimum=0.0, maximum=1.0, max_open=True)
        weight_decay = check.real("weight_decay", weight_decay, minimum=0.0)
        super().__init__(_params(params, "params", ""), dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps, gs, ms = buckets.setdefault((p.device, p.dtype), ([], [], []))
                ps.append(p)
                gs.append(p.grad)
                ms.append(state["exp_avg"])
            for ps, gs, ms in buckets.values():
                update = torch._foreach_mul(ms, beta1)
                torch._foreach_add_(update, gs, alpha=1 - beta1)
                torch._foreach_sign_(update)
                if wd != 0:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_add_(ps, update, alpha=-lr)
                torch._foreach_lerp_(ms, gs, 1 - beta2)
        return loss
