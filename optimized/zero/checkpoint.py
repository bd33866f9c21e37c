"""Sharded ZeRO checkpoints: one file per rank plus a manifest; loadable at any world size; consolidated offline.

A checkpoint is a directory:
    manifest.json              format version, stage, param_dtype, optimizer class, world size, the flat layouts
                               (every parameter's names, shape, dtype, group and offset), the model's state_dict
                               keys, and for every shard file its SHA-256 and size
    shard-00000-of-00004.pt    rank 0's ZeroOptimizer.state_dict(): its master slices, the optimizer state of
    shard-00001-of-00004.pt    those slices, the hyperparameters, and (rank 0 only) the replicated tensors
    ...                        (frozen parameters, buffers)
Saving commits across ranks, so a crash or a killed rank never leaves a mixture or destroys the last checkpoint:
    0. rank 0 takes the name's lock (`.NAME.lock`, O_EXCL; files.py): one job writes a name at a time;
    1. every rank writes its shard into a staging directory beside the target (`.NAME.staging-TOKEN`), fsynced;
    2. all ranks agree that every shard is written (one all_gather_object of [error or file entry]);
    3. rank 0 writes the manifest and publishes the staging directory with one rename onto NAME, then points
       `latest` at it (commit.py: the commit number, the previous copy set aside, how a reader resolves NAME);
    4. all ranks agree again: save_checkpoint returns on every rank only once the checkpoint is published.
Until step 3's rename the previous checkpoint at NAME is untouched. Any exception on any rank, during save or
load, reaches every rank as an error (the ranks always meet at the same collectives: never a hang). Loading
validates everything (manifest, the shards this rank needs, checksums, shapes, compatibility) without changing any
state, then all ranks agree: either
every rank loads the same checkpoint (same manifest digest) or every rank raises. Manifest entries are plain file
names inside the checkpoint directory. Files are read (files.read_regular: regular files only, bounded) with
torch.load(weights_only=True) after their checksum is verified.

The flat layout does not depend on the world size (only the padding and the slice boundaries do), so loading at
another world size M is re-slicing: rank r of M needs the elements [r·S_M, r·S_M + o_r) of each flat buffer and
reads them from the old shards that overlap that range. Elementwise optimizer state (momentum, variance) is
re-sliced the same way; scalar state (Adam's step) is the same on every rank and is taken from rank 0's shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimized.zero import commit, files
from optimized.zero.commit import MANIFEST, resolve
from optimized.zero.partition import FlatLayout

FORMAT = "pretrain-spec ZeRO checkpoint"
SECTIONS = ("zero", "layouts", "group_params", "state_dict_keys", "replicated", "files")


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def save_checkpoint(opt, path: str | os.PathLike) -> Path:
    """Write the checkpoint directory `path` (see the module docstring); every rank must call it. Returns path.

    Any exception on any rank (not only OSError) makes every rank raise, naming that rank: the ranks always meet
    at the same collectives, so a failure can never leave the others waiting. One job saves to a name at a time
    (a lock file beside it, see files.acquire_lock); a second is refused."""
    path = Path(path)
    group = opt.group
    lock_error = files.acquire_lock(path) if opt.rank == 0 else None
    token, lock_error = group.all_gather_object((uuid.uuid4().hex[:12], lock_error))[0]  # rank 0's, for all
    if lock_error is not None:
        raise RuntimeError(f"save_checkpoint({str(path)!r}): {lock_error}; nothing was written")
    try:
        return _save_locked(opt, path, token)
    finally:
        if opt.rank == 0:
            files.release_lock(path)


def _save_locked(opt, path: Path, token: str) -> Path:
    group = opt.group
    staging = path.parent / f".{path.name}.staging-{token}"
    name = shard_file(opt.rank, opt.world_size)
    entry, error, state = None, None, None
    try:
        state = opt.state_dict()
        if opt.rank != 0:
            state["replicated"] = {}  # the same on every rank: saved once, by rank 0
        staging.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        files.atomic_write(staging / name, data)
        entry = {"rank": opt.rank, "file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    except Exception as e:  # noqa: BLE001 - every rank must reach the all_gather below, whatever went wrong
        error = f"could not write its shard {staging / name}: {type(e).__name__}: {e}"
    outcomes = group.all_gather_object((error, entry))
    failed = [(r, e) for r, (e, _) in enumerate(outcomes) if e is not None]
    publish_error = None
    if not failed and opt.rank == 0:
        try:
            number = commit.next_commit(path)
            commit.publish(path, staging, _manifest(state, [e for _, e in outcomes], number), number)
        except Exception as e:  # noqa: BLE001 - reported to every rank by group.agree below
            publish_error = str(e) if isinstance(e, commit.PublishError) else f"could not publish {path}: " \
                f"{type(e).__name__}: {e}; the previous checkpoint (if any) is untouched"
    elif failed and opt.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"save_checkpoint({str(path)!r}) failed on rank {rank}: {message}; the previous "
                           f"checkpoint (if any) is untouched")
    group.agree(publish_error)  # nobody returns (and, say, loads) before the checkpoint is published
    return path


def _manifest(state: dict, entries: list[dict], number: int) -> bytes:
    """The manifest of rank 0's `state` and every rank's shard entry, with commit number `number`."""
    manifest = {
        "format": FORMAT,
        "commit": number,
        "zero": {k: v for k, v in state["zero"].items() if k != "rank"},
        "layouts": state["layouts"],
        "group_params": state["group_params"],
        "state_dict_keys": state["state_dict_keys"],
        "replicated": sorted(state["replicated"]),
        "files": entries,
    }
    return json.dumps(manifest, indent=1).encode()


def _is_int(value: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
"""The dtypes a layout (flat parameters, master weights) may name: an allow-list, never getattr(torch, name), which
would hand back torch.os or torch.int8 for a forged manifest."""
MAX_ELEMENTS = 1 << 48  # far beyond any model; bounds the arithmetic a forged manifest can ask for


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint `path` names (see resolve), validated: every section present, world_size
    an integer >= 1, one shard entry per rank with a plain file name, a SHA-256 and a size, layouts of named
    parameters with integer shapes and a torch dtype. Anything else is a ValueError naming the file."""
    file = resolve(path) / MANIFEST
    try:
        manifest = json.loads(files.read_regular(file, None))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no ZeRO checkpoint manifest (was save_checkpoint finished?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{file}: not a valid manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} manifest")
    missing = [k for k in SECTIONS if k not in manifest]
    if missing:
        raise ValueError(f"{file}: manifest has no {missing[0]!r} section (it needs {list(SECTIONS)})")
    zero = manifest["zero"]
    n = zero.get("world_size") if isinstance(zero, dict) else None
    if not _is_int(n, 1):
        raise ValueError(f"{file}: zero.world_size must be an integer >= 1, got {n!r}")
    entries = manifest["files"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{file}: 'files' must be a list of shard entries, got {str(entries)[:200]}")
    for e in entries:
        for key in ("rank", "file", "sha256", "bytes"):
            if key not in e:
                raise ValueError(f"{file}: shard entry {e!r} has no {key!r}")
        files.check_plain_name(e["file"], file)
        if not isinstance(e["sha256"], str) or not _is_int(e["bytes"], 0, 1 << 48):
            raise ValueError(f"{file}: shard entry {str(e)[:200]} needs a string 'sha256' and an integer 'bytes' "
                             f">= 0")
    ranks = sorted(e["rank"] for e in entries if _is_int(e["rank"]))
    if len(entries) != n or ranks != list(range(n)):
        lost = sorted(set(range(min(n, len(entries) + 1))) - set(ranks))
        raise ValueError(f"{file}: world_size is {n} but the shard entries are for ranks {ranks[:20]}"
                         + (f" (rank {lost[0]} has no shard)" if lost else " (duplicates or out of range)"))
    _check_layouts(manifest["layouts"], file)
    for key in ("group_params", "state_dict_keys", "replicated"):
        if not isinstance(manifest[key], list):
            raise ValueError(f"{file}: {key!r} must be a list, got {type(manifest[key]).__name__}")
    return manifest


def _check_layouts(layouts: Any, file: Path) -> None:
    what = "'layouts' must be a list of {group, dtype, params}, params a list of {names, shape}"
    if not isinstance(layouts, list) or not all(
            isinstance(ld, dict) and {"group", "dtype", "params"} <= ld.keys() for ld in layouts):
        raise ValueError(f"{file}: {what}")
    for ld in layouts:
        if not isinstance(ld["dtype"], str) or ld["dtype"] not in FLOAT_DTYPES:
            raise ValueError(f"{file}: layout dtype {str(ld['dtype'])[:100]!r} is not one of the floating dtypes "
                             f"{', '.join(FLOAT_DTYPES)}")
        if not _is_int(ld["group"]) or not isinstance(ld["params"], list):
            raise ValueError(f"{file}: {what}; got group {ld['group']!r}, dtype {ld['dtype']!r}")
        numel = 0
        for p in ld["params"]:
            ok = isinstance(p, dict) and isinstance(p.get("names"), list) and p["names"] and all(
                isinstance(n, str) for n in p["names"]) and isinstance(p.get("shape"), list) and all(
                _is_int(d, 0, MAX_ELEMENTS) for d in p["shape"]) and len(p["shape"]) <= 64
            if not ok:
                raise ValueError(f"{file}: {what}; got the parameter entry {str(p)[:200]}")
            numel += math.prod(p["shape"])  # exact (Python integers), so a forged shape cannot overflow it
            if numel > MAX_ELEMENTS:
                raise ValueError(f"{file}: the layout of group {ld['group']} has more than {MAX_ELEMENTS} elements")


def _layouts(manifest: dict) -> list[FlatLayout]:
    n = manifest["zero"]["world_size"]
    return [
        FlatLayout.build(ld["group"], FLOAT_DTYPES[ld["dtype"]],
                         [(tuple(p["names"]), tuple(p["shape"])) for p in ld["params"]], n)
        for ld in manifest["layouts"]
    ]


def read_shard(path: str | os.PathLike, manifest: dict, rank: int) -> dict:
    """Rank `rank`'s shard, after its size and SHA-256 match the manifest and its slices match the layout.

    The file must be a regular file; at most the manifest's size + 1 bytes are read. Anything wrong with it is a
    ValueError naming the file (FileNotFoundError when it is missing)."""
    entry = next((e for e in manifest["files"] if e["rank"] == rank), None)
    if entry is None:
        raise ValueError(f"the manifest has no shard entry for rank {rank}")
    file = resolve(path) / entry["file"]
    layouts = _layouts(manifest)
    holds = sorted({name for lay in layouts for name in lay.params_in(*lay.owned_range(rank))})
    try:
        data = files.read_regular(file, entry["bytes"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: shard of rank {rank} is missing; it holds slices of {holds}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry["bytes"] or digest != entry["sha256"]:
        size = f"{len(data)} bytes" if len(data) <= entry["bytes"] else f"more than {entry['bytes']} bytes"
        raise ValueError(
            f"{file}: corrupt shard ({size}, sha256 {digest[:16]}..., the manifest says {entry['bytes']} "
            f"bytes, sha256 {entry['sha256'][:16]}...); it holds the slices of parameters {holds}"
        )
    try:
        shard = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file whose checksum matches a forged manifest may hold anything
        raise ValueError(f"{file}: not a readable shard ({type(e).__name__}: {e})") from None
    _check_shard(shard, file, layouts)
    if shard["zero"]["rank"] != rank or shard["zero"]["world_size"] != manifest["zero"]["world_size"]:
        raise ValueError(f"{file}: written by rank {shard['zero']['rank']} of {shard['zero']['world_size']}, the "
                         f"manifest lists it as rank {rank} of {manifest['zero']['world_size']}")
    for i, lay in enumerate(layouts):
        owned = lay.owned_numel(rank)
        for what, t in [("master slice", shard["masters"][i])] + [
            (f"optimizer state {k!r}", v) for k, v in shard["state"][i].items() if _elementwise(v, lay.shard_numel)
        ]:
            if tuple(t.shape) != (owned,):
                first = lay.params_in(*lay.owned_range(rank)) or [s.name for s in lay.slots[:1]] or ["(none)"]
                raise ValueError(f"{file}: {what} of the flat buffer starting at parameter {first[0]!r} has shape "
                                 f"{tuple(t.shape)}, the layout needs ({owned},)")
    return shard


def _check_shard(shard: Any, file: Path, layouts: list[FlatLayout]) -> None:
    """The structure read_shard, _prepare_load and consolidate index into: a ValueError instead of a KeyError,
    IndexError or TypeError deep inside them."""
    n = len(layouts)
    zero = shard.get("zero") if isinstance(shard, dict) else None
    ok = (isinstance(zero, dict) and _is_int(zero.get("rank")) and _is_int(zero.get("world_size"), 1)
          and isinstance(shard.get("masters"), list) and len(shard["masters"]) == n
          and all(isinstance(t, Tensor) for t in shard["masters"])
          and isinstance(shard.get("state"), list) and len(shard["state"]) == n
          and all(isinstance(s, dict) for s in shard["state"])
          and isinstance(shard.get("param_groups"), list) and all(isinstance(g, dict) for g in shard["param_groups"])
          and isinstance(shard.get("replicated"), dict))
    if not ok:
        raise ValueError(f"{file}: not a ZeRO shard of this manifest (it needs 'zero' with an integer rank and "
                         f"world_size, {n} master slices, {n} optimizer states, 'param_groups' and 'replicated')")


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
    except Exception as e:  # noqa: BLE001 - whatever went wrong (IndexError, MemoryError, ...), every rank must
        error = e  # reach the all_gather below, or the others wait there until the timeout
    outcomes = opt.group.all_gather_object((None if error is None else f"{type(error).__name__}: {error}", digest))
    failed = [(r, message) for r, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        if isinstance(error, (OSError, ValueError, RuntimeError)):
            raise error  # the project's own errors, raised as they are on the rank that found them
        if error is not None:
            raise RuntimeError(f"load_checkpoint({str(path)!r}) failed on rank {opt.rank} of {opt.world_size}, so "
                               f"no rank loaded it: {type(error).__name__}: {error}") from error
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
    digest = hashlib.sha256(files.read_regular(directory / MANIFEST, None)).hexdigest()
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
