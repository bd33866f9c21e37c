"""Rank liveness for the launcher: how a rank shows it is making progress and how it dies with its caller.

Each rank touches `beat_<r>` from a heartbeat thread (a rank stopped by SIGSTOP, or one whose C code holds the GIL,
stops touching it; one blocked in a collective does not) and holds a lock on `alive_<r>` (with its pid inside)
while it lives. When the caller dies, a live rank SIGKILLs every peer whose lock is still held (a stopped rank
cannot run its own watchdog), removes the work folder and exits; Linux's PR_SET_PDEATHSIG covers the rank itself.
At a timeout the launcher asks `stalled` which ranks stopped, so the message names them apart from the ranks only
waiting on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
BEAT_S = 0.2
"""How often a rank's heartbeat thread touches beat_<r>."""
STALE_S = 3.0
"""A heartbeat older than this at the timeout means the rank stopped making progress."""
FOLLOW_ON_WINDOW_S = 0.2
"""How long a failing rank looks for a dead peer before calling its own failure the cause: the sockets of a dead
process close a moment before its lock is released, so a peer's "Connection reset" can come first."""


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename tmp to path: a reader of `path` never sees a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    write(tmp)
    os.replace(tmp, path)


def die_with_caller(caller_alive: mp.connection.Connection, workdir: str, rank: int, world_size: int) -> None:
    """End this rank, and remove the workdir, as soon as the caller is gone (killed by SIGKILL or SIGTERM, which run
    no cleanup in the caller); kill the peers first, since a stopped peer (SIGSTOP) cannot notice by itself and
    would keep the forkserver and the resource tracker alive with it.

    The caller holds the only write end of `caller_alive`; the kernel closes it when the caller dies, so the read
    here ends with EOF. A thread waits for it (collectives and sleeps release the GIL, so it runs while the main
    thread is blocked). Once every rank is gone, the forkserver and the resource tracker see their own pipes close
    and exit too (the ranks hold their pipes' other ends, which is why they outlived the caller before). On Linux the
    rank also gets SIGKILL if its parent, the forkserver, is killed (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the forkserver died before the prctl took effect
            os._exit(1)

    def watch() -> None:
        try:
            while True:
                caller_alive.recv_bytes()
        except (EOFError, OSError):
            pass
        for peer in range(world_size):
            pid = pid_if_alive(workdir, peer)
            if peer != rank and pid is not None:
                with contextlib.suppress(OSError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="launch-watchdog", daemon=True).start()


def hold_alive_lock(workdir: str, rank: int) -> None:
    """Lock alive_<rank> until this process ends (the descriptor is never closed). The lock is taken under a temp
    name and renamed into place, so a peer never finds the file unlocked while this rank lives. The file holds the
    pid."""
    tmp = os.path.join(workdir, f"alive_{rank}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getpid()).encode())
    os.replace(tmp, os.path.join(workdir, f"alive_{rank}"))


def locked(workdir: str, rank: int) -> bool | None:
    """Whether rank's alive lock is held (it lives); None when it has not started."""
    try:
        fd = os.open(os.path.join(workdir, f"alive_{rank}"), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: peers probing the same rank never block each other
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


def pid_if_alive(workdir: str, rank: int) -> int | None:
    """The pid of `rank` while it lives (its lock is held, so the pid is not yet reused), else None."""
    try:
        pid = int(Path(workdir, f"alive_{rank}").read_text())
    except (OSError, ValueError):
        return None
    return pid if locked(workdir, rank) else None


def beat(workdir: str, rank: int) -> None:
    """Touch beat_<rank> every BEAT_S from a daemon thread, for as long as this process runs at all."""
    path = os.path.join(workdir, f"beat_{rank}")

    def beat() -> None:
        while True:
            try:
                with open(path, "a"):
                    os.utime(path)
            except OSError:  # the workdir is gone: the caller has ended the call
                return
            time.sleep(BEAT_S)

    threading.Thread(target=beat, name="launch-heartbeat", daemon=True).start()


def gone(workdir: str, rank: int) -> bool:
    """True when `rank` started and has ended without a result (it raised or died)."""
    if locked(workdir, rank) is not False:
        return False  # not started yet, or alive
    return not os.path.exists(os.path.join(workdir, f"result_{rank}.pt"))


def stalled(proc, workdir: str, rank: int) -> str | None:
    """Why `rank` has stopped making progress, or None while it runs: its process is stopped (SIGSTOP, SIGTSTP, a
    debugger), or its heartbeat is older than STALE_S."""
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = None
    if state in ("T", "t"):
        return "its process is stopped (SIGSTOP, SIGTSTP or a debugger)"
    try:
        age = time.time() - os.stat(os.path.join(workdir, f"beat_{rank}")).st_mtime
    except OSError:
        return None  # not started its heartbeat yet: nothing known
    return f"its heartbeat thread had not run for {age:.1f} s" if age > STALE_S else None
