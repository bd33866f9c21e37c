"""The parallel-strategy planner (tools.plan) and the formulas it adds (reference.parallelism).

Hand-computed values (the ZeRO paper's 7.5B example among them), the formulas against what the implementations do
(DeepSpeed's module count, the pipeline simulator, the pipeline splitter), properties over drawn shapes and clusters,
and the command line: every option explained, a 7B plan on 64 GPUs, JSON, and clear errors for bad input.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from reference.memory import FP32, MIXED, activation_bytes_per_layer, communication_elements, gpt_parameters
from reference.model import GPT, GPTConfig
from reference.parallelism import (
    activation_bytes_per_rank,
    data_parallel_communication_bytes,
    in_flight_microbatches,
    largest_module_parameters,
    offload_step_seconds,
    offload_transfer_bytes,
    pipeline_bubble_fraction,
    pipeline_communication_bytes,
    pipeline_stage_parameters,
    step_seconds,
    tensor_parallel_communication_bytes,
    training_flops,
    zero_communication_elements,
)
from tools.plan import (
    GB,
    PRESETS,
    Cluster,
    Layout,
    candidate_layouts,
    estimate,
    plan,
    render,
    workload,
)
from tools.plan.cli import main, parser

HAS_PIPELINE = importlib.util.find_spec("optimized.pipeline") is not None


# --- hand-computed values ----------------------------------------------------------------------------------------


def test_zero_paper_example_7_5b_on_64_gpus():
    """ZeRO paper (arXiv 1910.02054) Fig. 1: Ψ = 7.5B, Nd = 64, K = 12: 120, 31.4, 16.6 and 1.9 GB per GPU."""
    work = workload(num_params=7_500_000_000, seq_len=1024, global_batch=64)
    cluster = Cluster(gpus=64)
    got = [estimate(work, cluster, Layout(1, 1, 64, stage)).model_states.device / GB for stage in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    assert got == pytest.approx([120.0, 7.5 * (4 + 12 / 64), 7.5 * (2 + 14 / 64), 7.5 * 16 / 64], rel=1e-12)


def test_fp32_accounting_halves_the_claims():
    """fp32 Adam is 4 + 4 + 8 bytes: ZeRO-1 at Nd = 64 saves 16/(8 + 8/64), not the mixed-precision 16/(4+12/64)."""
    work = workload(num_params=1_000_000, seq_len=8, global_batch=64, precision="fp32")
    states = [estimate(work, Cluster(gpus=64), Layout(1, 1, 64, s)).model_states.device for s in range(4)]
    assert states == pytest.approx([16e6, 8e6 + 8e6 / 64, 4e6 + 12e6 / 64, 16e6 / 64])


def test_pipeline_formulas_by_hand():
    assert pipeline_bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubble_fraction(1, 5) == 0.0
    assert in_flight_microbatches(4, 8) == 4
    assert in_flight_microbatches(4, 2) == 2
    assert in_flight_microbatches(1, 16) == 1
    assert in_flight_microbatches(4, 8, "gpipe") == 8
    assert pipeline_communication_bytes(2, 3, 5, pp=4, num_microbatches=2, element_bytes=2) == 2 * 2 * 2 * 30
    assert pipeline_communication_bytes(2, 3, 5, pp=1, num_microbatches=2) == 0.0


def test_communication_formulas_by_hand():
    psi = 1000.0
    assert zero_communication_elements(psi, 0, 4) == 2000.0  # DP: reduced once per step (no_sync)
    assert zero_communication_elements(psi, 1, 4) == 2000.0
    assert zero_communication_elements(psi, 2, 4) == 5000.0  # (m + 1)Ψ
    assert zero_communication_elements(psi, 3, 4) == 12000.0  # 3mΨ
    for stage in range(4):
        assert zero_communication_elements(psi, stage, 1) == communication_elements(psi, stage)
    # 2 layers' worth of 4 all-reduces x 2 micro-batches x (2*3*5 elements x 2 bytes) x ring 2(t-1)/t with t = 4
    assert tensor_parallel_communication_bytes(2, 3, 5, tp=4, num_layers=7, num_microbatches=2,
                                               element_bytes=2) == 2 * 7 * 4 * 60 * 1.5
    assert tensor_parallel_communication_bytes(2, 3, 5, tp=4, num_layers=7, num_microbatches=2, element_bytes=2,
                                               recompute=True) == 2 * 7 * 6 * 60 * 1.5
    assert tensor_parallel_communication_bytes(2, 3, 5, tp=1, num_layers=7) == 0.0
    assert offload_transfer_bytes(1000, 4, MIXED) == 1000.0
    assert offload_transfer_bytes(1000, 4, FP32) == 2000.0


def test_training_flops_by_hand():
    assert training_flops(1e9, 1000, n_layer=2, seq_len=8, n_embd=4) == 6 * (1e9 + 64) * 1000
    assert training_flops(1e9, 1000, n_layer=2, seq_len=8, n_embd=4, recompute="full") == 8 * (1e9 + 64) * 1000
    assert training_flops(1e9, 1000, n_layer=2, seq_len=8, n_embd=4, recompute="selective") == \
        (6 * (1e9 + 64) + 2 * 64) * 1000
    assert training_flops(1e9, 1000) == 6e12


def test_checkpointed_activations_keep_block_inputs_and_one_block():
    cfg = GPTConfig(n_layer=3, block_size=16)
    a = activation_bytes_per_layer(cfg, 2, 16, attention="flash", element_bytes=2)
    full = activation_bytes_per_rank(cfg, 2, 16, num_layers=3, in_flight=2, attention="flash", element_bytes=2)
    ckpt = activation_bytes_per_rank(cfg, 2, 16, num_layers=3, in_flight=2, attention="flash", element_bytes=2,
                                     recompute="full")
    assert full == 2 * 3 * a
    block_input = 2 * 2 * 16 * cfg.n_embd
    assert ckpt == 2 * 3 * block_input + a - block_input  # the recomputing block's input is among its kept inputs
    naive = activation_bytes_per_layer(cfg, 2, 16, element_bytes=2)
    sel = activation_bytes_per_layer(cfg, 2, 16, element_bytes=2, recompute="selective")
    assert activation_bytes_per_rank(cfg, 2, 16, num_layers=3, in_flight=2, element_bytes=2,
                                     recompute="selective") == 2 * 3 * sel + naive - sel
    # Context parallel over 4 ranks: every rank's blocks at s/4 tokens, with the blockwise (flash) attention.
    assert activation_bytes_per_rank(cfg, 2, 16, num_layers=3, cp=4, element_bytes=2) == \
        3 * activation_bytes_per_layer(cfg, 2, 4, attention="flash", element_bytes=2)


# --- the formulas against the implementations ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, dict(tie_embeddings=False), dict(n_kv_head=2, bias=False),
                                    dict(vocab_size=7, n_embd=96, n_head=3, block_size=300)])
def test_largest_module_is_deepspeeds_count(kwargs):
    """DeepSpeed's own module walk (stage3.model_to_params) on the real model gives the same largest layer."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = GPTConfig(**kwargs)
    total, largest = model_to_params(GPT(cfg))
    assert largest == largest_module_parameters(cfg)
    assert total == gpt_parameters(cfg)


