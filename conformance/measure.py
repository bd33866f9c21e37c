"""Measurements that work on any device: bytes saved for backward, peak live bytes, model-state bytes, logical bytes
per collective, and median timings (CUDA events on GPU).

All byte counts are of unique storages: two views of one tensor count once, and a view keeps its whole base alive,
so it counts the whole base. That is what the allocator actually holds.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(s.device), s.data_ptr())


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the unique storages behind `tensors` (None entries are skipped)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[_storage_key(t)] = s.nbytes()
    return sum(seen.values())


# --- saved for backward ---------------------------------------------------------------------------------------------


class SavedTensorBytes:
    """Context manager: bytes of the unique storages autograd saves for backward inside the block.

    Storages of the tensors in `exclude` (typically the parameters, which live anyway) are not counted."""

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in self._exclude:
            self._seen[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[Tensor] = (), **kwargs: Any):
    """Run fn(*args, **kwargs); return (its result, bytes saved for backward)."""
    with SavedTensorBytes(exclude) as saved:
        result = fn(*args, **kwargs)
    return result, saved.bytes


# --- peak live bytes -------------------------------------------------------------------------------------------------


class PeakLiveBytes(TorchDispatchMode):
    """Context manager tracking the bytes of storages allocated inside the block that are still alive.

    Every op's outputs are inspected; a storage that is not one of the op's inputs' storages is new and is tracked
    through a weak reference. After each op, expired storages are dropped and the live total updates `.peak`.
    This is exact at op granularity (an op's internal workspace is not seen), device independent, and sees
    temporaries freed before the block ends. Storages that existed before the block are never counted."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[tuple[str, int], tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            key = _storage_key(t)
            nbytes = t.untyped_storage().nbytes()
            if key in inputs or key in self._live or nbytes == 0:
                continue
            self._live[key] = (StorageWeakRef(t.untyped_storage()), nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out

    def __exit__(self, *exc) -> None:
        self._sweep()
        super().__exit__(*exc)


def peak_live_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """Run fn(*args, **kwargs); return (its result, the peak bytes of storages it allocated and held at once)."""
    with PeakLiveBytes() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak


def cuda_peak_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """Run fn on CUDA; return (result, torch.cuda.max_memory_allocated during it minus the memory held before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


# --- model state -----------------------------------------------------------------------------------------------------


def _by_dtype(tensors: Iterable[Tensor]) -> dict[str, int]:
    groups: dict[str, list[Tensor]] = defaultdict(list)
    for t in tensors:
        if t is not None:
            groups[str(t.dtype).removeprefix("torch.")].append(t)
    return {dtype: tensor_bytes(ts) for dtype, ts in sorted(groups.items())}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    out = []
    for state in optimizer.state.values():
        flat, _ = tree_flatten(state)
        out.extend(t for t in flat if isinstance(t, Tensor))
    return out


@dataclass
class ModelState:
    """Model-state bytes held by one rank, by kind and dtype (unique storages)."""

    params: dict[str, int] = field(default_factory=dict)
    grads: dict[str, int] = field(default_factory=dict)
    optimizer: dict[str, int] = field(default_factory=dict)
    """Optimizer state (moments, fp32 master weights, step counters)."""

    @property
    def total(self) -> int:
        return sum(self.params.values()) + sum(self.grads.values()) + sum(self.optimizer.values())

    def kind_total(self, kind: str) -> int:
        return sum(getattr(self, kind).values())


def model_state_bytes(
    params: Iterable[Tensor] = (),
    *,
    grads: Iterable[Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_tensors: Iterable[Tensor] = (),
) -> ModelState:
    """Bytes of parameters, gradients (default: the .grad of `params`) and optimizer state.

    `optimizer`: every tensor in optimizer.state; `optimizer_tensors`: extra state an optimizer keeps elsewhere."""
    params = list(params)
    grads = [p.grad for p in params] if grads is None else list(grads)
    opt = list(optimizer_tensors) + (_optimizer_tensors(optimizer) if optimizer is not None else [])
    return ModelState(params=_by_dtype(params), grads=_by_dtype(grads), optimizer=_by_dtype(opt))


# --- collectives -----------------------------------------------------------------------------------------------------

# op -> the fraction of the payload one rank sends when the collective runs a ring algorithm.
# Ring algorithms (Patarasuk & Yuan 2009): all-reduce sends 2(n-1)/n of the buffer per rank; reduce-scatter and
# all-gather (n-1)/n of the full buffer; broadcast and point-to-point the buffer once.
_COLLECTIVES: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter_tensor": lambda n: (n - 1) / n,
    "all_gather_into_tensor": lambda n: (n - 1) / n,
    "reduce_scatter_single": lambda n: (n - 1) / n,
    "all_gather_single": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "reduce": lambda n: 1.0 if n > 1 else 0.0,
    "send": lambda n: 1.0,
    "isend": lambda n: 1.0,
    "recv": lambda n: 0.0,
    "irecv": lambda n: 0.0,
    "all_to_all_single": lambda n: (n - 1) / n,
    "batch_isend_irecv": lambda n: 1.0,
}


@dataclass(frozen=True)
class CollectiveCall:
    op: str
    payload_bytes: int
    """Bytes of the full logical buffer: the reduced tensor, the gathered output, the scattered input."""
    group_size: int


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _payload(op: str, args: tuple, kwargs: dict) -> int:
    if op in ("all_gather_into_tensor", "all_gather_single"):
        return _nbytes(args[0] if args else kwargs["output_tensor"])
    if op in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return _nbytes(args[1] if len(args) > 1 else kwargs["input"])
    if op == "all_gather":
        outs = args[0] if args else kwargs["tensor_list"]
        return sum(_nbytes(t) for t in outs)
    if op == "batch_isend_irecv":  # the payload is what this rank sends; what it receives is another's send
        ops = args[0] if args else kwargs["p2p_op_list"]
        sends = [o for o in ops if getattr(getattr(o.op, "__wrapped__", o.op), "__name__", "") == "isend"]
        return sum(_nbytes(o.tensor) for o in sends)
    if op == "reduce_scatter":
        ins = args[1] if len(args) > 1 else kwargs["input_list"]
        return sum(_nbytes(t) for t in ins)
    t = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
    return _nbytes(t)


class CollectiveCounter:
    """Context manager recording every torch.distributed collective called through the module (`dist.op(...)`).

    Counts the logical bytes at the call, independent of what the backend does on the wire. Calls made through
    names imported before the block (`from torch.distributed import all_reduce`) are not seen."""

    def __init__(self) -> None:
        self.calls: list[CollectiveCall] = []
        self._saved: dict[str, Callable] = {}

    def _wrap(self, op: str, original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            size = dist.get_world_size(group) if dist.is_initialized() else 1
            self.calls.append(CollectiveCall(op, _payload(op, args, kwargs), size))
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original
        return wrapper

    def __enter__(self) -> CollectiveCounter:
        for op in _COLLECTIVES:
            if hasattr(dist, op):
                self._saved[op] = getattr(dist, op)
                setattr(dist, op, self._wrap(op, self._saved[op]))
        return self

    def __exit__(self, *exc) -> None:
        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved.clear()

    def _select(self, op: str | None) -> list[CollectiveCall]:
        if op is not None and op not in _COLLECTIVES:
            raise ValueError(f"unknown collective {op!r}; known: {', '.join(_COLLECTIVES)}")
        return [c for c in self.calls if op is None or c.op == op]

    def count(self, op: str | None = None) -> int:
        return len(self._select(op))

    def payload_bytes(self, op: str | None = None) -> int:
        return sum(c.payload_bytes for c in self._select(op))

    def ring_bytes_sent(self, op: str | None = None) -> float:
        """Bytes this rank sends if every collective runs a ring algorithm."""
        return sum(c.payload_bytes * _COLLECTIVES[c.op](c.group_size) for c in self._select(op))


# --- time ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    times: tuple[float, ...]
    """Seconds of each timed repetition."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def min_s(self) -> float:
        return min(self.times)


def time_fn(
    fn: Callable[[], Any], *, warmup: int = 2, reps: int = 5, device: torch.device | str | None = None
) -> Timing:
    """Median-after-warm-up timing of fn(). On CUDA each repetition is bracketed by CUDA events."""
    if warmup < 0 or reps < 1:
        raise ValueError(f"need warmup >= 0 and reps >= 1, got warmup={warmup} reps={reps}")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(tuple(times))
