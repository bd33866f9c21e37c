"""The file-safety layer under ZeRO checkpoints: what the checkpoint code asks of the file system, each request made
so that a crash, a second job or a hostile directory cannot corrupt a checkpoint or make a load hang.

    atomic_write     a fresh unpredictable temporary name (O_EXCL | O_NOFOLLOW), fsynced, renamed onto the target:
                     a reader sees the old bytes or the new ones, never a mixture, and nothing planted in the
                     directory can redirect the write
    read_regular     regular files only (no symlink, FIFO or device), at most the expected size + 1 bytes
    acquire_lock     one writer per checkpoint name (`.NAME.lock`, O_EXCL); a stale lock of a dead process on this
                     host is taken over, never one of a live process or another host
    check_plain_name a name a manifest or `latest` gives must stay inside the checkpoint's directory
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import uuid
from pathlib import Path
from typing import Any

MAX_MANIFEST_BYTES = 1 << 30


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` all at once: a fresh temporary file beside it, fsynced, renamed onto it.

    The temporary name is unpredictable and created with O_EXCL | O_NOFOLLOW, so nothing planted in the directory
    (a symlink or a file at a guessed name) can redirect the write outside it or be written through."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def acquire_lock(path: Path) -> str | None:
    """Rank 0: take the one-writer-per-name lock of `path` (created with O_EXCL); None, or why it cannot.

    Two jobs saving to one name would otherwise remove each other's staging directories and publish a checkpoint
    holding only its manifest. A lock left by a process on this host that is gone (a job killed mid-save, restarted
    and saving again: the common case) is taken over: a save publishes atomically, so a cut-off one left only its
    staging directory, which this save removes. It is first renamed away, which only one of several restarted jobs
    can do; the others then find a live owner and are refused. A lock of another host, or of a live process, is
    never taken over."""
    lock = _lock_file(path)
    owner = f"{os.getpid()} {socket.gethostname()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"could not create the directory {path.parent}: {e}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            return f"could not create the lock file {lock}: {e}"
        else:
            try:
                os.write(fd, owner.encode())
            finally:
                os.close(fd)
            return None
        try:
            held = lock.read_text()[:200]
        except OSError:
            held = ""
        pid, _, host = held.partition(" ")
        if not (pid.isdigit() and host == socket.gethostname() and not _alive(int(pid))):
            break
        try:  # stale: rename it away (atomic, so one taker wins), then create ours
            os.replace(lock, lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex}"))
        except OSError:
            continue  # another job took it over first: look again
        for old in lock.parent.glob(f"{lock.name}.stale-*"):
            with contextlib.suppress(OSError):
                old.unlink()
    return (f"another save to {path} is in progress (lock file {lock} held by {held or 'an unknown process'!r}); "
            f"two jobs must not save to one name")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_lock_file(path))


def check_plain_name(name: Any, source: Path) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{source}: entry {name!r} must be a plain file name inside the checkpoint directory")


def read_regular(file: Path, size: int | None) -> bytes:
    """The bytes of `file`, which must be a regular file (not a symlink, FIFO or device): at most `size` + 1 of
    them, so a file longer than the manifest says is detected without reading it all (size None: the manifest
    itself, up to MAX_MANIFEST_BYTES). A FIFO would block the read forever and a link to /dev/zero would fill
    memory, so both are refused before opening for a read that could block."""
    st = os.lstat(file)
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a directory" if stat.S_ISDIR(st.st_mode) else "a device or other special file"
        raise ValueError(f"{file}: not a regular file ({kind}); checkpoint files must be regular files")
    limit = MAX_MANIFEST_BYTES if size is None else size + 1
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(file, flags)
    try:
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise ValueError(f"{file}: changed while being opened (no longer the regular file it was)")
        if size is None and st2.st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"{file}: {st2.st_size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})")
        chunks, total = [], 0
        while total < limit:
            chunk = os.read(fd, min(limit - total, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
