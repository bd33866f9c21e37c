"""Rows of `parallel_specs` for reference/parallel/zero.py: the one-process ZeRO-1/2/3 spec held to (a) the unsharded
reference and the memory model, and (b) optimized.zero.ZeroOptimizer on real gloo/NCCL ranks, stage by stage.

(a) ctx.world_size simulated ranks train three AdamW steps (float64, uneven padding, a parameter count that leaves the
    last slice padded at 2, 3 or 4 ranks); every rank's view of the final parameters and the losses must lie within
    10x the reference's own rounding spread (conformance.checks._reference_runs.reference_run). Each rank's
    model-state bytes (parameters, gradients, AdamW's m, v and step) must equal reference.memory.zero_rank_bytes.
(b) ZeroOptimizer(stage) around torch.optim.AdamW on the same ranks and data, every token weighted by the whole
    batch's count (ZeroOptimizer averages, so rank r's loss is N * loss_sum_r / n): rank r's owned slice of the
    parameters and its AdamW state (exp_avg, exp_avg_sq) against the spec's rank r, within the same spread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import one_thread, reference_run
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import bitwise, combine, within_spread
from optimized.zero import ZeroOptimizer
from reference import memory
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig
from reference.parallel import zero as spec_zero

LR, WD, STEPS = 1e-2, 0.1, 3
CONFIG = dict(vocab_size=29, block_size=12, n_layer=2, n_head=5, n_kv_head=1, n_embd=25, mlp_ratio=2)
"""Ψ = 9535: divides by none of 2, 3, 4, so the last rank's slice carries padding."""


def _batches(world_size: int) -> list:
    return make_batches(STEPS, batch_size=2 * world_size, seq_len=12, vocab_size=29, seed=11, vary_length=True)


def _state(master: torch.Tensor, adam: dict) -> dict[str, torch.Tensor]:
    return {"owned parameters": master.detach().cpu().clone(), "exp_avg": adam["exp_avg"].detach().cpu().clone(),
            "exp_avg_sq": adam["exp_avg_sq"].detach().cpu().clone()}


def _optimized_rank(stage: int, device: str) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = GPT(GPTConfig(**CONFIG)).to(device, torch.float64)
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=LR, weight_decay=WD)
    for idx, targets in _batches(world):
        n = max(int((targets != IGNORE_INDEX).sum()), 1)  # the whole batch's scored tokens
        _, loss_sum = model(idx.chunk(world)[rank].to(device), targets.chunk(world)[rank].to(device), reduction="sum")
        (loss_sum * world / n).backward()  # ZeroOptimizer averages over the N ranks
        opt.step()
        opt.zero_grad()
    shard = opt.state_dict()
    return _state(shard["masters"][0], shard["state"][0])


def _stage_rows(ctx: Context, spec: CheckSpec, stage: int, ref) -> list[Result]:
    ws = ctx.world_size
    with one_thread():
        simulated = spec_zero.Zero(GPT(GPTConfig(**CONFIG)).double(), ws, stage, lr=LR, weight_decay=WD)
        losses = torch.tensor([simulated.train_step(b) for b in _batches(ws)], dtype=torch.float64)
    parts = [within_spread({**simulated.full_parameters(r), "loss": losses}, ref.final, ref.run_spread,
                           name=f"rank {r}") for r in range(ws)]
    for r in range(ws):
        want = memory.zero_rank_bytes([simulated.numel], world_size=ws, rank=r, stage=stage,
                                      precision=memory.Precision("float64, AdamW", 8, 8, 16, 0), scalar_state_bytes=4)
        got = simulated.rank_bytes(r)
        parts.append(bitwise(torch.tensor([got["params"], got["grads"], got["optimizer"]], dtype=torch.float64),
                             torch.tensor([want.params, want.grads, want.optimizer], dtype=torch.float64),
                             name=f"rank {r} bytes (params, grads, optimizer) vs memory.zero_rank_bytes"))
    vs_reference = combine(f"ZeRO-{stage} spec x{ws} vs one process", parts)
    per_rank = spawn(_optimized_rank, ws, stage, ctx.device.type, device=ctx.device.type, timeout=ctx.timeout)
    mine = [_state(simulated.masters[r], simulated.optimizers[r].state[simulated.masters[r]]) for r in range(ws)]
    vs_optimized = combine(f"ZeRO-{stage} spec vs ZeroOptimizer x{ws}", [
        within_spread(got, mine[r], ref.run_spread, name=f"rank {r}") for r, got in enumerate(per_rank)])
    technique = f"ZeRO-{stage} (spec)"
    return [
        spec.row(ctx, f"ZeRO-{stage} spec vs one process", technique=technique,
                 optimized="reference.parallel.zero.Zero", world_size=ws, equivalence=vs_reference,
                 notes=f"{ws} simulated ranks, Ψ={simulated.numel} padded to {ws * simulated.shard}, AdamW x{STEPS}, "
                       "float64: losses and every rank's full parameters within 10x the reference's own rounding "
                       "spread; every rank's model-state bytes equal to memory.zero_rank_bytes"),
        spec.row(ctx, f"ZeRO-{stage} spec vs ZeroOptimizer", technique=technique,
                 reference="reference.parallel.zero.Zero", optimized=f"optimized.zero.ZeroOptimizer(stage={stage})",
                 world_size=ws, equivalence=vs_optimized,
                 notes=f"{ws} real ranks ({ctx.device.type}), AdamW x{STEPS}, float64: rank r's owned parameters, "
                       "exp_avg and exp_avg_sq vs the spec's rank r, within 10x the reference's rounding spread"),
    ]


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    with one_thread():
        ref = reference_run(lambda: GPT(GPTConfig(**CONFIG)), _batches(ctx.world_size), lr=LR, weight_decay=WD)
    out: list[Result] = []
    for stage in spec_zero.STAGES:
        out += spec.guarded(ctx, f"ZeRO-{stage}", lambda c, s=stage: _stage_rows(c, spec, s, ref))
    return out
