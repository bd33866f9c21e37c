"""Check `zero`: ZeRO-1/2/3 and offload (optimized.zero) held to unsharded AdamW and to its peers (DeepSpeed,
FSDP2, torch's ZeroRedundancyOptimizer); the seed's "ZeRO-1 4x", "ZeRO-2 8x" and the paper's 2Ψ / 3Ψ measured.

1. Equivalence. On ctx.world_size ranks, each rank trains the tiny GPT on its slice of every batch with our
   ZeroOptimizer (stages 1, 2, 3; stage 2 with offload) and with DeepSpeed's ZeRO of the same stage (CPU + gloo:
   `"torch_adam": true`, so none of DeepSpeed's C++ ops is compiled), same model, data, AdamW and clipping.
   Rows: our parameters vs the unsharded reference (AdamW + clip_grad_norm_ on the whole batch, one process), and
   vs the torch-native peers, FSDP2 (`torch.distributed.fsdp.fully_shard` on every block and the root;
   reshard_after_forward=False is ZeRO-2's layout, True ZeRO-3's) and ZeroRedundancyOptimizer over DDP (ZeRO-1),
   all in float64 (the claim is algorithmic: what is left is another reduction order's rounding), within 10x the
   reference's own rounding spread (its re-runs from initial weights nudged by one ulp and with the batch summed
   in parts: conformance.tolerance.within_spread). Vs DeepSpeed, which refuses float64, in float32 within 10x the
   float32 reference's own spread, measured the same way. No fixed bound can hold for a trajectory: AdamW turns
   each machine's rounding into ~lr steps.
2. Memory (claims zero1/2/3.memory). Model-state bytes each rank holds (parameters, gradients, optimizer state;
   unique storages, counted by conformance.measure after a backward) for world sizes 1 to 4 (quick: 1 and
   ctx.world_size), fp32 and bf16-with-fp32-master, must equal reference.memory.zero_rank_bytes to the byte. The
   formula, so confirmed, is carried to Nd = 64 and set beside the seed's 4x / 8x, with the accounting stated.
3. Communication (claim zero.communication): bytes our collectives carry in one step, counted at the call, over
   Ψ times the element size, vs 2 (stages 1-2) and 3 (stage 3).
4. Speed (claim zero.speed): step time ours / DeepSpeed and ours / FSDP2 (ZeroRedundancyOptimizer for stage 1)
   for the same stage in the same run, and ours / torch DDP.
5. Plot: model-state bytes per rank vs world size for DP and each stage, measured and by formula.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks import _zero_peers as peers
from conformance.checks import _zero_workload as workload
from conformance.checks._zero_memory import MEMORY_CASES, memory_figure, memory_rows, memory_worker
from conformance.claims import Verdict
from conformance.divergence import first_divergence
from conformance.launch import spawn, under_torchrun
from conformance.measure import CollectiveCounter, time_fn
from conformance.result import Metric, Result
from conformance.tolerance import within_spread
from optimized.zero import ZeroOptimizer
from reference.model import GPT, GPTConfig

SPEC = CheckSpec(
    name="zero", technique="ZeRO", reference="torch.optim.AdamW + clip_grad_norm_, whole batch, one process",
    optimized="optimized.zero", order=120,
    peers=("deepspeed", "torch.distributed.fsdp.fully_shard", "torch.distributed.optim.ZeroRedundancyOptimizer"),
    claims=("zero1.memory", "zero2.memory", "zero3.memory", "zero.communication", "zero.speed"),
)
PEER_CONFIGS = ((1, False), (2, False), (3, False), (2, True))
"""(stage, offload) compared with the reference and DeepSpeed (and, without offload, torch's peer)."""


# --- the worker: ours and the peers, same data -------------------------------------------------------------------


def _resumed_run(stage: int, offload: bool, batches, steps_before: int, directory: str, rank: int, world: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Ours in float64: `steps_before` steps, a checkpoint, a fresh model and optimizer that load it, the other
    steps; the parameters at the end (equal to an uninterrupted run's, if the resume restores everything: the
    masters, Adam's moments and its step count, which sets the bias correction)."""
    model = GPT(GPTConfig(**workload.CONFIG)).to(device, torch.float64)
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, offload=offload, **workload.ADAMW)
    for batch in batches[:steps_before]:
        workload.ours_step(model, opt, batch, rank, world, device)
    opt.save_checkpoint(directory)
    model = GPT(GPTConfig(**workload.CONFIG)).to(device, torch.float64)
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, offload=offload, **workload.ADAMW)
    opt.load_checkpoint(directory)
    for batch in batches[steps_before:]:
        workload.ours_step(model, opt, batch, rank, world, device)
    with opt.gathered_parameters():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def peer_worker(configs, steps: int, timing_reps: int, device_type: str, memory_cases=(),
                with_deepspeed: bool = True, checkpoint_dir: str | None = None) -> dict:
    """On each rank: for every (stage, offload), train ours and DeepSpeed's `steps` steps from the same weights;
    return both final states, the bytes our collectives carried in one step, step times (reps > 0), and the
    model-state bytes of `memory_cases` (memory_worker); with `checkpoint_dir` (a directory every rank sees), also
    ours resumed from a checkpoint taken one step before the end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    batches = workload.workload_batches(world, steps)
    out: dict = {"ours": {}, "ours64": {}, "resumed64": {}, "deepspeed": {}, "torch": {}, "comm": {},
                 "time_ours": {}, "time_ds": {}, "time_torch": {}, "time_ddp": None,
                 "memory": memory_worker(memory_cases, device_type)}
    for stage, offload in configs:
        model = GPT(GPTConfig(**workload.CONFIG)).to(device, torch.float64)
        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, offload=offload, **workload.ADAMW)
        trajectory = []  # the parameters after each step: where a failing run left its band
        for batch in batches:
            workload.ours_step(model, opt, batch, rank, world, device)
            with opt.gathered_parameters():
                trajectory.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        out["ours64"][(stage, offload)] = trajectory
        if checkpoint_dir is not None:
            out["resumed64"][(stage, offload)] = _resumed_run(
                stage, offload, batches, steps - 1, os.path.join(checkpoint_dir, f"zero{stage}-offload{offload}"),
                rank, world, device)

        model = GPT(GPTConfig(**workload.CONFIG)).to(device)
        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, offload=offload, **workload.ADAMW)
        for step, batch in enumerate(batches):
            if step == 1:
                with CollectiveCounter() as counter:
                    workload.ours_step(model, opt, batch, rank, world, device)
                # the all-reduce of the gradient norm's scalar is not model-state traffic
                out["comm"][(stage, offload)] = counter.payload_bytes() - counter.payload_bytes("all_reduce")
            else:
                workload.ours_step(model, opt, batch, rank, world, device)
        with opt.gathered_parameters():
            out["ours"][(stage, offload)] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if timing_reps:
            out["time_ours"][(stage, offload)] = time_fn(
                lambda model=model, opt=opt: workload.ours_step(model, opt, batches[0], rank, world, device), warmup=1,
                reps=timing_reps, device=device).median_s

        if not offload:
            torch_step, torch_state = peers.torch_peer(stage, device, torch.float64)
            for batch in batches:
                torch_step(batch, rank, world)
            out["torch"][stage] = torch_state()
            if timing_reps:  # timed in float32, as ours and DeepSpeed are
                torch_step, _ = peers.torch_peer(stage, device)
                out["time_torch"][stage] = time_fn(lambda s=torch_step: s(batches[0], rank, world), warmup=1,
                                                   reps=timing_reps, device=device).median_s

        if not with_deepspeed:
            continue
        ds_model = GPT(GPTConfig(**workload.CONFIG)).to(device)
        engine = peers.deepspeed_engine(ds_model, stage=stage, offload=offload, micro_batch=workload.LOCAL_BATCH,
                                        device=device)
        for batch in batches:
            peers.ds_step(engine, batch, rank, world, device)
        out["deepspeed"][(stage, offload)] = peers.deepspeed_state(engine)
        if timing_reps:
            out["time_ds"][(stage, offload)] = time_fn(
                lambda engine=engine: peers.ds_step(engine, batches[0], rank, world, device), warmup=1,
                reps=timing_reps, device=device).median_s
        engine.destroy()
    if timing_reps:
        model = GPT(GPTConfig(**workload.CONFIG)).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        adamw = torch.optim.AdamW(ddp.parameters(), **workload.ADAMW)

        def ddp_step():
            idx, targets = workload.local_slice(batches[0], rank, world, device)
            _, loss = ddp(idx, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), workload.MAX_NORM)
            adamw.step()
            adamw.zero_grad()

        out["time_ddp"] = time_fn(ddp_step, warmup=1, reps=timing_reps, device=device).median_s
    return out


# --- the check ---------------------------------------------------------------------------------------------------


def run(ctx: Context) -> list[Result]:
    ws = ctx.world_size
    steps = 3 if ctx.quick else 10
    reps = 3 if ctx.quick else 10
    device_type = ctx.device.type
    psi = GPT(GPTConfig(**workload.CONFIG)).num_parameters()
    ds_version = peers.deepspeed_version()
    with_ds = ds_version is not None
    worlds = ([1, 2, 3, 4] if not ctx.quick else sorted({1, ws})) if not under_torchrun() else [ws]
    if device_type == "cuda":
        worlds = [w for w in worlds if w <= torch.cuda.device_count()] or [ws]
    cases = MEMORY_CASES if not ctx.quick else tuple(c for c in MEMORY_CASES if not (c.mixed and c.offload))
    rows: list[Result] = []

    # A resume needs one directory every rank sees: a temporary one here; under torchrun the nodes may not share one.
    with tempfile.TemporaryDirectory(prefix="zero-resume-") as checkpoints:
        peer = spawn(peer_worker, ws, PEER_CONFIGS, steps, reps, device_type, cases, with_ds,
                     None if under_torchrun() else checkpoints, device=device_type, timeout=ctx.timeout)
    ref_trajectory: list[dict] = []
    ref64, spread64 = workload.reference_and_spread(ws, steps, ctx.device, torch.float64, ref_trajectory)
    ref32, spread32 = workload.reference_and_spread(ws, steps, ctx.device)
    ours_all, ds_all = peer[0]["ours"], peer[0]["deepspeed"]
    for stage, offload in PEER_CONFIGS:
        label = f"ZeRO-{stage}{' + offload' if offload else ''}"
        ours = ours_all[(stage, offload)]
        common = dict(technique=label, device=device_type, world_size=ws,
                      optimized=f"optimized.zero.ZeroOptimizer(stage={stage}, offload={offload})")
        ours_trajectory = peer[0]["ours64"][(stage, offload)]
        ours64 = ours_trajectory[-1]
        vs_ref = within_spread(ours64, ref64, spread64, name=f"{label} vs unsharded AdamW")
        where = "" if vs_ref.passed else "; left the band at " + str(first_divergence(
            ours_trajectory, ref_trajectory, order=list(ref64), start=1,
            band=lambda step, name, a, e: within_spread({name: a}, {name: e}, spread64, name=name)))
        rows.append(SPEC.row(ctx, f"{label}: parameters after {steps} steps vs unsharded AdamW",
                             equivalence=vs_ref, notes="each rank its slice of every batch, gradients averaged; "
                             "clipping 1.0; float64 on both sides, within 10x the reference's own rounding spread"
                             + where, **common))
        resumed = peer[0]["resumed64"].get((stage, offload))
        if resumed is not None:
            rows.append(SPEC.row(
                ctx, f"{label}: saved after {steps - 1} steps, loaded into a fresh optimizer, 1 more step",
                equivalence=within_spread(resumed, ref64, spread64, name=f"{label} resumed vs unsharded AdamW"),
                notes="save_checkpoint / load_checkpoint between the steps (masters, Adam's moments and step count); "
                "float64, the uninterrupted reference within 10x its own rounding spread", **common))
        if not offload:
            theirs = peer[0]["torch"][stage]
            torch_name = peers.TORCH_PEERS[stage]
            vs_torch = within_spread(ours64, theirs, spread64, name=f"{label} vs {torch_name}")
            torch_ref = max(float((theirs[k] - ref64[k]).abs().max()) for k in ref64)
            rows.append(SPEC.row(ctx, f"{label}: parameters after {steps} steps vs {torch_name}",
                                 reference=torch_name, peer=f"torch {torch.__version__}", equivalence=vs_torch,
                                 notes=f"same model, data, AdamW and clipping, float64 on both sides; max "
                                 f"|{torch_name} - float64 reference| = {torch_ref:.3g}", **common))
        if not with_ds:
            continue
        ds = ds_all[(stage, offload)]
        vs_ds = within_spread(ours, ds, spread32, name=f"{label} vs DeepSpeed")
        ds_ref = max(float((ds[k] - ref32[k]).abs().max()) for k in ref32)
        peer_name = f"DeepSpeed {ds_version} ZeRO-{stage}{' offload_optimizer cpu' if offload else ''}"
        rows.append(SPEC.row(ctx, f"{label}: parameters after {steps} steps vs DeepSpeed", reference=peer_name,
                             peer=f"deepspeed {ds_version}", equivalence=vs_ds,
                             notes=f"same model, data, AdamW (torch_adam) and clipping, float32 on both sides "
                             f"(DeepSpeed refuses float64: in float32, AdamW's rounding chaos makes the yardstick "
                             f"lr-sized); max |DeepSpeed - float32 reference| = {ds_ref:.3g}",
                             **common))

    comm = peer[0]["comm"]
    metrics = []
    for stage, offload in PEER_CONFIGS:
        if not offload:
            metrics.append(Metric(f"ZeRO-{stage}: bytes sent per step / (Ψ·4 bytes), {ws} ranks",
                                  comm[(stage, offload)] / (psi * 4), "x", claimed="3" if stage == 3 else "2"))
    comm_ok = ws == 1 or all(abs(m.measured - (3 if "ZeRO-3" in m.name else 2)) < 0.01 for m in metrics)
    rows.append(SPEC.row(
        ctx, "collective bytes per step", reference="ZeRO paper Sec. 7 (2Ψ / 3Ψ)", device=device_type, world_size=ws,
        metrics=metrics, claim="zero.communication",
        verdict=(Verdict.HOLDS if comm_ok else Verdict.DOES_NOT_HOLD) if ws > 1 else Verdict.NOT_MEASURABLE,
        notes="payload of every collective of one step, counted at the call (conformance.measure.CollectiveCounter): "
              "stages 1-2 reduce each owner's slice of the gradients to it (Ψ) and all-gather the updated slices "
              "(Ψ plus padding); stage 3 gathers each module's parameters for forward (Ψ) and backward (Ψ) and "
              "reduces the gradients (Ψ); the all-reduce of the norm (a scalar) is left out. With ring "
              "collectives a rank sends (Nd-1)/Nd of each."))

    rows.append(_speed_row(ctx, peer[0], reps, ds_version))

    measured = {ws: [r["memory"] for r in peer]}
    for w in worlds:
        if w != ws:
            measured[w] = spawn(memory_worker, w, cases, device_type, device=device_type, timeout=ctx.timeout)
    by_stage = memory_rows(ctx, SPEC, measured, psi)
    by_stage[0].figures.append(memory_figure(measured, psi))
    rows += by_stage
    return rows


def _speed_row(ctx: Context, peer: dict, reps: int, ds_version: str | None) -> Result:
    speed = []
    for stage, offload in PEER_CONFIGS:
        t_ours = peer["time_ours"][(stage, offload)]
        tag = f"ZeRO-{stage}{' offload' if offload else ''}"
        if ds_version is not None:
            speed.append(Metric(f"{tag} step time ours / DeepSpeed", t_ours / peer["time_ds"][(stage, offload)],
                                "x"))
        if not offload:
            speed.append(Metric(f"{tag} step time ours / {peers.TORCH_PEERS[stage]}",
                                t_ours / peer["time_torch"][stage], "x"))
        if stage < 3 and not offload:
            speed.append(Metric(f"{tag} step time ours / torch DDP", t_ours / peer["time_ddp"], "x",
                                claimed="slight"))
    where = ("The claim compares ZeRO-1/2 with DP on GPUs with large models, where compute hides communication; "
             "a tiny model measures mostly per-collective latency." if ctx.device.type == "cuda" else
             "Measured off the claim's hardware (CPU + gloo, where per-collective latency dominates a tiny model); "
             "the claim is about GPUs.")
    names = ([f"DeepSpeed {ds_version}"] if ds_version else []) + ["FSDP2", "ZeroRedundancyOptimizer", "torch DDP"]
    return SPEC.row(
        ctx, "step time", reference="; ".join(names),
        peer=f"deepspeed {ds_version}" if ds_version else f"torch {torch.__version__}",
        world_size=ctx.world_size, speed=speed, claim="zero.speed", verdict=Verdict.NOT_MEASURABLE,
        notes=f"median of {reps} steps after warm-up, tiny GPT, {ctx.world_size} ranks, same run. " + where)


