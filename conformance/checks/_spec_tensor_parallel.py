"""Rows of `parallel_specs` for reference/parallel/tensor_parallel.py: the one-process Megatron spec (with and without
sequence parallelism) held to (a) the unsharded reference and (b) optimized.tensor_parallel.parallelize on real
gloo/NCCL ranks, for both model families (GPT-2-style, and Llama-style with GQA).

(a) t = ctx.world_size simulated ranks train three AdamW steps in float64; the losses and every gathered final
    parameter must lie within 10x the reference's own rounding spread (conformance.checks._reference_runs), and the
    replicated parameters must be bitwise equal on every rank.
(b) parallelize(model, plan) with the project's Megatron plan, its embedding and head left whole (the spec keeps them
    whole; the vocabulary-parallel ones are the optimized module's own), trained with torch.optim.AdamW on t real
    ranks: rank r's local parameters (its shards and its copy of the replicated ones) against the spec's rank r.
"""

from __future__ import annotations

import torch

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import one_thread, reference_run
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import bitwise, combine, within_spread
from optimized.tensor_parallel import megatron_plan, parallelize
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.optimizers import AdamW
from reference.parallel import tensor_parallel as spec_tp

LR, WD, STEPS = 1e-2, 0.1, 3


def _config(family: str, t: int) -> GPTConfig:
    """Heads, key/value heads (GQA for Llama), MLP width and sequence length all divisible by t."""
    n_head = 6 if 6 % t == 0 else 2 * t
    shape = dict(vocab_size=32, block_size=12 * t, n_layer=2, n_head=n_head, n_embd=4 * n_head)
    if family == "llama":
        return GPTConfig.llama(**shape, n_kv_head=n_head // 2 if (n_head // 2) % t == 0 else n_head)
    return GPTConfig(**shape)


def _batches(config: GPTConfig) -> list:
    return make_batches(STEPS, batch_size=2, seq_len=config.block_size, vocab_size=32, seed=13, vary_length=True)


def _named(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in named}


def _optimized_rank(family: str, world_size: int, device: str) -> dict[str, torch.Tensor]:
    config = _config(family, world_size)
    model = GPT(config).to(device, torch.float64)
    plan = megatron_plan(model, vocab_head=False)
    plan.pop("wte", None)  # the spec keeps the embedding whole
    parallelize(model, plan)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for idx, targets in _batches(config):
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx.to(device), targets.to(device))
        loss.backward()
        opt.step()
    return _named(model.named_parameters())


def _family_rows(ctx: Context, spec: CheckSpec, family: str) -> list[Result]:
    t = ctx.world_size
    config = _config(family, t)
    with one_thread():
        ref = reference_run(lambda: GPT(config), _batches(config), lr=LR, weight_decay=WD)
        runs = {}
        for sequence_parallel in (False, True):
            models = spec_tp.shard_model(GPT(config).double(), t)
            optimizers = [AdamW(m.parameters(), lr=LR, weight_decay=WD) for m in models]
            losses = [spec_tp.train_step(models, optimizers, b, sequence_parallel=sequence_parallel)
                      for b in _batches(config)]
            runs[sequence_parallel] = models
            full = {**spec_tp.gather_parameters(models), "loss": torch.tensor(losses, dtype=torch.float64)}
            mode = "with sequence parallelism" if sequence_parallel else "tensor parallel"
            parts = [within_spread(full, ref.final, ref.run_spread, name=mode)]
            parts += [bitwise(p, dict(models[0].named_parameters())[n], name=f"{mode}: rank {r} {n} replicated")
                      for r, m in enumerate(models[1:], 1) for n, p in m.named_parameters()
                      if spec_tp.split_dim(n) is None]
            runs[mode] = combine(f"{family} TP spec x{t} {mode} vs one process", parts)
    per_rank = spawn(_optimized_rank, t, family, t, ctx.device.type, device=ctx.device.type, timeout=ctx.timeout)
    vs_optimized = combine(f"{family} TP spec vs parallelize x{t}", [
        within_spread(got, _named(runs[False][r].named_parameters()), ref.run_spread, name=f"rank {r}")
        for r, got in enumerate(per_rank)])
    shape = (f"{config.n_head} heads, {config.n_kv_head} kv heads, MLP {config.mlp_ratio * config.n_embd}, "
             f"T={config.block_size}")
    technique = f"tensor parallel (spec), {family}"
    return [
        *[spec.row(ctx, f"{family}: TP spec {mode} vs one process", technique=technique,
                   optimized="reference.parallel.tensor_parallel", world_size=t, equivalence=runs[mode],
                   notes=f"t={t} simulated ranks, {shape}, AdamW x{STEPS}, float64: losses and gathered final "
                         "parameters within 10x the reference's own rounding spread; replicated parameters bitwise "
                         "equal on every rank")
          for mode in ("tensor parallel", "with sequence parallelism")],
        spec.row(ctx, f"{family}: TP spec vs parallelize", technique=technique,
                 reference="reference.parallel.tensor_parallel",
                 optimized="optimized.tensor_parallel.parallelize (megatron_plan, embedding and head whole)",
                 world_size=t, equivalence=vs_optimized,
                 notes=f"t={t} real ranks ({ctx.device.type}), {shape}, AdamW x{STEPS}, float64: rank r's local "
                       "parameters vs the spec's rank r, within 10x the reference's rounding spread"),
    ]


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    out: list[Result] = []
    for family in ("gpt2", "llama"):
        out += spec.guarded(ctx, f"tensor parallel {family}", lambda c, f=family: _family_rows(c, spec, f))
    return out
