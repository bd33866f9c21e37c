"""Check `parallel_specs`: the one-process parallel specs (reference/parallel/) hold equal to what they describe.

Each spec in reference/parallel/ simulates its ranks in one process. Two things keep it from drifting:
1. it equals the unsharded model (reference/model.py trained by reference/training.py's rules) run on the whole
   batch, in float64, within the reference's own rounding spread (conformance.tolerance);
2. it equals the optimized, multi-process module of the same technique on real gloo/NCCL ranks (where one exists),
   rank by rank, so the simulated collectives say what the real ones do.

The rows of each technique live in a private module `_spec_<technique>.py` beside this file, defining
`rows(ctx: Context, spec: CheckSpec) -> list[Result]`; this check runs them in the order of `TECHNIQUES`, each
guarded, so one crashing spec does not hide the others.
"""

from __future__ import annotations

import importlib

from conformance.checks import CheckSpec, Context
from conformance.result import Result

SPEC = CheckSpec(
    name="parallel_specs", technique="parallel specs (one process)", reference="reference.model.GPT (unsharded)",
    optimized="reference.parallel.* (simulated ranks)", order=95,
    claims=("data_parallel.equivalence",),
)
TECHNIQUES = ("data_parallel", "zero", "tensor_parallel", "pipeline", "context_parallel", "expert_parallel")
"""The specs, in reading order; each has conformance/checks/_spec_<name>.py."""


def run(ctx: Context) -> list[Result]:
    rows: list[Result] = []
    for name in TECHNIQUES:
        module = importlib.import_module(f"{__package__}._spec_{name}")
        rows += SPEC.guarded(ctx, name, lambda c, m=module: m.rows(c, SPEC))
    return rows
