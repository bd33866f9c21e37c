"""optimized.tensor_parallel held to dense layers (float64) and to single-process training of the tiny GPT.

The GPT comparisons follow tests/optimized/test_data_parallel.py, in float64 on both sides: at each of 10 AdamW
steps of the reference run the parallel model is loaded with the reference's state (`load_full`), and its loss,
gradient norm and every gathered gradient must be within 10x the reference's per-step rounding spread; and, on four
ranks, a whole trajectory with the parallel model's own AdamW must give the same losses and final parameters within
10x the reference's whole-run spread (conformance.checks._reference_runs, conformance.tolerance.within_spread).
Every multi-rank test goes through conformance.launch.spawn (gloo, one thread per rank); workers are module-level.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from conformance.checks._reference_runs import ReferenceRun, reference_run
from conformance.launch import spawn
from conformance.measure import CollectiveCounter
from conformance.tolerance import allclose, assert_equivalent, combine, step_by_step, within_spread
from optimized.clipping import global_grad_norm
from optimized.data_parallel import DataParallel
from optimized.distributed.grid import make_process_grid
from optimized.tensor_parallel import (
    ColumnParallelLinear,
    LocalHeads,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_region,
    gather_full,
    load_full,
    megatron_plan,
    parallelize,
    scatter_to_region,
    split_parameters,
    vocab_parallel_cross_entropy,
)
from reference.data import make_batches
from reference.model import GPT, GPTConfig

TIMEOUT = 120.0
STEPS = 10
BATCH, SEQ = 4, 16
LR, WD = 1e-2, 0.1


# --- layers vs dense, float64 ---------------------------------------------------------------------------------------


def _backward(y: torch.Tensor, grad: torch.Tensor) -> None:
    """y.backward(grad), spelled as the backward of sum(y * grad): the same gradient, without the shape checks that
    import sympy into every rank (seconds of start-up)."""
    (y * grad).sum().backward()


def _layers_worker(in_f: int, out_per_rank: int, lead: tuple[int, ...], seed: int) -> list:
    rank, t = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # the same draws on every rank
    f64 = torch.float64
    out_f = out_per_rank * t
    pairs = []  # (name, actual, expected)

    def chunk(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.chunk(t, dim=dim)[rank].clone()  # a copy: later backwards accumulate into the dense grads

    dense = nn.Linear(in_f, out_f, dtype=f64)
    x = torch.randn(*lead, in_f, dtype=f64, requires_grad=True)
    gy = torch.randn(*lead, out_f, dtype=f64)
    y_ref = dense(x)
    _backward(y_ref, gy)
    for gather in (True, False):
        col = ColumnParallelLinear.from_dense(dense, gather_output=gather)
        xc = x.detach().clone().requires_grad_()
        y = col(xc)
        _backward(y, gy if gather else chunk(gy, -1))
        tag = f"column gather={gather}"
        pairs += [(f"{tag} out", y, y_ref if gather else chunk(y_ref, -1)),
                  (f"{tag} dx", xc.grad, x.grad),
                  (f"{tag} dW", col.weight.grad, chunk(dense.weight.grad, 0)),
                  (f"{tag} db", col.bias.grad, chunk(dense.bias.grad, 0))]

    dense2 = nn.Linear(out_f, in_f, bias=False, dtype=f64)
    h = torch.randn(*lead, out_f, dtype=f64, requires_grad=True)
    gz = torch.randn(*lead, in_f, dtype=f64)
    z_ref = dense2(h)
    _backward(z_ref, gz)
    for parallel_in in (True, False):
        row = RowParallelLinear.from_dense(dense2, input_is_parallel=parallel_in)
        hc = h.detach().clone().requires_grad_()
        z = row(hc.chunk(t, dim=-1)[rank] if parallel_in else hc)
        _backward(z, gz)
        tag = f"row input_is_parallel={parallel_in}"
        # A parallel input is this rank's slice: its gradient is the slice of the dense one (zero elsewhere).
        dh = chunk(hc.grad, -1) if parallel_in else hc.grad
        pairs += [(f"{tag} out", z, z_ref), (f"{tag} dh", dh, chunk(h.grad, -1) if parallel_in else h.grad),
                  (f"{tag} dW", row.weight.grad, chunk(dense2.weight.grad, 1))]

    # Megatron MLP: column -> GeLU -> row equals the dense MLP, output and input gradient.
    x.grad = None
    dense.zero_grad()
    dense2.zero_grad()
    mlp_ref = dense2(F.gelu(dense(x)))
    _backward(mlp_ref, gz)
    col, row = ColumnParallelLinear.from_dense(dense), RowParallelLinear.from_dense(dense2)
    xm = x.detach().clone().requires_grad_()
    mlp = row(F.gelu(col(xm)))
    _backward(mlp, gz)
    pairs += [("mlp out", mlp, mlp_ref), ("mlp dx", xm.grad, x.grad)]

    # Vocab-parallel embedding.
    vocab = out_f
    emb_ref = nn.Embedding(vocab, in_f, dtype=f64)
    ids = torch.randint(0, vocab, lead)
    ge = torch.randn(*lead, in_f, dtype=f64)
    e_ref = emb_ref(ids)
    _backward(e_ref, ge)
    emb = VocabParallelEmbedding.from_dense(emb_ref)
    e = emb(ids)
    _backward(e, ge)
    pairs += [("embedding out", e, e_ref), ("embedding dW", emb.weight.grad, chunk(emb_ref.weight.grad, 0))]

    # Vocab-parallel cross-entropy, with ignored targets and every reduction.
    logits = torch.randn(*lead, vocab, dtype=f64) * 3
    targets = torch.randint(0, vocab, lead)
    targets.view(-1)[::3] = -100
    for reduction in ("mean", "sum", "none"):
        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(full.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100,
                              reduction="sum" if reduction == "mean" else reduction)
        if reduction == "mean":  # the project's convention: 0, not NaN, when no token is scored
            ref = ref / (targets != -100).sum().clamp(min=1)
        ref = ref.view(targets.shape) if reduction == "none" else ref
        g_loss = torch.randn(ref.shape, dtype=f64)
        _backward(ref, g_loss)
        local = chunk(logits, -1).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, reduction=reduction)
        _backward(loss, g_loss)
        pairs += [(f"ce {reduction}", loss, ref), (f"ce {reduction} dlogits", local.grad, chunk(full.grad, -1))]
    local = chunk(logits, -1).clone().requires_grad_()
    nothing = vocab_parallel_cross_entropy(local, torch.full(lead, -100))
    nothing.backward()
    pairs += [("ce no scored token", nothing, torch.zeros((), dtype=f64)),
              ("ce no scored token grad", local.grad, torch.zeros_like(local))]

    # scatter / gather round trip, and their gradients (gather backward slices, scatter backward gathers).
    v = torch.randn(*lead, out_f, dtype=f64, requires_grad=True)
    back = gather_from_region(scatter_to_region(v))
    _backward(back, gy)
    pairs += [("gather(scatter(v))", back, v.detach()), ("gather(scatter(v)) grad", v.grad, gy)]

    # Built from scratch: every rank draws the same full weight from `seed` and keeps its slice.
    singles = [dist.new_group([r]) for r in range(t)]
    for cls, args, dim in ((ColumnParallelLinear, (in_f, out_f), 0), (RowParallelLinear, (out_f, in_f), 1),
                           (VocabParallelEmbedding, (vocab, in_f), 0)):
        shard = cls(*args, seed=seed)
        whole = cls(*args, seed=seed, process_group=singles[rank])
        pairs.append((f"{cls.__name__} init", shard.weight.detach(), chunk(whole.weight.detach(), dim)))
    return [(name, a.detach(), b.detach()) for name, a, b in pairs]


def _assert_pairs(results: list[list]) -> None:
    parts = [allclose(a, b, name=f"rank {r}: {name}") for r, pairs in enumerate(results) for name, a, b in pairs]
    assert_equivalent(combine("tensor-parallel layers vs dense", parts))


@settings(max_examples=3, deadline=None)
@given(
    world_size=st.sampled_from([1, 2, 3, 4]),
    in_f=st.integers(1, 11),
    out_per_rank=st.integers(1, 5),
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
)
@example(world_size=1, in_f=7, out_per_rank=5, lead=(3, 5))
@example(world_size=2, in_f=7, out_per_rank=3, lead=(13,))
@example(world_size=3, in_f=5, out_per_rank=7, lead=(2, 3))
@example(world_size=4, in_f=11, out_per_rank=2, lead=(1, 1))
def test_layers_forward_and_backward_equal_dense(world_size, in_f, out_per_rank, lead):
    _assert_pairs(spawn(_layers_worker, world_size, in_f, out_per_rank, lead, 5, timeout=TIMEOUT))


# --- the tiny GPT, trained tensor-parallel (and DP x TP) vs one process ----------------------------------------------


CONFIGS = {
    # GQA with the key/value heads split too, tied embedding.
    2: GPTConfig(vocab_size=32, block_size=SEQ, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
    # Three ranks: 6 heads, 3 kv heads, untied head, no biases.
    3: GPTConfig(vocab_size=33, block_size=SEQ, n_layer=2, n_head=6, n_kv_head=3, n_embd=24, bias=False,
                 tie_embeddings=False),
    4: GPTConfig(vocab_size=32, block_size=SEQ, n_layer=2, n_head=4, n_embd=32),
}


def _batches(config: GPTConfig) -> list:
    return _batches_for_vocab(config.vocab_size)


@functools.cache
def _batches_for_vocab(vocab_size: int) -> list:
    return make_batches(3, batch_size=BATCH, seq_len=SEQ, vocab_size=vocab_size, seed=11)



@functools.cache
def _reference(world_size: int) -> tuple[ReferenceRun, list[float]]:
    """One process, 10 AdamW steps in float64: the state before each step, its loss and gradients, the reference's
    own rounding spread, and each step's gradient norm."""
    config = CONFIGS[world_size]
    ref = reference_run(lambda: GPT(config), [_batches(config)[step % 3] for step in range(STEPS)], lr=LR,
                        weight_decay=WD)
    norms = [float(torch.stack([g.pow(2).sum() for g in grads.values()]).sum().sqrt()) for grads in ref.grads]
    return ref, norms


