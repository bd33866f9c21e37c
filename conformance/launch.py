"""Run a function on N ranks and get every rank's return value back: gloo on CPU, NCCL on CUDA.

    results = spawn(fn, world_size, *args, timeout=60.0, **kwargs)   # [fn(...) on rank 0, on rank 1, ...]

Each rank is a process started from a forkserver that has torch imported already (a fork costs milliseconds, not
the seconds of a fresh interpreter). The ranks meet through a torch.distributed.FileStore in a fresh temp dir: no
ports, so parallel pytest workers never collide. `fn` runs with the default process group initialised; it reads
its rank from torch.distributed.get_rank(). Every rank writes its return value (torch.save) or its traceback to the
temp dir, atomically (a reader never sees half a file). The caller watches all ranks:
  - a rank that raises or dies: the call raises RankError naming the rank whose failure came first (its traceback,
    or its exit code or signal; a rank that ends without a result, os._exit(0), counts as failed), then the
    failures that followed from it ("Connection reset by peer" on the survivors); the others are killed;
  - ranks still running at `timeout`: all are killed and the call raises RankTimeout naming the ranks that stopped
    making progress (a process stopped by SIGSTOP or a debugger, or one whose heartbeat thread has not run for
    seconds) apart from those that were only waiting on them (blocked in a collective with a stopped peer); without
    such a rank, the ranks that had not finished are named;
  - in every case no process is left behind, and nothing outlives the caller: if the caller itself is killed
    (SIGKILL, SIGTERM), its ranks notice within milliseconds, kill any peer that cannot notice (a stopped rank),
    remove the temp dir and exit, and then the forkserver and multiprocessing's resource tracker exit as well.
`world_size` is at most MAX_CPU_RANKS on CPU and the visible GPUs on CUDA; `timeout` at most a week.
Under torchrun (RANK and WORLD_SIZE in the environment) the function runs in place on this process's rank and the
results of all ranks are gathered with all_gather_object; a rank that raises is reported on every rank, so all of
them raise the same RankError and stay in step for the next call.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from conformance import liveness
from conformance.flags import MAX_CPU_RANKS, MAX_SECONDS

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


def _check_timeout(timeout: Any) -> None:
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) \
        and 0 < timeout <= MAX_SECONDS
    if not ok:
        raise ValueError(f"timeout must be a finite number of seconds > 0 and at most {MAX_SECONDS:g} (a week; a "
                         f"hang must end), got {timeout!r}")


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
    _check_timeout(timeout)
    backend, device = _resolve(backend, device)
    if device.type == "cuda" and world_size > torch.cuda.device_count() and not under_torchrun():
        raise ValueError(f"world_size={world_size} exceeds the {torch.cuda.device_count()} visible CUDA devices")
    if device.type == "cpu" and world_size > MAX_CPU_RANKS and not under_torchrun():
        raise ValueError(f"world_size={world_size} exceeds the {MAX_CPU_RANKS} gloo ranks one CPU machine runs "
                         "(each rank is a process with torch loaded)")
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


# ---- the rank's side -------------------------------------------------------------------------------------------------
# Files in the workdir, each written once and atomically (a temp name, then os.replace): a reader sees the whole file
# or none of it.
#   call.pt           (fn, args, kwargs, numerics), written by the caller before any rank starts
#   store             the FileStore of the rendezvous
#   alive_<r>         locked (a POSIX record lock, lockf) by rank r for its whole life: the kernel releases the lock
#                     when r dies, however it dies, so a peer can tell "r is gone" from "r is slow" without any message
#                     from r; unlike flock, the lock is not inherited by processes r forks (DataLoader workers).
#                     It holds r's pid: while the lock is held the pid is r's, so a peer may kill it
#   beat_<r>          touched by a thread of rank r every liveness.BEAT_S: its age says whether r still runs at all
#                     (a rank stopped by SIGSTOP, or one whose C code holds the GIL, stops touching it; one blocked
#                     in a collective does not)
#   result_<r>.pt     r's return value (torch.save)
#   error_<r>.json    r's failure: traceback, when (time.monotonic, one clock for every process on the machine), and
#                     which peers were already gone at that moment (then the failure is a consequence, not a cause)

def _record_error(workdir: str, rank: int, world_size: int) -> NoReturn:
    """Record the exception being handled for the caller, then end this rank at once."""
    when = time.monotonic()
    text = traceback.format_exc()
    deadline = when + liveness.FOLLOW_ON_WINDOW_S
    peers = [r for r in range(world_size) if r != rank]
    while True:
        gone = [r for r in peers if liveness.gone(workdir, r)]
        if gone or not peers or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    record = json.dumps({"traceback": text, "time": when, "peers_gone": gone})

    def write(path: str) -> None:
        with open(path, "w") as f:
            f.write(record)

    liveness.write_atomically(os.path.join(workdir, f"error_{rank}.json"), write)
    os._exit(1)


def _numerics() -> dict[str, Any]:
    """The caller's process-wide numeric settings that a fresh interpreter would not inherit: a rank must compute
    as the caller does (float32 matmuls in bf16 under "medium" on CPU, TF32 on CUDA), or the caller's expected
    values and the ranks' results differ by the setting, not by the technique."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def _apply_numerics(numerics: dict[str, Any]) -> None:
    torch.set_float32_matmul_precision(numerics["float32_matmul_precision"])
    torch.backends.cudnn.allow_tf32 = numerics["cudnn_allow_tf32"]


