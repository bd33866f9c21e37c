"""Sharded ZeRO checkpoints: save at N ranks, load at M, continue bitwise; consolidate; corruption; mismatches.

Resharding is checked by a round trip through another world size, against a run that never stopped:
    uninterrupted   3 ranks: 10 steps (a checkpoint written after step 5 on the way)
    interrupted     3 ranks: the step-5 checkpoint -> 2 ranks: load, save -> 3 ranks: load, 5 more steps
The two must end bitwise equal (model, master weights, optimizer state): 3 -> 2 and 2 -> 3 both lost nothing.
The same for 1 -> 4 -> 1 (the 4 -> 1 of the issue) with bf16 compute and offload on one rank.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conformance.launch import spawn
from conformance.tolerance import allclose, assert_equivalent, combine
from optimized.zero import ZeroOptimizer, commit, consolidate, files
from optimized.zero import checkpoint as zero_checkpoint
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.training import accumulate_gradients, split_batch
from tests.optimized.test_zero import ADAMW, CFG, FROZEN, _model, _param_groups

GLOBAL_BATCH = 12  # divides by 1, 2, 3 and 4 ranks


def _optimizer(model: GPT, stage: int, **kwargs) -> ZeroOptimizer:
    return ZeroOptimizer(model, torch.optim.AdamW, stage=stage, param_groups=_param_groups(model), bucket_cap_mb=0.01,
                         **kwargs, **ADAMW)


def _train(model: GPT, opt: ZeroOptimizer, steps: range) -> list[float]:
    batches = make_batches(10, batch_size=GLOBAL_BATCH, seq_len=12, vocab_size=CFG["vocab_size"], seed=1)
    losses = []
    for step in steps:
        idx, targets = batches[step]
        local = (idx.chunk(opt.world_size)[opt.rank], targets.chunk(opt.world_size)[opt.rank])
        losses.append(float(accumulate_gradients(model, split_batch(local, 1))))
        opt.clip_grad_norm_(1.0)
        opt.step()
    return losses


def _uninterrupted(root: str, stage: int, kwargs: dict) -> list[float]:
    model = _model()
    opt = _optimizer(model, stage, **kwargs)
    losses = _train(model, opt, range(5))
    opt.save_checkpoint(f"{root}/step5")
    losses += _train(model, opt, range(5, 10))
    opt.save_checkpoint(f"{root}/uninterrupted")
    return losses


def _reshard(root: str, src: str, dst: str, stage: int, kwargs: dict) -> None:
    model = _model()
    opt = _optimizer(model, stage, **kwargs)
    opt.load_checkpoint(f"{root}/{src}")
    opt.save_checkpoint(f"{root}/{dst}")


def _resume(root: str, src: str, stage: int, kwargs: dict) -> list[float]:
    model = _model()
    opt = _optimizer(model, stage, **kwargs)
    opt.load_checkpoint(f"{root}/{src}")
    losses = _train(model, opt, range(5, 10))
    opt.save_checkpoint(f"{root}/resumed")
    return losses


def _one_thread(fn, *args):
    """Run fn in this process as a single rank would: one thread, so its arithmetic is the ranks' arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _assert_bitwise(a: str, b: str) -> None:
    (model_a, opt_a), (model_b, opt_b) = consolidate(a), consolidate(b)
    assert list(model_a) == list(model_b)
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_b["state"][i][k]), (i, k)


def test_save_at_3_load_at_2_and_back_continues_bitwise(tmp_path):
    root, stage, kwargs = str(tmp_path), 3, {}
    uninterrupted = spawn(_uninterrupted, 3, root, stage, kwargs, timeout=120)[0]
    spawn(_reshard, 2, root, "step5", "two_ranks", stage, kwargs, timeout=120)
    resumed = spawn(_resume, 3, root, "two_ranks", stage, kwargs, timeout=120)[0]
    assert resumed == uninterrupted[5:]
    _assert_bitwise(f"{root}/uninterrupted", f"{root}/resumed")
    assert json.loads((tmp_path / "two_ranks" / "manifest.json").read_text())["zero"]["world_size"] == 2


