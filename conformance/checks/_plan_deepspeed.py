"""The plan check's second part: the planner's ZeRO-2/ZeRO-3 bytes per GPU beside DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs_all_cold`, `estimate_zero3_model_states_mem_needs_all_cold`) for the same
inputs, the difference in accounting explained term by term. DeepSpeed's estimators are arithmetic: no GPU and no
process group, so this runs on any machine where DeepSpeed imports."""

from __future__ import annotations

import contextlib
import io
import re

from conformance.checks import CheckSpec
from conformance.peers import import_deepspeed
from conformance.result import Metric, Result
from conformance.tolerance import Equivalence
from tools.plan import GB, Cluster, Layout, estimate, workload


def _deepspeed_printed_gpu_gib(fn, **kwargs) -> dict[str, float]:
    """Run one of DeepSpeed's *_all_cold estimators (they print a table) and read its per-GPU column by options."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        fn(**kwargs)
    out = {}
    for line in text.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", line)
        if m:
            out[m.group(3).replace("OffloadDeviceEnum.", "").strip()] = float(m.group(2))
    return out


def deepspeed_rows(spec: CheckSpec, cases: list[tuple[str, int, int, int, int]]) -> list[Result]:
    """Rows of `spec` (the plan check's), four per case: (label, total params, largest module's params, nodes, GPUs
    per node). DeepSpeed is an optional peer: without it, one row says the comparison was not run."""
    try:
        import_deepspeed("cpu")  # the estimators are arithmetic; quiet about the accelerator it would guess
        from deepspeed.runtime.zero.stage3 import (
            estimate_zero3_model_states_mem_needs,
            estimate_zero3_model_states_mem_needs_all_cold,
        )
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
            estimate_zero2_model_states_mem_needs_all_cold,
        )
    except ImportError as e:
        return [spec.row(None, "per GPU vs DeepSpeed's estimators: not run", peer="deepspeed", device="cpu",
                         world_size=1, notes=f"peer not run: {e} (pip install deepspeed)")]

    rows = []
    for label, psi, largest, nodes, per_node in cases:
        n = nodes * per_node
        work = workload(None, num_params=psi, seq_len=1, global_batch=n, precision="bf16")
        cluster = Cluster(gpus=n, gpus_per_node=per_node)
        printed2 = _deepspeed_printed_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, total_params=psi,
                                              num_gpus_per_node=per_node, num_nodes=nodes)
        printed3 = _deepspeed_printed_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold, total_params=psi,
                                              largest_layer_params=largest, num_gpus_per_node=per_node,
                                              num_nodes=nodes)
        variants = [
            ("ZeRO-2", 2, False, estimate_zero2_model_states_mem_needs(psi, per_node, nodes, cpu_offload=False)[1],
             printed2.get("offload_optimizer=none"), 4 * psi / n,
             "DeepSpeed 2Ψ + 18Ψ/Nd, paper 2Ψ + 14Ψ/Nd: DeepSpeed also counts the fp32 gradient partition its "
             "optimizer steps from (4Ψ/Nd; its comment: 18 = 2 grads16 + 4 grads32 + 4 params32 + 8 moments)"),
            ("ZeRO-2 + optimizer offload", 2, True,
             estimate_zero2_model_states_mem_needs(psi, per_node, nodes, cpu_offload=True)[1],
             printed2.get("offload_optimizer=cpu"), 0.0,
             "both count only the bf16 parameters on the GPU (2Ψ); gradients and optimizer live on the CPU"),
            ("ZeRO-3", 3, False, estimate_zero3_model_states_mem_needs(
                psi, largest, per_node, nodes, cpu_offload=False, cpu_offload_params=False)[1],
             printed3.get("offload_param=none, offload_optimizer=none, zero_init=1"), 2 * psi / n + 4 * largest,
             "DeepSpeed 18Ψ/Nd + 4·L, paper 16Ψ/Nd: DeepSpeed counts an fp32 gradient partition (4Ψ/Nd) where "
             "the paper counts a bf16 one (2Ψ/Nd), and the largest module L gathered whole in bf16 with its bf16 "
             "gradient (4 bytes per parameter of L) while it computes"),
            ("ZeRO-3 + optimizer offload", 3, True, estimate_zero3_model_states_mem_needs(
                psi, largest, per_node, nodes, cpu_offload=True, cpu_offload_params=False)[1],
             printed3.get("offload_param=none, offload_optimizer=cpu, zero_init=1"), 4 * largest,
             "both keep the parameter shard on the GPU (2Ψ/Nd); DeepSpeed adds the gathered largest module and its "
             "gradient (4·L)"),
        ]
        for name, stage, offload, ds_bytes, printed_gib, explained, why in variants:
            ours = estimate(work, cluster, Layout(1, 1, n, stage, offload)).model_states.device
            residual = abs(ds_bytes - (ours + explained))
            printed_ok = printed_gib is not None and abs(printed_gib - ds_bytes / 2**30) < 0.006
            bound = 1.0  # DeepSpeed truncates to whole bytes
            rows.append(spec.row(
                None, f"{name} per GPU vs DeepSpeed's estimator, {label}",
                reference="tools.plan.estimate (ZeRO paper accounting)",
                peer=f"deepspeed estimate_zero{stage}_model_states_mem_needs_all_cold", device="cpu", world_size=n,
                equivalence=Equivalence(
                    name=f"DeepSpeed = planner + explained terms, {name}, {label}",
                    passed=residual <= bound and printed_ok, max_error=residual, mean_error=residual, bound=bound,
                    rule="|DeepSpeed - (planner + explained difference)| <= 1 byte, and DeepSpeed's printed table "
                    "shows the same figure"),
                memory=[Metric("planner (ZeRO paper: 2+2+12 bytes)", ours, "bytes"),
                        Metric("DeepSpeed's estimate", ds_bytes, "bytes"),
                        Metric("explained difference", explained, "bytes"),
                        Metric("DeepSpeed / planner", ds_bytes / ours, "x")],
                notes=f"Ψ = {psi:,}, largest module L = {largest:,} parameters, {nodes} node(s) x {per_node} GPUs. "
                f"{why}. DeepSpeed prints GiB ({printed_gib} GiB); the planner writes GB = 1e9 bytes "
                f"({ours / GB:.4g} GB)."))
    return rows
