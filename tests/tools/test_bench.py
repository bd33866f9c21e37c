"""`python -m conformance bench attention`: FLOP count, peak table, arguments, the timing loop on CPU tensors, the
rendering, and (gpu-marked) one tiny case on CUDA."""

import importlib.util
import json

import pytest
import torch

from conformance.__main__ import main as cli_main
from tools.bench import cases, cli, measure, report
from tools.bench.cases import Case, attention_flops, peak_tflops
from tools.bench.measure import CaseResult, MemoryResult, Timing

FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def test_flop_count_is_fa2s():
    forward = 4 * 2 * 3 * 1024 * 512 * 64  # 4·B·H·N·M·d
    assert attention_flops(2, 3, 1024, 512, 64, causal=False, mode="fwd") == forward
    assert attention_flops(2, 3, 1024, 512, 64, causal=True, mode="fwd") == forward / 2
    assert attention_flops(2, 3, 1024, 512, 64, causal=False, mode="bwd") == 2.5 * forward
    assert attention_flops(2, 3, 1024, 512, 64, causal=True, mode="fwd_bwd") == 3.5 * forward / 2
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_flops(1, 1, 8, 8, 8, causal=False, mode="backward")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
    ("NVIDIA L40", None), ("Tesla T4", None),
])
def test_dense_peak_by_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_cases_are_sized_like_flash_attns_bench_and_headline_first():
    todo = cases.cases(("fp16", "bf16"), (64, 128), (1024, 8192), (False, True))
    assert len(todo) == 16
    assert [(c.dtype, c.d, c.N) for c in todo[:2]] == [cases.HEADLINE] * 2
    for c in todo:
        assert c.B * c.N == cases.TOKENS and c.H * c.d == cases.HIDDEN
    assert Case.sized("bf16", 64, 32768, False).B == 1  # at least one sequence


def test_arguments():
    args = cli.parse_args(["attention"])
    assert args.seqlen == cases.SEQLENS and args.causal == (False, True) and args.impl == cases.IMPLS
    args = cli.parse_args(["attention", "--quick", "--dtype", "bf16", "--head-dim", "128", "--causal", "yes"])
    assert args.seqlen == cases.QUICK_SEQLENS and args.dtype == ("bf16",) and args.head_dim == (128,)
    assert args.causal == (True,) and args.reps < cli.parse_args(["attention"]).reps
    assert cli.parse_args(["attention", "--seqlen", "2k,4096"]).seqlen == (2048, 4096)
    for bad in (["attention", "--dtype", "fp32"], ["attention", "--impl", "xformers"], ["other"],
                ["attention", "--seqlen", "0"], ["attention", "--budget", "0"]):
        with pytest.raises(SystemExit) as exit_:
            cli.parse_args(bad)
        assert exit_.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA path")
def test_no_cuda_is_one_line_and_exit_2(capsys):
    assert cli_main(["bench", "attention", "--quick"]) == 2
    assert capsys.readouterr().err == "bench attention needs a CUDA device\n"


def test_timing_loop_on_cpu_tensors():
    """The loop the GPU runs, on CPU: a number where the implementation serves the case, a reason where not."""
    case = Case("fp16", 16, 32, True, B=1, H=2)
    result = measure.measure_case(case, ("sdpa-flash", "sdpa-efficient", "flash-attn"), torch.device("cpu"),
                                warmup=0, reps=1, peak=100.0)
    for mode in cases.MODES:
        t = result.timings["sdpa-flash"][mode]
        assert t.na is None and t.ms > 0 and t.tflops == pytest.approx(case.flops(mode) / t.ms / 1e9)
        assert t.pct_peak == pytest.approx(t.tflops)
        assert result.timings["sdpa-efficient"][mode].na.startswith("RuntimeError")  # no CPU kernel: refused
        if not FLASH_ATTN:
            assert result.timings["flash-attn"][mode].na == "the flash_attn package is not installed"
    assert json.loads(json.dumps(result.to_dict()))["timings"]["sdpa-flash"]["fwd"]["ms"] > 0


def test_triton_in_the_timing_loop_under_the_interpreter():
    case = Case("fp16", 16, 16, False, B=1, H=1)
    result = measure.measure_case(case, ("triton",), torch.device("cpu"), warmup=0, reps=1)
    assert all(t.tflops is not None for t in result.timings["triton"].values()), result.timings


