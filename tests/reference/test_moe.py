"""The MoE block spec: a dense hand loop over tokens, capacity drops and the auxiliary losses by hand, and
transformers' MixtralSparseMoeBlock (tiny config, built not downloaded) as a peer where nothing is dropped."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from reference.moe import MoE, MoEConfig, capacity_mask, load_balancing_loss, route, router_z_loss


def _hand_loop(moe: MoE, x: torch.Tensor, num_groups: int = 1) -> tuple[torch.Tensor, int]:
    """Token by token, in plain Python: softmax, sort, renormalise, count slots per group and expert."""
    c = moe.config
    out, dropped = torch.zeros_like(x), 0
    for group in torch.arange(len(x)).tensor_split(num_groups):
        choices = {}
        for t in group.tolist():
            p = torch.softmax(x[t] @ moe.router.weight.T, dim=0)
            ranked = sorted(range(c.num_experts), key=lambda e, p=p: -float(p[e]))[:c.top_k]
            total = sum(float(p[e]) for e in ranked)
            choices[t] = [(e, p[e] / total) for e in ranked]
        cap = math.inf if c.capacity_factor is None else math.ceil(c.capacity_factor * c.top_k * len(group)
                                                                   / c.num_experts)
        used = [0] * c.num_experts
        for j in range(c.top_k):  # all first choices, then all second choices, ...
            for t in group.tolist():
                e, g = choices[t][j]
                if used[e] >= cap:
                    dropped += 1
                    continue
                used[e] += 1
                w = moe.experts[e]
                out[t] += g * (w.fc_out.weight @ (F.silu(w.fc_gate.weight @ x[t]) * (w.fc_in.weight @ x[t])))
        for t in group.tolist():
            for s in moe.shared_experts:
                out[t] += s(x[t][None])[0]
    return out, dropped


@given(n=st.sampled_from([1, 5, 13, 17]), E=st.sampled_from([2, 3, 5, 8]), k=st.integers(1, 3),
       cf=st.sampled_from([None, 0.5, 1.0, 1.25]), shared=st.integers(0, 2), groups=st.sampled_from([1, 2, 3]))
def test_block_equals_a_dense_hand_loop_over_tokens(n, E, k, cf, shared, groups):
    k = min(k, E)
    moe = MoE(MoEConfig(dim=6, hidden=5, num_experts=E, top_k=k, capacity_factor=cf, num_shared_experts=shared,
                        seed=n)).double()
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(E), dtype=torch.float64)
    got = moe(x, num_groups=groups)
    with torch.no_grad():
        expected, dropped = _hand_loop(moe, x, groups)
    torch.testing.assert_close(got.out, expected, rtol=1e-12, atol=1e-14)
    assert got.dropped == dropped
    assert int(got.tokens_per_expert.sum()) == n * k - dropped


def test_capacity_drops_second_choices_before_first_choices():
    # E=4, k=2, 4 tokens, cf=1: capacity ceil(1 * 2 * 4 / 4) = 2 per expert. Tokens 0, 1 choose (1, 0); 2, 3 choose
    # (0, 1). First choices fill expert 1 with tokens 0, 1 and expert 0 with tokens 2, 3: every second choice drops.
    experts = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    kept = capacity_mask(experts, num_experts=4, capacity_factor=1.0)
    assert kept.tolist() == [[True, False]] * 4
    # Token order within a choice: all four choose expert 0 first; tokens 0 and 1 get its two slots.
    kept = capacity_mask(torch.tensor([[0, 1]] * 4), num_experts=4, capacity_factor=1.0)
    assert kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    # Two groups of two tokens: capacity ceil(2 * 2 / 4) = 1 in each, counted separately.
    kept = capacity_mask(torch.tensor([[0, 1]] * 4), num_experts=4, capacity_factor=1.0, num_groups=2)
    assert kept.tolist() == [[True, True], [False, False], [True, True], [False, False]]
    assert capacity_mask(torch.tensor([[0, 1]] * 4), 4, None).all()


def test_aux_and_z_loss_on_a_hand_computed_case():
    # E=2, k=1, four tokens with logits (ln 3, 0) or (0, ln 3): p = (3/4, 1/4) or (1/4, 3/4).
    third = math.log(3.0)
    logits = torch.tensor([[third, 0.0], [third, 0.0], [0.0, third], [third, 0.0]], dtype=torch.float64)
    r = route(logits, top_k=1)
    assert r.experts[:, 0].tolist() == [0, 0, 1, 0]
    # f = (3/4, 1/4); P = ((3*3/4 + 1/4) / 4, (3*1/4 + 3/4) / 4) = (0.625, 0.375); aux = 2 (3/4 0.625 + 1/4 0.375).
    assert float(load_balancing_loss(r.probs, r.experts)) == pytest.approx(1.125, rel=1e-15)
    # Every token's log-sum-exp is log(3 + 1).
    assert float(router_z_loss(logits)) == pytest.approx(math.log(4.0) ** 2, rel=1e-15)
    # Uniform routing gives 1 for any k.
    uniform = route(torch.zeros(6, 3, dtype=torch.float64), top_k=1)
    assert float(load_balancing_loss(uniform.probs, torch.tensor([[0], [1], [2], [0], [1], [2]]))) == \
        pytest.approx(1.0)


def test_top_k_weights_are_renormalised_over_the_chosen():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    r = route(logits, top_k=2)
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(r.weights[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (3, 1), (5, 3)])
def test_equals_transformers_mixtral_block_without_capacity(E, k):
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from conformance.checks._spec_expert_parallel import mixtral_peer

    moe = MoE(MoEConfig(dim=8, hidden=12, num_experts=E, top_k=k, seed=E)).double()
    peer = mixtral_peer(moe)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = moe(x_ours), peer(x_peer)
    # transformers' router takes softmax(logits.float()): its gate weights carry float32 rounding, ours float64.
    # Each output is a sum of k gated expert outputs, so the two differ by a few float32 ulps of their magnitude.
    def close(a, b):
        eps32 = torch.finfo(torch.float32).eps
        torch.testing.assert_close(a, b, rtol=0, atol=4 * k * eps32 * float(b.abs().max()))

    close(ours.out, theirs)
    dy = torch.randn_like(x)
    ours.out.backward(dy)
    theirs.backward(dy)
    close(x_ours.grad, x_peer.grad)
    if k > 1:  # with k = 1 the renormalised weight is p/p = 1: the router's gradient is 0, both sides rounding noise
        close(moe.router.weight.grad, peer.gate.weight.grad)
    for e, expert in enumerate(moe.experts):
        close(torch.cat([expert.fc_gate.weight.grad, expert.fc_in.weight.grad]), peer.experts.gate_up_proj.grad[e])
        close(expert.fc_out.weight.grad, peer.experts.down_proj.grad[e])
    # transformers counts f per token (sum k), so its aux loss is k times Switch's normalised one.
    logits = x.reshape(-1, 8) @ moe.router.weight.detach().T
    torch.testing.assert_close(ours.aux_loss.detach() * k, load_balancing_loss_func((logits,), E, k).double(),
                               rtol=1e-6, atol=0)  # transformers sums in float32


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(dim=4, hidden=4, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(dim=4, hidden=4, num_experts=2, capacity_factor=0)
