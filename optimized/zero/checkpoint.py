"""Sharded ZeRO checkpoints: one file per rank plus a manifest; loadable at any world size; consolidated offline.

A checkpoint is a directory:
    manifest.json              format version, stage, param_dtype, optimizer class, world size, the flat layouts
                               (every parameter's names, shape, dtype, group and offset), the model's state_dict
                               keys, and for every shard file its SHA-256 and size
    shard-00000-of-00004.pt    rank 0's ZeroOptimizer.state_dict(): its master slices, the optimizer state of
    shard-00001-of-00004.pt    those slices, the hyperparameters, and (rank 0 only) the replicated tensors
    ...                        (frozen parameters, buffers)
Saving commits across ranks, so a crash or a killed rank never leaves a mixture or destroys the last checkpoint:
    1. every rank writes its shard into a staging directory beside the target (`.NAME.staging-TOKEN`), fsynced;
    2. all ranks agree that every shard is written (one all_gather_object of [error or file entry]);
    3. rank 0 writes the manifest (the commit record) into the staging directory and publishes it with one
       rename onto NAME (a previous checkpoint at NAME is first renamed aside and removed only after), then
       points `latest` in the parent directory at NAME (write to a temporary file, rename);
    4. all ranks agree again: save_checkpoint returns on every rank only once the checkpoint is published.
Until step 3's rename the previous checkpoint at NAME is untouched. Loading validates everything (manifest, the
shards this rank needs, checksums, shapes, compatibility) without changing any state, then all ranks agree: either
every rank loads the same checkpoint (same manifest digest) or every rank raises. Manifest entries are plain file
names inside the checkpoint directory. Files are read with torch.load(weights_only=True) after their checksum
is verified.

The flat layout does not depend on the world size (only the padding and the slice boundaries do), so loading at
another world size M is re-slicing: rank r of M needs the elements [r·S_M, r·S_M + o_r) of each flat buffer and
reads them from the old shards that overlap that range. Elementwise optimizer state (momentum, variance) is
re-sliced the same way; scalar state (Adam's step) is the same on every rank and is taken from rank 0's shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimized.zero.partition import FlatLayout

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "pretrain-spec ZeRO checkpoint"
SECTIONS = ("zero", "layouts", "group_params", "state_dict_keys", "replicated", "files")


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(opt, path: str | os.PathLike) -> Path:
    """Write the checkpoint directory `path` (see the module docstring); every rank must call it. Returns path."""
    path = Path(path)
    group = opt.group
    token = group.all_gather_object(uuid.uuid4().hex[:12])[0]  # rank 0's: one staging directory for all
    staging = path.parent / f".{path.name}.staging-{token}"
    state = opt.state_dict()
    if opt.rank != 0:
        state["replicated"] = {}  # the same on every rank: saved once, by rank 0
    name = shard_file(opt.rank, opt.world_size)
    entry, error = None, None
    try:
        staging.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        _atomic_write(staging / name, data)
        entry = {"rank": opt.rank, "file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    except OSError as e:
        error = f"could not write its shard {staging / name}: {e}"
    outcomes = group.all_gather_object((error, entry))
    failed = [(r, e) for r, (e, _) in enumerate(outcomes) if e is not None]
    publish_error = None
    if not failed and opt.rank == 0:
        try:
            _publish(path, staging, token, state, [e for _, e in outcomes])
        except OSError as e:
            publish_error = f"could not publish {path}: {e}"
    elif failed and opt.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"save_checkpoint({str(path)!r}) failed on rank {rank}: {message}; the previous "
                           f"checkpoint (if any) is untouched")
    group.agree(publish_error)  # nobody returns (and, say, loads) before the checkpoint is published
    return path


def _publish(path: Path, staging: Path, token: str, state: dict, entries: list[dict]) -> None:
    """Rank 0, after every shard is written: the manifest, then one rename onto path, then `latest`."""
    meta = {k: v for k, v in state["zero"].items() if k != "rank"}
    manifest = {
        "format": FORMAT,
        "zero": meta,
        "layouts": state["layouts"],
        "group_params": state["group_params"],
        "state_dict_keys": state["state_dict_keys"],
        "replicated": sorted(state["replicated"]),
        "files": entries,
    }
    _atomic_write(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(staging)
    previous = path.parent / f".{path.name}.previous-{token}"
    if path.exists():
        os.rename(path, previous)  # kept until the new one is in place (load falls back to it in between)
    os.rename(staging, path)
    _fsync_dir(path.parent)
    _atomic_write(path.parent / LATEST, path.name.encode())
    shutil.rmtree(previous, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.staging-*"):  # left by saves that failed before publishing
        shutil.rmtree(stale, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` names: itself when it holds a manifest; the one its `latest` file points
    at; or, when path is missing because a save was interrupted between its two renames, the previous one."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        _check_plain_name(name, path / LATEST)
        return path / name
    if not path.exists():
        aside = sorted(path.parent.glob(f".{path.name}.previous-*"))
        if aside and (aside[-1] / MANIFEST).exists():
            return aside[-1]
    return path


def _check_plain_name(name: Any, source: Path) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{source}: entry {name!r} must be a plain file name inside the checkpoint directory")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint `path` names (see resolve), validated: every section present, world_size
    an integer >= 1, one shard entry per rank with a plain file name, a SHA-256 and a size."""
    file = resolve(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no ZeRO checkpoint manifest (was save_checkpoint finished?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a valid manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} manifest")
    missing = [k for k in SECTIONS if k not in manifest]
    if missing:
        raise ValueError(f"{file}: manifest has no {missing[0]!r} section (it needs {list(SECTIONS)})")
    zero = manifest["zero"]
    n = zero.get("world_size") if isinstance(zero, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{file}: zero.world_size must be an integer >= 1, got {n!r}")
    files = manifest["files"]
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        raise ValueError(f"{file}: 'files' must be a list of shard entries, got {files!r}")
    for e in files:
        for key in ("rank", "file", "sha256", "bytes"):
            if key not in e:
                raise ValueError(f"{file}: shard entry {e!r} has no {key!r}")
        _check_plain_name(e["file"], file)
    ranks = sorted(e["rank"] for e in files if isinstance(e["rank"], int))
    if ranks != list(range(n)):
        lost = sorted(set(range(n)) - set(ranks))
        raise ValueError(f"{file}: world_size is {n} but the shard entries are for ranks {ranks}"
                         + (f" (rank {lost[0]} has no shard)" if lost else " (duplicates or out of range)"))
    if not isinstance(manifest["layouts"], list) or not all(
            isinstance(ld, dict) and {"group", "dtype", "params"} <= ld.keys() for ld in manifest["layouts"]):
        raise ValueError(f"{file}: 'layouts' must be a list of {{group, dtype, params}}")
    return manifest


def _layouts(manifest: dict) -> list[FlatLayout]:
    n = manifest["zero"]["world_size"]
    return [
        FlatLayout.build(ld["group"], getattr(torch, ld["dtype"]),
                         [(tuple(p["names"]), tuple(p["shape"])) for p in ld["params"]], n)
        for ld in manifest["layouts"]
    ]


def read_shard(path: str | os.PathLike, manifest: dict, rank: int) -> dict:
    """Rank `rank`'s shard, after its size and SHA-256 match the manifest and its slices match the layout."""
    entry = next(e for e in manifest["files"] if e["rank"] == rank)
    file = resolve(path) / entry["file"]
    layouts = _layouts(manifest)
    holds = sorted({name for lay in layouts for name in lay.params_in(*lay.owned_range(rank))})
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: shard of rank {rank} is missing; it holds slices of {holds}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry["bytes"] or digest != entry["sha256"]:
        raise ValueError(
            f"{file}: corrupt shard ({len(data)} bytes, sha256 {digest[:16]}..., the manifest says {entry['bytes']} "
            f"bytes, sha256 {entry['sha256'][:16]}...); it holds the slices of parameters {holds}"
        )
    shard = torch.load(io.BytesIO(data), weights_only=True)
    if shard["zero"]["rank"] != rank or shard["zero"]["world_size"] != manifest["zero"]["world_size"]:
        raise ValueError(f"{file}: written by rank {shard['zero']['rank']} of {shard['zero']['world_size']}, the "
                         f"manifest lists it as rank {rank} of {manifest['zero']['world_size']}")
    for i, lay in enumerate(layouts):
        owned = lay.owned_numel(rank)
        for what, t in [("master slice", shard["masters"][i])] + [
            (f"optimizer state {k!r}", v) for k, v in shard["state"][i].items() if _elementwise(v, lay.shard_numel)
        ]:
            if tuple(t.shape) != (owned,):
                first = lay.params_in(*lay.owned_range(rank)) or [lay.slots[0].name]
                raise ValueError(f"{file}: {what} of the flat buffer starting at parameter {first[0]!r} has shape "
                                 f"{tuple(t.shape)}, the layout needs ({owned},)")
    return shard


def _elementwise(value: Any, shard_numel: int) -> bool:
    """Per-element optimizer state is a 1-D tensor as long as the slice; anything else is per-buffer (step)."""
    return isinstance(value, Tensor) and value.dim() == 1 and value.numel() <= shard_numel


def _reslice(shards: dict[int, dict], old: FlatLayout, lo: int, hi: int, get) -> Tensor:
    """Elements [lo, hi) of a flat buffer laid out by `old`, cut from the old shards that hold them."""
    parts = [get(shards[q])[a - old.shard_start(q) : b - old.shard_start(q)] for q, a, b in old.pieces(lo, hi)]
    return torch.cat(parts) if parts else get(shards[0]).new_empty(0)


def load_checkpoint(opt, path: str | os.PathLike) -> None:
    """Load into `opt` (any world size); every rank must call it. Each rank validates the manifest against the
    optimizer, reads and verifies the old shards that hold its new slices and re-slices them, changing nothing;
    then the ranks agree (same checkpoint, no error anywhere) and only then load. Otherwise every rank raises:
    the failing rank its own error, the others a RuntimeError naming it."""
    prepared, error, digest = None, None, None
    try:
        prepared, digest = _prepare_load(opt, path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:
        error = e
    outcomes = opt.group.all_gather_object((None if error is None else f"{type(error).__name__}: {error}", digest))
    failed = [(r, message) for r, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        raise RuntimeError(f"load_checkpoint({str(path)!r}) failed on rank {rank} of {opt.world_size}, so no rank "
                           f"loaded it: {message}")
    digests = {d for _, d in outcomes}
    if len(digests) != 1:
        raise RuntimeError(f"load_checkpoint({str(path)!r}): the ranks read different manifests (the checkpoint "
                           f"changed while loading, or `latest` moved); no rank loaded it")
    opt.load_state_dict(prepared)


def _prepare_load(opt, path: str | os.PathLike) -> tuple[dict, str]:
    """This rank's state_dict re-sliced from the checkpoint, validated as load_state_dict will need it, and the
    digest of the manifest it came from. No state changes."""
    directory = resolve(path)
    manifest = read_manifest(directory)
    digest = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    source = str(directory / MANIFEST)
    opt.check_compatible(manifest["zero"], manifest["layouts"], manifest["replicated"], source)
    old_layouts = _layouts(manifest)
    ranges = [lay.owned_range(opt.rank) for lay in opt.layouts()]
    needed = {0} | {q for old, (lo, hi) in zip(old_layouts, ranges, strict=True) for q, _, _ in old.pieces(lo, hi)}
    shards = {q: read_shard(directory, manifest, q) for q in sorted(needed)}
    masters, states = [], []
    for i, (old, (lo, hi)) in enumerate(zip(old_layouts, ranges, strict=True)):
        masters.append(_reslice(shards, old, lo, hi, lambda s, i=i: s["masters"][i]))
        state = {}
        for key, value in shards[0]["state"][i].items():
            if _elementwise(value, old.shard_numel):
                state[key] = _reslice(shards, old, lo, hi, lambda s, i=i, key=key: s["state"][i][key])
            else:
                state[key] = value
        states.append(state)
    first = shards[0]
    prepared = {
        "zero": {**manifest["zero"], "world_size": opt.world_size, "rank": opt.rank},
        "layouts": manifest["layouts"],
        "group_params": manifest["group_params"],
        "state_dict_keys": manifest["state_dict_keys"],
        "masters": masters,
        "state": states,
        "param_groups": first["param_groups"],
        "replicated": first["replicated"],
    }
    if "loss_scale" in first:
        prepared["loss_scale"] = first["loss_scale"]
    opt.check_state_dict(prepared)
    return prepared, digest


def consolidate(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(model_state_dict, optimizer_state) of the whole model from a checkpoint, with no process group.

    model_state_dict has the model's state_dict keys (tied names share one tensor); trainable parameters are the
    master weights (fp32 when param_dtype was half). optimizer_state is what an unsharded optimizer of the same
    class over the trainable parameters (in param_groups order) returns from state_dict(), e.g.
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).load_state_dict(optimizer_state)"""
    manifest = read_manifest(path)
    layouts = _layouts(manifest)
    n = manifest["zero"]["world_size"]
    shards = {q: read_shard(path, manifest, q) for q in range(n)}
    first = shards[0]
    params: dict[str, Tensor] = {}
    param_state: dict[str, dict] = {}
    for i, lay in enumerate(layouts):
        full = torch.cat([shards[q]["masters"][i] for q in range(n)])
        elementwise = {k: torch.cat([shards[q]["state"][i][k] for q in range(n)])
                       for k, v in first["state"][i].items() if _elementwise(v, lay.shard_numel)}
        for slot in lay.slots:
            tensor = full[slot.offset : slot.end].view(slot.shape).clone()
            for name in slot.names:
                params[name] = tensor
            param_state[slot.name] = {
                k: (elementwise[k][slot.offset : slot.end].view(slot.shape).clone() if k in elementwise
                    else v.clone() if isinstance(v, Tensor) else v)
                for k, v in first["state"][i].items()
            }
    model_state = {}
    for key in manifest["state_dict_keys"]:
        if key in params:
            model_state[key] = params[key]
        elif key in first["replicated"]:
            model_state[key] = first["replicated"][key]
        else:
            raise ValueError(f"{path}: state_dict key {key!r} is neither a sharded parameter nor replicated")
    state, groups, index = {}, [], 0
    for names, hyper in zip(manifest["group_params"], first["param_groups"], strict=True):
        indices = []
        for name in names:
            if param_state[name]:
                state[index] = param_state[name]
            indices.append(index)
            index += 1
        groups.append({**hyper, "params": indices})
    return model_state, {"state": state, "param_groups": groups}
