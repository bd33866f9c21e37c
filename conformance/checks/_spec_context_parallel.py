"""Rows of `parallel_specs` for reference/parallel/context_parallel.py (the one-process ring-attention spec).

(a) The spec vs one process, in float64 within the reference's own rounding spread:
    - ring attention (out, dq, dk, dv) against reference.attention.attention on the whole sequence, causal and not,
      GQA, both layouts, on c = ctx.world_size and 3 simulated ranks, N = 13 (not a multiple of c or 2c);
    - the whole GPT with its sequence split (the loss and every gradient): the Llama-shaped model (RoPE rotated at
      GLOBAL positions inside attention) and the GPT-2-shaped one (learned positions read at global positions),
      against one process on the whole sequence.
(b) The spec vs optimized.context_parallel.ring_attention on ctx.world_size gloo ranks, in float64: each rank given
    its slice in the spec's layout (so a layout the two disagree on fails), its out, dq, dk, dv equal the spec's rows
    for that rank, within the one-process rounding spread.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import input_spread, one_thread, step_reference
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import within_spread
from optimized.context_parallel import ring_attention as optimized_ring_attention
from reference.attention import attention
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.parallel.context_parallel import LAYOUTS, context_parallel_loss, positions_of, ring_attention

HEADS = (4, 2)
"""(H, Hkv): GQA, two query heads per key/value head."""
NAMES = ("out", "dq", "dk", "dv")


def _inputs(seq_len: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seq_len)
    (H, Hkv), B, d = HEADS, 2, 8
    q, dout = (torch.randn(B, H, seq_len, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, Hkv, seq_len, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def _one_process(q, k, v, dout, causal: bool) -> dict[str, torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, is_causal=causal)  # (B, H, N, d)
    out.backward(dout)
    return dict(zip(NAMES, [out.detach()] + [t.grad for t in leaves], strict=True))


def _spec(q, k, v, dout, causal: bool, world: int, layout: str) -> list[dict[str, torch.Tensor]]:
    """Each simulated rank's out, dq, dk, dv."""
    pos = positions_of(q.size(2), world, layout)
    leaves = [[t[:, :, p].detach().clone().requires_grad_() for p in pos] for t in (q, k, v)]
    outs = ring_attention(*leaves, pos, is_causal=causal)
    torch.autograd.backward(outs, [dout[:, :, p] for p in pos])
    return [dict(zip(NAMES, [outs[r].detach()] + [leaves[i][r].grad for i in range(3)], strict=True))
            for r in range(world)]


def _optimized_worker(seq_len: int) -> dict:
    """One rank of optimized.context_parallel: its slice in the spec's layout (positions_of), out, dq, dk, dv."""
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, dout = _inputs(seq_len)
    results = {}
    for causal, layout in ((c, lay) for c in (False, True) for lay in LAYOUTS):
        pos = positions_of(seq_len, world, layout)[rank]  # equal slices here: what the optimized layout expects
        leaves = [t[:, :, pos].clone().requires_grad_() for t in (q, k, v)]
        o = optimized_ring_attention(*leaves, is_causal=causal, layout=layout)  # (B, H, n, d)
        o.backward(dout[:, :, pos])
        results[causal, layout] = dict(zip(NAMES, [o.detach()] + [t.grad for t in leaves], strict=True))
    return results


def _model_config(family: str, seq_len: int) -> GPTConfig:
    if family == "llama":
        return GPTConfig.llama(vocab_size=32, block_size=seq_len, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, seed=5)
    return GPTConfig(vocab_size=32, block_size=seq_len, n_layer=2, n_head=2, n_embd=16, seed=5)


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    out = []
    world = ctx.world_size
    attention_spec = "reference.parallel.context_parallel.ring_attention"
    with one_thread():
        n = 13
        for causal in (False, True):
            ref, spread = input_spread(functools.partial(_one_process, causal=causal), _inputs(n)[:4],
                                       origin="float64 attention and its gradients")
            for c in sorted({world, 3}):
                for layout in LAYOUTS:
                    pos = positions_of(n, c, layout)
                    got = _spec(*_inputs(n), causal, c, layout)
                    eq = within_spread({f"rank {r} {k}": t for r, g in enumerate(got) for k, t in g.items()},
                                       {f"rank {r} {k}": t[:, :, pos[r]] for r in range(c) for k, t in ref.items()},
                                       spread, name=f"ring spec c={c} {layout} causal={causal}")
                    out.append(spec.row(
                        ctx, f"ring attention spec c={c} {layout} {'causal' if causal else 'full'} vs one process",
                        world_size=c, reference="reference.attention.attention (whole sequence)",
                        optimized=attention_spec, equivalence=eq,
                        notes=f"B=2, H:Hkv={HEADS[0]}:{HEADS[1]}, N={n} (slices of {[len(p) for p in pos]}), d=8, "
                              f"float64; out/dq/dk/dv of every rank within 10x the reference's own rounding spread "
                              f"{spread.value:.2g} + 1 ulp"))
        for family in ("llama", "gpt2"):
            n_model = 11
            config = _model_config(family, n_model)
            batch = make_batches(1, batch_size=2, seq_len=n_model, vocab_size=32, seed=1, vary_length=True)[0]
            ref, spread = step_reference(lambda config=config: GPT(config), batch)
            for layout in LAYOUTS:
                model = GPT(config).double()
                loss = context_parallel_loss(model, *batch, world_size=world, layout=layout)
                loss.backward()
                got = {n: p.grad for n, p in model.named_parameters()} | {"loss": loss.detach().reshape(1)}
                out.append(spec.row(
                    ctx, f"context-parallel GPT spec c={world} {layout} vs one process ({family})", world_size=world,
                    reference="reference.model.GPT (whole sequence)",
                    optimized="reference.parallel.context_parallel.context_parallel_loss",
                    equivalence=within_spread(got, ref, spread, name=f"{family} c={world} {layout}"),
                    notes=("RoPE rotated at global positions inside attention, GQA 4:2" if family == "llama" else
                           "learned position table read at global positions, tied head")
                          + f"; N={n_model} over {world} ranks, float64; the loss and every gradient within 10x the "
                            f"reference's own rounding spread {spread.value:.2g} + 1 ulp"))

    n = 8 * world  # the optimized ring needs equal slices: a multiple of 2c
    per_rank = spawn(_optimized_worker, world, n, backend="gloo", device="cpu", timeout=ctx.timeout)
    with one_thread():
        for causal in (False, True):
            _, spread = input_spread(functools.partial(_one_process, causal=causal), _inputs(n),
                                     origin="float64 attention and its gradients")
            for layout in LAYOUTS:
                got = _spec(*_inputs(n), causal, world, layout)
                eq = within_spread({f"rank {r} {k}": t for r, res in enumerate(per_rank)
                                    for k, t in res[causal, layout].items()},
                                   {f"rank {r} {k}": t for r, g in enumerate(got) for k, t in g.items()},
                                   spread, name=f"optimized ring vs spec {layout} causal={causal}")
                out.append(spec.row(
                    ctx, f"ring attention spec vs optimized.context_parallel ({layout}, "
                         f"{'causal' if causal else 'full'})",
                    world_size=world, device="cpu", reference=attention_spec,
                    optimized="optimized.context_parallel.ring_attention", equivalence=eq,
                    notes=f"{world} gloo ranks, N={n}, float64 on both sides; every rank's out/dq/dk/dv within 10x "
                          f"the one-process rounding spread {spread.value:.2g} + 1 ulp of the spec's"))
    return out