def _rank_main(rank, world_size, backend, device_type, timeout, workdir, caller_alive) -> None:
    """Body of one rank process. Reads the call from workdir; writes result_<rank>.pt or error_<rank>.json there."""
    try:
        liveness.die_with_caller(caller_alive, workdir, rank, world_size)
        liveness.hold_alive_lock(workdir, rank)
        liveness.beat(workdir, rank)
        fn, args, kwargs, numerics = torch.load(os.path.join(workdir, "call.pt"), weights_only=False)
        _apply_numerics(numerics)
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
        _record_error(workdir, rank, world_size)
    try:
        # A result that cannot be pickled fails here, with its traceback.
        liveness.write_atomically(os.path.join(workdir, f"result_{rank}.pt"), lambda path: torch.save(result, path))
        # Stay until every rank has returned: exiting closes this rank's connections, and a peer still inside
        # init_process_group's connect or a last collective with it would fail with "Connection closed by peer".
        # The wait is on the store, not a collective, so it cannot itself be cut short that way.
        store.set(f"returned_{rank}", "1")
        store.wait([f"returned_{r}" for r in range(world_size)], timedelta(seconds=timeout))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        _record_error(workdir, rank, world_size)
    os._exit(0)  # skip interpreter teardown: nothing left to flush, and it can hang on gloo threads


