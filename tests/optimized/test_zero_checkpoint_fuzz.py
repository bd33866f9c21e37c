"""Fuzzing read_manifest and read_shard: whatever is on disk (random bytes, a truncated file, a manifest with huge
numbers or the wrong types, a shard whose checksum was forged to match), only the module's own clear errors come
out (ValueError naming the file, FileNotFoundError for a missing shard), never an IndexError, KeyError,
TypeError, AttributeError or MemoryError from deep inside."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from optimized.zero import ZeroOptimizer
from optimized.zero import checkpoint as zc
from optimized.zero.commit import MANIFEST

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHARD = zc.shard_file(0, 1)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    root = tmp_path_factory.mktemp("fuzz")
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.save_checkpoint(root / "ckpt")
    return root / "ckpt"


def _copy(saved: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="zero-fuzz-")) / "ckpt"
    shutil.copytree(saved, out)
    return out


def _read_both(directory: Path) -> None:
    """read_manifest, then every shard: success or one of the module's own errors, with a message."""
    try:
        manifest = zc.read_manifest(directory)
        for rank in range(manifest["zero"]["world_size"]):
            zc.read_shard(directory, manifest, rank)
    except (ValueError, FileNotFoundError) as e:
        assert str(e), type(e)
    finally:
        shutil.rmtree(directory.parent, ignore_errors=True)


def _forge(directory: Path, data: bytes) -> None:
    """Write `data` as the shard and make the manifest's size and checksum match it (a forged checkpoint)."""
    (directory / SHARD).write_bytes(data)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (directory / MANIFEST).write_text(json.dumps(manifest))


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_manifest(saved, data):
    directory = _copy(saved)
    (directory / MANIFEST).write_bytes(data)
    _read_both(directory)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@SETTINGS
@given(choice=st.integers(min_value=0), value=json_values | st.sampled_from([2**63, -1, 10**30, 0, "float64x"]),
       delete=st.booleans())
def test_one_field_of_the_manifest_replaced_or_deleted(saved, choice, value, delete):
    directory = _copy(saved)
    manifest = json.loads((directory / MANIFEST).read_text())
    paths = [p for p in _paths(manifest) if p]
    where = paths[choice % len(paths)]
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    if delete:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    (directory / MANIFEST).write_text(json.dumps(manifest))
    _read_both(directory)


@SETTINGS
@given(cut=st.integers(min_value=0), forge=st.booleans())
def test_a_truncated_shard(saved, cut, forge):
    directory = _copy(saved)
    data = (directory / SHARD).read_bytes()
    data = data[: cut % len(data)]
    if forge:
        _forge(directory, data)
    else:
        (directory / SHARD).write_bytes(data)
    _read_both(directory)


shard_values = st.recursive(
    st.none() | st.integers(-5, 5) | st.text(max_size=4) | st.just(torch.zeros(3)) | st.just(torch.zeros(2, 2)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["zero", "rank", "world_size", "masters", "state", "param_groups", "replicated", "exp_avg", "step"]),
        inner, max_size=4),
    max_leaves=10,
)


@SETTINGS
@given(random=st.binary(max_size=200), structure=shard_values, use_structure=st.booleans())
def test_a_forged_shard_whose_checksum_matches(saved, random, structure, use_structure):
    directory = _copy(saved)
    if use_structure:
        buffer = io.BytesIO()
        torch.save(structure, buffer)
        random = buffer.getvalue()
    _forge(directory, random)
    _read_both(directory)
