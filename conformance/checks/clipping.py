"""Check `clipping`: global-norm gradient clipping, spec vs optimized vs torch, on one process and sharded.

1. The tiny GPT's real gradients, norm types 1, 2, inf: optimized.clipping.clip_grad_norm_ (foreach) and the peer
   torch.nn.utils.clip_grad_norm_ against reference.clipping.clip_grad_norm (total norm and every clipped
   gradient, fp32 defaults); and p = 2 with max_norm above the norm, where nothing may change.
2. fp16 gradients whose norm exceeds fp16's largest value (65504): the optimized norm (fp32 accumulation) against
   the float64 norm; torch's fp16 norm is reported beside it (it overflows to inf and zeroes the gradients).
3. Sharded: each of `world_size` ranks holds a disjoint slice of every weight's gradient plus the full LayerNorm and
   bias gradients (replicated, as under tensor parallel); optimized.clipping.global_grad_norm must equal the
   single-process norm, with one all-reduce of one fp32 scalar (for p = inf a tensor of two: the max and a NaN
   flag, since a MAX all-reduce alone can drop a NaN).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.launch import spawn
from conformance.measure import CollectiveCounter
from conformance.result import Result
from conformance.tolerance import allclose, combine
from optimized.clipping import clip_grad_norm_, clip_sharded_grad_norm_, global_grad_norm
from reference.clipping import clip_grad_norm
from reference.data import make_batches
from reference.model import GPT, GPTConfig

SPEC = CheckSpec(
    name="clipping", technique="gradient clipping", reference="reference.clipping.clip_grad_norm",
    optimized="optimized.clipping.clip_grad_norm_", order=60, peers=("torch.nn.utils.clip_grad_norm_",),
)
CONFIG = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=32, seed=0)
NORMS = (1.0, 2.0, math.inf)
MAX_NORM = 0.5  # below the tiny GPT's gradient norm (~4), so clipping scales every gradient


def _grads(device: torch.device) -> list[torch.Tensor]:
    """The tiny GPT's gradients on one batch, in named_parameters order (tied weights once)."""
    model = GPT(GPTConfig(**CONFIG)).to(device)
    (idx, targets), = make_batches(1, batch_size=4, seq_len=16, vocab_size=32, seed=11, vary_length=True)
    model(idx.to(device), targets.to(device))[1].backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _params_with(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def _single_process_rows(device: torch.device) -> list[Result]:
    grads = _grads(device)
    rows = []
    # Clipped to half the norm for each p, and once with max_norm above the norm: clipping must then leave the
    # gradients as they are (min(1, max_norm / norm) is 1, never a scale-up).
    for norm_type, fraction in [(p, 0.5) for p in NORMS] + [(2.0, 2.0)]:
        max_norm = fraction * float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), norm_type))
        spec, mine, theirs = _params_with(grads), _params_with(grads), _params_with(grads)
        t_spec = clip_grad_norm(spec, max_norm, norm_type)
        t_mine = clip_grad_norm_(mine, max_norm, norm_type)
        t_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        for label, total, params, optimized, peer in (
            ("optimized foreach", t_mine, mine, "optimized.clipping.clip_grad_norm_", None),
            ("torch", t_theirs, theirs, "torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm_"),
        ):
            eq = combine(f"p={norm_type:g}: {label} vs reference", [
                allclose(total.cpu(), t_spec.cpu(), name="total norm"),
                *[allclose(p.grad, q.grad, name=f"grad {i}") for i, (p, q) in enumerate(zip(params, spec,
                                                                                              strict=True))],
            ])
            what = "clipped to half" if fraction < 1 else "max_norm twice the norm (no clipping)"
            rows.append(SPEC.row(
                None, f"p={norm_type:g}, {label}" + ("" if fraction < 1 else ", max_norm above the norm"),
                optimized=optimized, peer=peer, device=device.type, equivalence=eq,
                notes=f"tiny GPT gradients ({len(grads)} tensors), norm {float(t_spec):.4g} {what}"))
    return rows


