"""Check `tensor_parallel`: the tiny GPT, in both families (GPT-2-style and Llama-style: RMSNorm, RoPE, SwiGLU, GQA,
untied head), parallelised with optimized.tensor_parallel (Megatron-LM, arXiv 1909.08053, Sec. 3) on
t = ctx.world_size ranks, against one process training the same model on the same batches.

The claim is algorithmic, so the parallel model and the reference train in float64
(conformance.checks._reference_runs.reference_run) and the bound is the reference's own rounding spread measured
beside it, never a constant (see conformance/checks/data_parallel.py). Every step is compared from the same state:
before each step of the reference's AdamW run, the parallel model loads its parameters shard by shard (`load_full`),
within the per-step spread; a whole run with the parallel model's own AdamW is held to the reference's run (losses
and every all-gathered final parameter) within the whole-run spread. Communication and memory are measured on the
model in fp32, the dtype of training.

Rows
1. TP vs one process, each family: the loss and every (all-gathered) gradient at every AdamW step; the losses and
   final parameters of a whole run.
2. Communication (claim tensor_parallel.communication): all-reduces per transformer layer in forward and backward
   (Megatron: 2 + 2), and the bytes of a whole training step against the formula: per layer 2 forward + 2 backward
   all-reduces of B*T*C activations, the embedding's g, the head's f and the vocab-parallel loss's 3 numbers per token;
   each family (SwiGLU's gate and up share one f, as q, k and v do).
3. Memory (claim tensor_parallel.memory): parameter bytes per rank of the split layers against 1/t of the full
   layers, of the whole model (LayerNorms, position embedding and row-parallel biases stay replicated), and the
   logits one rank holds with the vocab-parallel loss against gathered logits.
4. DP x TP on a 2 x (t/2) grid (when the world size is an even number >= 4): the same training, the batch split
   over the two replicas.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import ReferenceRun, one_thread, reference_run
from conformance.claims import Verdict
from conformance.launch import spawn
from conformance.measure import CollectiveCounter, tensor_bytes
from conformance.result import Metric, Result
from conformance.tolerance import bitwise, combine, step_by_step, within_spread
from optimized.data_parallel import DataParallel
from optimized.distributed.grid import make_process_grid
from optimized.tensor_parallel import (
    gather_full,
    load_full,
    megatron_plan,
    parallelize,
    split_parameters,
)
from reference.data import make_batches
from reference.model import GPT, GPTConfig

SPEC = CheckSpec(
    name="tensor_parallel", technique="tensor parallel", reference="reference.training.train_step",
    optimized="optimized.tensor_parallel", order=100,
    claims=("tensor_parallel.communication", "tensor_parallel.memory"),
)
LR, WD = 1e-2, 0.1
FAMILIES = {"gpt2": "GPT", "llama": "Llama-style GPT"}
"""reference.model families checked: GPTConfig(...) and GPTConfig.llama(...)."""


def _sizes(quick: bool, t: int, family: str = "gpt2") -> dict:
    """A GPT whose heads, MLP width and vocabulary all divide by t (12 heads cover t = 1, 2, 3, 4, 6, 12); the
    Llama-style one with GQA (half as many key/value heads when t divides them)."""
    n_head = 12 if 12 % t == 0 else 4 * t
    head_dim = 4 if quick else 16
    config = dict(vocab_size=(24 if quick else 96) * t, block_size=16 if quick else 64, n_layer=2 if quick else 4,
                  n_head=n_head, n_embd=n_head * head_dim)
    if family == "llama":
        config["n_kv_head"] = n_head // 2 if (n_head // 2) % t == 0 else n_head
    return dict(config=config, family=family, rows=4, seq=config["block_size"], steps=3 if quick else 10)


def _config(sizes: dict) -> GPTConfig:
    return GPTConfig.llama(**sizes["config"]) if sizes["family"] == "llama" else GPTConfig(**sizes["config"])


def _batches(sizes: dict) -> list:
    return make_batches(sizes["steps"], batch_size=sizes["rows"], seq_len=sizes["seq"],
                        vocab_size=sizes["config"]["vocab_size"], seed=5)


def _reference(sizes: dict) -> ReferenceRun:
    """One process, AdamW in float64: the parameters before each step, its loss and gradients, and the reference's
    own rounding spread."""
    with one_thread():
        return reference_run(lambda: GPT(_config(sizes)), _batches(sizes), lr=LR, weight_decay=WD)


# --- one rank --------------------------------------------------------------------------------------------------------


def _build(sizes: dict, device: torch.device, dp_size: int, dtype: torch.dtype = torch.float64):
    """(model, what to call, dp rank): TP over the world, or DP over the columns of a dp_size x (world/dp_size) grid
    of TP rows."""
    world = dist.get_world_size()
    model = GPT(_config(sizes)).to(device, dtype)
    if dp_size == 1:
        return model, parallelize(model, megatron_plan(model)), 0
    grid = make_process_grid(dp=dp_size, tp=world // dp_size)
    wrapped = DataParallel(parallelize(model, megatron_plan(model), grid.tp_group), process_group=grid.dp_group)
    return model, wrapped, grid.dp_rank


def _local(batch, dp_size: int, dp_rank: int, device: torch.device):
    idx, targets = batch
    return idx.chunk(dp_size)[dp_rank].to(device), targets.chunk(dp_size)[dp_rank].to(device)


def _per_step(sizes: dict, device: torch.device, dp_size: int, states: list[dict]) -> dict:
    """Each step from the reference's state, in float64: the loss and every all-gathered gradient."""
    model, wrapped, dp_rank = _build(sizes, device, dp_size)
    out: dict = {"loss": [], "grads": [], "dp_rank": dp_rank}
    for step, batch in enumerate(_batches(sizes)):
        load_full(model, states[step])
        model.zero_grad(set_to_none=True)
        _, loss = wrapped(*_local(batch, dp_size, dp_rank, device))
        loss.backward()
        out["loss"].append(float(loss.detach()))
        full = gather_full(model, grads=True)
        out["grads"].append({n: g.cpu() for n, g in full.items()} if dist.get_rank() == 0 else None)
    return out


