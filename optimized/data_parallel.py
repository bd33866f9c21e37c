"""Data parallel: every rank holds the whole model, reads its own slice of the batch, and the ranks average their
gradients before the optimizer step (PyTorch DDP, Li et al. 2020, arXiv 2006.15704).

    g = (1 / N) * sum over ranks r of g_r          g_r: the gradient of rank r's loss on its slice

With the same number of scored tokens on every rank, g is the gradient of the mean loss over the concatenated batch,
so N ranks compute the single-process step. With uneven padding the mean of the ranks' means weights tokens
unequally; multiply each rank's summed loss by N / (scored tokens of the whole batch, one all-reduce) instead.
Each rank sends 2 (N-1)/N of the gradient bytes per step when the all-reduce runs as a ring (Patarasuk & Yuan 2009).

Two implementations:
  - `DataParallel` (the one to train with): gradients are packed into flat buckets of about `bucket_cap_mb`, in
    reverse registration order, which is roughly the order backward produces them (DDP paper Sec. 3.2.2). A hook on
    every parameter copies its gradient into its bucket as soon as autograd has accumulated it; when a bucket is
    full its all-reduce is launched asynchronously, so communication overlaps the rest of backward (Sec. 3.2.3).
    Buckets are launched strictly in index order, so every rank issues the same collectives in the same order. At
    the end of backward the remaining buckets are launched, all are awaited, divided by N and copied back into
    `.grad`. `no_sync()` skips the synchronisation for gradient accumulation (Sec. 3.2.4).
  - `NaiveDataParallel` (for study, Sec. 3.2.1): after backward, `sync_gradients()` all-reduces one gradient at a
    time, with no overlap: as many collectives as parameters, each paying the full latency.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optimized.distributed.collectives import broadcast_state
from optimized.distributed.groups import check_replicas_agree, group_rank_and_size, refuse_meta, single_device
from optimized.distributed.hooks import GradReadyHooks, assign_buckets

_MB = 1024 * 1024


def _unique_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) in registration order, each tied parameter once, only those that require grad."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: Tensor
    """Flat gradient buffer, (sum of numels,)."""
    ready: list[bool] = field(default_factory=list)
    pending: int = 0
    work: dist.Work | None = None
    launched: bool = False

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.pending = len(self.params)
        self.work = None
        self.launched = False

    def slot(self, i: int) -> Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i] : self.offsets[i] + p.numel()]


@dataclass
class BackwardStats:
    """What the last synchronised backward did, for tests and study."""

    launched_in_backward: int = 0
    """Buckets whose all-reduce started from a gradient hook, while backward was still running."""
    launched_at_end: int = 0
    """Buckets launched after backward had finished (they held a parameter that got no gradient)."""
    pending_at_launch: list[int] = field(default_factory=list)
    """For each launch in order: parameters whose gradient had not arrived yet (> 0 means overlap with backward)."""


class DataParallel(nn.Module):
    """Wrap `module` for data-parallel training over `process_group` (default: the world).

    At wrap, parameters and buffers are broadcast from the group's rank 0, so every rank starts from the same
    weights. During backward, gradients are all-reduced in buckets of about `bucket_cap_mb` megabytes, overlapping
    the rest of backward; when `loss.backward()` returns, every `.grad` holds the mean over the group's ranks, ready
    for `optimizer.step()`. Inside `with model.no_sync():` forwards are not synchronised: their backwards only
    accumulate local gradients, and the first synchronised backward after them all-reduces the accumulated sum.

    A parameter that gets no gradient in a synchronised backward: with `find_unused_parameters=False` (the default,
    as in torch DDP) the step's collectives are completed and a RuntimeError names it. With True, one extra small
    all-reduce per step counts the ranks that used each parameter: a parameter no rank used keeps `.grad` None (as
    in one process), one used by some ranks gets the mean with zeros from the others (its true gradient).
    Gradients are copied into the buckets and back (the layout of DDP with gradient_as_bucket_view=False): one extra
    copy of the gradients in memory. With `broadcast_buffers=True` (the default, as in DDP) every forward first
    overwrites the module's buffers (running statistics, ...) with rank 0's. At wrap the ranks' parameter names,
    shapes and dtypes are compared (one all_gather_object) and a model on the meta device is refused.
    """

    def __init__(
        self,
        module: nn.Module,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        *,
        find_unused_parameters: bool = False,
        broadcast_buffers: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(broadcast_buffers, bool):
            raise ValueError(f"broadcast_buffers must be True or False, got {broadcast_buffers!r}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not (
            bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)
        ):
            raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
        if not isinstance(find_unused_parameters, bool):
            raise ValueError(f"find_unused_parameters must be True or False, got {find_unused_parameters!r}")
        self.rank, self.world_size = group_rank_and_size(process_group)
        refuse_meta(module, "module")
        named = _unique_parameters(module)
        if not named:
            raise ValueError("module has no parameter that requires grad: nothing to synchronise")
        state = [p for p in module.parameters()] + [b for b in module.buffers()]
        self.device = single_device(state, "module")
        for name, p in named:
            if p.layout != torch.strided:
                raise ValueError(f"module: parameter {name!r} has layout {p.layout}; only dense (strided) is supported")
        check_replicas_agree(module, process_group, "module")

        self.module = module
        self.process_group = process_group
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.find_unused_parameters = find_unused_parameters
        self.broadcast_buffers = broadcast_buffers
        broadcast_state(state, process_group)

        # Reverse registration order: the last layers' gradients are produced first in backward.
        order = list(reversed(named))
        assignment = assign_buckets(
            [p.numel() * p.element_size() for _, p in order], [p.dtype for _, p in order], bucket_cap_mb * _MB
        )
        self._names = {id(p): n for n, p in named}
        self._buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket index, position in bucket)
        for b, indices in enumerate(assignment):
            params = [order[i][1] for i in indices]
            offsets = [0]
            for p in params[:-1]:
                offsets.append(offsets[-1] + p.numel())
            numel = offsets[-1] + params[-1].numel()
            bucket = _Bucket(params, offsets, torch.zeros(numel, dtype=params[0].dtype, device=self.device))
            bucket.reset()
            self._buckets.append(bucket)
            for j, p in enumerate(params):
                self._where[id(p)] = (b, j)
        self._next_bucket = 0
        self._pending_total = len(named)
        self._require_sync = True
        self._sync_next_backward = True
        self.stats = BackwardStats()
        self._hooks = GradReadyHooks([p for _, p in named], self._on_grad_ready, self._finish_backward,
                                     on_start=self._start_backward)

    # --- public ------------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self._hooks.pending:
            # A backward raised midway and never reached its end-of-backward callback: start clean, or the next
            # backward would never synchronise.
            self._reset()
        # As in DDP, whether the coming backward synchronises is decided by the forward that built its graph.
        if torch.is_grad_enabled():
            self._sync_next_backward = self._require_sync
        if self.broadcast_buffers:
            buffers = list(self.module.buffers())
            if buffers:  # as DDP(broadcast_buffers=True): every forward starts from rank 0's buffers
                broadcast_state(buffers, self.process_group)
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forwards run inside skip gradient synchronisation in their backward: gradients accumulate locally."""
        previous = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = previous

    @property
    def bucket_assignment(self) -> list[list[str]]:
        """Parameter names of each bucket, in launch order."""
        return [[self._names[id(p)] for p in b.params] for b in self._buckets]

    # --- backward ----------------------------------------------------------------------------------------------

    def _start_backward(self) -> None:
        if self._sync_next_backward:
            self.stats = BackwardStats()

    def _on_grad_ready(self, param: Tensor) -> None:
        if not self._sync_next_backward:
            return
        b, j = self._where[id(param)]
        bucket = self._buckets[b]
        if bucket.ready[j]:
            raise RuntimeError(
                f"parameter {self._names[id(param)]!r} received its gradient twice in one backward "
                f"(reentrant backward or a graph run twice); DataParallel cannot synchronise that"
            )
        bucket.slot(j).copy_(param.grad.reshape(-1))
        bucket.ready[j] = True
        bucket.pending -= 1
        self._pending_total -= 1
        while self._next_bucket < len(self._buckets) and self._buckets[self._next_bucket].pending == 0:
            self._launch(self._buckets[self._next_bucket], in_backward=True)

    def _launch(self, bucket: _Bucket, *, in_backward: bool) -> None:
        self.stats.pending_at_launch.append(self._pending_total)
        if in_backward:
            self.stats.launched_in_backward += 1
        else:
            self.stats.launched_at_end += 1
        bucket.work = dist.all_reduce(bucket.buffer, group=self.process_group, async_op=True)
        bucket.launched = True
        self._next_bucket += 1

    @torch.no_grad()
    def _finish_backward(self) -> None:
        """Runs once autograd has finished: launch what is left, wait for everything, write the means back."""
        if not self._sync_next_backward:
            return
        unused: list[nn.Parameter] = []
        for bucket in self._buckets[self._next_bucket :]:
            for j, p in enumerate(bucket.params):
                if not bucket.ready[j]:
                    # Gradients accumulated under no_sync still count; a parameter with none contributes zero.
                    if p.grad is None:
                        bucket.slot(j).zero_()
                        unused.append(p)
                    else:
                        bucket.slot(j).copy_(p.grad.reshape(-1))
            self._launch(bucket, in_backward=False)
        used_by = None
        if self.find_unused_parameters:
            unused_ids = {id(p) for p in unused}
            locally_used = torch.tensor(
                [0 if id(p) in unused_ids else 1 for b in self._buckets for p in b.params],
                dtype=torch.int32,
                device=self.device,
            )
            dist.all_reduce(locally_used, group=self.process_group)
            used_by = locally_used.tolist()
        position = 0
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.world_size)
            for j, p in enumerate(bucket.params):
                globally_unused = used_by is not None and used_by[position] == 0
                position += 1
                if globally_unused:
                    continue
                mean = bucket.slot(j).view_as(p)
                if p.grad is None:
                    p.grad = mean.clone(memory_format=torch.contiguous_format)
                else:
                    p.grad.copy_(mean)
        self._reset()
        if unused and not self.find_unused_parameters:
            names = [self._names[id(p)] for p in unused]
            raise RuntimeError(
                f"DataParallel: parameter(s) {names} got no gradient in this backward on rank {self.rank}; the step's "
                f"all-reduces completed with zeros for them. If some parameters are legitimately unused, wrap with "
                f"DataParallel(..., find_unused_parameters=True)"
            )

    def _reset(self) -> None:
        for bucket in self._buckets:
            bucket.reset()
        self._next_bucket = 0
        self._pending_total = sum(len(b.params) for b in self._buckets)
        self._hooks.pending = False


class NaiveDataParallel(nn.Module):
    """Data parallel spelled out, for study: broadcast at wrap, then after backward call `sync_gradients()`, which
    all-reduces each gradient on its own, blocking, once backward is over (no buckets, no overlap).

    A parameter without a gradient gets a zero gradient (so every rank issues the same collectives)."""

    def __init__(self, module: nn.Module, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.rank, self.world_size = group_rank_and_size(process_group)
        state = [p for p in module.parameters()] + [b for b in module.buffers()]
        single_device(state, "module")
        self.module = module
        self.process_group = process_group
        broadcast_state(state, process_group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Replace every gradient by its mean over the group: one blocking all-reduce per parameter."""
        for _, p in _unique_parameters(self.module):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.process_group)
            p.grad.div_(self.world_size)
