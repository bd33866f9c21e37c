"""Rows of `parallel_specs` for reference/parallel/pipeline.py (the one-process 1F1B and GPipe spec).

(a) The spec vs one process: one step of the tiny GPT (GPT-2 shaped, tied head; Llama shaped, RoPE, GQA, untied)
    through p = max(ctx.world_size, 2) and 3 stages, m micro-batches with uneven padding, against one forward and
    backward on the whole batch (reference.training), in float64, within the reference's own rounding spread.
(b) The spec vs optimized.pipeline on ctx.world_size gloo ranks: the spec's printed 1F1B schedule equals
    optimized.pipeline.one_f_one_b's, each rank of the executor ran its actions in the spec's order, and the
    executor's loss and every gradient equal the spec's (both float64, the same stage cut), within the same spread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import one_thread, step_reference
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import bitwise, combine, within_spread
from optimized.pipeline import PipelineExecutor, one_f_one_b, split
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.parallel.pipeline import format_schedule, gpipe, run_pipeline, stage_boundaries
from reference.parallel.pipeline import one_f_one_b as spec_one_f_one_b

MICROBATCHES = 3
ROWS = 2
"""Rows per micro-batch."""
VS_ONE_PROCESS = dict(reference="reference.training.accumulate_gradients (one process, whole batch)",
                      optimized="reference.parallel.pipeline.run_pipeline")


def _config(family: str, n_layer: int) -> GPTConfig:
    if family == "llama":
        return GPTConfig.llama(vocab_size=32, block_size=16, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=16, seed=4)
    return GPTConfig(vocab_size=32, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, seed=4)


def _batch():
    return make_batches(1, batch_size=ROWS * MICROBATCHES, seq_len=11, vocab_size=32, seed=3, vary_length=True)[0]


def _spec_step(config: GPTConfig, p: int, schedule) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    model = GPT(config).double()
    run = run_pipeline(model, *_batch(), p, MICROBATCHES, schedule)
    got = {n: q.grad.clone() for n, q in model.named_parameters()}
    got["loss"] = run.loss.reshape(1).double()
    return got, run.order


def _executor_worker(family: str, n_layer: int) -> dict:
    """One rank of optimized.pipeline: the spec's stage cut, 1F1B, one step in float64."""
    backend = str(dist.get_backend())
    group = None if backend == "gloo" or "cpu:gloo" in backend else dist.new_group(backend="gloo")
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    model = GPT(_config(family, n_layer)).double()
    cuts = [blocks.start for blocks in stage_boundaries(n_layer, p)[1:]]
    stage = split(model, p, cuts)[rank]
    result = PipelineExecutor(stage, one_f_one_b(p, MICROBATCHES), process_group=group).step(*_batch())
    mine = {id(q) for q in stage.parameters()}
    return {"loss": result.loss, "order": [a.action.label() for a in result.timeline],
            "grads": {n: q.grad.clone() for n, q in model.named_parameters() if id(q) in mine}}


def rows(ctx: Context, spec: CheckSpec) -> list[Result]:
    out = []
    p_opt = ctx.world_size
    for family in ("gpt2", "llama"):
        n_layer = max(p_opt, 3)
        config = _config(family, n_layer)
        with one_thread():
            ref, spread = step_reference(lambda config=config: GPT(config), _batch())
            for p in sorted({max(p_opt, 2), 3}):
                for name, make in (("1f1b", spec_one_f_one_b), ("gpipe", gpipe)):
                    got, _ = _spec_step(config, p, make(p, MICROBATCHES))
                    eq = within_spread(got, ref, spread, name=f"{name} p={p} m={MICROBATCHES}")
                    out.append(spec.row(
                        ctx, f"pipeline spec {name} p={p} vs one process ({family})", world_size=p, equivalence=eq,
                        **VS_ONE_PROCESS,
                        notes=f"{n_layer} blocks in {p} simulated stages, {MICROBATCHES} micro-batches of {ROWS} rows "
                              f"with uneven padding (token-weighted), float64 on both sides; loss and every gradient "
                              f"within 10x the reference's own rounding spread {spread.value:.2g} + 1 ulp"))
            spec_got, spec_order = _spec_step(config, p_opt, spec_one_f_one_b(p_opt, MICROBATCHES))
        per_rank = spawn(_executor_worker, p_opt, family, n_layer, backend="gloo", device="cpu", timeout=ctx.timeout)
        last = per_rank[-1]
        parts = [bitwise(torch.tensor([ord(ch) for ch in format_schedule(spec_one_f_one_b(p_opt, MICROBATCHES))]),
                         torch.tensor([ord(ch) for ch in str(one_f_one_b(p_opt, MICROBATCHES)).split("\n", 1)[1]]),
                         name="printed 1F1B schedule"),
                 bitwise(torch.tensor([int(res["order"] == spec_order[r]) for r, res in enumerate(per_rank)]),
                         torch.ones(p_opt, dtype=torch.long), name="each rank ran the spec's order"),
                 within_spread({"loss": last["loss"].reshape(1).double()}, {"loss": spec_got["loss"]}, spread,
                               name="loss")]
        for r, res in enumerate(per_rank):
            parts.append(within_spread(res["grads"], {n: spec_got[n] for n in res["grads"]}, spread,
                                       name=f"rank {r} gradients"))
        out.append(spec.row(
            ctx, f"pipeline spec 1f1b vs optimized.pipeline ({family})", world_size=p_opt, device="cpu",
            reference="reference.parallel.pipeline (one process, simulated stages)",
            optimized="optimized.pipeline.PipelineExecutor + one_f_one_b",
            equivalence=combine(f"spec vs PipelineExecutor p={p_opt}", parts),
            notes=f"{p_opt} gloo ranks, the spec's stage cut ({n_layer} blocks), float64; the printed schedules equal "
                  f"character for character, every rank's executed order equals the spec's, the loss and every "
                  f"rank's gradients within 10x the one-process rounding spread {spread.value:.2g} + 1 ulp of the "
                  f"spec's"))
    return out
