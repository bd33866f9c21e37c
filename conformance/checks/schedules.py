"""Check `schedules`: the closed-form multipliers (reference.schedules), the LRScheduler classes
(optimized.schedules) and the peers, transformers' schedule factories and torch's CosineAnnealingLR, at every step.

For each schedule: the lr of two param groups with different base LRs in force at every optimizer step, from step 0
to twice the length of training (warmup 0, warmup = total and the steps past the end are covered by the cases).
Optimized vs reference: the same closed form, so bitwise. Peer vs reference: rtol 1e-12 (torch's chainable cosine
drifts by ~1e-16 per step; transformers' factories are the same formulas).
"""

from __future__ import annotations

import torch

from conformance.checks import CheckSpec, Context
from conformance.result import Result
from conformance.tolerance import allclose, bitwise, combine
from optimized import schedules as opt_schedules
from reference import schedules as ref_schedules

SPEC = CheckSpec(
    name="schedules", technique="LR schedules", reference="reference.schedules", optimized="optimized.schedules",
    order=50, peers=("transformers", "torch.optim.lr_scheduler"),
)
BASE_LRS = (0.3, 0.007)

# (schedule name, kwargs, transformers factory, its kwargs); None: the peer is torch's CosineAnnealingLR
CASES = [
    ("linear_warmup_decay", dict(warmup_steps=10, total_steps=100),
     "get_linear_schedule_with_warmup", dict(num_warmup_steps=10, num_training_steps=100)),
    ("linear_warmup_decay", dict(warmup_steps=0, total_steps=37),
     "get_linear_schedule_with_warmup", dict(num_warmup_steps=0, num_training_steps=37)),
    ("linear_warmup_decay", dict(warmup_steps=23, total_steps=23),
     "get_linear_schedule_with_warmup", dict(num_warmup_steps=23, num_training_steps=23)),
    ("cosine_with_warmup", dict(warmup_steps=10, total_steps=100),
     "get_cosine_schedule_with_warmup", dict(num_warmup_steps=10, num_training_steps=100)),
    ("cosine_with_warmup", dict(warmup_steps=7, total_steps=53, num_cycles=1.5, min_lr_ratio=0.1),
     "get_cosine_with_min_lr_schedule_with_warmup",
     dict(num_warmup_steps=7, num_training_steps=53, num_cycles=1.5, min_lr_rate=0.1)),
    ("constant_with_warmup", dict(warmup_steps=13),
     "get_constant_schedule_with_warmup", dict(num_warmup_steps=13)),
    ("inverse_sqrt", dict(warmup_steps=16), "get_inverse_sqrt_schedule", dict(num_warmup_steps=16)),
    ("warmup_stable_decay", dict(warmup_steps=5, stable_steps=30, decay_steps=15, min_lr_ratio=0.05),
     "get_wsd_schedule", dict(num_warmup_steps=5, num_stable_steps=30, num_decay_steps=15, min_lr_ratio=0.05)),
    ("warmup_stable_decay", dict(warmup_steps=5, stable_steps=30, decay_steps=15, decay_type="1-sqrt"),
     "get_wsd_schedule", dict(num_warmup_steps=5, num_stable_steps=30, num_decay_steps=15, decay_type="1-sqrt")),
    ("cosine_annealing", dict(t_max=50), None, None),
]


def _optimizer() -> torch.optim.Optimizer:
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [p], "lr": BASE_LRS[0]}, {"params": [q], "lr": BASE_LRS[1]}])


def _lrs(make_scheduler, steps: int) -> torch.Tensor:
    """(steps, groups) float64: each group's lr in force at optimizer step 0 .. steps-1."""
    opt = _optimizer()
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return torch.tensor(out, dtype=torch.float64)


def _length(kwargs: dict) -> int:
    if "total_steps" in kwargs:
        return kwargs["total_steps"]
    if "t_max" in kwargs:
        return kwargs["t_max"]
    if "decay_steps" in kwargs:
        return kwargs["warmup_steps"] + kwargs["stable_steps"] + kwargs["decay_steps"]
    return 4 * kwargs["warmup_steps"]


def run(ctx: Context) -> list[Result]:
    try:
        import transformers.optimization as hf  # heavy and optional; imported where it is used
    except ImportError:
        hf = None
    cases = CASES if not ctx.quick else [c for i, c in enumerate(CASES) if i in (0, 2, 3, 5, 6, 7, 9)]
    rows = []
    for name, kwargs, factory, peer_kwargs in cases:
        steps = 2 * _length(kwargs) + 3
        spec = torch.tensor([[b * ref_schedules.SCHEDULES[name](s, **kwargs) for b in BASE_LRS]
                             for s in range(steps)], dtype=torch.float64)  # (steps, groups)
        ours = _lrs(lambda o, n=name, k=kwargs: opt_schedules.build_scheduler(o, n, **k), steps)
        mine_eq = bitwise(ours, spec, name=f"optimized.schedules vs reference, {steps} steps")
        if factory is None:
            peer_name = "torch.optim.lr_scheduler.CosineAnnealingLR (chainable)"
            theirs = _lrs(lambda o, k=kwargs: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=k["t_max"]), steps)
        elif hf is not None:
            peer_name = f"transformers.{factory}"
            theirs = _lrs(lambda o, f=factory, k=peer_kwargs: getattr(hf, f)(o, **k), steps)
        else:
            peer_name, theirs = None, None
        if theirs is None:
            eq = combine(f"{name} {kwargs}", [mine_eq])
            peer_note = f"peer transformers.{factory} not run: transformers is not installed (pip install transformers)"
        else:
            peer_eq = allclose(theirs, spec, name=f"{peer_name} vs reference, {steps} steps", rtol=1e-12, atol=1e-15)
            eq = combine(f"{name} {kwargs}", [mine_eq, peer_eq])
            peer_note = f"peer: rtol 1e-12 (max err {peer_eq.max_error:.3g})"
        rows.append(SPEC.row(
            None, f"{name} {kwargs}", reference=f"reference.schedules.{name}",
            optimized=f"optimized.schedules.{opt_schedules.SCHEDULERS[name].__name__}",
            peer=peer_name, equivalence=eq,
            notes=f"lr of 2 param groups (base {BASE_LRS}) at every step 0..{steps - 1}, past the end of training; "
                  f"optimized: bitwise (max err {mine_eq.max_error:.3g}); {peer_note}"))
    return rows
