"""The one-process expert-parallel spec: tokens dispatched to their expert's rank and combined back with all-to-all
equal reference.moe.MoE on all tokens (capacity counted per rank's tokens), outputs, losses and gradients, in float64
within the reference's own rounding spread."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import input_spread, one_thread
from conformance.tolerance import assert_equivalent, within_spread
from reference.moe import MoE, MoEConfig
from reference.parallel.expert_parallel import ExpertParallelMoE, shard_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _weights(x: torch.Tensor):
    g = torch.Generator().manual_seed(7)
    return torch.randn(x.shape, generator=g, dtype=x.dtype), 0.3, 0.2  # dy, aux and z-loss coefficients


def _one_process(config: MoEConfig, world_size: int):
    def compute(x):
        moe = MoE(config).double()
        x = x.detach().clone().requires_grad_()
        got = moe(x, num_groups=world_size)
        dy, a, z = _weights(x)
        ((got.out * dy).sum() + a * got.aux_loss + z * got.z_loss).backward()
        out = {f"grad {n}": p.grad for n, p in moe.named_parameters()}
        return out | {"out": got.out.detach(), "dx": x.grad, "aux": got.aux_loss.detach().reshape(1),
                      "z": got.z_loss.detach().reshape(1)}
    return compute


def _expert_parallel(config: MoEConfig, world_size: int, x: torch.Tensor):
    ep = ExpertParallelMoE(MoE(config).double(), world_size)
    xs = [t.detach().clone().requires_grad_() for t in shard_tokens(x, world_size)]
    outs = ep.forward(xs)
    dy, a, z = _weights(x)
    dys = shard_tokens(dy, world_size)
    # Each rank's share of the loss; the auxiliary losses (equal on every rank) counted once.
    loss = sum((o.out * d).sum() for o, d in zip(outs, dys, strict=True)) + a * outs[0].aux_loss + z * outs[0].z_loss
    loss.backward()
    got = {f"grad {n}": g for n, g in ep.gradients().items()}
    got |= {"out": torch.cat([o.out.detach() for o in outs]), "dx": torch.cat([t.grad for t in xs]),
            "aux": outs[0].aux_loss.detach().reshape(1), "z": outs[0].z_loss.detach().reshape(1)}
    return got, outs


@settings(max_examples=15)
@given(n=st.sampled_from([1, 5, 13, 24]), ep=st.sampled_from([1, 2, 3, 4]), per_rank=st.sampled_from([1, 2]),
       k=st.integers(1, 3), cf=st.sampled_from([None, 0.5, 1.0, 1.5]), shared=st.integers(0, 1))
def test_expert_parallel_equals_the_block(n, ep, per_rank, k, cf, shared):
    E = ep * per_rank
    k = min(k, E)
    config = MoEConfig(dim=6, hidden=7, num_experts=E, top_k=k, capacity_factor=cf, num_shared_experts=shared,
                       seed=n + E)
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ref, spread = input_spread(_one_process(config, ep), (x,), origin="MoE out, losses and gradients")
    got, outs = _expert_parallel(config, ep, x)
    assert_equivalent(within_spread(got, ref, spread, name=f"EP={ep} E={E} k={k} cf={cf} N={n}"))
    block = MoE(config).double()(x, num_groups=ep)
    assert outs[0].dropped == block.dropped
    assert torch.equal(outs[0].tokens_per_expert, block.tokens_per_expert)


def test_world_size_must_divide_the_experts():
    with pytest.raises(ValueError, match="num_experts=4"):
        ExpertParallelMoE(MoE(MoEConfig(dim=4, hidden=4, num_experts=4)), 3)