def _build(config: GPTConfig, dp_size: int):
    """The tiny GPT, tensor parallel over the world (dp_size 1) or over the rows of a dp_size x (world/dp_size)
    grid, data parallel over its columns. Returns (model, what to call, tp group, dp rank, tp rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = GPT(config).to(torch.float64)
    if dp_size == 1:
        return model, parallelize(model, megatron_plan(model)), None, 0, rank
    grid = make_process_grid(dp=dp_size, tp=world // dp_size)
    wrapped = DataParallel(parallelize(model, megatron_plan(model), grid.tp_group), process_group=grid.dp_group)
    return model, wrapped, grid.tp_group, grid.dp_rank, grid.tp_rank


def _per_step(config: GPTConfig, dp_size: int, states: list[dict]) -> dict:
    """Every step from the reference's state (loaded shard by shard): loss, gradient norm, all gradients."""
    model, wrapped, tp_group, dp_rank, tp_rank = _build(config, dp_size)
    out: dict = {"loss": [], "norm": [], "grads": [], "dp_rank": dp_rank, "tp_rank": tp_rank}
    for step in range(STEPS):
        load_full(model, states[step])
        model.zero_grad(set_to_none=True)
        idx, targets = _batches(config)[step % 3]
        idx, targets = idx.chunk(dp_size)[dp_rank], targets.chunk(dp_size)[dp_rank]
        with CollectiveCounter() as fwd:
            logits, loss = wrapped(idx, targets)
        with CollectiveCounter() as bwd:
            loss.backward()
        if step == 0:
            out["logits_shape"] = tuple(logits.shape)
            out["calls"] = ([(c.op, c.payload_bytes) for c in fwd.calls], [(c.op, c.payload_bytes) for c in bwd.calls])
        sharded, replicated = split_parameters(model)
        out["norm"].append(float(global_grad_norm([p.grad for p in sharded], [p.grad for p in replicated],
                                                  process_group=tp_group)))
        out["loss"].append(float(loss.detach()))
        full = gather_full(model, grads=True)
        out["grads"].append(full if dist.get_rank() == 0 else None)
    out["numel"] = {n: p.numel() for n, p in model.named_parameters()}
    # One transformer layer alone: Megatron's two all-reduces forward and two backward.
    x = torch.randn(2, 5, config.n_embd, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                    requires_grad=True)
    with CollectiveCounter() as layer_fwd:
        y = model.blocks[0](x)
    with CollectiveCounter() as layer_bwd:
        y.square().sum().backward()
    out["layer"] = (layer_fwd.count("all_reduce"), layer_bwd.count("all_reduce"), layer_fwd.count(),
                    layer_bwd.count())
    return out


