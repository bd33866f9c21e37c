"""optimized.data_parallel held to one process on the concatenated batch (reference.training) and to torch DDP.

The claim is algorithmic, so the ranks and the reference run in float64 (conformance.checks._reference_runs), and
every bound is the reference's own rounding spread measured beside it (conformance.tolerance.within_spread), the
same verdict on any CPU ISA, thread count or world size. Two comparisons over 10 AdamW steps:
  - per step, from the same state: before each step every rank loads the reference's parameters, and the loss and
    every gradient must be within 10x the reference's per-step spread (its loss and gradients recomputed with the
    batch in two micro-batches, or from a state nudged by one ulp);
  - the whole trajectory, each run with its own AdamW: the losses and every final parameter within 10x the
    reference's whole-run spread (the run from initial weights nudged by one ulp), and all ranks hold bitwise the
    same parameters at the end.
Every multi-rank test goes through conformance.launch.spawn (gloo, one thread per rank). Workers are module-level
functions; one spawn per world size runs every variant, so each rank pays torch's start-up costs once.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conformance.checks._reference_runs import ReferenceRun, load_parameters, reference_run
from conformance.launch import RankError, spawn
from conformance.measure import CollectiveCounter
from conformance.tolerance import allclose, assert_equivalent, combine, step_by_step, within_spread
from optimized.data_parallel import DataParallel, NaiveDataParallel
from optimized.distributed.hooks import assign_buckets
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig

CFG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32)
BATCH = 12  # divisible by every world size 1-4
SEQ = 16
STEPS = 10
LR, WD = 1e-2, 0.1
TINY_CAP_MB = 1e-3  # ~1 KB: most parameters get a bucket of their own
TIMEOUT = 120.0
VARIANTS = ("bucketed", "tiny_buckets", "no_sync", "naive", "ddp")


@functools.cache
def _batches() -> list:
    return make_batches(3, batch_size=BATCH, seq_len=SEQ, vocab_size=CFG.vocab_size, seed=7)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)



def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _model(config: GPTConfig) -> nn.Module:
    return GPT(config).to(torch.float64)


@functools.cache
def _reference() -> ReferenceRun:
    """Single process, whole batch, 10 AdamW steps in float64: the state before each step, its loss and gradients,
    and the reference's own rounding spread."""
    return reference_run(lambda: GPT(CFG), [_batches()[step % 3] for step in range(STEPS)], lr=LR, weight_decay=WD)


# --- the worker: every variant on this rank's slice of each batch ----------------------------------------------------


def _local(batch, rank: int, world: int):
    idx, targets = batch
    return idx.chunk(world)[rank], targets.chunk(world)[rank]


def _wrap(variant: str, model: nn.Module) -> nn.Module:
    if variant == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if variant == "naive":
        return NaiveDataParallel(model)
    return DataParallel(model, bucket_cap_mb=TINY_CAP_MB if variant == "tiny_buckets" else 25.0)


def _forward_backward(variant: str, wrapped: nn.Module, idx, targets) -> torch.Tensor:
    if variant != "no_sync":
        _, loss = wrapped(idx, targets)
        loss.backward()
        if variant == "naive":
            wrapped.sync_gradients()
        return loss.detach()
    # Two micro-batches, each token weighted by this rank's scored-token count; only the second synchronises.
    n_tokens = int((targets != IGNORE_INDEX).sum())
    loss = torch.zeros(())
    for j, (i_mb, t_mb) in enumerate(zip(idx.chunk(2), targets.chunk(2), strict=True)):
        if j == 0:
            with wrapped.no_sync():
                _, loss_sum = wrapped(i_mb, t_mb, reduction="sum")
        else:
            _, loss_sum = wrapped(i_mb, t_mb, reduction="sum")
        (loss_sum / n_tokens).backward()
        loss = loss + loss_sum.detach() / n_tokens
    return loss