def test_largest_module_of_a_big_shape_costs_nothing():
    assert largest_module_parameters(PRESETS["7b"]) == 32000 * 4096


@pytest.mark.skipif(not HAS_PIPELINE, reason="optimized.pipeline is not in this build")
@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bubble_and_in_flight_match_the_pipeline_simulator(p, m):
    from optimized.pipeline import gpipe, one_f_one_b, simulate

    sim = simulate(one_f_one_b(p, m))
    assert sim.bubble_fraction == pytest.approx(pipeline_bubble_fraction(p, m))
    assert sim.peak_alive[0] == in_flight_microbatches(p, m)
    assert simulate(gpipe(p, m)).peak_alive[0] == in_flight_microbatches(p, m, "gpipe")
    assert simulate(gpipe(p, m)).bubble_fraction == pytest.approx(pipeline_bubble_fraction(p, m))


@pytest.mark.skipif(not HAS_PIPELINE, reason="optimized.pipeline is not in this build")
@pytest.mark.parametrize("n_layer", [4, 5])
@pytest.mark.parametrize("tie", [True, False])
def test_stage_parameters_bound_every_real_stage(n_layer, tie):
    """The planner's most-loaded-stage count is >= every stage optimized.pipeline.split makes, and close to it."""
    from optimized.pipeline import split

    cfg = GPTConfig(n_layer=n_layer, block_size=32, tie_embeddings=tie)
    assert pipeline_stage_parameters(cfg, pp=1) == gpt_parameters(cfg)
    for p in range(2, n_layer + 1):
        stages = split(GPT(cfg), p)
        counts = [sum(x.numel() for x in s.parameters()) for s in stages]
        bound = pipeline_stage_parameters(cfg, pp=p)
        assert max(counts) <= bound, (p, counts, bound)
        block = gpt_parameters(dataclasses.replace(cfg, n_layer=2)) - gpt_parameters(
            dataclasses.replace(cfg, n_layer=1))
        assert bound - max(counts) <= block, (p, counts, bound)


