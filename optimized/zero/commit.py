"""How a ZeRO checkpoint directory becomes visible, and how it is found again: the commit protocol on disk.

A save writes its shards into a staging directory beside the target (`.NAME.staging-TOKEN`); then rank 0
(`publish`):
    1. writes the manifest (the commit record, with a commit number one above any before it) into the staging
       directory, fsynced;
    2. renames a previous checkpoint at NAME aside (`.NAME.previous-COMMIT-RANDOM`, removed only at the end), then
       renames the staging directory onto NAME: the one step that publishes;
    3. points `latest` in the parent directory at NAME (an atomic write).
Until step 2's rename the previous checkpoint at NAME is untouched. A reader (`resolve`) takes NAME when it holds
a manifest, else what `latest` names, else, when a save was cut off between the two renames, the set-aside copy
with the highest commit number (never by name: its suffix is random).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from optimized.zero import files

MANIFEST = "manifest.json"
LATEST = "latest"


class PublishError(RuntimeError):
    """A failure after the commit rename: the message says the checkpoint itself is in place."""


def commit_of(directory: Path) -> int:
    """The commit sequence number a checkpoint directory's manifest records; 0 when it has none or is unreadable
    (older checkpoints, a directory cut off before its manifest)."""
    try:
        number = json.loads(files.read_regular(directory / MANIFEST, None)).get("commit", 0)
    except Exception:  # noqa: BLE001 - an unreadable manifest simply ranks below every readable one
        return 0
    return number if isinstance(number, int) and not isinstance(number, bool) and number >= 0 else 0


def _asides(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.previous-*"))


def next_commit(path: Path) -> int:
    """One above every checkpoint ever published at this name that is still on disk (at path or set aside)."""
    return 1 + max([commit_of(path)] + [commit_of(a) for a in _asides(path)])


def publish(path: Path, staging: Path, manifest: bytes, number: int) -> None:
    """Rank 0, after every shard is in `staging`: the manifest (commit `number`), one rename onto path, `latest`."""
    files.atomic_write(staging / MANIFEST, manifest)
    files.fsync_dir(staging)
    previous = path.parent / f".{path.name}.previous-{number - 1:012d}-{secrets.token_hex(6)}"
    if path.exists():
        os.rename(path, previous)  # kept until the new one is in place (load falls back to it in between)
    os.rename(staging, path)
    files.fsync_dir(path.parent)
    try:
        files.atomic_write(path.parent / LATEST, path.name.encode())
    except OSError as e:
        raise PublishError(f"{path} was published (commit {number}, complete and loadable by its name), but "
                           f"{path.parent / LATEST} could not be updated to point at it: {e}") from e
    finally:
        shutil.rmtree(previous, ignore_errors=True)
        for stale in path.parent.glob(f".{path.name}.staging-*"):  # left by saves that failed before publishing
            shutil.rmtree(stale, ignore_errors=True)


def _newest_aside(path: Path) -> Path | None:
    """Of the set-aside copies `.NAME.previous-*`, the one with the highest commit (never the name's order: its
    suffix is random), among those that hold a manifest."""
    candidates = [(commit_of(a), a) for a in _asides(path) if (a / MANIFEST).exists()]
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` names: itself when it holds a manifest; the one its `latest` file points
    at; or, when path is missing because a save was interrupted between its two renames, the previous one."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        files.check_plain_name(name, path / LATEST)
        return path / name
    if not path.exists():
        aside = _newest_aside(path)
        if aside is not None:
            return aside
    return path