def _per_step(variant: str, states: list[dict], rank: int, world: int) -> dict:
    # Every rank starts from a different initialisation: the wrapper's broadcast from rank 0 must fix that.
    model = _model(replace(CFG, seed=CFG.seed + rank))
    wrapped = _wrap(variant, model)
    rank0_init = _model(CFG).state_dict()
    out: dict = {"broadcast": all(torch.equal(v, rank0_init[k]) for k, v in model.state_dict().items()),
                 "loss": [], "grads": [], "comm": []}
    for step in range(STEPS):
        load_parameters(model, states[step])
        model.zero_grad(set_to_none=True)
        idx, targets = _local(_batches()[step % 3], rank, world)
        with CollectiveCounter() as counter:
            loss = _forward_backward(variant, wrapped, idx, targets)
        out["comm"].append((counter.count("all_reduce"), counter.payload_bytes("all_reduce")))
        out["loss"].append(float(loss))
        out["grads"].append(_grads(model) if rank == 0 else None)
    if isinstance(wrapped, DataParallel):
        out["buckets"] = wrapped.bucket_assignment
        out["stats"] = wrapped.stats
    return out


def _trajectory(rank: int, world: int) -> dict:
    """10 AdamW steps with DataParallel and its own optimizer, in float64."""
    model = _model(replace(CFG, seed=CFG.seed + rank))
    wrapped = DataParallel(model)
    opt = _optimizer(model)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, loss = wrapped(*_local(_batches()[step % 3], rank, world))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"loss": losses, "final": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _equivalence_worker(states: list[dict]) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {v: _per_step(v, states, rank, world) for v in VARIANTS}
    out["trajectory"] = _trajectory(rank, world)
    return out


def _mean_losses(results: list[dict], variant: str) -> list[float]:
    return [sum(r[variant]["loss"][s] for r in results) / len(results) for s in range(STEPS)]


def _check_against(results: list[dict], variant: str, ref: ReferenceRun) -> None:
    """Loss (mean over ranks) and every gradient at each step within 10x the reference's per-step spread."""
    parts = step_by_step(_mean_losses(results, variant), results[0][variant]["grads"], ref.losses, ref.grads,
                         name=variant, spread=ref.step_spread)
    assert_equivalent(combine(f"{variant} vs single process", parts))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_data_parallel_equals_single_process_and_ddp(world_size):
    ref = _reference()
    results = spawn(_equivalence_worker, world_size, ref.states, timeout=TIMEOUT)
    # Loss and every gradient at each of the 10 steps; no_sync over two micro-batches per rank equals the big batch.
    for variant in VARIANTS:
        _check_against(results, variant, ref)
        assert all(r[variant]["broadcast"] for r in results), f"{variant}: wrap must broadcast rank 0's weights"

    # vs torch DDP (float64 too), step by step, within the reference's per-step spread.
    ours, ddp = results[0]["bucketed"], results[0]["ddp"]
    assert_equivalent(combine("bucketed vs DDP", step_by_step(ours["loss"], ours["grads"], ddp["loss"], ddp["grads"],
                                                              name="vs DDP", spread=ref.step_spread)))

    # The whole trajectory with DataParallel's own AdamW: the same losses and final parameters, within the
    # reference's whole-run spread, and ranks bitwise in sync at the end.
    run = {**results[0]["trajectory"]["final"],
           "loss": torch.tensor(_mean_losses(results, "trajectory"), dtype=torch.float64)}
    assert_equivalent(within_spread(run, ref.final, ref.run_spread, name="own AdamW run"))
    for r in results[1:]:
        for n, p in results[0]["trajectory"]["final"].items():
            assert torch.equal(r["trajectory"]["final"][n], p), f"{n} differs between ranks"

    # Many buckets, launched while backward was still running (overlap), each all-reduced once per step; the bytes
    # all-reduced per step are exactly the gradient bytes (float64: 8 per parameter).
    grad_bytes = sum(p.numel() * 8 for p in GPT(CFG).parameters())
    for variant in ("bucketed", "tiny_buckets"):
        res = results[0][variant]
        assert all(c == (len(res["buckets"]), grad_bytes) for c in res["comm"]), res["comm"]
        stats = res["stats"]
        assert stats.launched_in_backward == len(res["buckets"]) and stats.launched_at_end == 0
    tiny = results[0]["tiny_buckets"]
    assert len(tiny["buckets"]) > 10
    assert tiny["stats"].pending_at_launch[0] > 0, "the first bucket must be launched before backward ends"
    assert len(results[0]["bucketed"]["buckets"]) == 1
    # Reverse registration order: the last layer's parameters are in the first bucket.
    assert tiny["buckets"][0][0] == "ln_f.bias"
    # no_sync: the first micro-batch issued no collective, the second one all-reduce per bucket.
    assert all(c == (1, grad_bytes) for c in results[0]["no_sync"]["comm"])
    # naive: one blocking all-reduce per parameter.
    n_params = len(list(GPT(CFG).parameters()))
    assert all(c == (n_params, grad_bytes) for c in results[0]["naive"]["comm"])