# --- the planner ------------------------------------------------------------------------------------------------


def _seven_b_plan():
    return plan(workload(PRESETS["7b"], global_batch=1024), Cluster(gpus=64, gpus_per_node=8))


def test_7b_on_64_gpus_recommends_a_sharded_data_parallel_layout():
    result = _seven_b_plan()
    best = result.recommended
    assert best is not None and best.fits
    assert (best.layout.tp, best.layout.pp, best.layout.dp) == (1, 1, 64)
    assert best.layout.zero in (1, 2) and not best.layout.offload
    dp = next(e for e in result.estimates if e.layout == Layout(1, 1, 64, 0))
    assert not dp.fits and dp.model_states.device == pytest.approx(16 * gpt_parameters(PRESETS["7b"]))
    assert any("plain data parallelism does not fit" in r for r in result.reasons)
    for e in result.estimates:
        lay = e.layout
        assert lay.tp * lay.cp * lay.pp * lay.dp == 64
        assert lay.tp <= 8 and 32 % lay.tp == 0 and 2048 % (2 * lay.cp) == 0
        assert not (lay.pp > 1 and lay.zero > 1)  # pipelines take ZeRO-0/1 only
        assert e.gpu_bytes == pytest.approx(e.model_states.device + e.activation_bytes)
    console = Console(record=True, width=200)
    render(result, console, top=10)
    text = console.export_text()
    assert "recommended: DP64 ZeRO-" in text and "act. flash+ckpt" in text


def test_plan_json_round_trip():
    result = _seven_b_plan()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["recommended"] == result.recommended.name
    assert len(data["layouts"]) == len(result.estimates)
    first = data["layouts"][0]
    assert first["name"] == result.recommended.name and first["fits"] is True
    assert set(first["activations"]) == {"naive", "flash", "naive+selective", "flash+selective", "naive+ckpt",
                                         "flash+ckpt"}
    assert set(first["communication"]) == {"dp", "tp", "pp", "cp", "offload"}


def test_checkpointing_is_chosen_only_when_needed():
    work = workload(PRESETS["7b"], seq_len=8192, micro_batch=2, global_batch=16)
    cluster = Cluster(gpus=8, gpus_per_node=8)
    layout = Layout(1, 1, 8, 3)
    auto = estimate(work, cluster, layout)
    never = estimate(work, cluster, layout, checkpointing="never")
    assert not never.fits_gpu and not never.checkpoint
    assert auto.fits_gpu and auto.checkpoint
    assert auto.activation_bytes == auto.activations["flash+ckpt"] < never.activation_bytes
    assert auto.compute_s == pytest.approx(never.compute_s * 8 / 6, rel=1e-3)


