"""Sharded ZeRO checkpoints: one file per rank plus a manifest; loadable at any world size; consolidated offline.

A checkpoint is a directory:
    manifest.json              format version, stage, param_dtype, optimizer class, world size, the flat layouts
                               (every parameter's names, shape, dtype, group and offset), the model's state_dict
                               keys, and for every shard file its SHA-256 and size
    shard-00000-of-00004.pt    rank 0's ZeroOptimizer.state_dict(): its master slices, the optimizer state of
    shard-00001-of-00004.pt    those slices, the hyperparameters, and (rank 0 only) the replicated tensors
    ...                        (frozen parameters, buffers)
Files are written to a temporary name and renamed (atomic on POSIX), the manifest last, after every shard is on
disk; they are read with torch.load(weights_only=True) after their checksum is verified.

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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimized.zero.partition import FlatLayout

MANIFEST = "manifest.json"
FORMAT = "pretrain-spec ZeRO checkpoint"


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(opt, path: str | os.PathLike) -> None:
    """Every rank writes its shard; rank 0 then writes the manifest with every shard's checksum."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = opt.state_dict()
    if opt.rank != 0:
        state["replicated"] = {}  # the same on every rank: saved once, by rank 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    name = shard_file(opt.rank, opt.world_size)
    _atomic_write(path / name, data)
    entries = opt.all_gather_object({"rank": opt.rank, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                     "bytes": len(data)})
    if opt.rank == 0:
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
        _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    opt.barrier()  # nobody returns (and, say, loads) before the manifest exists


def read_manifest(path: str | os.PathLike) -> dict:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no ZeRO checkpoint manifest (was save_checkpoint finished?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a valid manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} manifest")
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
    file = Path(path) / entry["file"]
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
    """Load into `opt` (any world size): check the manifest against the optimizer, read the old shards that hold
    this rank's new slices, re-slice, and load_state_dict."""
    manifest = read_manifest(path)
    source = str(Path(path) / MANIFEST)
    opt.check_compatible(manifest["zero"], manifest["layouts"], manifest["replicated"], source)
    old_layouts = _layouts(manifest)
    ranges = [lay.owned_range(opt.rank) for lay in opt.layouts()]
    needed = {0} | {q for old, (lo, hi) in zip(old_layouts, ranges, strict=True) for q, _, _ in old.pieces(lo, hi)}
    shards = {q: read_shard(path, manifest, q) for q in sorted(needed)}
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
    opt.load_state_dict({
        "zero": {**manifest["zero"], "world_size": opt.world_size, "rank": opt.rank},
        "layouts": manifest["layouts"],
        "group_params": manifest["group_params"],
        "state_dict_keys": manifest["state_dict_keys"],
        "masters": masters,
        "state": states,
        "param_groups": first["param_groups"],
        "replicated": first["replicated"],
    })


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
