"""split() cuts the tiny GPT into stages that compute exactly what the model computes; the executor on one rank."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import step_reference
from conformance.tolerance import assert_equivalent, within_spread
from optimized.pipeline import Deadlock, PipelineExecutor, Schedule, gpipe, interleaved_one_f_one_b, split
from optimized.pipeline.split import Layout, balanced_boundaries
from reference.data import make_batches
from reference.model import GPT, GPTConfig


def tiny(n_layer=4, **kw):
    return GPT(GPTConfig(n_layer=n_layer, n_embd=32, n_head=4, block_size=32, **kw))


def batch(rows=4, seq_len=16, seed=0):
    return make_batches(1, batch_size=rows, seq_len=seq_len, vocab_size=64, seed=seed, vary_length=True)[0]


def run_stages(stages, idx, targets):
    x = idx
    for stage in stages[:-1]:
        x = stage(x)
    return stages[-1](x), stages[-1](x, targets)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
@pytest.mark.parametrize("tie", [True, False])
def test_stages_in_sequence_compute_the_model_bitwise(num_stages, tie):
    model = tiny(n_layer=5, tie_embeddings=tie)
    idx, targets = batch()
    logits_ref, loss_ref = model(idx, targets, reduction="sum")
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    stages = split(model, num_stages)
    assert [s.index for s in stages] == list(range(num_stages))
    assert [i for s in stages for i in s.block_indices] == list(range(5))
    logits, loss = run_stages(stages, idx, targets)
    loss.backward()
    assert torch.equal(logits, logits_ref) and torch.equal(loss, loss_ref)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_ref[n]), n


def test_stages_share_the_models_parameters():
    model = tiny()
    stages = split(model, 2)
    assert stages[0].token_embedding is model.wte and list(stages[1].head) == [model.ln_f, model.lm_head]
    assert stages[0].blocks[0] is model.blocks[0]
    assert stages[0].tied_embeddings and stages[1].tied_weight() is model.wte.weight
    assert stages[0].position_embedding is model.wpe and stages[1].token_embedding is None and not stages[0].head


def test_explicit_boundaries_place_the_blocks():
    stages = split(tiny(n_layer=6), 3, boundaries=[1, 4])
    assert [list(s.block_indices) for s in stages] == [[0], [1, 2, 3], [4, 5]]


def _stage_costs(costs, cuts, first, last):
    edges = [0, *cuts, len(costs)]
    out = [sum(costs[a:b]) for a, b in itertools.pairwise(edges)]
    out[0] += first
    out[-1] += last
    return out


@settings(max_examples=40, deadline=None)
@given(
    costs=st.lists(st.integers(1, 50), min_size=1, max_size=7),
    first=st.integers(0, 80),
    last=st.integers(0, 80),
    data=st.data(),
)
def test_balanced_cut_minimises_the_largest_stage(costs, first, last, data):
    num_stages = data.draw(st.integers(1, len(costs)))
    cuts = balanced_boundaries(costs, num_stages, first, last)
    assert len(cuts) == num_stages - 1 and cuts == sorted(set(cuts)) and all(0 < c < len(costs) for c in cuts)
    best = min(
        max(_stage_costs(costs, list(c), first, last))
        for c in itertools.combinations(range(1, len(costs)), num_stages - 1)
    )
    assert max(_stage_costs(costs, cuts, first, last)) == best


def test_default_split_balances_parameters():
    model = tiny(n_layer=8)  # block 12672 params, wte + wpe 3072, ln_f + lm_head (tied copy counted) 2112

    def sizes(stages):
        return [sum(p.numel() for p in s.parameters()) for s in stages]

    stages = split(model, 3)
    assert [len(s.block_indices) for s in stages] == [2, 3, 3]
    assert sizes(stages) == [2 * 12672 + 3072, 3 * 12672, 3 * 12672 + 2112]
    assert max(sizes(stages)) < max(sizes(split(model, 3, boundaries=[3, 6])))


@pytest.mark.parametrize(
    "args, match",
    [
        ((5,), "num_stages=5 exceeds the model's 4 blocks"),
        ((0,), "num_stages must be a positive integer, got 0"),
        ((3, [2, 1]), r"boundaries must be strictly increasing block indices in 1 .. 3 .* got \[2, 1\]"),
        ((3, [0, 2]), "strictly increasing"),
        ((2, [4]), "strictly increasing"),
        ((3, [2]), "boundaries must hold num_stages - 1 = 2 block indices, got 1"),
        ((2, [1.5]), "boundaries must be integers"),
    ],
)
def test_bad_split_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        split(tiny(), *args)


def test_split_says_how_to_describe_an_unknown_model():
    with pytest.raises(ValueError, match=r"no ready layout for Linear .*pass layout=Layout\(token_embedding="):
        split(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="an nn.Sequential must hold an nn.Embedding first"):
        split(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)
    with pytest.raises(ValueError, match=r"layout.layers='blocks.x' names no module of GPT"):
        split(tiny(), 1, layout=Layout("wte", "blocks.x", ("ln_f", "lm_head")))


# --- the executor on one rank (no process group): micro-batching, token weighting, local stage-to-stage messages ---


def _reference(idx, targets):
    """The whole batch in float64: loss (tensor "loss"), every gradient, and their rounding spread (the batch in two
    micro-batches, or the weights nudged by one ulp)."""
    return step_reference(tiny, (idx, targets))


@pytest.mark.parametrize(
    "make_schedule, num_stages",
    [
        (lambda m: gpipe(1, m), 1),
        (lambda m: interleaved_one_f_one_b(1, m, 2), 2),  # two stages on one rank talk through the local mailbox
        (lambda m: interleaved_one_f_one_b(1, m, 4), 4),
    ],
)
@pytest.mark.parametrize("m", [1, 3])
def test_one_rank_executor_equals_the_whole_batch(make_schedule, num_stages, m):
    """float64 on both sides: the loss and every gradient within 10x the reference's own rounding spread."""
    idx, targets = batch(rows=2 * m)
    model = tiny().to(torch.float64)
    schedule = make_schedule(m)
    executor = PipelineExecutor(split(model, num_stages), schedule)
    result = executor.step(idx, targets)
    ref, spread = _reference(idx, targets)
    got = {"loss": result.loss.reshape(1), **{n: p.grad for n, p in model.named_parameters()}}
    assert_equivalent(within_spread(got, ref, spread, name=f"{num_stages} stages, m={m}"))
    assert [iv.action for iv in result.timeline] == list(schedule[0])
    assert all(iv.end >= iv.start for iv in result.timeline)


