"""The checks of ZeroOptimizer's arguments, all made before any state changes (an error names the argument, the
value and what is allowed), and the probe that the inner optimizer's update is elementwise, which sharding its
state by slices of a flat buffer relies on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from optimized.data_parallel import refuse_meta
from optimized.mixed_precision import HALF_DTYPES
from optimized.zero.partition import parse_groups


def check_arguments(model: nn.Module, optimizer_class: type, stage: int, offload: bool,
                    param_dtype: torch.dtype | None, bucket_cap_mb: float, param_groups: list[dict] | None,
                    optimizer_kwargs: dict, itself: type) -> tuple[list[tuple[dict, list]], torch.device]:
    """Refuse what ZeroOptimizer (`itself`) cannot take; return the trainable parameters by group (parse_groups)
    and the one device they are on."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, itself):
        raise ValueError("optimizer_class cannot be ZeroOptimizer itself")
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if not isinstance(offload, bool):
        raise ValueError(f"offload must be True or False, got {offload!r}")
    if param_dtype is not None and param_dtype not in HALF_DTYPES:
        raise ValueError(
            f"param_dtype must be None, torch.float16 or torch.bfloat16 (half-precision compute with fp32 "
            f"master weights), got {param_dtype!r}"
        )
    if not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)):
        raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
    refuse_meta(model, "model")
    groups = parse_groups(model, param_groups)
    devices = {p.device for _, named in groups for _, p in named}
    if len(devices) != 1:
        raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
    for _, named in groups:
        for names, p in named:
            if not p.is_floating_point():
                raise ValueError(f"parameter {names[0]!r} has dtype {p.dtype}; ZeroOptimizer needs floating point")
    probe_elementwise(optimizer_class, optimizer_kwargs)
    return groups, devices.pop()


def probe_elementwise(optimizer_class: type, optimizer_kwargs: dict) -> None:
    """Refuse an optimizer whose update is not elementwise, before any state changes.

    ZeRO updates each rank's slice of a flat buffer on its own, so the update of an element may depend only on
    that element's own history (SGD, Adam, AdamW, Adagrad, RMSprop, Lion, ...). Probe: three steps on one (5, 7)
    tensor and on its two halves cut mid-row as separate 1-D tensors must agree; Adafactor (factored moments),
    LAMB/LARS (per-tensor trust ratios) or L-BFGS (a closure over all parameters) do not."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 7, generator=gen)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    whole = nn.Parameter(start.clone())
    halves = [nn.Parameter(start.reshape(-1)[:17].clone()), nn.Parameter(start.reshape(-1)[17:].clone())]
    try:
        opt_whole = optimizer_class([whole], **optimizer_kwargs)
        opt_halves = optimizer_class(halves, **optimizer_kwargs)
        for g in grads:
            whole.grad = g.clone()
            halves[0].grad, halves[1].grad = g.reshape(-1)[:17].clone(), g.reshape(-1)[17:].clone()
            opt_whole.step()
            opt_halves.step()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"optimizer_class {optimizer_class.__name__} with optimizer_kwargs {optimizer_kwargs} could not run a "
            f"probe step ({type(e).__name__}: {e}); ZeroOptimizer needs an elementwise torch.optim.Optimizer that "
            f"steps without a closure"
        ) from e
    joined = torch.cat([h.detach() for h in halves])
    shapes_ok = all(
        not isinstance(v, Tensor) or v.dim() == 0 or v.shape == h.shape
        for h in halves
        for v in opt_halves.state[h].values()
    )
    if not shapes_ok or not torch.allclose(joined, whole.detach().reshape(-1), rtol=1e-5, atol=1e-7):
        raise ValueError(
            f"optimizer_class {optimizer_class.__name__} is not elementwise: updating a tensor in two pieces gives "
            f"a different result than updating it whole (max difference "
            f"{float((joined - whole.detach().reshape(-1)).abs().max()):.3g}), so its state cannot be sharded by "
            f"slices of a flat buffer. Use an elementwise optimizer (SGD, Adam, AdamW, Adagrad, RMSprop, ...)"
        )
