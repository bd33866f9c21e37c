"""Where in the model did two runs part? The first module and the first aten op whose result left its band.

`localize(model, reference, inputs)` runs the same input through both models (recorded by
conformance/_localize_record.py) and compares:
- layer: forward outputs compared module by module in the order modules finish (a child before its parent, so the
  innermost culprit is named), then, if the forward agrees, what each module hands back in backward (`grad_input` of
  a full backward hook) and each parameter's gradient as it is accumulated, in backward's execution order;
- op: every aten op's outputs in both runs, forward and backward: the first op whose output leaves the band, with
  the module it ran in ("aten.addmm.default in blocks.1.mlp.fc_in, forward, call #41"), or the call at which the two
  op sequences stop matching.
`first_layer` and `first_op` are the two halves alone. The bands and the records are conformance/divergence.py's,
as is the step level (`first_divergence`).

To find why step s diverged, build both models from the states *before* step s (they agree, or s would not be the
first) and run step s's batch through `localize`: a forward or backward bug is named; if none is, the update itself
(optimizer, clipping, communication) is where the runs part. Dropout draws the same masks in both runs (each run
starts from the same seed), so models in training mode compare too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from conformance._localize_record import Inputs, Op, Recording, as_float64, is_float64, record
from conformance.divergence import (
    Band,
    Divergence,
    LayerDivergence,
    OpDivergence,
    against_float64,
    as_equivalence,
    relative_band,
    shape_or_kind_mismatch,
)
from conformance.tolerance import FORWARD_FACTOR, GRADIENT_FACTOR


# ----------------------------------------------------------------------------------------------------- comparing
def _compare_layers(run: Recording, ref: Recording, judge: Callable) -> LayerDivergence | None:
    for phase in ("forward", "backward"):
        expected = {e.key: e for e in getattr(ref, phase)}
        for entry in getattr(run, phase):
            want = expected.get(entry.key)
            if want is None:  # a module only the run has: nothing to hold it to
                continue
            for i, (label, got) in enumerate(zip(entry.labels, entry.tensors, strict=True)):
                if i >= len(want.tensors):
                    return LayerDivergence(entry.module, phase, entry.call, label, math.inf, 0.0,
                                           f"the run has {len(entry.tensors)} tensors, the reference "
                                           f"{len(want.tensors)}")
                name = f"{entry.module} ({phase}, call {entry.call}) {label}"
                eq = judge(name, got, want.tensors[i], ("layer", want.key, i), phase)
                if not eq.passed:
                    return LayerDivergence(entry.module, phase, entry.call, label, eq.max_error, eq.bound, eq.rule)
    return None


def _compare_ops(run: list[Op], ref: list[Op], judge: Callable) -> OpDivergence | None:
    for call, (got, want) in enumerate(zip(run, ref, strict=False)):  # the shorter ends: handled below
        if got.name != want.name or len(got.tensors) != len(want.tensors):
            return OpDivergence(got.name, call, got.module, got.phase, None, None, "op sequences differ",
                                mismatch=f"calls {want.name} in {want.module} ({want.phase})")
        for i, (a, e) in enumerate(zip(got.tensors, want.tensors, strict=True)):
            eq = judge(f"{got.name} call #{call} output {i}", a, e, ("op", call, i), got.phase)
            if not eq.passed:
                return OpDivergence(got.name, call, got.module, got.phase, eq.max_error, eq.bound, eq.rule)
    if len(run) == len(ref):
        return None
    call = min(len(run), len(ref))
    if len(run) < len(ref):
        want = ref[call]
        return OpDivergence("end of run", call, "-", "-", None, None, "op sequences differ",
                            mismatch=f"calls {want.name} in {want.module} ({want.phase})")
    got = run[call]
    return OpDivergence(got.name, call, got.module, got.phase, None, None, "op sequences differ",
                        mismatch="has ended")


class _NoBand(Exception):
    """The float64 copy cannot give a band from here on (its ops or records differ from the reference's)."""


def _judge(band: Band | None, ref64: Recording | None, ref: Recording) -> Callable:
    """judge(name, actual, expected, where, phase) -> Equivalence, with the caller's band or the spread band."""
    if band is not None:
        def judge(name, actual, expected, where, phase):
            mismatch = shape_or_kind_mismatch(name, actual, expected)
            return mismatch if mismatch is not None else as_equivalence(band(name, actual, expected), name)
        return judge
    assert ref64 is not None
    layers = {e.key: e for e in [*ref64.forward, *ref64.backward]}

    def spread(name, actual, expected, where, phase):
        kind, key, i = where
        if kind == "op":
            if key >= len(ref64.ops) or ref64.ops[key].name != ref.ops[key].name:
                raise _NoBand(f"ops compared up to call #{key} only: from there the float64 copy of the reference "
                              "runs other ops than the reference (casts), so it gives no band; pass band=")
            ref64_tensor = ref64.ops[key].tensors[i]
        elif key in layers:
            ref64_tensor = layers[key].tensors[i]
        else:
            raise _NoBand(f"modules compared up to {key[0]} ({key[1]}) only: the float64 copy of the reference "
                          "has no such record, so it gives no band; pass band=")
        factor = FORWARD_FACTOR if phase == "forward" else GRADIENT_FACTOR
        return against_float64(name, actual, ref64_tensor, expected, factor)

    return spread


def localize(
    model: nn.Module,
    reference: nn.Module,
    inputs: Inputs,
    *,
    band: Band | None = None,
    layers: bool = True,
    ops: bool = True,
    backward: bool = True,
    loss: Callable[[Any], Tensor] | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    divergence: Divergence | None = None,
    seed: int = 0,
) -> Divergence | None:
    """Run `inputs` through `model` (under test) and `reference`, forward and backward, and name the first module
    (`layers`) and the first aten op (`ops`) whose result leaves its band; None if everything agrees.

    inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments, the same for both models.
    band(name, actual, expected): the band per tensor. Default: relative_band() (1e-10 relative) when the reference
    and its inputs are float64; otherwise a float64 copy of the reference is run too and each tensor may be 2x
    (outputs) or 3x (gradients) as far from it as the reference is, plus one ulp (conformance.tolerance's rule), so
    give the reference the run's dtype. Where the copy runs other ops (a cast that float64 skips), ops are compared up
    to there and the result's notes say so.
    backward: also compare the backward pass, started from loss(output) (default: a fixed random projection of the
    floating outputs). context / reference_context: a callable returning a context manager for each model's forward
    (e.g. `lambda: torch.autocast("cpu", torch.bfloat16)`). divergence: a step found by first_divergence, kept in
    the result. Both models' .grad are left as they were; module records are matched by qualified name, so a module
    only one model has is skipped."""
    if not (layers or ops):
        raise ValueError("localize: layers and ops are both False; ask for at least one")
    options = dict(ops=ops, backward=backward, loss=loss, seed=seed)
    ref = record(reference, inputs, context=reference_context, **options)
    ref64 = None
    if band is None and not is_float64(reference, inputs):
        ref64 = record(copy.deepcopy(reference).double(), as_float64(inputs), context=None, **options)
    elif band is None:
        band = relative_band()
    got = record(model, inputs, context=context, **options)
    judge = _judge(band, ref64, ref)
    notes: list[str] = []

    def compare(what: Callable[[], Any]) -> Any:
        try:
            return what()
        except _NoBand as no_band:
            notes.append(str(no_band))
            return None

    layer = compare(lambda: _compare_layers(got, ref, judge)) if layers else None
    op = compare(lambda: _compare_ops(got.ops, ref.ops, judge)) if ops else None
    step = divergence.step if divergence is not None else None
    if step is None and layer is None and op is None:
        return None
    return Divergence(step=step, layer=layer, op=op, notes=tuple(notes))


def first_layer(model: nn.Module, reference: nn.Module, inputs: Inputs, **options: Any) -> Divergence | None:
    """`localize` with module hooks only: the first module whose forward output or backward gradient differs."""
    return localize(model, reference, inputs, layers=True, ops=False, **options)


def first_op(model: nn.Module, reference: nn.Module, inputs: Inputs, **options: Any) -> Divergence | None:
    """`localize` with the op recorder only: the first aten op (and its module) whose output differs, or the call
    at which the two op sequences part."""
    return localize(model, reference, inputs, layers=False, ops=True, **options)