def test_selective_recomputation_is_chosen_when_dropping_the_attention_matrix_is_enough():
    work = workload(PRESETS["7b"], seq_len=2048, micro_batch=4, global_batch=64)
    e = estimate(work, Cluster(gpus=8), Layout(1, 1, 8, 3), attention="naive")
    a = e.activations
    assert a["naive+selective"] < e.activation_bytes + 1 and e.recompute == "selective" and e.fits_gpu
    assert a["naive"] > Cluster(gpus=8).usable_gpu_memory - e.model_states.device  # none does not fit
    forced = estimate(work, Cluster(gpus=8), Layout(1, 1, 8, 3), attention="naive", checkpointing="always")
    assert forced.recompute == "full" and forced.compute_s > e.compute_s > estimate(
        work, Cluster(gpus=8), Layout(1, 1, 8, 3), attention="naive", checkpointing="never").compute_s


def test_context_parallelism_is_chosen_for_long_sequences():
    result = plan(workload(PRESETS["7b"], seq_len=524288, global_batch=64), Cluster(gpus=64, gpus_per_node=8))
    best = result.recommended
    assert best is not None and best.layout.cp > 1 and best.attention == "flash"
    assert best.communication["cp"] > 0 and any("context parallel over" in r for r in result.reasons)
    # The same layout without CP does not fit: every rank would hold the whole sequence's activations.
    flat = [e for e in result.estimates if e.layout.cp == 1 and e.layout.tp == best.layout.tp
            and e.layout.pp == best.layout.pp and e.layout.zero == best.layout.zero and not e.layout.offload]
    assert flat and not any(e.fits for e in flat)
    with pytest.raises(ValueError, match=r"cp=3: seq_len=2048 must be a multiple of 2 x cp = 6"):
        candidate_layouts(workload(PRESETS["7b"], global_batch=64), Cluster(gpus=48, gpus_per_node=6), cp=(3,))


def test_offload_pays_for_its_cpu_step_and_pcie_traffic():
    work = workload(PRESETS["7b"], global_batch=16)
    cluster = Cluster(gpus=1, gpus_per_node=1, cpu_memory_bandwidth=50 * GB, pcie_bandwidth=20 * GB)
    e = estimate(work, cluster, Layout(1, 1, 1, 2, offload=True))
    psi = gpt_parameters(PRESETS["7b"])
    assert e.model_states.device == pytest.approx(2 * psi)  # bf16 parameters only
    assert e.model_states.host == pytest.approx((4 + 4 + 8) * psi)  # fp32 gradient, master, two moments
    assert e.communication["offload"] == pytest.approx(4 * psi)
    assert e.offload_step_s == pytest.approx((4 + 2 * 12) * psi / (50 * GB))  # read grads, read+write the rest
    assert e.step_s == pytest.approx(e.compute_s + 4 * psi / (20 * GB) + e.offload_step_s)


def test_nothing_fits_is_said_plainly():
    result = plan(workload(PRESETS["65b"], global_batch=8), Cluster(gpus=1, gpu_memory=16 * GB, cpu_memory=64 * GB))
    assert result.recommended is None
    assert result.reasons[0].startswith("nothing fits")


def test_parameter_count_alone_gives_model_states_only():
    work = workload(num_params=7_000_000_000, seq_len=2048, global_batch=64)
    e = estimate(work, Cluster(gpus=8), Layout(2, 1, 4, 1))
    assert e.activations is None and e.communication["tp"] is None
    assert e.model_states.device == pytest.approx(2 * 3.5e9 + 2 * 3.5e9 + 12 * 3.5e9 / 4)


