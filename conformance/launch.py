"""Run a function on N ranks and get every rank's return value back: gloo on CPU, NCCL on CUDA.

    results = spawn(fn, world_size, *args, timeout=60.0, **kwargs)   # [fn(...) on rank 0, on rank 1, ...]

Each rank is a process started from a forkserver that has torch imported already (a fork costs milliseconds, not
the seconds of a fresh interpreter). The ranks meet through a torch.distributed.FileStore in a fresh temp dir: no
ports, so parallel pytest workers never collide. `fn` runs with the default process group initialised; it reads
its rank from torch.distributed.get_rank(). Every rank writes its return value (torch.save) or its traceback to the
temp dir. The caller watches all ranks:
  - a rank that raises or dies: the others are killed at once and the call raises RankError with that traceback;
  - ranks still running at `timeout`: all are killed and the call raises RankTimeout naming them;
  - in every case no process is left behind.
Under torchrun (RANK and WORLD_SIZE in the environment) the function runs in place on this process's rank and the
results of all ranks are gathered with all_gather_object; a rank that raises is reported on every rank, so all of
them raise the same RankError and stay in step for the next call.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

# Imported once in the forkserver, so every rank starts with them loaded (torch._dynamo is pulled in by the first
# optimizer or DDP a rank builds and costs seconds per process otherwise).
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch.nn", "torch.optim", "torch._dynamo"]


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback."""


class RankTimeout(TimeoutError):
    """Some ranks had not finished when the timeout ran out."""


def under_torchrun() -> bool:
    """True when this process is one rank of a torchrun (or other env://) launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _resolve(backend: str | None, device: str | torch.device | None) -> tuple[str, torch.device]:
    device = torch.device(device if device is not None else "cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend 'nccl' needs device 'cuda'")
    return backend, device


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run fn(*args, **kwargs) on `world_size` ranks; return the ranks' results in rank order.

    `fn` and its arguments must be picklable (a module-level function). On CUDA rank r uses cuda:r."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    backend, device = _resolve(backend, device)
    if device.type == "cuda" and world_size > torch.cuda.device_count() and not under_torchrun():
        raise ValueError(f"world_size={world_size} exceeds the {torch.cuda.device_count()} visible CUDA devices")
    if under_torchrun():
        return _run_in_place(fn, world_size, args, kwargs, backend, device, timeout)
    return _spawn_processes(fn, world_size, args, kwargs, backend, device, timeout)


def _run_in_place(fn, world_size, args, kwargs, backend, device, timeout) -> list[Any]:
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size != env_world:
        raise ValueError(f"world_size={world_size} but torchrun started WORLD_SIZE={env_world} ranks")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    try:
        outcome = (None, fn(*args, **kwargs))
    except Exception:  # noqa: BLE001 - shared with every rank below, so all of them fail together
        outcome = (traceback.format_exc(), None)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, outcome)
    failed = [r for r, (error, _) in enumerate(gathered) if error is not None]
    if failed:
        raise RankError(f"rank {failed[0]} of {world_size} raised:\n{gathered[failed[0]][0]}"
                        + (f"\n(rank(s) {', '.join(map(str, failed[1:]))} failed too)" if failed[1:] else ""))
    return [result for _, result in gathered]


def _write_error(workdir: str, rank: int) -> NoReturn:
    """Record the exception being handled for the caller, then end this rank at once."""
    with open(os.path.join(workdir, f"error_{rank}.txt"), "w") as f:
        f.write(traceback.format_exc())
    os._exit(1)


def _rank_main(rank, world_size, backend, device_type, timeout, workdir) -> None:
    """Body of one rank process. Reads the call from workdir; writes result_<rank>.pt or error_<rank>.txt there."""
    try:
        fn, args, kwargs = torch.load(os.path.join(workdir, "call.pt"), weights_only=False)
        if device_type == "cpu":
            torch.set_num_threads(1)  # N ranks share the cores; one intra-op thread each avoids oversubscription
        else:
            torch.cuda.set_device(rank)
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        result = fn(*args, **kwargs)
    except BaseException:  # noqa: BLE001 - every failure must reach the caller, KeyboardInterrupt included
        # Written before anything else happens: the peers fail only once this process exits and its
        # connections close, so the first error file on disk is the root cause.
        _write_error(workdir, rank)
    try:
        dist.destroy_process_group()
        tmp = os.path.join(workdir, f"result_{rank}.tmp")
        torch.save(result, tmp)  # a result that cannot be pickled fails here, with its traceback
        os.replace(tmp, os.path.join(workdir, f"result_{rank}.pt"))
    except BaseException:  # noqa: BLE001
        _write_error(workdir, rank)
    os._exit(0)  # skip interpreter teardown: nothing left to flush, and it can hang on gloo threads


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _spawn_processes(fn, world_size, args, kwargs, backend, device, timeout) -> list[Any]:
    workdir = tempfile.mkdtemp(prefix="pretrain-spec-launch-")
    ctx = _context()
    procs = []
    try:
        # The call travels as a file, not as Process arguments: multiprocessing would share tensor arguments
        # through one file descriptor per storage, which runs out of descriptors for a model's worth of tensors.
        torch.save((fn, args, kwargs), os.path.join(workdir, "call.pt"))
        for rank in range(world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(rank, world_size, backend, device.type, timeout, workdir),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        _watch(procs, workdir, timeout)
        return [torch.load(os.path.join(workdir, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]
    finally:
        _kill(procs)
        shutil.rmtree(workdir, ignore_errors=True)


def _watch(procs: list, workdir: str, timeout: float) -> None:
    """Wait for all ranks; raise on the first failure or at the timeout."""
    deadline = time.monotonic() + timeout
    running = {p.sentinel: rank for rank, p in enumerate(procs)}
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(str(r) for r in sorted(running.values()))
            raise RankTimeout(
                f"rank(s) {names} of {len(procs)} did not finish within {timeout:g} s and were killed "
                f"(a hang: a collective some rank never joined, or a deadlock)"
            )
        for sentinel in mp.connection.wait(list(running), timeout=min(left, 0.5)):
            rank = running.pop(sentinel)
            procs[rank].join()
            if procs[rank].exitcode != 0:
                raise RankError(_failure_message(rank, procs, workdir))


def _failure_message(rank: int, procs: list, workdir: str) -> str:
    """The traceback of the rank that failed first (its error file is the oldest): a rank that fails because a
    peer vanished mid-collective writes its error later, and is only listed."""
    errors = {
        r: os.path.join(workdir, f"error_{r}.txt")
        for r in range(len(procs))
        if os.path.exists(os.path.join(workdir, f"error_{r}.txt"))
    }
    if not errors:
        code = procs[rank].exitcode
        return f"rank {rank} of {len(procs)} died with exit code {code} (killed by a signal if negative)"
    first = min(errors, key=lambda r: os.path.getmtime(errors[r]))
    with open(errors[first]) as f:
        message = f"rank {first} of {len(procs)} raised:\n{f.read()}"
    others = sorted(set(errors) - {first})
    if others:
        message += f"\n(rank(s) {', '.join(map(str, others))} failed after it)"
    return message


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)
