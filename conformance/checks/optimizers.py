"""Check `optimizers`: reference.optimizers (the for-loop spec) against torch.optim and optimized.optimizers.

The tiny GPT is trained for a few steps from the same initialisation on the same batches by each implementation,
and the parameters at the end are compared with the reference's:
  - torch.optim for-loop (foreach=False): the reference performs its very operations, so bitwise;
  - torch.optim foreach and fused, and optimized.build_optimizer (fused on CUDA, foreach elsewhere): fp32 defaults;
  - optimized.optimizers.Lion (foreach) against reference.optimizers.Lion: bitwise.
Speed: one optimizer step over the model's parameters, for-loop vs the optimized choice, timed in the same run.
"""

from __future__ import annotations

import statistics

import torch

from conformance.checks import CheckSpec, Context
from conformance.measure import time_fn
from conformance.result import Metric, Result
from conformance.tolerance import allclose, bitwise, combine
from optimized.optimizers import Lion, build_optimizer
from reference import optimizers as ref
from reference.data import make_batches
from reference.model import GPT, GPTConfig

SPEC = CheckSpec(
    name="optimizers", technique="optimizers", reference="reference.optimizers",
    optimized="optimized.optimizers.build_optimizer", order=40, peers=("torch.optim",),
)
CONFIG = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=32, seed=0)
QUICK_CONFIG = dict(vocab_size=32, block_size=32, n_layer=1, n_head=2, n_embd=16, seed=0)
SETTINGS = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": dict(lr=3e-3, weight_decay=0.01, amsgrad=True),
    "adamw": dict(lr=3e-3, weight_decay=0.1),
    "lion": dict(lr=3e-4, weight_decay=0.1),
}
REFERENCE_OPTIMIZERS = {"sgd": ref.SGD, "adam": ref.Adam, "adamw": ref.AdamW, "lion": ref.Lion}
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _train(make_opt, device: torch.device, steps: int, config: dict) -> dict[str, torch.Tensor]:
    model = GPT(GPTConfig(**config)).to(device)
    opt = make_opt(model)
    for idx, targets in make_batches(steps, batch_size=4, seq_len=16, vocab_size=config["vocab_size"], seed=7,
                                     vary_length=True):
        opt.zero_grad(set_to_none=True)
        model(idx.to(device), targets.to(device))[1].backward()
        opt.step()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _groups(model, name):
    """The decay / no-decay groups, in the form each constructor takes (weight decay set per group): matrices and
    embeddings decayed, biases and norm gains (fewer than 2 dims) exempt, as GPT-2 / nanoGPT train. Spelled out here,
    not taken from optimized.optimizers.param_groups: the groups build_optimizer forms are part of what is checked."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": SETTINGS[name]["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _kwargs(name):
    return {k: v for k, v in SETTINGS[name].items() if k != "weight_decay"}


def _compare(label: str, rule, state, spec) -> object:
    return combine(label, [rule(state[k], spec[k], name=k) for k in spec])


def run(ctx: Context) -> list[Result]:
    device = ctx.device
    steps, config = (3, QUICK_CONFIG) if ctx.quick else (30, CONFIG)
    rows = []
    for name in SETTINGS:
        spec = _train(lambda m, n=name: REFERENCE_OPTIMIZERS[n](_groups(m, n), **_kwargs(n)), device, steps, config)
        impls = []
        if name in TORCH:
            impls.append(("torch.optim for-loop", f"torch.optim.{TORCH[name].__name__}(foreach=False)", bitwise,
                          lambda m, n=name: TORCH[n](_groups(m, n), foreach=False, **_kwargs(n))))
            impls.append(("torch.optim foreach", f"torch.optim.{TORCH[name].__name__}(foreach=True)", allclose,
                          lambda m, n=name: TORCH[n](_groups(m, n), foreach=True, **_kwargs(n))))
            impls.append(("torch.optim fused", f"torch.optim.{TORCH[name].__name__}(fused=True)", allclose,
                          lambda m, n=name: TORCH[n](_groups(m, n), fused=True, **_kwargs(n))))
            impls.append(("build_optimizer", f"optimized.optimizers.build_optimizer({name!r})", allclose,
                          lambda m, n=name: build_optimizer(m, n, **SETTINGS[n])))
        else:
            impls.append(("foreach Lion", "optimized.optimizers.Lion", bitwise,
                          lambda m, n=name: build_optimizer(m, n, **SETTINGS[n])))
        for label, optimized, rule, make in impls:
            state = _train(make, device, steps, config)
            eq = _compare(f"{name}: {label} vs reference, {steps} steps", rule, state, spec)
            is_peer = optimized.startswith("torch")
            rows.append(SPEC.row(
                ctx, f"{name}: {label}", reference=f"reference.optimizers.{REFERENCE_OPTIMIZERS[name].__name__}",
                optimized=optimized, peer="torch.optim" if is_peer else None, equivalence=eq,
                notes=f"tiny GPT, {steps} steps, {SETTINGS[name]}; every parameter after the run"))
        rows[-1].speed.append(_step_speed(name, device, quick=ctx.quick))
    return rows


def _step_speed(name: str, device: torch.device, quick: bool) -> Metric:
    """Time of one optimizer step, reference for-loop / build_optimizer's choice, on a wider GPT's parameters.

    The two are timed in alternation, one step each per round, so a change of machine load hits both alike."""
    n_layer, width, rounds = (2, 64, 5) if quick else (8, 256, 15)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=4, n_embd=width)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    loop = REFERENCE_OPTIMIZERS[name](_groups(model, name), **_kwargs(name))
    fast = build_optimizer(model, name, **SETTINGS[name])
    t_loop, t_fast = [], []
    for _ in range(rounds):
        t_loop += time_fn(loop.step, warmup=1, reps=1, device=device).times
        t_fast += time_fn(fast.step, warmup=1, reps=1, device=device).times
    ratio = statistics.median(t_loop) / statistics.median(t_fast)
    impl = "Lion foreach" if isinstance(fast, Lion) else ("fused" if fast.defaults.get("fused") else "foreach")
    n_tensors = len(list(model.parameters()))
    return Metric(f"optimizer step time, for-loop / {impl} ({model.num_parameters()} params in {n_tensors} "
                  f"tensors, median of {rounds} alternating steps)", ratio, "x")
