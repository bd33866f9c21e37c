"""The pipeline executor on real ranks (gloo): loss and every gradient equal the single-process model's.

The claim is algorithmic, so both sides run in float64 and every bound is the reference's own rounding spread,
measured beside it (conformance.checks._reference_runs: one step recomputed with the batch in two micro-batches or
from weights nudged by one ulp; a whole AdamW run repeated from nudged initial weights), the same verdict on any CPU
ISA, thread count or world size (conformance.tolerance.within_spread)."""

import functools

import pytest
import torch
import torch.distributed as dist

from conformance.checks._reference_runs import reference_run, step_reference
from conformance.launch import RankError, spawn
from conformance.tolerance import Spread, assert_equivalent, within_spread
from optimized.pipeline import (
    Deadlock,
    PipelineExecutor,
    Schedule,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    split,
)
from optimized.pipeline.split import token_loss_sum
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig
from reference.training import accumulate_gradients

CONFIG = dict(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=32)
ROWS_PER_MICROBATCH = 2
LR, WD = 1e-2, 0.01  # torch.optim.AdamW's default weight decay


def _model() -> GPT:
    return GPT(GPTConfig(**CONFIG)).to(torch.float64)


def assert_within(actual: dict, expected: dict, spread: Spread, what: str) -> None:
    """Every tensor of `actual` within 10x the reference's rounding spread of `expected`'s tensor of that name."""
    assert_equivalent(within_spread(actual, {n: expected[n] for n in actual}, spread, name=what))


def _schedule(name, p, m, v=1):
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    return interleaved_one_f_one_b(p, m, v)


def _batches(n, m, seed):
    return make_batches(n, batch_size=ROWS_PER_MICROBATCH * m, seq_len=16, vocab_size=64, seed=seed, vary_length=True)


def _my_grads(model, executor):
    """name -> gradient of the model's parameters this rank holds (the tied weight appears as wte.weight)."""
    mine = {id(p) for p in executor.parameters()}
    return {n: p.grad.clone() for n, p in model.named_parameters() if id(p) in mine}


def _one_step_worker(cases):
    rank = dist.get_rank()
    out = []
    for name, p, m, v in cases:
        model = _model()
        schedule = _schedule(name, p, m, v)
        stages = split(model, schedule.num_stages)
        executor = PipelineExecutor([stages[s] for s in schedule.stages_of(rank)], schedule)
        idx, targets = _batches(1, m, seed=m)[0]
        result = executor.step(idx, targets)
        out.append((result.loss, _my_grads(model, executor), [iv.action for iv in result.timeline]))
    return out


@functools.cache
def _reference_step(m):
    """The whole batch in one piece, float64: the loss (tensor "loss"), every gradient, and their rounding spread."""
    return step_reference(lambda: GPT(GPTConfig(**CONFIG)), _batches(1, m, seed=m)[0])


def _check_against_reference(p, cases, per_rank):
    names = set(dict(GPT(GPTConfig(**CONFIG)).named_parameters()))
    for k, (name, _, m, v) in enumerate(cases):
        ref, spread = _reference_step(m)
        label = f"{name} p={p} m={m} v={v}"
        schedule = _schedule(name, p, m, v)
        seen = set()
        for rank, results in enumerate(per_rank):
            loss, grads, actions = results[k]
            assert actions == list(schedule[rank]), label
            if rank == schedule.rank_of(schedule.num_stages - 1):
                assert_within({"loss": loss.reshape(1)}, ref, spread, f"{label}: loss")
            else:
                assert loss is None
            assert_within(grads, ref, spread, f"{label}: rank {rank} gradients")
            seen |= set(grads)
        assert seen == names, f"{label}: parameters on no rank: {names - seen}"


@pytest.mark.parametrize("p", [2, 3, 4])
def test_gpipe_and_1f1b_gradients_equal_the_single_process_model(p):
    cases = [(name, p, m, 1) for name in ("gpipe", "1f1b") for m in (1, p, 2 * p, 2 * p + 1)]
    if p == 2:  # two virtual stages per rank: tied weight on ranks 0 and 1, messages in both directions
        cases += [("interleaved", 2, 2, 2), ("interleaved", 2, 4, 2)]
    per_rank = spawn(_one_step_worker, p, cases, timeout=120)
    _check_against_reference(p, cases, per_rank)


def test_token_weighting_matters_for_these_batches():
    """The batches have uneven padding, so averaging micro-batch means would be a different loss: the equality
    above can fail if the executor weighted micro-batches equally."""
    idx, targets = _batches(1, 3, seed=3)[0]
    model = GPT(GPTConfig(**CONFIG))
    token_mean = accumulate_gradients(model, [(idx, targets)])
    means = []
    for i, t in zip(idx.chunk(3), targets.chunk(3), strict=True):
        means.append(model(i, t)[1].detach())
    assert abs(float(torch.stack(means).mean() - token_mean)) > 1e-3


# --- training: 10 AdamW steps ---------------------------------------------------------------------------------------

STEPS = 10


def _train_worker(name, m):
    rank = dist.get_rank()
    p = dist.get_world_size()
    model = _model()
    schedule = _schedule(name, p, m)
    executor = PipelineExecutor(split(model, p)[rank], schedule)
    opt = torch.optim.AdamW(executor.parameters(), lr=LR, weight_decay=WD)
    losses = []
    batches = _batches(2, m, seed=7)
    for step in range(STEPS):
        idx, targets = batches[step % 2]
        opt.zero_grad(set_to_none=True)
        losses.append(executor.step(idx, targets).loss)
        opt.step()
    mine = {id(q) for q in executor.parameters()}
    return losses, {n: q.detach().clone() for n, q in model.named_parameters() if id(q) in mine}