def test_memory_ratio_on_cpu_tensors():
    memory = measure.measure_memory(Case("fp16", 16, 256, True, B=1, H=2), ("sdpa-flash", "sdpa-efficient"),
                                  torch.device("cpu"))
    assert memory.naive_bytes > 0 and memory.ratios["sdpa-flash"] > 1  # N² scores vs N·d: flash is smaller
    assert isinstance(memory.flash_bytes["sdpa-efficient"], str)
    assert "sdpa-flash" in report.render_memory(memory)


def _fake() -> tuple[list[CaseResult], MemoryResult]:
    headline = Case.sized("bf16", 128, 8192, True)
    rows = [CaseResult(headline, {
        "triton": {"fwd": Timing(1.0, 452.0, 45.7), "fwd_bwd": Timing(4.0, 380.0, 38.4)},
        "sdpa-flash": {"fwd": Timing(1.1, 400.0, 40.4), "fwd_bwd": Timing(3.0, 400.0, 40.4)},
        "flash-attn": {m: Timing(na="the flash_attn package is not installed") for m in cases.MODES},
    })]
    memory = MemoryResult(Case("fp16", 64, 4096, True, B=1, H=8), 20 * 2**20,
                          {"triton": 2**20, "sdpa-cudnn": "RuntimeError: no"})
    return rows, memory


def test_table_from_a_fake_result():
    rows, memory = _fake()
    text = report.render_table(rows, ("triton", "sdpa-flash", "flash-attn"), memory=memory,
                              device_name="NVIDIA H200", peak=989.0)
    assert "dense peak 989 TFLOP/s" in text and "452.0 (46%)" in text and "380.0 (38%)" in text
    assert text.count("n/a [1]") == 2 and "[1] the flash_attn package is not installed" in text
    assert "triton 20.0x" in text and "sdpa-cudnn n/a (RuntimeError: no)" in text
    head = report.headline_ratios([r.to_dict() for r in rows])
    assert head["causal fwd"] == pytest.approx(452 / 400) and head["causal fwd_bwd"] == pytest.approx(0.95)
    assert head["full fwd"] is None


def test_run_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "memory_case", lambda device: Case("fp16", 16, 128, False, B=1, H=2))
    args = cli.parse_args(["attention", "--dtype", "fp16", "--head-dim", "16", "--seqlen", "32,64",
                             "--causal", "no", "--impl", "sdpa-flash,sdpa-cudnn", "--tokens", "64",
                             "--hidden", "32", "--out", str(tmp_path)])
    args.warmup, args.reps = 0, 1
    payload = cli.run(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "fp16 d=16 N=64 full  fwd_bwd" in out and "peak memory naive / flash" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert [c["N"] for c in saved["cases"]] == [32, 64] and saved["memory"]["ratios"]["sdpa-flash"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_budget_skips_the_remaining_cases(tmp_path, capsys):
    args = cli.parse_args(["attention", "--dtype", "fp16", "--head-dim", "16", "--seqlen", "32,64",
                             "--causal", "no", "--impl", "sdpa-flash", "--tokens", "64", "--hidden", "32",
                             "--budget", "1e-9", "--no-memory", "--out", str(tmp_path)])
    args.warmup, args.reps = 0, 1
    payload = cli.run(args, torch.device("cpu"))
    assert len(payload["cases"]) == 1 and payload["skipped"] == ["fp16 d=16 N=64 full"]
    assert "1 case(s) skipped" in capsys.readouterr().out


@pytest.mark.gpu
def test_a_tiny_bench_case_on_cuda():
    cuda = torch.device("cuda")
    case = Case("bf16", 64, 256, True, B=2, H=4)
    result = measure.measure_case(case, cases.IMPLS, cuda, warmup=1, reps=2, peak=peak_tflops("NVIDIA H200"))
    for mode in cases.MODES:
        assert result.timings["triton"][mode].tflops > 0, result.timings["triton"][mode]
        assert result.timings["sdpa-flash"][mode].tflops or result.timings["sdpa-flash"][mode].na
    memory = measure.measure_memory(Case("fp16", 64, 1024, True, B=1, H=2), ("triton", "sdpa-flash"), cuda)
    assert memory.ratios["triton"] > 1, memory