def test_executor_rejects_a_batch_that_does_not_split():
    executor = PipelineExecutor(split(tiny(), 1), gpipe(1, 3))
    idx, targets = batch(rows=4)
    with pytest.raises(ValueError, match="batch of 4 rows does not split into num_microbatches=3"):
        executor.step(idx, targets)
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        executor.step(idx, targets[:, :3])


def test_executor_rejects_wrong_stages_and_deadlocking_schedules():
    stages = split(tiny(), 2)
    with pytest.raises(ValueError, match=r"rank 0 must hold PipelineStages \[0\] of 1"):
        PipelineExecutor(stages[1], gpipe(1, 2))
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        PipelineExecutor(stages[0], gpipe(2, 2))
    stuck = Schedule.parse("B0@0 F0@0 F0@1 B0@1", stages_per_rank=2)
    with pytest.raises(Deadlock, match="rank 0 waits at B0@0 for F0@0 on rank 0"):
        PipelineExecutor(stages, stuck)


def test_llama_style_stages_in_sequence_compute_the_model_bitwise():
    from reference.model import GPT, GPTConfig

    model = GPT(GPTConfig.llama(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_kv_head=2, n_embd=32))
    idx, targets = batch()
    logits_ref, loss_ref = model(idx, targets, reduction="sum")
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    stages = split(model, 3)
    assert stages[0].position_embedding is None and not stages[0].tied_embeddings
    logits, loss = run_stages(stages, idx, targets)
    loss.backward()
    assert torch.equal(logits, logits_ref) and torch.equal(loss, loss_ref)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_ref[n]), n


@pytest.mark.parametrize(
    "idx, match",
    [(torch.tensor([[1, 99]]), r"idx holds token id 99, outside \[0, vocab_size=64\)"),
     (torch.zeros(1, 0, dtype=torch.long), "T >= 1"),
     (torch.zeros(1, 33, dtype=torch.long), r"T=33 exceeds the position embedding.s 32 positions")],
)
def test_first_stage_checks_ids(idx, match):
    with pytest.raises(ValueError, match=match):
        split(tiny(), 2)[0](idx)


def test_an_nn_sequential_is_cut_by_its_children():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 64))
    idx, targets = batch()
    want = model(idx)
    stages = split(model, 2)
    assert stages[0].token_embedding is model[0] and list(stages[1].head) == [model[5]]
    assert [i for s in stages for i in s.block_indices] == [0, 1, 2, 3]  # the children between embedding and head
    logits, loss = run_stages(stages, idx, targets)
    assert torch.equal(logits, want)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(want.reshape(-1, 64), targets.reshape(-1),
                                                               reduction="sum"))