# --- a failing rank ------------------------------------------------------------------------------------------------


def _raising_worker() -> None:
    rank = dist.get_rank()
    model = DataParallel(GPT(CFG))
    idx, targets = _local(_batches()[0], rank, dist.get_world_size())
    if rank == 1:
        model(idx.float(), targets)  # the GPT rejects float ids: ValueError while rank 0 waits in its all-reduce
    _, loss = model(idx, targets)
    loss.backward()


def test_a_rank_that_raises_fails_the_run_instead_of_hanging():
    start = time.monotonic()
    # Rank 0 is blocked in its bucket's all-reduce when rank 1 raises: the run fails with rank 1's own error.
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 raised.*ValueError: idx must be a \(B, T\) int64"):
        spawn(_raising_worker, 2, timeout=60.0)
    assert time.monotonic() - start < 30.0, "the failure must end the run at once, not at the timeout"


# --- parameters that get no gradient --------------------------------------------------------------------------------


class _Branchy(nn.Module):
    """A shared trunk, two branches (rank-dependent choice) and a head that is never used."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.trunk = nn.Linear(5, 7)
        self.branch_a = nn.Linear(7, 3)
        self.branch_b = nn.Linear(7, 3)
        self.never = nn.Linear(7, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x, branch: str):
        h = torch.tanh(self.trunk(x))
        return (self.branch_a if branch == "a" else self.branch_b)(h).square().mean()


def _branch_input(rank: int) -> tuple[torch.Tensor, str]:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + rank))
    return x, "a" if rank % 2 == 0 else "b"


def _unused_worker() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    strict = DataParallel(_Branchy())
    x, branch = _branch_input(rank)
    try:
        strict(x, branch).backward()
        out["strict_error"] = None
    except RuntimeError as e:
        out["strict_error"] = str(e)

    model = _Branchy()
    dp = DataParallel(model, find_unused_parameters=True, bucket_cap_mb=1e-4)
    dp(x, branch).backward()
    out["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    # What the mean of the ranks' local gradients is, computed here without communication.
    expected: dict[str, torch.Tensor | None] = {}
    for r in range(world):
        local = _Branchy()
        xr, br = _branch_input(r)
        local(xr, br).backward()
        for n, p in local.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, torch.zeros_like(p)) + p.grad / world
    out["expected"] = {n: expected.get(n) for n, _ in model.named_parameters()}
    return out


@pytest.mark.parametrize("world_size", [1, 3])
def test_unused_parameters_error_by_default_and_are_handled_on_request(world_size):
    for rank, res in enumerate(spawn(_unused_worker, world_size, timeout=TIMEOUT)):
        assert res["strict_error"] is not None and "never.weight" in res["strict_error"]
        assert "find_unused_parameters=True" in res["strict_error"]
        for n, g in res["expected"].items():
            got = res["grads"][n]
            if g is None:
                assert got is None, f"rank {rank}: {n} is unused on every rank, its grad must stay None"
            else:
                assert_equivalent(allclose(got, g, name=f"rank {rank} {n}"))
    # With one rank branch b is never used (grad None); with three, rank 1 uses it and all ranks get its mean.
    assert (res["grads"]["branch_b.weight"] is None) == (world_size == 1)


# --- bad input ------------------------------------------------------------------------------------------------------


def _bad_input_worker() -> list[str]:
    rank = dist.get_rank()
    only_rank0 = dist.new_group([0])
    messages = []
    with CollectiveCounter() as counter:
        for kwargs in ({"bucket_cap_mb": 0}, {"bucket_cap_mb": -1.0}, {"bucket_cap_mb": float("nan")},
                       {"bucket_cap_mb": True}, {"bucket_cap_mb": "25"}):
            with pytest.raises(ValueError, match="bucket_cap_mb") as e:
                DataParallel(nn.Linear(2, 2), **kwargs)
            messages.append(str(e.value))
        with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
            DataParallel(lambda x: x)
        mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
        with pytest.raises(ValueError, match="'1.weight' is on the meta device"):
            DataParallel(mixed)
        with pytest.raises(ValueError, match="no parameter that requires grad"):
            DataParallel(nn.Linear(2, 2).requires_grad_(False))
        if rank == 1:
            for cls in (DataParallel, NaiveDataParallel):
                with pytest.raises(ValueError, match="not a member of the group") as e:
                    cls(nn.Linear(2, 2), process_group=only_rank0)
                messages.append(str(e.value))
    assert counter.count() == 0, "bad input must be rejected before any collective"
    return messages


def test_bad_input_is_rejected_before_any_collective():
    messages = spawn(_bad_input_worker, 2, timeout=TIMEOUT)
    assert any("global rank 1" in m for m in messages[1])


def test_not_initialised_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        DataParallel(nn.Linear(2, 2))


# --- bucket assignment ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 97), min_size=1, max_size=23),
    dtypes=st.lists(st.sampled_from(["f32", "f16"]), min_size=23, max_size=23),
    cap=st.integers(1, 211),
)
def test_bucket_assignment_properties(sizes, dtypes, cap):
    dtypes = dtypes[: len(sizes)]
    buckets = assign_buckets(sizes, dtypes, cap)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(sizes))), "every item in exactly one bucket"
    for b in buckets:
        assert len({dtypes[i] for i in b}) == 1, "a bucket holds one dtype"
        assert b == sorted(b), "items keep their order inside a bucket"
        assert len(b) == 1 or sum(sizes[i] for i in b) <= cap, "over the cap only as a single item"
    # Greedy: an item opened a new bucket only because the open bucket of its dtype could not take it.
    for k, b in enumerate(buckets):
        earlier = [c for c in buckets[:k] if dtypes[c[0]] == dtypes[b[0]]]
        if earlier:
            assert sum(sizes[i] for i in earlier[-1]) + sizes[b[0]] > cap
    with pytest.raises(ValueError, match="cap_bytes"):
        assign_buckets(sizes, dtypes, 0)


# --- buffers --------------------------------------------------------------------------------------------------------


def _buffers_worker() -> dict:
    """BatchNorm's running statistics after 3 training steps on rank-local data, ours and DDP's, broadcast_buffers
    True and False."""
    rank = dist.get_rank()
    out = {}
    for broadcast in (True, False):
        for name, wrap in (("ours", DataParallel), ("ddp", torch.nn.parallel.DistributedDataParallel)):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
            wrapped = wrap(model, broadcast_buffers=broadcast)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(3):
                x = torch.randn(6, 3, generator=torch.Generator().manual_seed(10 * step + rank)) * (rank + 1)
                wrapped(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            out[(name, broadcast)] = [b.clone() for b in model.buffers()]
    return out


def test_broadcast_buffers_follows_ddp():
    """With broadcast_buffers=True every forward starts from rank 0's running statistics, as in DDP; with False
    each rank keeps its own. Ours equals DDP's buffers on every rank in both modes."""
    results = spawn(_buffers_worker, 2, timeout=60)
    for result in results:
        for broadcast in (True, False):
            for a, b in zip(result[("ours", broadcast)], result[("ddp", broadcast)], strict=True):
                torch.testing.assert_close(a, b)
    differs = [not torch.equal(a, b) for a, b in zip(results[0][("ours", False)], results[1][("ours", False)],
                                                        strict=True)]
    assert any(differs)  # the ranks' data differ, so without the broadcast their statistics do
