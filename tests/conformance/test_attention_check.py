"""The `attention` conformance check: its rows, its byte accounting and its verdicts, on small sizes."""

import importlib.util
from pathlib import Path

import pytest
import torch

import conformance.checks._attention_claims as claims
import conformance.checks.attention as check
from conformance.checks import Context
from conformance.checks._attention_cases import Case, VarlenCase
from conformance.checks._attention_claims import Workload
from conformance.claims import Verdict
from conformance.report import draw
from conformance.tolerance import Equivalence


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(check, "CASES", (
        Case("causal GQA", B=1, H=2, Hkv=1, N=131, M=131, d=8, is_causal=True),
        Case("bottom-right padded", B=2, H=2, Hkv=1, N=20, M=45, d=8, is_causal=True,
             causal_alignment="bottom_right", padding=True),
    ))
    monkeypatch.setattr(check, "INTERPRETER_CASES", (
        Case("tiny", B=1, H=1, Hkv=1, N=9, M=16, d=16, is_causal=True, causal_alignment="bottom_right"),
    ))
    monkeypatch.setattr(check, "VARLEN_CASES", (
        VarlenCase("mixed, window, softcap", (1, 13, 40), H=2, Hkv=1, d=8, is_causal=True, window_size=(5, 0),
                   softcap=3.0, q_scale=4.0),
        VarlenCase("one length", (9, 9), H=2, Hkv=1, d=8, is_causal=True),
    ))
    monkeypatch.setattr(check, "INTERPRETER_VARLEN_CASES", (VarlenCase("tiny", (5, 5), H=1, Hkv=1, d=16),))
    monkeypatch.setattr(claims, "_lengths", lambda device, quick: (128, 256, 512))
    monkeypatch.setattr(claims, "_packed_lengths", lambda device, quick: (100, 30, 7, 1))
    # The ahead-of-time build row with two builds: tests/tools/test_triton_build.py builds the whole CI set.
    quick_specs = check.triton_build.quick_specs
    monkeypatch.setattr(check.triton_build, "quick_specs", lambda: quick_specs()[:2])


