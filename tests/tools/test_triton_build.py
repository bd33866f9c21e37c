"""The Triton attention kernels built ahead of time for sm_80 and sm_90 with the installed Triton (no GPU needed):
every kernel at every padded head dim the launcher can pick, in bfloat16 with every mask on (the most live values),
plus float16 and float32 at one head dim; none may fail to compile, spill at half precision or overflow shared
memory. Every variant (each mask flag on or off, every dtype) is built by
`tools.triton_build.report_row(out_dir, full=True)`, the row of the conformance report."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from optimized.attention.triton import launch as kernels  # noqa: E402
from tools import triton_build as tb  # noqa: E402


@pytest.fixture(scope="module")
def builds():
    return tb.build_all(tb.quick_specs(), workers=2)


def test_every_kernel_and_head_dim_builds_for_ampere_and_hopper_without_spilling(builds):
    assert {(b.spec.kernel, b.spec.arch, b.spec.block_d) for b in builds} == {
        (k, a, d) for k in tb.KERNELS for a in tb.ARCHS for d in tb.BLOCK_DS}
    dot_kernels = [b for b in builds if b.spec.kernel != "_bwd_preprocess"]
    assert {b.spec.varlen for b in dot_kernels} == {False, True}  # both layouts
    assert tb.failures(builds) == [], "\n" + tb.table(builds)


def test_half_precision_dot_products_run_on_tensor_cores(builds):
    for b in builds:
        if b.spec.dtype in tb.HALF and b.spec.kernel != "_bwd_preprocess":
            assert b.mma != "none", str(b.spec)
            if b.spec.kernel == "_fwd_kernel":  # Hopper's forward on its warp-group MMA, as fast kernels there are
                assert b.mma == ("wgmma" if b.spec.arch == 90 else "mma"), str(b.spec)


def test_a_build_that_spills_or_overflows_shared_memory_fails():
    spec = tb.Spec("_fwd_kernel", 80, "bfloat16", 128, True, True)
    assert tb.failures([tb.judge(tb.Build(spec, registers=255, stack=0, shared=1024, mma="mma"))]) == []
    spilled = tb.judge(tb.Build(spec, registers=255, stack=16, shared=1024, mma="mma"))
    assert tb.failures([spilled]) == [f"{spec}: spills: 16 B stack, 0 B local"]
    too_big = tb.judge(tb.Build(spec, registers=128, shared=163 * 1024 + 1, mma="mma"))
    assert "shared memory" in too_big.problems[0]
    broken = tb.judge(tb.Build(spec, error="CompilationError: ..."))
    assert broken.problems == ("compile error",)
    fp32 = tb.Spec("_fwd_kernel", 90, "float32", 128, True, True)
    assert tb.judge(tb.Build(fp32, registers=255, stack=512, shared=1024)).problems == ()  # fp32 may spill


def test_the_tiles_depend_on_the_head_dim_only_through_its_padded_width():
    # So one head dim per BLOCK_D covers every head dim 1..256 the launcher accepts.
    for capability in ((8, 0), (9, 0)):
        for dtype in kernels.DTYPES:
            for d in range(1, kernels.MAX_HEAD_DIM + 1):
                cfg = kernels.config(d, dtype, capability)
                assert cfg == kernels.config(cfg.block_d, dtype, capability), (capability, dtype, d)


def test_specs_refuse_what_cannot_be_built():
    with pytest.raises(ValueError, match=r"archs must be a non-empty subset of \(80, 90\), got \(75,\)"):
        tb.specs(archs=(75,))
    with pytest.raises(ValueError, match="block_ds"):
        tb.specs(block_ds=(48,))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        tb.build_all([], workers=0)


def test_the_full_set_has_every_variant():
    full = tb.specs()
    assert len(full) == len(set(full))
    per_kernel = len(tb.ARCHS) * len(tb.DTYPES) * len(tb.BLOCK_DS)
    # causal x window x softcap x (padded, padded with a key padding mask, packed documents)
    assert sum(s.kernel == "_fwd_kernel" for s in full) == per_kernel * 24
    assert not any(s.pad and s.varlen for s in full)
    assert sum(s.kernel == "_bwd_preprocess" for s in full) == per_kernel
    assert {s.dtype for s in full} == {str(t).removeprefix("torch.") for t in kernels.DTYPES}


def test_the_report_row_carries_the_table_and_fails_on_a_failing_build(tmp_path, monkeypatch):
    from conformance.checks import Context
    from conformance.checks.attention import SPEC

    one = tb.Spec("_bwd_preprocess", 90, "bfloat16", 64, False, False)
    monkeypatch.setattr(tb, "quick_specs", lambda: [one])
    ctx = Context(device=torch.device("cpu"), world_size=1, quick=True, out_dir=tmp_path)
    row = tb.report_row(SPEC, ctx, workers=1)
    assert row.check == "attention" and row.error is None
    assert {m.name: m.measured for m in row.metrics}["builds"] == 1
    assert "bwd_preprocess" in (tmp_path / "triton_build.txt").read_text()
    monkeypatch.setattr(tb, "SHARED_LIMIT", {80: 0, 90: 0})  # every build now overflows shared memory
    assert "shared memory" in tb.report_row(SPEC, ctx, workers=1).error