def test_save_at_4_load_at_1_continues_bitwise(tmp_path):
    """1 -> 4 -> 1, bf16 compute with offloaded fp32 masters, stage 2; the single rank runs without a group."""
    root, stage, kwargs = str(tmp_path), 2, {"param_dtype": torch.bfloat16, "offload": True}
    uninterrupted = _one_thread(_uninterrupted, root, stage, kwargs)
    spawn(_reshard, 4, root, "step5", "four_ranks", stage, kwargs, timeout=120)
    resumed = _one_thread(_resume, root, "four_ranks", stage, kwargs)
    assert resumed == uninterrupted[5:]
    _assert_bitwise(f"{root}/uninterrupted", f"{root}/resumed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Stage 1 on one rank, 5 steps: a checkpoint to consolidate, corrupt and load into the wrong optimizer."""
    root = tmp_path_factory.mktemp("zero-checkpoint")
    _one_thread(_uninterrupted, str(root), 1, {})
    return root / "step5"


def test_consolidate_equals_the_unsharded_reference(checkpoint):
    model_state, opt_state = consolidate(checkpoint)
    ref = _model()
    ref_opt = torch.optim.AdamW(_param_groups(ref), **ADAMW)
    batches = make_batches(10, batch_size=GLOBAL_BATCH, seq_len=12, vocab_size=CFG["vocab_size"], seed=1)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    for idx, targets in batches[:5]:
        ref_opt.zero_grad()
        accumulate_gradients(ref, [(idx, targets)])
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        ref_opt.step()
    ref_state, ref_opt_state = ref.state_dict(), ref_opt.state_dict()
    assert list(model_state) == list(ref_state)  # every key, the tied lm_head.weight and the frozen bias included
    assert model_state["lm_head.weight"] is model_state["wte.weight"]
    parts = [allclose(model_state[k], ref_state[k], name=k) for k in ref_state]
    assert opt_state["param_groups"] == ref_opt_state["param_groups"]
    for i, state in ref_opt_state["state"].items():
        assert opt_state["state"][i].keys() == state.keys()
        parts += [allclose(opt_state["state"][i][k], v, name=f"state {i} {k}") for k, v in state.items()]
    assert_equivalent(combine("consolidated vs unsharded AdamW, 5 steps", parts))
    plain = torch.optim.AdamW(_param_groups(ref), **ADAMW)
    plain.load_state_dict(opt_state)  # a plain torch optimizer takes the consolidated state as it is
    ref.load_state_dict(model_state)


def test_a_flipped_byte_is_detected(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    shard = bad / "shard-00000-of-00001.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00000-of-00001\.pt: corrupt shard .*wte\.weight"):
        consolidate(bad)
    model = _model()
    opt = _optimizer(model, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"shard-00000-of-00001\.pt: corrupt shard"):
        opt.load_checkpoint(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing changed


def test_a_missing_manifest_or_shard_is_named(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        consolidate(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    (partial / "shard-00000-of-00001.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00000-of-00001\.pt.*missing"):
        consolidate(partial)


def test_another_model_stage_or_dtype_is_refused_before_any_change(checkpoint):
    other = GPT(GPTConfig(**{**CFG, "n_embd": 30, "n_head": 5}))
    other.get_parameter(FROZEN).requires_grad_(False)
    opt = _optimizer(other, 1)
    with pytest.raises(ValueError, match=r"parameter 'wte\.weight' was saved with shape \[37, 25\]"):
        opt.load_checkpoint(checkpoint)
    model = _model()
    with pytest.raises(ValueError, match="stage=1, this optimizer has stage=2"):
        _optimizer(model, 2).load_checkpoint(checkpoint)
    model = _model()
    with pytest.raises(ValueError, match="param_dtype=None, this optimizer has param_dtype='bfloat16'"):
        _optimizer(model, 1, param_dtype=torch.bfloat16).load_checkpoint(checkpoint)
    model = GPT(GPTConfig(**CFG))  # nothing frozen: q_proj.bias is trainable here and not in the checkpoint
    with pytest.raises(ValueError, match=r"trainable parameter 'blocks\.0\.attn\.q_proj\.bias' .* not in"):
        _optimizer(model, 1).load_checkpoint(checkpoint)


def test_state_dict_round_trip_at_the_same_world_size():
    model = _model()
    opt = _optimizer(model, 2, param_dtype=torch.bfloat16)
    _train(model, opt, range(3))
    saved = opt.state_dict()
    continued = _train(model, opt, range(3, 6))
    params = [p.detach().clone() for p in model.parameters()]
    model2 = _model()
    opt2 = _optimizer(model2, 2, param_dtype=torch.bfloat16)
    opt2.load_state_dict(saved)
    assert _train(model2, opt2, range(3, 6)) == continued
    assert all(torch.equal(a, b) for a, b in zip(params, model2.parameters(), strict=True))


# --- the file system working against the checkpoint -----------------------------------------------------------------


def test_an_interrupted_save_falls_back_to_the_newest_set_aside_copy_by_commit(tmp_path):
    """Several `.NAME.previous-*` copies (saves cut off between their two renames): resolve() takes the one with
    the highest commit, whatever their random suffixes sort as. Before, it took the last by name: a rollback."""
    model = GPT(GPTConfig(**{**CFG, "n_layer": 1}))
    opt = ZeroOptimizer(model, torch.optim.SGD, stage=1, lr=0.1)
    copies = []
    for suffix in ("zzzz", "mmmm", "aaaa"):  # oldest sorts last
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        opt.save_checkpoint(tmp_path / "ckpt")
        copies.append(tmp_path / f".ckpt.previous-{suffix}")
        shutil.copytree(tmp_path / "ckpt", copies[-1])
    assert [zero_checkpoint.read_manifest(c)["commit"] for c in copies] == [1, 2, 3]
    shutil.rmtree(tmp_path / "ckpt")
    (tmp_path / "latest").unlink()
    assert commit.resolve(tmp_path / "ckpt") == copies[-1]
    shutil.rmtree(copies[-1])
    assert commit.resolve(tmp_path / "ckpt") == copies[1]


def test_a_planted_symlink_cannot_redirect_a_write_outside_the_directory(tmp_path):
    """The temporary name was predictable (.NAME.tmp-PID) and opened following symlinks."""
    inside, outside = tmp_path / "ckpt", tmp_path / "outside.txt"
    inside.mkdir()
    outside.write_bytes(b"precious")
    for name in ("x", "latest"):
        os.symlink(outside, inside / f".{name}.tmp-{os.getpid()}")
        files.atomic_write(inside / name, b"new bytes")
        assert (inside / name).read_bytes() == b"new bytes" and not (inside / name).is_symlink()
    assert outside.read_bytes() == b"precious"
    assert not [f for f in inside.iterdir() if ".tmp-" in f.name and not f.is_symlink()]  # no temporaries left


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "symlink to a copy", "longer", "fifo manifest"])
def test_a_shard_that_is_not_a_regular_file_of_the_stated_size_is_refused(checkpoint, tmp_path, kind):
    """A FIFO hung the read and a link to /dev/zero filled memory: only regular files are read, and only as far as
    the manifest's size + 1."""
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    shard = bad / "shard-00000-of-00001.pt"
    if kind == "longer":
        with open(shard, "ab") as f:
            f.write(b"\0" * 1000)
        match = r"corrupt shard \(more than \d+ bytes"
    elif kind == "fifo manifest":
        (bad / "manifest.json").unlink()
        os.mkfifo(bad / "manifest.json")
        shard, match = bad / "manifest.json", r"manifest\.json: not a regular file \(a FIFO\)"
    else:
        copy = tmp_path / "copy.pt"
        shutil.copy(shard, copy)
        shard.unlink()
        if kind == "fifo":
            os.mkfifo(shard)
        else:
            os.symlink("/dev/zero" if "zero" in kind else copy, shard)
        match = r"shard-00000-of-00001\.pt: not a regular file \(a " + ("FIFO" if kind == "fifo" else "symlink")
    with pytest.raises(ValueError, match=match):
        consolidate(bad)
    model = _model()
    with pytest.raises(ValueError, match=match):
        _optimizer(model, 1).load_checkpoint(bad)
