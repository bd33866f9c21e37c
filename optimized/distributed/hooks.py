"""Gradient-ready hooks and the buckets they fill: the one mechanism behind data parallelism's overlapped
all-reduce (optimized.data_parallel) and ZeRO's gradient reduction (optimized.zero.reduction), which differ only in
what they do with each gradient and which collective a full bucket launches.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.autograd import Variable


def assign_buckets(nbytes: Sequence[int], dtypes: Sequence[object], cap_bytes: float) -> list[list[int]]:
    """Pack items (given in the order their gradients are expected) into buckets of one dtype each.

    An item joins the open bucket of its dtype unless that would take the bucket past `cap_bytes`; then the bucket
    is closed and a new one opened. So every bucket holds at most `cap_bytes`, except a bucket of a single item
    larger than the cap. Buckets are numbered in the order they were opened; items keep their order inside."""
    if len(nbytes) != len(dtypes):
        raise ValueError(f"nbytes and dtypes must have the same length, got {len(nbytes)} and {len(dtypes)}")
    if not cap_bytes > 0:
        raise ValueError(f"cap_bytes must be > 0, got {cap_bytes}")
    buckets: list[list[int]] = []
    open_bucket: dict[object, tuple[int, int]] = {}  # dtype -> (bucket index, bytes in it)
    for i, (size, dtype) in enumerate(zip(nbytes, dtypes, strict=True)):
        if dtype in open_bucket and open_bucket[dtype][1] + size <= cap_bytes:
            b, used = open_bucket[dtype]
            buckets[b].append(i)
            open_bucket[dtype] = (b, used + size)
        else:
            buckets.append([i])
            open_bucket[dtype] = (len(buckets) - 1, size)
    return buckets


class GradReadyHooks:
    """Post-accumulate-grad hooks on `params`: on_grad(p) runs the moment autograd has accumulated p's gradient into
    p.grad, on_start() before the first of a backward and on_end() once that backward has finished (queued on
    autograd's engine at its first gradient). The one mechanism behind DataParallel's buckets and ZeRO's gradient
    reduction (optimized.zero.reduction), which differ only in what they do with each gradient."""

    def __init__(self, params: Sequence[nn.Parameter], on_grad, on_end, on_start=None) -> None:
        self.on_grad, self.on_end, self.on_start = on_grad, on_end, on_start
        self.pending = False
        """A backward has produced a gradient and its end has not run yet (True after a backward that raised)."""
        self.handles: list = []
        self.add(params)

    def add(self, params: Sequence[nn.Parameter]) -> None:
        self.handles += [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _ready(self, p: nn.Parameter) -> None:
        if not self.pending:
            self.pending = True
            if self.on_start is not None:
                self.on_start()
            Variable._execution_engine.queue_callback(self._end)
        self.on_grad(p)

    def _end(self) -> None:
        self.pending = False
        self.on_end()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
