"""Rows of `parallel_specs` for reference/parallel/data_parallel.py: the one-process spec of data parallelism held to
(a) the unsharded reference and (b) optimized.data_parallel.DataParallel on real gloo/NCCL ranks, in float64.

(a) N simulated replicas train three AdamW steps on batches with uneven padding; their losses and final parameters
    must lie within 10x the reference's own rounding spread (conformance.checks._reference_runs.reference_run).
(b) DataParallel with torch.optim.AdamW on ctx.world_size real ranks, each its slice of the same batches, every token
    weighted by the whole batch's count (DataParallel averages, so rank r's loss is N * loss_sum_r / n): rank r's
    final parameters against the spec's replica r, within the same spread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import one_thread, reference_run
from conformance.claims import equivalence_verdict
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import combine, within_spread
from optimized.data_parallel import DataParallel
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig
from reference.optimizers import AdamW
from reference.parallel import data_parallel as spec_dp

LR, WD, STEPS = 1e-2, 0.1, 3
CONFIG = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16)


def _batches(world_size: int) -> list:
    return make_batches(STEPS, batch_size=2 * world_size, seq_len=16, vocab_size=32, seed=7, vary_length=True)


def _final(named, losses: list[float]) -> dict[str, torch.Tensor]:
    return {**{n: p.detach().cpu().clone() for n, p in named}, "loss": torch.tensor(losses, dtype=torch.float64)}


def _spec(world_size: int) -> list[dict[str, torch.Tensor]]:
    replicas = spec_dp.make_replicas(GPT(GPTConfig(**CONFIG)).double(), world_size)
    optimizers = [AdamW(r.parameters(), lr=LR, weight_decay=WD) for r in replicas]
    losses = [spec_dp.train_step(replicas, optimizers, batch) for batch in _batches(world_size)]
    return [_final(r.named_parameters(), losses) for r in replicas]


def _optimized_rank(device: str) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = GPT(GPTConfig(**CONFIG)).to(device, torch.float64)
    wrapped = DataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for idx, targets in _batches(world):
        n = max(int((targets != IGNORE_INDEX).sum()), 1)  # the whole batch's scored tokens
        idx, targets = idx.chunk(world)[rank].to(device), targets.chunk(world)[rank].to(device)
        opt.zero_grad(set_to_none=True)
        _, loss_sum = wrapped(idx, targets, reduction="sum")
        (loss_sum * world / n).backward()  # DataParallel averages over the N ranks
        opt.step()
        total = loss_sum.detach() / n
        dist.all_reduce(total)
        losses.append(float(total))
    return _final(model.named_parameters(), losses)


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    ws = ctx.world_size
    with one_thread():
        ref = reference_run(lambda: GPT(GPTConfig(**CONFIG)), _batches(ws), lr=LR, weight_decay=WD)
        simulated = _spec(ws)
    vs_reference = combine(f"spec x{ws} vs one process", [
        within_spread(s, ref.final, ref.run_spread, name=f"replica {r}") for r, s in enumerate(simulated)])
    per_rank = spawn(_optimized_rank, ws, ctx.device.type, device=ctx.device.type, timeout=ctx.timeout)
    vs_optimized = combine(f"spec vs DataParallel x{ws}", [
        within_spread(got, simulated[r], ref.run_spread, name=f"rank {r}") for r, got in enumerate(per_rank)])
    return [
        spec.row(ctx, "data parallel spec vs one process", technique="data parallel (spec)",
                 optimized="reference.parallel.data_parallel", world_size=ws, equivalence=vs_reference,
                 claim="data_parallel.equivalence", verdict=equivalence_verdict(vs_reference.passed, world_size=ws),
                 notes=f"{ws} simulated replicas, AdamW x{STEPS}, uneven padding, float64: losses and every replica's "
                       "final parameters within 10x the reference's own rounding spread"),
        spec.row(ctx, "data parallel spec vs DataParallel", technique="data parallel (spec)",
                 reference="reference.parallel.data_parallel", optimized="optimized.data_parallel.DataParallel",
                 world_size=ws, equivalence=vs_optimized,
                 notes=f"{ws} real ranks ({ctx.device.type}), AdamW x{STEPS}, float64: rank r's losses and final "
                       "parameters vs the spec's replica r, within 10x the reference's rounding spread"),
    ]