def _layer_collectives(block: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, int, int]:
    """One transformer layer alone, forward then backward of sum(y²): (all-reduces forward, all-reduces backward,
    collectives forward, collectives backward). Megatron (Sec. 3, Fig. 4): two all-reduces each way, nothing else."""
    forward, backward = CollectiveCounter(), CollectiveCounter()
    with forward:
        y = block(x)
    with backward:
        y.square().sum().backward()
    return forward.count("all_reduce"), backward.count("all_reduce"), forward.count(), backward.count()


def _measure(sizes: dict, device: torch.device) -> dict:
    """Communication and memory of the TP model in fp32: the collectives of one training step and of one
    transformer layer alone (Megatron Sec. 3, Fig. 4), the parameter bytes per rank and the logits one rank holds."""
    model, wrapped, _ = _build(sizes, device, 1, torch.float32)
    idx, targets = _local(_batches(sizes)[0], 1, 0, device)
    with CollectiveCounter() as fwd:
        logits, loss = wrapped(idx, targets)
    with CollectiveCounter() as bwd:
        loss.backward()
    out: dict = {"step_comm": {k: (c.count("all_reduce"), c.payload_bytes("all_reduce"),
                                   c.ring_bytes_sent("all_reduce")) for k, c in (("fwd", fwd), ("bwd", bwd))},
                 "logits_bytes": tensor_bytes([logits])}
    x = torch.randn(sizes["rows"], sizes["seq"], model.config.n_embd, device=device,
                    generator=torch.Generator(device=device).manual_seed(0), requires_grad=True)
    out["layer"] = _layer_collectives(model.blocks[0], x)
    sharded, _ = split_parameters(model)
    out["param_bytes"] = tensor_bytes(model.parameters())
    out["split_param_bytes"] = tensor_bytes(sharded)
    out["split_names"] = [n for n, p in model.named_parameters() if any(p is q for q in sharded)]
    return out


def _trajectory(sizes: dict, device: torch.device, dp_size: int) -> dict:
    """A whole run with the parallel model's own AdamW (on its shards), in float64: the losses, and (on rank 0) the
    all-gathered final parameters."""
    model, wrapped, dp_rank = _build(sizes, device, dp_size)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for batch in _batches(sizes):
        opt.zero_grad(set_to_none=True)
        _, loss = wrapped(*_local(batch, dp_size, dp_rank, device))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    full = gather_full(model)
    return {"loss": losses, "final": {n: q.cpu() for n, q in full.items()} if dist.get_rank() == 0 else None}


def _worker(quick: bool, device_type: str, states: dict[str, list[dict]]) -> dict:
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    out = {}
    for family in FAMILIES:
        sizes = _sizes(quick, world, family)
        out[family] = {"tp": _per_step(sizes, device, 1, states[family]), "measured": _measure(sizes, device),
                       "tp_trajectory": _trajectory(sizes, device, 1)}
    sizes = _sizes(quick, world)
    if world >= 4 and world % 2 == 0:
        out["dp_tp"] = _per_step(sizes, device, 2, states["gpt2"])
        out["dp_tp_trajectory"] = _trajectory(sizes, device, 2)
    return out