def _trajectory(config: GPTConfig, dp_size: int) -> dict:
    """10 AdamW steps with the parallel model's own optimizer (on its shards): the losses and the all-gathered final
    parameters."""
    model, wrapped, _, dp_rank, _ = _build(config, dp_size)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(STEPS):
        idx, targets = _batches(config)[step % 3]
        opt.zero_grad(set_to_none=True)
        _, loss = wrapped(idx.chunk(dp_size)[dp_rank], targets.chunk(dp_size)[dp_rank])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"loss": losses, "final": gather_full(model)}


def _tp_worker(config_dict: dict, dp_sizes: tuple[int, ...], states: list[dict], trajectory: bool) -> dict:
    config = GPTConfig(**config_dict)
    out = {dp: _per_step(config, dp, states) for dp in dp_sizes}
    if trajectory:
        out["trajectory"] = {dp: _trajectory(config, dp) for dp in dp_sizes}
    return out


def _assert_matches_reference(res: dict, world_size: int) -> None:
    ref, ref_norms = _reference(world_size)
    assert all(got.keys() == want.keys() for got, want in zip(res["grads"], ref.grads, strict=True))
    parts = step_by_step(res["loss"], res["grads"], ref.losses, ref.grads, name="TP", spread=ref.step_spread)
    parts.append(within_spread({"grad norm": torch.tensor(res["norm"], dtype=torch.float64)},
                               {"grad norm": torch.tensor(ref_norms, dtype=torch.float64)}, ref.step_spread,
                               name="grad norm"))
    assert_equivalent(combine(f"TP t={world_size} vs single process", parts))