@pytest.mark.parametrize("name, p, m", [("1f1b", 3, 3)])
def test_ten_adamw_steps_stay_equal(name, p, m):
    """The losses and every parameter after 10 AdamW steps, in float64, within 10x the single-process run's own
    whole-run spread (the tied weight's two gradient halves are added in another order, which Adam carries on)."""
    batches = _batches(2, m, seed=7)
    ref = reference_run(lambda: GPT(GPTConfig(**CONFIG)), [batches[step % 2] for step in range(STEPS)], lr=LR,
                        weight_decay=WD)
    per_rank = spawn(_train_worker, p, name, m, timeout=120)
    assert ref.losses[-2] < ref.losses[0] - 0.1  # same batch, 8 steps later: a run that learns, not a stalled one
    pipe = {n: q for _, params in per_rank for n, q in params.items()}
    assert set(pipe) == set(ref.final) - {"loss"}
    for rank, (_, params) in enumerate(per_rank):  # both copies of the tied weight stayed equal
        if "wte.weight" in params:
            assert torch.equal(params["wte.weight"], pipe["wte.weight"]), f"rank {rank}"
    pipe["loss"] = torch.stack(per_rank[-1][0])
    assert_equivalent(within_spread(pipe, ref.final, ref.run_spread, name="losses and parameters after 10 steps"))


# --- bad input on real ranks: every rank raises before anything is sent ---------------------------------------------


def _bad_input_worker():
    rank = dist.get_rank()
    model = _model()
    stages = split(model, 2)
    errors = []
    stuck = Schedule.parse("rank 0: F0 B0 F1 B1\nrank 1: F0 F1 B0 B1")
    try:
        PipelineExecutor(stages[rank], stuck)
    except Deadlock as e:
        errors.append(str(e))
    executor = PipelineExecutor(stages[rank], one_f_one_b(2, 3))
    idx, targets = _batches(1, 2, seed=0)[0]  # 4 rows: not 3 micro-batches
    try:
        executor.step(idx, targets)
    except ValueError as e:
        errors.append(str(e))
    idx, targets = _batches(1, 3, seed=0)[0]  # nothing stray is in flight: a good step still matches
    loss = executor.step(idx, targets).loss
    return errors, loss


def test_bad_input_raises_on_every_rank_before_any_message():
    per_rank = spawn(_bad_input_worker, 2, timeout=60)
    for errors, _ in per_rank:
        assert len(errors) == 2
        assert "rank 0 waits at B0@0 for B0@1 on rank 1" in errors[0]
        assert "batch of 4 rows does not split into num_microbatches=3" in errors[1]
    ref, spread = step_reference(lambda: GPT(GPTConfig(**CONFIG)), _batches(1, 3, seed=0)[0])
    assert_within({"loss": per_rank[1][1].reshape(1)}, ref, spread, "loss")


def _mismatched_world_worker():
    PipelineExecutor(split(GPT(GPTConfig(**CONFIG)), 3)[dist.get_rank()], gpipe(3, 2))


def test_schedule_and_process_group_must_agree():
    with pytest.raises(RankError, match="schedule has num_ranks=3 but the process group has 2 ranks"):
        spawn(_mismatched_world_worker, 2, timeout=60)


# --- torch.distributed.pipelining runs the same split: its gradients agree with ours --------------------------------


def _torch_pipelining_worker(cases):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    rank, p = dist.get_rank(), dist.get_world_size()
    out = []
    for name, m in cases:
        grads = []
        for runner in ("ours", "torch"):
            model = _model()
            stage = split(model, p)[rank]
            idx, targets = _batches(1, m, seed=m)[0]
            if runner == "ours":
                PipelineExecutor(stage, _schedule(name, p, m)).step(idx, targets)
            else:
                n_tokens = int((targets != IGNORE_INDEX).sum())
                cls = ScheduleGPipe if name == "gpipe" else Schedule1F1B
                schedule = cls(PipelineStage(stage, rank, p, torch.device("cpu")), m,
                               loss_fn=lambda logits, t, n=n_tokens: token_loss_sum(logits, t) / n, scale_grads=False)
                if rank == 0:
                    schedule.step(idx)
                elif rank == p - 1:
                    schedule.step(target=targets)
                else:
                    schedule.step()
                if rank in (0, p - 1):  # torch leaves tied weights to the user: sum the two partial gradients
                    w = model.wte.weight
                    theirs = torch.empty_like(w.grad)
                    other = p - 1 - rank
                    work = dist.isend(w.grad.clone(), other)
                    dist.recv(theirs, other)
                    work.wait()
                    w.grad += theirs
            grads.append({n: q.grad for n, q in model.named_parameters() if q.grad is not None})
        out.append(grads)
    return out


@pytest.mark.parametrize("p, cases", [(3, (("1f1b", 3), ("gpipe", 5), ("1f1b", 6)))])
def test_torch_pipelining_agrees_with_ours(p, cases):
    """torch.distributed.pipelining runs on CPU with gloo; its Schedule1F1B refuses m < p, so m >= p here. Both in
    float64, within 10x the single-process reference's rounding spread on the same batch."""
    per_rank = spawn(_torch_pipelining_worker, p, cases, timeout=120)
    for rank, results in enumerate(per_rank):
        for (name, m), (ours, theirs) in zip(cases, results, strict=True):
            assert set(ours) == set(theirs)
            spread = _reference_step(m)[1]
            assert_within(ours, theirs, spread, f"{name} p={p} m={m} rank {rank}")