@settings(max_examples=25, deadline=None)
@given(
    n_layer=st.integers(1, 7),
    heads=st.sampled_from([1, 2, 3, 4, 6, 8]),
    head_dim=st.sampled_from([8, 16]),
    nodes=st.sampled_from([1, 2, 3]),
    per_node=st.sampled_from([1, 2, 3, 4, 8]),
    micro_batch=st.integers(1, 3),
    precision=st.sampled_from(["bf16", "fp32"]),
)
def test_every_estimate_is_consistent(n_layer, heads, head_dim, nodes, per_node, micro_batch, precision):
    cfg = GPTConfig(n_layer=n_layer, n_head=heads, n_embd=heads * head_dim, vocab_size=97, block_size=61)
    gpus = nodes * per_node
    work = workload(cfg, micro_batch=micro_batch, global_batch=micro_batch * gpus * 6, precision=precision)
    cluster = Cluster(gpus=gpus, gpus_per_node=per_node, gpu_memory=0.02 * GB)
    result = plan(work, cluster)
    by_layout = {e.layout: e for e in result.estimates}
    for e in result.estimates:
        lay, a = e.layout, e.activations
        assert lay.tp * lay.cp * lay.pp * lay.dp == gpus and per_node % lay.tp == 0 and heads % lay.tp == 0
        assert lay.pp <= n_layer
        assert e.fits_gpu == (e.gpu_bytes <= cluster.usable_gpu_memory)
        assert a["flash"] <= a["naive"] and a["flash+ckpt"] <= a["naive+ckpt"]
        if (n_layer + lay.pp - 1) // lay.pp * min(lay.pp, e.microbatches) >= 2:
            assert a["flash+ckpt"] <= a["flash"]
        assert 0 <= e.bubble < 1 and e.step_s > 0
        if lay.dp == 1:
            assert e.communication["dp"] == 0.0
        lower = Layout(lay.tp, lay.pp, lay.dp, lay.zero - 1, lay.offload, cp=lay.cp)
        if lay.zero and not lay.offload and lower in by_layout:  # more sharding never holds more
            assert e.model_states.device <= by_layout[lower].model_states.device
    if result.recommended is not None:
        assert result.recommended.fits
        fastest = min(e.step_s for e in result.estimates if e.fits)
        assert result.recommended.step_s <= fastest * 1.1 + 1e-15


# --- bad input --------------------------------------------------------------------------------------------------


def test_library_errors_name_the_argument():
    work = workload(PRESETS["7b"], global_batch=1024)
    with pytest.raises(ValueError, match=r"gpus=64 is not divisible by tp x pp = 8 x 16"):
        candidate_layouts(work, Cluster(gpus=64), tp=(8,), pp=(16,))
    with pytest.raises(ValueError, match=r"tp=3"):
        candidate_layouts(work, Cluster(gpus=48, gpus_per_node=6), tp=(3,))
    with pytest.raises(ValueError, match=r"gpus must be a positive integer, got 0"):
        Cluster(gpus=0)
    with pytest.raises(ValueError, match=r"gpu_memory must be a positive number"):
        Cluster(gpus=8, gpu_memory=-1.0)
    with pytest.raises(ValueError, match=r"micro_batch must be a positive integer"):
        workload(PRESETS["7b"], micro_batch=0, global_batch=8)
    with pytest.raises(ValueError, match=r"num_params must be a positive integer"):
        workload(num_params=-7, seq_len=8, global_batch=8)


def test_step_time_and_ring_formulas_by_hand():
    """The planner's step-time pieces, moved to reference.parallelism, on numbers small enough to check by hand."""
    # ZeRO-3, Ψ = 1000, m = 2: 3mΨ = 6000 elements of 2 bytes, a ring of 4 sends 3/4 of it
    assert data_parallel_communication_bytes(1000, 3, 4, accumulation_steps=2, element_bytes=2) == 6000 * 2 * 0.75
    assert data_parallel_communication_bytes(1000, 1, 1) == 0.0
    assert offload_step_seconds(300.0, ranks_per_node=8, host_memory_bandwidth=1200.0) == 2.0
    compute, step = step_seconds(8e12, gpus=4, flops_per_second=1e12, bubble=0.5, communication_s=1.0,
                                 offload_step_s=0.5)
    assert (compute, step) == (2.0, 2.0 / 0.5 + 1.0 + 0.5)
    with pytest.raises(ValueError, match="bubble"):
        step_seconds(1.0, gpus=1, flops_per_second=1.0, bubble=1.0)


