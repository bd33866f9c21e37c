"""optimized.precision.autocast: autocast's numerics held to the float64 model by the error-ratio rule, and a device
or dtype that autocast would silently ignore refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from conformance.tolerance import GRADIENT_FACTOR, assert_equivalent, combine, error_ratio
from optimized.precision import amp_step, check_autocast, make_grad_scaler
from tests.optimized.precision_workload import tiny_batches, tiny_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_gradients_obey_the_error_ratio_rule(dtype):
    """One forward + backward at the initial weights: autocast over fp32 weights vs the float64 model, with the
    model cast entirely to `dtype` as the naive baseline. Logits within 2x, gradients within 3x the naive error."""
    idx, targets = tiny_batches()[0]

    def grads_and_logits(model, autocast):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits, loss = model(idx, targets)
        loss.backward()
        return logits, [p.grad for p in model.parameters()]

    ref_logits, ref_grads = grads_and_logits(tiny_model(torch.float64), False)
    base_logits, base_grads = grads_and_logits(tiny_model(dtype), False)
    opt_logits, opt_grads = grads_and_logits(tiny_model(), True)
    assert opt_logits.dtype == dtype  # the lm_head matmul really ran in the half dtype
    assert_equivalent(error_ratio(opt_logits, ref_logits, base_logits, name="logits", dtype=dtype))
    names = [n for n, _ in tiny_model().named_parameters()]
    assert_equivalent(combine("grads", [
        error_ratio(o, r, b, name=n, factor=GRADIENT_FACTOR, dtype=dtype)
        for n, o, r, b in zip(names, opt_grads, ref_grads, base_grads, strict=True)]))


def test_autocast_without_device_support_is_refused(monkeypatch):
    """torch.autocast with an unsupported dtype warns and runs fp32; check_autocast turns that into an error."""
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        check_autocast("cpu", torch.float64)
    check_autocast("cpu", torch.bfloat16)
    check_autocast("cpu", torch.float16)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)  # a device that silently disables it
    model = tiny_model()
    with pytest.raises(ValueError, match="no torch.float16 autocast support"):
        amp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), tiny_batches()[0], dtype=torch.float16,
                 scaler=make_grad_scaler(torch.float16, "cpu"))