# --- comparison ------------------------------------------------------------------------------------------------------




def _own_run(losses: list[float], final: dict, ref: ReferenceRun, name: str):
    """A whole run with the parallel model's own AdamW against the reference's, within its whole-run spread."""
    return within_spread({**final, "loss": torch.tensor(losses, dtype=torch.float64)}, ref.final, ref.run_spread,
                         name=name)


def _family_rows(ctx: Context, family: str, label: str, per_rank: list[dict], ref: ReferenceRun) -> list[Result]:
    """Equivalence and communication rows of one model family."""
    t = ctx.world_size
    sizes = _sizes(ctx.quick, t, family)
    tp, measured = per_rank[0]["tp"], per_rank[0]["measured"]
    cfg = _config(sizes)
    B, T, C, L, V = sizes["rows"], sizes["seq"], cfg.n_embd, cfg.n_layer, cfg.vocab_size
    common = dict(world_size=t)
    shape = (f"{L} layers, C={C}, {cfg.n_head} heads" + (f" ({cfg.n_kv_head} key/value)" if family == "llama" else "")
             + f", V={V}, B={B}, T={T}")
    rows = []

    # 1. equivalence
    same_loss = [bitwise(torch.tensor(r["tp"]["loss"]), torch.tensor(tp["loss"]), name=f"rank {i} losses")
                 for i, r in enumerate(per_rank)]
    eq = combine(f"TP on {t} ranks vs one process",
                 step_by_step(tp["loss"], tp["grads"], ref.losses, ref.grads, name="per step",
                              spread=ref.step_spread) + same_loss
                 + [_own_run(per_rank[0]["tp_trajectory"]["loss"], per_rank[0]["tp_trajectory"]["final"], ref,
                             "own AdamW run")])
    rows.append(SPEC.row(
        ctx, f"Megatron TP {label} vs one process, t={t}",
        optimized="optimized.tensor_parallel.parallelize(model, megatron_plan(model))", equivalence=eq,
        notes=f"{shape}; {sizes['steps']} AdamW steps in float64 on both sides; each step from the reference's "
              f"state: loss (vocab-parallel cross-entropy) and every all-gathered gradient within 10x the "
              f"reference's per-step rounding spread {ref.step_spread.value:.2g} + 1 ulp, bitwise the same loss on "
              f"every rank; a whole run with the sharded model's own AdamW: the losses and every all-gathered final "
              f"parameter within 10x the reference's whole-run spread {ref.run_spread.value:.2g} + 1 ulp",
        **common,
    ))

    # 2. communication
    layer_fwd, layer_bwd, any_fwd, any_bwd = measured["layer"]
    act = B * T * C * 4
    want_fwd = (1 + 2 * L) * act + 3 * B * T * 4  # embedding g, 2 per layer, loss: max + (sum-exp, target logit)
    want_bwd = (2 * L + 1) * act  # 2 per layer, the head's f
    fwd, bwd = measured["step_comm"]["fwd"], measured["step_comm"]["bwd"]
    if t == 1:
        verdict, note = Verdict.NOT_MEASURABLE, "one rank: no collective is issued; run with world size >= 2"
    else:
        holds = (layer_fwd, layer_bwd, any_fwd, any_bwd) == (2, 2, 2, 2) and (fwd[1], bwd[1]) == (want_fwd, want_bwd)
        verdict = Verdict.HOLDS if holds else Verdict.DOES_NOT_HOLD
        note = (f"per layer (one Block alone): {layer_fwd} all-reduces forward, {layer_bwd} backward, and no other "
                f"collective; whole step: {fwd[0]} forward ({1 + 2 * L} of B*T*C activations + 2 for the loss) and "
                f"{bwd[0]} backward (2 per layer + the head's f); q, k and v share one f"
                + ("; so do SwiGLU's gate and up" if family == "llama" else ""))
    rows.append(SPEC.row(
        ctx, f"collectives per layer and per step, {label}, t={t}", claim="tensor_parallel.communication",
        verdict=verdict,
        metrics=[Metric("all-reduces per layer, forward", layer_fwd, "count", claimed="2"),
                 Metric("all-reduces per layer, backward", layer_bwd, "count", claimed="2"),
                 Metric("all-reduce payload per step, forward", fwd[1], "bytes",
                        claimed=f"(1 + 2L) x 4BTC + 3 x 4BT = {want_fwd}" if t > 1 else "0"),
                 Metric("all-reduce payload per step, backward", bwd[1], "bytes",
                        claimed=f"(2L + 1) x 4BTC = {want_bwd}" if t > 1 else "0"),
                 Metric("ring bytes sent per rank per step", fwd[2] + bwd[2], "bytes",
                        claimed=f"2(t-1)/t x payload = {2 * (t - 1) / t * (want_fwd + want_bwd):.0f}")],
        notes=f"{shape}; fp32; " + note, **common,
    ))

    return rows