BAD_CLI = [
    (["--model", "7b", "--gpus", "64", "--tp", "8", "--pp", "16"],
     "argument --pp: gpus=64 is not divisible by tp x pp = 8 x 16"),
    (["--model", "7b", "--gpus", "64", "--tp", "3"], "argument --tp: gpus=64 is not divisible by tp=3"),
    (["--layers", "8", "--hidden", "96", "--heads", "6", "--gpus", "8", "--tp", "4"],
     "argument --tp: tp=4 must divide heads=6"),
    (["--model", "7b", "--gpus", "0"], "argument --gpus: must be a positive integer at most 1048576, got 0"),
    (["--model", "7b", "--gpus", "-8"], "argument --gpus: must be a positive integer at most 1048576, got -8"),
    (["--model", "7b", "--gpus", "12", "--gpus-per-node", "8"], "argument --gpus: gpus=12 must be a multiple"),
    (["--params", "0"], "argument --params: the parameter count must be in [1, 1e+15]"),
    (["--params=-7B"], "argument --params: the parameter count must be in [1, 1e+15]"),
    (["--model", "7b", "--micro-batch", "0"], "argument --micro-batch: must be a positive integer"),
    (["--model", "7b", "--seq-len", "-1"], "argument --seq-len: must be a positive integer"),
    (["--model", "7b", "--gpu-memory", "0"], "argument --gpu-memory: must be a positive number"),
    (["--model", "7b", "--tflops", "nan"], "argument --tflops: must be a positive number at most 1e+12, got nan"),
    (["--model", "7b", "--headroom", "1"], "argument --headroom: must be in [0, 1)"),
    (["--model", "7b", "--global-batch", "0"], "argument --global-batch: must be a positive integer"),
    (["--model", "7b", "--top", "0"], "argument --top: must be a positive integer"),
    (["--layers", "4"], "a model shape needs --hidden, --heads too"),
    (["--layers", "2", "--hidden", "10", "--heads", "3"], "argument --hidden: 10 must be divisible by --heads 3"),
    ([], "give the model"),
    (["--model", "7b", "--zero", "5"], "argument --zero: zero stages must be among 0, 1, 2, 3"),
    (["--model", "tiny", "--gpus", "3", "--pp", "3"], "argument --pp: pp=3 exceeds layers=2"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_CLI)
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, f"one line expected, got {err!r}"


def test_cli_json_to_an_unwritable_path_fails_before_planning(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--model", "7b", "--gpus", "64", "--json", str(blocker / "plan.json")]) == 2
    captured = capsys.readouterr()
    assert "argument --json: cannot create folder" in captured.err and captured.out == ""


def test_cli_help_explains_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


def test_cli_7b_on_64_gpus_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["--model", "7b", "--gpus", "64", "--gpu-memory", "80", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recommended: DP64 ZeRO-" in out and "plain data parallelism does not fit" in out
    data = json.loads(path.read_text())
    assert data["recommended"].startswith("DP64 ZeRO-") and data["cluster"]["gpus"] == 64


def test_cli_json_on_stdout(capsys):
    assert main(["--params", "7.5B", "--seq-len", "1024", "--gpus", "64", "--pp", "1", "--tp", "1", "--offload",
                 "never", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    states = {e["name"]: round(e["model_states"]["device"] / GB, 1) for e in data["layouts"]}
    assert states == {"DP64": 120.0, "DP64 ZeRO-1": 31.4, "DP64 ZeRO-2": 16.6, "DP64 ZeRO-3": 1.9}