# ---- the caller's side -----------------------------------------------------------------------------------------------


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _spawn_processes(fn, world_size, args, kwargs, backend, device, timeout) -> list[Any]:
    workdir = tempfile.mkdtemp(prefix="pretrain-spec-launch-")
    ctx = _context()
    procs: list = []
    # The ranks watch `caller_alive` (see liveness.die_with_caller); this process holds the only write end.
    caller_alive, keep_alive = ctx.Pipe(duplex=False)
    try:
        # The call travels as a file, not as Process arguments: multiprocessing would share tensor arguments
        # through one file descriptor per storage, which runs out of descriptors for a model's worth of tensors.
        torch.save((fn, args, kwargs, _numerics()), os.path.join(workdir, "call.pt"))
        for rank in range(world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(rank, world_size, backend, device.type, timeout, workdir, caller_alive),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        caller_alive.close()
        _watch(procs, workdir, timeout)
        return [torch.load(os.path.join(workdir, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]
    finally:
        keep_alive.close()
        caller_alive.close()
        _kill(procs)
        shutil.rmtree(workdir, ignore_errors=True)


_SETTLE_S = 1.0
"""After the first failure, how long the other ranks get to end on their own (a peer of a dead rank fails within
milliseconds) before they are killed: their errors are then listed as consequences."""


def _watch(procs: list, workdir: str, timeout: float) -> None:
    """Wait for all ranks; raise on the first failure or at the timeout."""
    deadline = time.monotonic() + timeout
    running = {p.sentinel: rank for rank, p in enumerate(procs)}
    seen: list[int] = []  # ranks in the order their ends were seen
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            # A rank that returned waits for the others before it exits (see _rank_main): it did not hang.
            raise RankTimeout(_timeout_message(procs, workdir, sorted(running.values()), timeout))
        for sentinel in mp.connection.wait(list(running), timeout=min(left, 0.5)):
            rank = running.pop(sentinel)
            procs[rank].join()
            seen.append(rank)
            if procs[rank].exitcode != 0 or not os.path.exists(os.path.join(workdir, f"result_{rank}.pt")):
                raise RankError(_failure_message(procs, workdir, seen))


def _timeout_message(procs: list, workdir: str, running: list[int], timeout: float) -> str:
    """Name the ranks that stopped making progress, apart from those only waiting on them; else every rank that had
    not finished. A rank that returned waits for the others before it exits (see _rank_main): it did not hang."""
    world = len(procs)
    returned = [r for r in running if os.path.exists(os.path.join(workdir, f"result_{r}.pt"))]
    unfinished = [r for r in running if r not in returned]
    stalled = {r: why for r in unfinished if (why := liveness.stalled(procs[r], workdir, r))}
    if stalled:
        waiting = [r for r in unfinished if r not in stalled]
        text = (f"rank(s) {', '.join(map(str, stalled))} of {world} stopped making progress ("
                + "; ".join(f"rank {r}: {why}" for r, why in stalled.items())
                + f") and did not finish within {timeout:g} s; all ranks were killed"
                + (f"; rank(s) {', '.join(map(str, waiting))} were still running, waiting on them" if waiting else ""))
    else:
        text = (f"rank(s) {', '.join(map(str, unfinished))} of {world} did not finish within {timeout:g} s and were "
                "killed (a hang: a collective some rank never joined, or a deadlock)")
    return text + (f"; rank(s) {', '.join(map(str, returned))} had returned" if returned else "")


def _failure_message(procs: list, workdir: str, seen: list[int]) -> str:
    """Name the rank whose failure came first, then list the failures that followed from it.

    First: a rank that raised while all its peers were alive (earliest first); else a rank that died without a
    record (a signal, os._exit, exit without a result), in the order the deaths were seen. A rank that raised after
    a peer had gone ("Connection reset by peer") is a consequence, listed after the cause."""
    settle = time.monotonic() + _SETTLE_S
    for p in procs:
        p.join(max(0.0, settle - time.monotonic()))
    stopped = [r for r, p in enumerate(procs) if p.exitcode is None]
    _kill(procs)
    returned = [r for r in stopped if os.path.exists(os.path.join(workdir, f"result_{r}.pt"))]
    stopped = [r for r in stopped if r not in returned]
    world = len(procs)
    seen = seen + [r for r in range(world) if r not in seen and r not in stopped]
    records, silent = {}, []
    for r in seen:
        try:
            with open(os.path.join(workdir, f"error_{r}.json")) as f:
                records[r] = json.load(f)
        except FileNotFoundError:
            if procs[r].exitcode != 0 or not os.path.exists(os.path.join(workdir, f"result_{r}.pt")):
                silent.append(r)
    causes = sorted((r for r in records if not records[r]["peers_gone"]), key=lambda r: records[r]["time"])
    first = causes[0] if causes else silent[0] if silent else min(records, key=lambda r: records[r]["time"])

    def describe(r: int, full: bool) -> str:
        if r in records:
            text = records[r]["traceback"].rstrip()
            return f"rank {r} of {world} raised:\n{text}" if full else f"rank {r} raised {text.splitlines()[-1]}"
        code = procs[r].exitcode
        if code == 0:
            return (f"rank {r} of {world} exited with code 0 without returning a result "
                    f"(fn ended the process: os._exit or an exit from a thread)")
        if code < 0:
            return f"rank {r} of {world} died: killed by signal {_signal_name(-code)} (exit code {code})"
        return f"rank {r} of {world} died with exit code {code}"

    lines = [describe(first, full=True)]
    for r in sorted((set(records) | set(silent)) - {first}):
        after = ", ".join(map(str, records[r]["peers_gone"])) if r in records else ""
        lines.append(f"  then {describe(r, full=False)}" + (f" (after rank(s) {after} had gone)" if after else ""))
    if stopped:
        lines.append(f"  rank(s) {', '.join(map(str, stopped))} were still running and were killed")
    if returned:
        lines.append(f"  rank(s) {', '.join(map(str, returned))} had returned and were waiting for the others")
    return "\n".join(lines)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)