def test_check_rows_on_cpu(small, tmp_path: Path):
    rows = check.run(Context(device=torch.device("cpu"), world_size=1, quick=True, out_dir=tmp_path))
    by_name = {r.name: r for r in rows}
    assert not [r.name for r in rows if r.failed]
    for dtype in ("float32", "float16", "bfloat16"):
        assert by_name[f"blocked {dtype} vs float64 naive (error rule)"].equivalence.passed
    sdpa = by_name["sdpa float32 vs float64 naive (error rule)"]
    assert sdpa.peer == "torch SDPA" and "1 of 1 served cases hold the rule (2 asked)" in sdpa.notes
    assert "padding" in sdpa.notes
    assert "CUDA" in by_name["flash_attn: not run here"].notes
    for dtype in ("float32", "float16", "bfloat16"):
        row = by_name[f"varlen blocked {dtype} vs float64 naive (error rule)"]
        assert row.equivalence.passed and row.metrics[0].measured == 2
        flex = by_name[f"flex_attention {dtype} vs float64 naive (error rule)"]
        assert flex.peer == "FlexAttention" and "forward only" in flex.notes
    varlen_sdpa = by_name["varlen sdpa float32 vs float64 naive (error rule)"]
    assert "1 of 1 served cases" in varlen_sdpa.notes and "different lengths" in varlen_sdpa.notes
    packing = next(r for r in rows if r.name.startswith("packing"))
    ratios = {m.name: m.measured for m in packing.memory + packing.metrics}
    assert ratios["saved, padded / varlen"] == pytest.approx(ratios["tokens, padded / packed"], rel=0.05)
    if importlib.util.find_spec("triton") is not None:
        from optimized.attention.triton.launch import interpreted

        if interpreted():  # tests/conftest.py turns the interpreter on without CUDA
            for dtype in ("float32", "float16"):
                row = by_name[f"triton {dtype} vs float64 naive (error rule)"]
                assert row.equivalence.passed and "interpreter" in row.notes

    memory = by_name["memory: naive vs blocked"]
    saved = [m.measured for m in memory.memory if m.name.startswith("saved, naive / blocked")]
    peak = [m.measured for m in memory.memory if m.name.startswith("peak, naive / blocked")]
    assert len(saved) == len(peak) == 3
    assert 1 < saved[0] < saved[1] < saved[2] and peak[0] < peak[1] < peak[2]  # grows with N
    assert peak[2] > 1  # at N=128 a single 128-row tile holds as much as the naive matrix
    assert memory.claim == "flash.memory" and memory.verdict == Verdict.NOT_MEASURABLE  # no N = 2K here
    assert by_name["memory: naive vs sdpa"].verdict is None

    seed = by_name["the seed's '7.6x memory'"]
    assert seed.claim == "flash.memory_seed" and seed.verdict == Verdict.DOES_NOT_HOLD
    assert "SPEED-UP" in seed.notes

    speed = next(r for r in rows if r.name.startswith("speed"))
    assert speed.claim == "flash.speed" and speed.verdict == Verdict.NOT_MEASURABLE
    assert {m.name for m in speed.speed} >= {"speed-up naive / blocked, N=256", "speed-up naive / sdpa, N=256"}
    assert all(m.measured > 0 for m in speed.speed)

    assert memory.plots == ["attention_memory.png"]
    png = draw(memory.figures[0], tmp_path / "attention_memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_bytes_are_what_each_implementation_keeps_for_backward():
    w = Workload(B=1, H=2, d=16, dtype=torch.float32)
    impls = claims._implementations(torch.device("cpu"), w)
    ctx = Context(device=torch.device("cpu"), world_size=1, quick=True, out_dir=Path("."))
    memory = claims._measure_memory(ctx, w, {k: impls[k] for k in ("naive", "blocked")}, (128,))
    n, qkv = 128, 2 * 128 * 16 * 4
    # naive: q, k, v, the (B, H, N, N) softmax output P, and the causal (N, N) bool mask
    assert memory["naive"][128][0] == 3 * qkv + 2 * n * n * 4 + n * n
    # blocked: q, k, v, out, and the (B, H, N) fp32 log-sum-exp
    assert memory["blocked"][128][0] == 4 * qkv + 2 * n * 4


def test_memory_verdicts():
    def memory(ratio_2k, ratio_4k):
        return {"naive": {2048: (100 * ratio_2k, 100 * ratio_2k), 4096: (100 * ratio_4k, 100 * ratio_4k)},
                "blocked": {2048: (100, 100), 4096: (100, 100)}}

    claimed = {2048: "10x @2K", 4096: "20x @4K"}
    assert claims._memory_verdict(memory(10.5, 21), "blocked", claimed)[0] == Verdict.HOLDS_UNDER_CONDITIONS
    assert claims._memory_verdict(memory(10.5, 12), "blocked", claimed)[0] == Verdict.DOES_NOT_HOLD
    assert claims._memory_verdict(memory(10.5, 21), "sdpa", claimed)[0] is None
    only_small = {"naive": {512: (9, 9)}, "blocked": {512: (1, 1)}}
    assert claims._memory_verdict(only_small, "blocked", claimed)[0] == Verdict.NOT_MEASURABLE


def test_flop_count_is_fa2s():
    w = Workload(B=2, H=3, d=64, dtype=torch.float16, is_causal=False)
    assert w.flops(1024) == 3.5 * 4 * 1024 * 1024 * 64 * 3 * 2
    assert Workload(B=2, H=3, d=64, dtype=torch.float16).flops(1024) == w.flops(1024) / 2


def test_a_failing_peer_is_reported_and_ours_fails_the_run():
    ok = Equivalence("a", True, 1e-4, 1e-5, 2e-4, "rule")
    bad = Equivalence("b", False, 5e-3, 1e-4, 4e-3, "rule; worst of 4: dv, b")
    ctx = Context(device=torch.device("cpu"), world_size=1, quick=True, out_dir=Path("."))
    peer = check._rule_row(ctx, "sdpa float16", [("case a", ok), ("case b", bad)], 3, ["case c: why"], "",
                           fails_run=False)
    assert not peer.failed and peer.equivalence is None and peer.metrics[0].measured == 1
    assert "1 of 2 served cases hold the rule (3 asked)" in peer.notes and "case b: 0.005 > bound 0.004" in peer.notes
    assert "case c: why" in peer.notes and "not failing the run" in peer.notes
    ours = check._rule_row(ctx, "blocked float16", [("case a", ok), ("case b", bad)], 2, [], "", fails_run=True)
    assert ours.failed and "OUTSIDE THE RULE" in ours.notes


def test_a_peer_that_raises_is_reported_not_a_crash(small, monkeypatch):
    """On an H200 (torch 2.11) flex_attention raised inside torch.compile for a varlen mask and took the whole check
    with it: a raising peer case is now named in its row's notes, the other cases still compared."""
    real = check.flex_attention_varlen_fn

    def boom(*args, **kwargs):
        raise RuntimeError("PendingUnbackedSymbolNotFound: simulated\nsecond line")

    monkeypatch.setattr(check, "flex_attention_varlen_fn", boom)
    rows = check._flex_rows(Context(device=torch.device("cpu"), world_size=1, quick=True, out_dir=Path(".")))
    assert len(rows) == 3 and not [r.name for r in rows if r.failed]
    assert all("raised RuntimeError: PendingUnbackedSymbolNotFound: simulated" in r.notes for r in rows)
    assert all("second line" not in r.notes for r in rows)
    monkeypatch.setattr(check, "flex_attention_varlen_fn", real)
    monkeypatch.setattr(check, "flex_attention_fn", boom)
    monkeypatch.setattr(check, "VARLEN_CASES", ())
    rows = check._flex_rows(Context(device=torch.device("cpu"), world_size=1, quick=True, out_dir=Path(".")))
    dtypes = ("float32", "float16", "bfloat16")
    assert [r.name for r in rows] == [f"flex_attention {d}: every case raised" for d in dtypes]