def _fp16_row(device: torch.device) -> Result:
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * 1e4).half().to(device) for s in [(64, 32), (97,), (31, 5)]]
    exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    mine, theirs = _params_with(grads), _params_with(grads)
    t_mine = clip_grad_norm_(mine, 1.0)
    t_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    zeroed = all(float(p.grad.abs().max()) == 0.0 for p in theirs)
    eq = allclose(t_mine.double().cpu(), exact.cpu(), name="fp16 gradients: total norm vs float64", rtol=1e-6,
                  atol=0.0)
    return SPEC.row(
        None, "fp16 gradients, norm > 65504", reference="float64 norm of the fp16 gradients",
        peer="torch.nn.utils.clip_grad_norm_", device=device.type, equivalence=eq,
        notes=f"true norm {float(exact):.6g}; optimized {float(t_mine):.6g} ({t_mine.dtype}); torch "
              f"{float(t_theirs):.6g} ({t_theirs.dtype}){', its clipping zeroed every gradient' if zeroed else ''}")


def _sharded_worker(device_type: str) -> dict[str, tuple]:
    rank, world = dist.get_rank(), dist.get_world_size()
    grads = _grads(torch.device(device_type))
    sharded = [g.flatten().chunk(world)[rank] if rank < len(g.flatten().chunk(world)) else g.new_empty(0)
               for g in grads if g.dim() >= 2]  # (ceil(n / world),) per weight; uneven or empty on some ranks
    replicated = [g for g in grads if g.dim() < 2]
    out = {}
    for norm_type in NORMS:
        with CollectiveCounter() as counter:
            total = global_grad_norm(sharded, replicated, norm_type=norm_type)
        out[repr(norm_type)] = (total.cpu(), counter.count(), counter.payload_bytes())
    clipped = [s.clone() for s in sharded]
    total = clip_sharded_grad_norm_(clipped, [r.clone() for r in replicated], max_norm=MAX_NORM)
    out["clipped"] = (total.cpu(), [c.cpu() for c in clipped])
    return out


def _sharded_rows(ctx: Context) -> list[Result]:
    world = ctx.world_size
    per_rank = spawn(_sharded_worker, world, ctx.device.type, device=ctx.device.type, timeout=ctx.timeout)
    grads = [g.cpu() for g in _grads(ctx.device)]
    rows = []
    for norm_type in NORMS:
        spec = clip_grad_norm(_params_with(grads), MAX_NORM, norm_type)
        parts = [allclose(r[repr(norm_type)][0], spec, name=f"rank {i} global norm") for i, r in enumerate(per_rank)]
        calls, payload = per_rank[0][repr(norm_type)][1:]
        rows.append(SPEC.row(
            ctx, f"p={norm_type:g}, sharded over {world} ranks + replicated",
            reference="reference.clipping.clip_grad_norm (whole gradient)",
            optimized="optimized.clipping.global_grad_norm", world_size=world,
            equivalence=combine(f"p={norm_type:g}: sharded norm vs single-process norm", parts),
            notes=f"weights sharded (torch.chunk, uneven), {sum(g.dim() < 2 for g in grads)} bias/LayerNorm "
                  f"gradients replicated and counted once; {calls} all-reduce call(s), {payload} bytes per rank"))
    spec_params = _params_with(grads)
    clip_grad_norm(spec_params, MAX_NORM)
    spec_shards = [p.grad.flatten().chunk(world) for p in spec_params if p.grad.dim() >= 2]
    parts = [allclose(c, spec_shards[j][i] if i < len(spec_shards[j]) else c, name=f"rank {i} shard {j}")
             for i, r in enumerate(per_rank) for j, c in enumerate(r["clipped"][1])]
    rows.append(SPEC.row(
        ctx, f"clip_sharded_grad_norm_ over {world} ranks",
        reference="reference.clipping.clip_grad_norm (whole gradient)",
        optimized="optimized.clipping.clip_sharded_grad_norm_", world_size=world,
        equivalence=combine("clipped shards vs clipped whole gradient", parts),
        notes="every rank's clipped shard equals its slice of the single-process clipped gradient"))
    return rows


def run(ctx: Context) -> list[Result]:
    return _single_process_rows(ctx.device) + [_fp16_row(ctx.device)] + _sharded_rows(ctx)
