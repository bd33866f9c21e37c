"""Rows of `parallel_specs` for reference/parallel/expert_parallel.py and the MoE block it shards (reference/moe.py).

(a) The spec vs one process: the experts over P = ctx.world_size and 3 simulated ranks (dispatch and combine by
    all-to-all) against reference.moe.MoE on all tokens with the capacity counted per rank's tokens (num_groups = P):
    the output, the load-balancing and z losses, the input's and every parameter's gradient, in float64 within the
    block's own rounding spread (inputs nudged by one ulp); with and without a capacity limit, with a shared expert.
(b) There is no optimized expert-parallel module yet (issue 26), so nothing multi-process to hold the spec to: the
    rows say so. In its place a peer nobody here wrote: transformers' MixtralSparseMoeBlock (a tiny MixtralConfig,
    built, not downloaded; its weights copied from the spec's) against reference.moe.MoE and the expert-parallel
    spec, where nothing is dropped (Mixtral has no capacity limit).
"""

from __future__ import annotations

import importlib.util

import torch

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import input_spread, one_thread
from conformance.result import Result
from conformance.tolerance import allclose, combine, within_spread
from reference.moe import MoE, MoEConfig
from reference.parallel.expert_parallel import ExpertParallelMoE, shard_tokens

NOT_MEASURABLE = ("not measurable against an optimized module: optimized/ has no expert-parallel MoE yet (issue 26), "
                  "so this spec is held to reference/moe.py and to transformers' Mixtral block only")
TOKENS = 23
"""Tokens in the batch: prime, so the ranks' shards are unequal."""


def _config(world: int, capacity_factor: float | None) -> MoEConfig:
    return MoEConfig(dim=8, hidden=12, num_experts=2 * world, top_k=2, capacity_factor=capacity_factor,
                     num_shared_experts=1 if capacity_factor else 0, seed=world)


def _x() -> torch.Tensor:
    return torch.randn(TOKENS, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _loss(out: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return (out * dy).sum() + 0.3 * aux + 0.2 * z  # a loss that weighs all three outputs


def _block(config: MoEConfig, world: int):
    def compute(x):
        moe = MoE(config).double()
        x = x.detach().clone().requires_grad_()
        got = moe(x, num_groups=world)
        _loss(got.out, got.aux_loss, got.z_loss, torch.ones_like(x)).backward()
        return {f"grad {n}": p.grad for n, p in moe.named_parameters()} | {
            "out": got.out.detach(), "dx": x.grad, "aux": got.aux_loss.detach().reshape(1),
            "z": got.z_loss.detach().reshape(1)}
    return compute


def _expert_parallel(config: MoEConfig, world: int) -> tuple[dict[str, torch.Tensor], int]:
    ep = ExpertParallelMoE(MoE(config).double(), world)
    xs = [t.detach().clone().requires_grad_() for t in shard_tokens(_x(), world)]
    outs = ep.forward(xs)
    loss = _loss(torch.cat([o.out for o in outs]), outs[0].aux_loss, outs[0].z_loss, torch.ones_like(_x()))
    loss.backward()
    got = {f"grad {n}": g for n, g in ep.gradients().items()} | {
        "out": torch.cat([o.out.detach() for o in outs]), "dx": torch.cat([t.grad for t in xs]),
        "aux": outs[0].aux_loss.detach().reshape(1), "z": outs[0].z_loss.detach().reshape(1)}
    return got, outs[0].dropped


def mixtral_peer(moe: MoE):
    """transformers' MixtralSparseMoeBlock with `moe`'s weights (float64), for the no-capacity case."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = moe.config
    peer = MixtralSparseMoeBlock(MixtralConfig(hidden_size=c.dim, intermediate_size=c.hidden,
                                               num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
                                               router_jitter_noise=0.0)).double()
    with torch.no_grad():
        peer.gate.weight.copy_(moe.router.weight)  # (E, C)
        for e, expert in enumerate(moe.experts):
            peer.experts.gate_up_proj[e].copy_(torch.cat([expert.fc_gate.weight, expert.fc_in.weight]))  # (2I, C)
            peer.experts.down_proj[e].copy_(expert.fc_out.weight)  # (C, I)
    return peer


def _peer_row(ctx: Context, spec: CheckSpec, world: int) -> Result:
    config = _config(world, None)
    moe = MoE(config).double()
    peer = mixtral_peer(moe)
    x = _x()
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = moe(x_ours), peer(x_peer[None])[0]  # Mixtral takes (B, T, C)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours.out.backward(dy)
    theirs.backward(dy)
    ep_out = torch.cat([o.out for o in ExpertParallelMoE(moe, world).forward(shard_tokens(x, world))]).detach()
    eps32 = torch.finfo(torch.float32).eps

    def close(a, b, name):  # transformers' router softmax runs in float32: its gate weights carry float32 rounding
        return allclose(a, b, rtol=0, atol=4 * config.top_k * eps32 * float(b.abs().max()), name=name)

    parts = [close(ours.out.detach(), theirs.detach(), "MoE out"), close(ep_out, theirs.detach(), "EP spec out"),
             close(x_ours.grad, x_peer.grad, "dx"), close(moe.router.weight.grad, peer.gate.weight.grad, "d router")]
    for e, expert in enumerate(moe.experts):
        parts.append(close(torch.cat([expert.fc_gate.weight.grad, expert.fc_in.weight.grad]),
                           peer.experts.gate_up_proj.grad[e], f"d expert {e} gate/up"))
        parts.append(close(expert.fc_out.weight.grad, peer.experts.down_proj.grad[e], f"d expert {e} down"))
    return spec.row(ctx, f"MoE spec and EP spec vs transformers Mixtral block (E={config.num_experts}, k=2)",
                    world_size=world, reference="reference.moe.MoE", optimized="reference.parallel.expert_parallel",
                    peer="transformers MixtralSparseMoeBlock", equivalence=combine("spec vs Mixtral", parts),
                    notes=f"no capacity limit (Mixtral drops nothing), {TOKENS} tokens, float64 weights; bound 4k "
                          f"float32 ulps at each tensor's magnitude because transformers computes the router softmax "
                          f"in float32. {NOT_MEASURABLE}")


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    out = []
    with one_thread():
        for world in sorted({ctx.world_size, 3}):
            for capacity_factor in (None, 1.0):
                config = _config(world, capacity_factor)
                ref, spread = input_spread(_block(config, world), (_x(),), origin="float64 MoE out, losses, grads")
                got, dropped = _expert_parallel(config, world)
                limit = "no capacity limit" if capacity_factor is None else \
                    f"capacity factor {capacity_factor} per rank's tokens ({dropped} of {2 * TOKENS} dropped)"
                out.append(spec.row(
                    ctx, f"expert parallel spec EP={world} vs MoE block, {limit.split(' (')[0]}", world_size=world,
                    reference="reference.moe.MoE (one process, num_groups = EP)",
                    optimized="reference.parallel.expert_parallel.ExpertParallelMoE",
                    equivalence=within_spread(got, ref, spread, name=f"EP={world} cf={capacity_factor}"),
                    notes=f"E={config.num_experts}, k=2, {limit}, {config.num_shared_experts} shared expert(s), "
                          f"{TOKENS} tokens in unequal shards, float64; out, aux and z losses, dx and every gradient "
                          f"within 10x the block's own rounding spread {spread.value:.2g} + 1 ulp. {NOT_MEASURABLE}"))
        if importlib.util.find_spec("transformers") is not None:
            out.append(_peer_row(ctx, spec, ctx.world_size))
    return out
