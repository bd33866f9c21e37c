"""The checks `checkpointing` and `context_parallel` on quick sizes: the measured bytes equal the formulas (the
verdicts say so), ring attention's equivalence rows pass, and the figures are returned as data."""

from __future__ import annotations

from pathlib import Path

import torch

from conformance.checks import Context
from conformance.checks import checkpointing as ckpt_check
from conformance.checks import context_parallel as cp_check
from conformance.claims import Verdict

CTX = Context(device=torch.device("cpu"), world_size=2, quick=True, out_dir=Path("."), timeout=240.0)


def test_checkpointing_check_memory_rows():
    rows = ckpt_check._memory_rows(CTX)  # (its equivalence rows are what tests/optimized/test_checkpointing.py runs)
    assert rows and not any(r.failed for r in rows), [r.error or str(r.equivalence) for r in rows if r.failed]
    memory = next(r for r in rows if r.claim == "checkpointing.memory")
    assert memory.verdict == Verdict.HOLDS_UNDER_CONDITIONS
    assert [f.name for f in memory.figures] == ["checkpointing_memory"]
    assert len(memory.figures[0].panels[0].series) == 6  # formula and measured, three policies


def test_context_parallel_check_rows():
    rows = cp_check.run(CTX)
    assert not any(r.failed for r in rows), [r.error or str(r.equivalence) for r in rows if r.failed]
    verdicts = {r.claim: r.verdict for r in rows if r.claim}
    assert verdicts == {"context_parallel.communication": Verdict.HOLDS, "context_parallel.memory": Verdict.HOLDS,
                        "context_parallel.balance": Verdict.HOLDS}
    assert sum(r.equivalence is not None for r in rows) == 4  # two layouts x causal or not