def run(ctx: Context) -> list[Result]:
    t = ctx.world_size
    references = {family: _reference(_sizes(ctx.quick, t, family)) for family in FAMILIES}
    per_rank = spawn(_worker, t, ctx.quick, ctx.device.type, {f: r.states for f, r in references.items()},
                     device=ctx.device.type, timeout=ctx.timeout)
    common = dict(world_size=t)
    rows = []
    for family, label in FAMILIES.items():
        rows += _family_rows(ctx, family, label, [r[family] for r in per_rank], references[family])
    sizes = _sizes(ctx.quick, t)
    ref = references["gpt2"]
    tp = per_rank[0]["gpt2"]["measured"]
    cfg = _config(sizes)
    B, T, C, L, V = sizes["rows"], sizes["seq"], cfg.n_embd, cfg.n_layer, cfg.vocab_size
    shape = f"{L} layers, C={C}, {cfg.n_head} heads, V={V}, B={B}, T={T}"

    # 3. memory
    full_model = GPT(cfg)
    full_split = tensor_bytes(p for n, p in full_model.named_parameters() if n in tp["split_names"])
    full_bytes = tensor_bytes(full_model.parameters())
    split_ratio = full_split / tp["split_param_bytes"]
    whole_ratio = full_bytes / tp["param_bytes"]
    verdict = Verdict.NOT_MEASURABLE if t == 1 else Verdict.HOLDS if split_ratio == t else Verdict.DOES_NOT_HOLD
    rows.append(SPEC.row(
        ctx, f"parameter bytes per rank, t={t}", claim="tensor_parallel.memory", verdict=verdict,
        memory=[Metric("split layers: full bytes / bytes per rank", split_ratio, "x", claimed=f"t = {t}"),
                Metric("whole model: full bytes / bytes per rank", whole_ratio, "x", claimed=f"< t = {t}"),
                Metric("parameter bytes per rank", tp["param_bytes"], "bytes", claimed=f"{full_bytes} / {t}"),
                Metric("logits bytes per rank, vocab-parallel loss", tp["logits_bytes"], "bytes",
                       claimed=f"4BTV/t = {4 * B * T * V // t} (gathered: {4 * B * T * V})")],
        notes=f"{shape}; split: q/k/v/out_proj/fc_in/fc_out weights, column biases, the tied embedding/head; "
              f"replicated: LayerNorms, the position embedding, row-parallel biases ({full_bytes - full_split} "
              f"bytes), so the whole model divides by less than t" + ("" if t > 1 else "; one rank: nothing split"),
        **common,
    ))

    # 4. DP x TP
    if "dp_tp" in per_rank[0]:
        runs = [r["dp_tp"] for r in per_rank]
        tp_size = t // 2
        mean_loss = [sum(r["loss"][s] for i, r in enumerate(runs) if i % tp_size == 0) / 2
                     for s in range(sizes["steps"])]
        trajectories = [r["dp_tp_trajectory"]["loss"] for i, r in enumerate(per_rank) if i % tp_size == 0]
        mean_trajectory = [sum(ls) / 2 for ls in zip(*trajectories, strict=True)]
        eq = combine(f"DP 2 x TP {tp_size} vs one process",
                     step_by_step(mean_loss, runs[0]["grads"], ref.losses, ref.grads, name="per step",
                                  spread=ref.step_spread)
                     + [_own_run(mean_trajectory, per_rank[0]["dp_tp_trajectory"]["final"], ref, "own AdamW run")])
        rows.append(SPEC.row(
            ctx, f"DP 2 x TP {tp_size} vs one process",
            optimized="DataParallel(parallelize(...), process_group=grid.dp_group) on make_process_grid(2, t/2)",
            equivalence=eq,
            notes=f"{shape}; each replica {B // 2} of the {B} rows; loss averaged over the replicas; float64 on both "
                  f"sides, per step within 10x the reference's per-step spread, the own AdamW run (losses and final "
                  f"parameters) within 10x its whole-run spread", **common,
        ))
    return rows
