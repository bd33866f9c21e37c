"""The one-process pipeline spec: its schedules are optimized.pipeline's, and one step through p stages equals one
process on the whole batch (float64, within the reference's own rounding spread)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.checks._reference_runs import one_thread, step_reference
from conformance.tolerance import assert_equivalent, within_spread
from optimized.pipeline import Schedule
from optimized.pipeline import gpipe as optimized_gpipe
from optimized.pipeline import one_f_one_b as optimized_one_f_one_b
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.parallel.pipeline import format_schedule, gpipe, one_f_one_b, run_pipeline, stage_boundaries


@given(p=st.integers(1, 7), m=st.integers(1, 11))
def test_schedules_print_as_optimized_pipeline_prints_them(p, m):
    for ours, theirs in ((one_f_one_b(p, m), optimized_one_f_one_b(p, m)), (gpipe(p, m), optimized_gpipe(p, m))):
        text = format_schedule(ours)
        assert text.splitlines() == str(theirs).splitlines()[1:]  # the optimized text has a header line
        assert Schedule.parse(text).actions == theirs.actions


def test_one_f_one_b_phases_by_hand():
    assert format_schedule(one_f_one_b(3, 5)) == (
        "rank 0: F0 F1 F2 B0 F3 B1 F4 B2 B3 B4\n"
        "rank 1: F0 F1 B0 F2 B1 F3 B2 F4 B3 B4\n"
        "rank 2: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4")


def _config(family: str, n_layer: int) -> GPTConfig:
    if family == "llama":
        return GPTConfig.llama(vocab_size=32, block_size=16, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=16, seed=3)
    return GPTConfig(vocab_size=32, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, seed=3)


def _pipeline_step(config: GPTConfig, batch, p: int, m: int, schedule) -> dict[str, torch.Tensor]:
    model = GPT(config).double()
    run = run_pipeline(model, *batch, p, m, schedule)
    out = {n: q.grad.clone() for n, q in model.named_parameters()}
    out["loss"] = run.loss.reshape(1).double()
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny float64 models: a second thread only waits at every op (2 busy cores)
        yield


@settings(max_examples=10)
@given(family=st.sampled_from(["gpt2", "llama"]), p=st.sampled_from([1, 2, 3, 5]), m=st.sampled_from([1, 2, 3, 7]),
       kind=st.sampled_from(["1f1b", "gpipe"]), seq_len=st.sampled_from([5, 7, 11]))
def test_pipeline_step_equals_one_process(family, p, m, kind, seq_len):
    config = _config(family, n_layer=max(p, 5) if p > 1 else 3)
    batch = make_batches(1, batch_size=2 * m, seq_len=seq_len, vocab_size=32, seed=p + m, vary_length=True)[0]
    ref, spread = step_reference(lambda: GPT(config), batch)
    schedule = (one_f_one_b if kind == "1f1b" else gpipe)(p, m)
    assert_equivalent(within_spread(_pipeline_step(config, batch, p, m, schedule), ref, spread,
                                    name=f"{kind} p={p} m={m}"))


def test_run_order_is_the_schedule_and_one_f_one_b_keeps_at_most_p_minus_r_in_flight():
    config = _config("gpt2", n_layer=4)
    batch = make_batches(1, batch_size=8, seq_len=8, vocab_size=32, seed=0)[0]
    run = run_pipeline(GPT(config).double(), *batch, 4, 8)
    assert "\n".join(f"rank {r}: " + " ".join(acts) for r, acts in enumerate(run.order)) == \
        str(optimized_one_f_one_b(4, 8)).split("\n", 1)[1]
    for r, acts in enumerate(run.order):
        alive = peak = 0
        for a in acts:
            alive += 1 if a[0] == "F" else -1
            peak = max(peak, alive)
        assert peak == min(4 - r, 8)
    # With equal unit costs and one round per message the steps take 2(m + p - 1) rounds: the bubble (p-1)/(m+p-1).
    assert len(run.rounds) == 2 * (8 + 4 - 1)


def test_a_schedule_that_cannot_finish_raises():
    bad = [[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        run_pipeline(GPT(_config("gpt2", 2)).double(), *make_batches(1, batch_size=1, seq_len=4, vocab_size=32)[0],
                     2, 1, bad)


def test_stage_boundaries_cover_every_block_once():
    assert stage_boundaries(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="num_stages"):
        stage_boundaries(2, 3)
