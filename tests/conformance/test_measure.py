"""Measurements checked against byte counts derived by hand."""

import torch
import torch.distributed as dist

from conformance.launch import spawn
from conformance.measure import (
    CollectiveCounter,
    PeakLiveBytes,
    model_state_bytes,
    peak_live_bytes,
    saved_tensor_bytes,
    tensor_bytes,
    time_fn,
)


def test_tensor_bytes_counts_unique_storages():
    a = torch.zeros(10, 10)
    assert tensor_bytes([a, a[2:], a.t(), None]) == 400
    assert tensor_bytes([a, torch.zeros(3, dtype=torch.float16)]) == 406


def test_saved_bytes_of_a_matmul():
    # y = x @ w saves both operands for backward: x (for dw) and w (for dx).
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    _, saved = saved_tensor_bytes(lambda: x @ w)
    assert saved == (8 * 16 + 16 * 4) * 4
    _, saved_no_w = saved_tensor_bytes(lambda: x @ w, exclude=[w])
    assert saved_no_w == 8 * 16 * 4


def test_saved_bytes_of_a_softmax():
    # softmax saves its output (B x N floats); its input is not kept.
    x = torch.randn(4, 32, requires_grad=True)
    y, saved = saved_tensor_bytes(lambda: torch.softmax(x * 2.0, dim=-1))
    assert saved == 4 * 32 * 4
    assert y.shape == (4, 32)


def test_peak_sees_a_freed_temporary():
    def f(x):
        big = x.repeat(100, 1)  # 100x the input, freed before return
        small = big.sum(0)
        del big
        return small

    x = torch.randn(1, 1000)
    out, peak = peak_live_bytes(f, x)
    assert peak >= 100 * 1000 * 4
    assert peak < 100 * 1000 * 4 + 2 * 1000 * 4 + 1024
    with PeakLiveBytes() as t:
        y = x + 1
    assert t.peak == 1000 * 4 and t.current == 1000 * 4
    del y


def test_peak_ignores_preexisting_and_views():
    x = torch.randn(256)
    with PeakLiveBytes() as t:
        x.view(16, 16).t()
        x.add_(1)
    assert t.peak == 0


def test_model_state_bytes_of_adam():
    model = torch.nn.Linear(10, 5)  # 55 parameters
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    ms = model_state_bytes(model.parameters(), optimizer=opt)
    assert ms.params == {"float32": 55 * 4}
    assert ms.grads == {"float32": 55 * 4}
    # exp_avg + exp_avg_sq (55 fp32 each) + one fp32 step scalar per parameter tensor
    assert ms.optimizer == {"float32": 2 * 55 * 4 + 2 * 4}
    assert ms.total == 55 * 16 + 8


def _collectives(n):
    t = torch.ones(n)
    with CollectiveCounter() as c:
        dist.all_reduce(t)
        out = torch.empty(n * dist.get_world_size())
        dist.all_gather_into_tensor(out, t)
        dist.broadcast(t, src=0)
    return c.count(), c.count("all_reduce"), c.payload_bytes("all_reduce"), c.payload_bytes(), c.ring_bytes_sent()


def test_collective_counter_on_three_ranks():
    original = dist.all_reduce
    results = spawn(_collectives, 3, 12, timeout=60)
    for count, n_ar, ar_bytes, total, ring in results:
        assert (count, n_ar, ar_bytes) == (3, 1, 48)
        assert total == 48 + 3 * 48 + 48
        assert abs(ring - (48 * 4 / 3 + 144 * 2 / 3 + 48)) < 1e-9
    assert dist.all_reduce is original


def test_time_fn_reports_every_rep():
    t = time_fn(lambda: sum(range(1000)), warmup=1, reps=4)
    assert len(t.times) == 4 and t.min_s <= t.median_s