def _assert_run(losses: list[float], final: dict, world_size: int, name: str) -> None:
    ref = _reference(world_size)[0]
    run = {**final, "loss": torch.tensor(losses, dtype=torch.float64)}
    assert_equivalent(within_spread(run, ref.final, ref.run_spread, name=name))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_tensor_parallel_gpt_trains_like_one_process(world_size):
    config = CONFIGS[world_size]
    dp_sizes = (1, 2) if world_size == 4 else (1,)
    # The run with the model's own AdamW needs torch.optim, whose first use costs every rank seconds of imports:
    # done once, on four ranks, for TP 4 and DP 2 x TP 2.
    trajectory = world_size == 4
    states = _reference(world_size)[0].states
    results = spawn(_tp_worker, world_size, asdict(config), dp_sizes, states, trajectory, timeout=TIMEOUT)
    t = world_size
    for r, per_rank in enumerate(results):
        res = per_rank[1]
        if r == 0:
            _assert_matches_reference(res, world_size)
        # Every rank reports the same loss (the vocab-parallel loss is all-reduced) and holds logits of V/t ids.
        assert res["loss"] == results[0][1]["loss"]
        assert res["logits_shape"] == (BATCH, SEQ, config.vocab_size // t)

        # Parameters per rank: every split tensor holds 1/t of the full one, the rest (LayerNorms, wpe, biases of
        # row-parallel layers) is replicated.
        full = {n: p.numel() for n, p in GPT(config).named_parameters()}
        assert res["numel"].keys() == full.keys()
        plan = megatron_plan(GPT(config))
        for name, numel in full.items():
            module, _, pname = name.rpartition(".")
            style = next((v for k, v in plan.items() if fnmatch.fnmatchcase(module, k)), None)
            split = style in ("colwise", "embedding", "vocab_head") or (style == "rowwise" and pname != "bias")
            assert res["numel"][name] * (t if split else 1) == numel, name

        # Collectives: per layer 2 all-reduces forward, 2 backward (Megatron Sec. 3); the whole model adds the
        # embedding's g, the head's f and the loss's two all-reduces (max; sum-exp with the target logit), each of
        # float64 elements (8 bytes).
        assert res["layer"] == (2, 2, 2, 2)
        fwd, bwd = res["calls"]
        B, T, C, L, b = BATCH, SEQ, config.n_embd, config.n_layer, 8
        act = B * T * C * b
        assert fwd == [("all_reduce", act)] * (1 + 2 * L) + [("all_reduce", B * T * b), ("all_reduce", 2 * B * T * b)]
        assert bwd == [("all_reduce", act)] * (2 * L + 1)

    if world_size == 4:  # DP x TP on a 2 x 2 grid: the same training, the batch split over the two replicas
        grid_results = [per_rank[2] for per_rank in results]
        assert sorted((g["dp_rank"], g["tp_rank"]) for g in grid_results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        mean_loss = [sum(g["loss"][s] for g in grid_results if g["tp_rank"] == 0) / 2 for s in range(STEPS)]
        _assert_matches_reference({**grid_results[0], "loss": mean_loss}, world_size)
        assert grid_results[0]["logits_shape"] == (BATCH // 2, SEQ, config.vocab_size // 2)

    if trajectory:  # the whole 10-step trajectory, each run with its own AdamW: the same losses and parameters
        tp_run = results[0]["trajectory"][1]
        _assert_run(tp_run["loss"], tp_run["final"], world_size, "TP 4 trajectory")
        by_rank = [r["trajectory"][2] for r in results]
        _assert_run([(a + b) / 2 for a, b in zip(by_rank[0]["loss"], by_rank[2]["loss"], strict=True)],
                    by_rank[0]["final"], world_size, "DP 2 x TP 2 trajectory")


# --- bad input ------------------------------------------------------------------------------------------------------


def _is_untouched(model: nn.Module) -> bool:
    return not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
                   for m in model.modules())


def _bad_input_worker() -> list[str]:
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    messages = []

    def rejects(match: str, model: nn.Module, plan, group=None) -> None:
        with pytest.raises(ValueError, match=match) as e:
            parallelize(model, plan, group)
        assert _is_untouched(model), f"model changed by a rejected plan ({match})"
        messages.append(str(e.value))

    good = GPTConfig(vocab_size=48, block_size=8, n_layer=1, n_head=6, n_embd=48)
    with CollectiveCounter() as counter:
        m = GPT(GPTConfig(vocab_size=48, block_size=8, n_layer=1, n_head=4, n_embd=48))
        rejects(r"n_head=4 query heads .* divisible by the tensor-parallel size 3", m, megatron_plan(m))
        m = GPT(GPTConfig(vocab_size=48, block_size=8, n_layer=1, n_head=4, n_embd=32))
        rejects(r"blocks.0.mlp.fc_in.out_features=128 must be divisible by the tensor-parallel size 3", m,
                {"blocks.0.mlp.fc_in": "colwise", "blocks.0.mlp.fc_out": "rowwise"})
        m = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=6, n_embd=48))
        rejects(r"wte.num_embeddings \(vocabulary size\)=32 must be divisible", m, megatron_plan(m))
        m = GPT(good)
        rejects(r"'blocks.0.attn.qproj', which the model does not have \(did you mean", m,
                {"blocks.0.attn.qproj": "colwise", "blocks.0.attn.out_proj": "rowwise"})
        rejects(r"'layers.\*.attn', which the model does not have.*write a plan", m, {"layers.*.attn": "shared_input"})
        rejects(r"needs a torch.nn.Linear or a transformers Conv1D, but 'blocks.0.ln_1' is a LayerNorm", m,
                {"blocks.0.ln_1": "colwise"})
        rejects(r"'embedding' needs an nn.Embedding, but 'blocks.0.mlp.fc_in' is a Linear", m,
                {"blocks.0.mlp.fc_in": "embedding"})
        rejects(r"plan\['wte'\] = 'diagonal'; allowed", m, {"wte": "diagonal"})
        rejects(r"plan must be a mapping", m, [("wte", "vocab")])
        rejects(r"'blocks.0.mlp'.*only \['ColumnParallel'\].*row-parallel partner", m,
                {"blocks.0.mlp.fc_in": "colwise"})
        rejects(r"attention 'blocks.0.attn': heads split only when all its projections are in the plan.*"
                r"missing \['k_proj', 'v_proj'\]", m,
                {"blocks.0.attn": LocalHeads(6, 6), "blocks.0.attn.q_proj": "colwise",
                 "blocks.0.attn.out_proj": "rowwise"})
        rejects(r"attribute 'n_heads' must be an int of the module", m,
                {**megatron_plan(m), "blocks.*.attn": LocalHeads(6, 6, attributes=("n_heads",))})
        rejects(r"'blocks.0.ln_1'\] shares f at its input, but the plan makes none of its children column-parallel",
                m, {"blocks.0.ln_1": "shared_input"})
        rejects(r"wte.weight is tied to \['lm_head'\]", m, {"wte": "vocab"})
        rejects(r"module '<root>'.*row-parallel partner", m, {"lm_head": "colwise", "wte": "vocab"})
        rejects(r"no ready tensor-parallel plan for Sequential.*write a plan", nn.Sequential(nn.Linear(3, 3)), None)
        tp = parallelize(GPT(good), None, pair if rank < 2 else None)
        with pytest.raises(ValueError, match=r"id 48 is outside the vocabulary \[0, num_embeddings=48\)"):
            tp.wte(torch.tensor([[1, 48]]))
        with pytest.raises(ValueError, match=r"idx holds token id -1"):
            tp(torch.tensor([[1, -1]]))
        with pytest.raises(ValueError, match=r"target 12 is outside \[0, V=12\) and is not ignore_index=-100"):
            vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.tensor([12, -100]))
        with pytest.raises(ValueError, match=r"target -5 is outside \[0, V=12\)"):
            vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.tensor([-5, 0]), reduction="sum")
        mixed = GPT(good)
        mixed.wpe.to("meta")
        rejects(r"one device.*cpu.*meta", mixed, megatron_plan(mixed))
        if rank == 2:
            rejects(r"not a member of the group", m, megatron_plan(m), pair)
        with pytest.raises(ValueError, match=r"out_features=5 must be divisible by the tensor-parallel size 3"):
            ColumnParallelLinear(7, 5)
        with pytest.raises(ValueError, match=r"in_features=7 must be divisible"):
            RowParallelLinear(7, 5)
        with pytest.raises(ValueError, match=r"pp=1 \* dp=2 \* cp=1 \* tp=2 = 4 must equal the world size 3"):
            make_process_grid(dp=2, tp=2)
        with pytest.raises(ValueError, match=r"reduction must be"):
            vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), reduction="avg")
    assert counter.count() == 0, "bad input must be rejected before any collective"
    return messages


def test_bad_input_is_rejected_before_any_collective_and_leaves_the_model_unchanged():
    messages = spawn(_bad_input_worker, 3, timeout=TIMEOUT)
    assert any("global rank 2" in m for m in messages[2])
