"""ZeroOptimizer under faults: inf/NaN gradients, fp16 loss scaling (own and torch.amp.GradScaler), checkpoints
written while a rank dies, a corrupt shard on one rank, malformed manifests, released ZeRO-3 parameters read
outside a gather, ranks holding different models, and torch's clip_grad_norm_ on sharded gradients.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conformance.launch import RankError, spawn
from optimized.data_parallel import DataParallel
from optimized.mixed_precision import MasterWeightOptimizer
from optimized.zero import ZeroOptimizer, checkpoint, commit, files
from optimized.zero.gather import ReleasedParameterError
from reference.data import make_batches
from reference.model import GPT, GPTConfig

CFG = dict(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=10, seed=0)
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
CONFIGS = [dict(stage=1), dict(stage=2), dict(stage=3), dict(stage=2, offload=True),
           dict(stage=3, offload=True, param_dtype=torch.bfloat16)]


def _model() -> GPT:
    return GPT(GPTConfig(**CFG))


def _local(batch, opt):
    idx, targets = batch
    return idx.chunk(opt.world_size)[opt.rank], targets.chunk(opt.world_size)[opt.rank]


def _params(model, opt) -> list[torch.Tensor]:
    with opt.gathered_parameters():
        return [p.detach().float().clone() for p in model.parameters()]


# --- inf / NaN gradients --------------------------------------------------------------------------------------------


def _inf_worker(configs: list[dict]) -> list[dict]:
    return [_inf_run(config) for config in configs]


def _inf_run(config: dict) -> dict:
    """Steps on batches 0, 1, 2 where step 1 has an inf gradient on rank 1 only, against steps on 0, 2."""
    batches = make_batches(3, batch_size=4, seq_len=6, vocab_size=CFG["vocab_size"], seed=3)
    out = {}
    for poisoned in (True, False):
        model = _model()
        opt = ZeroOptimizer(model, torch.optim.AdamW, bucket_cap_mb=0.001, **config, **ADAMW)
        skipped, unchanged = [], None
        for step, batch in enumerate(batches):
            if step == 1 and not poisoned:
                continue
            loss = model(*_local(batch, opt))[1]
            if step == 1 and opt.rank == 1:
                loss = loss * float("inf")
            before = _params(model, opt)
            state_before = copy.deepcopy(opt.optimizer.state_dict()["state"])
            loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            skipped.append(opt.last_step_skipped)
            if step == 1:
                after = opt.optimizer.state_dict()["state"]
                unchanged = all(torch.equal(a, b) for a, b in zip(before, _params(model, opt), strict=True)) and all(
                    torch.equal(v, after[i][k]) for i, s in state_before.items() for k, v in s.items())
        out["poisoned" if poisoned else "clean"] = (_params(model, opt), skipped, unchanged, opt.skipped_steps)
    return out


def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank():
    """Every stage, offload, bf16: the inf step changes nothing on any rank and the run then equals a run that
    never saw it, bitwise."""
    per_rank = spawn(_inf_worker, 2, CONFIGS, timeout=120)
    for c, config in enumerate(CONFIGS):
        for rank, result in enumerate(r[c] for r in per_rank):
            params, skipped, unchanged, count = result["poisoned"]
            clean = result["clean"][0]
            assert skipped == [False, True, False] and count == 1, (config, rank)
            assert unchanged, (config, rank)
            assert all(torch.equal(a, b) for a, b in zip(params, clean, strict=True)), (config, rank)


def _accumulation_worker() -> list[list[torch.Tensor]]:
    """Stage 1, two micro-batches per step: reduced after each backward, or only after the second (no_sync)."""
    batches = make_batches(4, batch_size=4, seq_len=6, vocab_size=CFG["vocab_size"], seed=4)
    out = []
    for use_no_sync in (False, True):
        model = _model()
        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
        for first, second in zip(batches[::2], batches[1::2], strict=True):
            with opt.no_sync() if use_no_sync else contextlib.nullcontext():
                (model(*_local(first, opt))[1] / 2).backward()
            (model(*_local(second, opt))[1] / 2).backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
        out.append(_params(model, opt))
    return out


def test_stage1_accumulation_with_and_without_no_sync_agree():
    for without, with_no_sync in spawn(_accumulation_worker, 2, timeout=60):
        for a, b in zip(without, with_no_sync, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_sync_is_refused_where_gradients_are_sharded():
    opt = ZeroOptimizer(_model(), torch.optim.AdamW, stage=2, **ADAMW)
    with pytest.raises(RuntimeError, match="no_sync\\(\\) is for stage 1"), opt.no_sync():
        pass


# --- fp16 loss scaling ----------------------------------------------------------------------------------------------


def _fp16_run(kind: str, overflow_at: int) -> tuple[list[torch.Tensor], list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():  # fp16-representable start: both keep the same fp32 masters
        for p in model.parameters():
            p.copy_(p.half())
    data = [(torch.randn(5, 6), torch.randn(5, 3)) for _ in range(4)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) if "scaler" in kind else None
    if kind.startswith("zero"):
        opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, param_dtype=torch.float16,
                            loss_scale=None if scaler else "dynamic", init_scale=2.0**8, growth_interval=2, **ADAMW)
        masters = lambda: [m.detach().clone() for g in opt.param_groups for m in g["params"]]  # noqa: E731
        scale = opt.scale_loss
    else:
        model.half()
        opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, dtype=torch.float16,
                                    loss_scale=None if scaler else "dynamic", init_scale=2.0**8, growth_interval=2,
                                    **ADAMW)
        masters = lambda: [torch.cat([m.detach().reshape(-1) for m in opt.master_params()])]  # noqa: E731
        scale = opt.scale_loss
    scales = []
    for step, (x, y) in enumerate(data):
        loss = ((model(x.half()).float() - y) ** 2).mean() * (float("inf") if step == overflow_at else 1.0)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            scale(loss).backward()
            opt.step()
            scales.append(opt.loss_scale)
        opt.zero_grad()
    return [torch.cat([m.reshape(-1) for m in masters()])], scales


@pytest.mark.parametrize("with_grad_scaler", [False, True])
def test_fp16_zero_trains_with_dynamic_loss_scaling_like_master_weights(with_grad_scaler):
    """fp16 ZeRO-2 (one process) and MasterWeightOptimizer, both with torch.amp.GradScaler or both with their own
    dynamic scale: the same scales (an overflow at step 1 backs off, then growth) and the same fp32 masters."""
    suffix = "+scaler" if with_grad_scaler else ""
    zero, zero_scales = _fp16_run("zero" + suffix, overflow_at=1)
    mwo, mwo_scales = _fp16_run("mwo" + suffix, overflow_at=1)
    assert zero_scales == mwo_scales == [256.0, 128.0, 128.0, 256.0]
    torch.testing.assert_close(zero[0], mwo[0], rtol=1e-6, atol=1e-7)


def _grad_scaler_worker() -> tuple[list[float], list[torch.Tensor]]:
    """2 ranks, GradScaler: an overflow on rank 1 only must back off the scale on both ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=3, param_dtype=torch.float16, **ADAMW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    scales = []
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step * 10 + opt.rank))
        loss = model(x.half()).float().pow(2).mean()
        if step == 1 and opt.rank == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return scales, _params(model, opt)


def test_grad_scaler_skips_and_backs_off_on_every_rank():
    (scales0, params0), (scales1, params1) = spawn(_grad_scaler_worker, 2, timeout=60)
    assert scales0 == scales1 == [256.0, 128.0, 128.0]
    assert all(torch.equal(a, b) for a, b in zip(params0, params1, strict=True))


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _train_and_save(root: str, steps: int, load: bool, die: str | None) -> list[torch.Tensor]:
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, bucket_cap_mb=0.001, **ADAMW)
    if load:
        opt.load_checkpoint(root)  # through `latest`
    for batch in make_batches(steps, batch_size=4, seq_len=6, vocab_size=CFG["vocab_size"], seed=5):
        model(*_local(batch, opt))[1].backward()
        opt.step()
    if die is not None and opt.rank == 1:
        write = files.atomic_write

        def dying(path, data):
            write(path, data[: len(data) // 2])  # half a shard on disk, then the rank is gone
            if die == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)

        files.atomic_write = dying
    opt.save_checkpoint(os.path.join(root, "ckpt"))
    return _params(model, opt)


def _load(root: str) -> list[torch.Tensor]:
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, bucket_cap_mb=0.001, **ADAMW)
    opt.load_checkpoint(root)
    return _params(model, opt)


@pytest.mark.parametrize("die", ["os._exit", "SIGKILL"])
def test_a_rank_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, die):
    saved = spawn(_train_and_save, 2, str(tmp_path), 2, False, None, timeout=60)[0]
    with pytest.raises(RankError):
        spawn(_train_and_save, 2, str(tmp_path), 1, True, die, timeout=60)
    for loaded in spawn(_load, 2, str(tmp_path), timeout=60):
        assert all(torch.equal(a, b) for a, b in zip(loaded, saved, strict=True))
    assert (tmp_path / "latest").read_text() == "ckpt"


def _try_load(root: str, errors: tuple[type[BaseException], ...]) -> tuple[str, bool]:
    """A fresh model and optimizer, moved off the saved values, load root/ckpt: (the error of `errors` raised, or
    "loaded"; whether the parameters are untouched)."""
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = _params(model, opt)
    try:
        opt.load_checkpoint(os.path.join(root, "ckpt"))
    except errors as e:
        message = f"{type(e).__name__}: {e}"
    else:
        message = "loaded"
    return message, all(torch.equal(a, b) for a, b in zip(before, _params(model, opt), strict=True))


def _corrupt_worker(root: str) -> tuple[str, bool]:
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    opt.save_checkpoint(os.path.join(root, "ckpt"))
    opt.barrier()
    if opt.rank == 0:
        shard = Path(root) / "ckpt" / checkpoint.shard_file(1, 2)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    opt.barrier()
    return _try_load(root, (RuntimeError, ValueError))


def test_a_bad_shard_on_one_rank_makes_every_rank_raise(tmp_path):
    (m0, same0), (m1, same1) = spawn(_corrupt_worker, 2, str(tmp_path), timeout=60)
    assert m1.startswith("ValueError") and "corrupt shard" in m1  # rank 1 read its own slice from shard 1
    assert m0.startswith("RuntimeError") and "failed on rank 1" in m0 and "no rank loaded it" in m0
    assert same0 and same1


def _load_raising_worker(root: str, error: str) -> tuple[str, bool]:
    """Rank 1's shard read raises `error` (as a forged shard can: IndexError, AttributeError, MemoryError)."""
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    opt.save_checkpoint(os.path.join(root, "ckpt"))
    if opt.rank == 1:
        def forged(*args, **kwargs):
            raise getattr(builtins, error)("forged shard")

        checkpoint.read_shard = forged
    return _try_load(root, (RuntimeError,))  # anything else escapes: the test fails with it



@pytest.mark.parametrize("error", ["IndexError", "AttributeError", "MemoryError"])
def test_any_exception_on_one_rank_during_load_makes_every_rank_raise(tmp_path, error):
    """Not only the expected types: before, these escaped on rank 1 and left rank 0 waiting in the collective."""
    (m0, same0), (m1, same1) = spawn(_load_raising_worker, 2, str(tmp_path), error, timeout=60)
    for message in (m0, m1):
        assert message.startswith("RuntimeError") and "failed on rank 1" in message, message
        assert "no rank loaded it" in message and f"{error}: forged shard" in message, message
    assert same0 and same1


def _save_raising_worker(root: str) -> tuple[str, list[torch.Tensor]]:
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    opt.save_checkpoint(os.path.join(root, "ckpt"))
    saved = _params(model, opt)
    for batch in make_batches(1, batch_size=4, seq_len=6, vocab_size=CFG["vocab_size"], seed=5):
        model(*_local(batch, opt))[1].backward()
        opt.step()
    if opt.rank == 1:
        def full(path, data):
            raise MemoryError("no memory for the shard")

        files.atomic_write = full
    try:
        opt.save_checkpoint(os.path.join(root, "ckpt"))
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}", saved
    return "saved", saved


def _load_stage1(root: str) -> list[torch.Tensor]:
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    opt.load_checkpoint(os.path.join(root, "ckpt"))
    return _params(model, opt)


def test_any_exception_on_one_rank_during_save_makes_every_rank_raise(tmp_path):
    results = spawn(_save_raising_worker, 2, str(tmp_path), timeout=60)
    for message, _ in results:
        assert "failed on rank 1" in message and "MemoryError: no memory for the shard" in message, message
        assert "previous checkpoint (if any) is untouched" in message
    for loaded, (_, saved) in zip(spawn(_load_stage1, 2, str(tmp_path), timeout=60), results, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(loaded, saved, strict=True))  # the previous one, intact
    assert not list(tmp_path.glob(".ckpt.staging-*")) and not (tmp_path / ".ckpt.lock").exists()


def _save_one(root: Path, steps: int = 0) -> ZeroOptimizer:
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    for batch in make_batches(steps, batch_size=2, seq_len=6, vocab_size=CFG["vocab_size"], seed=5) if steps else []:
        model(*batch)[1].backward()
        opt.step()
    opt.save_checkpoint(root / "ckpt")
    return opt


def test_a_second_writer_to_one_name_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    """Before, two jobs saving to one name removed each other's staging and published a manifest-only checkpoint.
    Now the second is refused while the first holds the lock; a lock left by a dead process on this host (a job
    killed mid-save and restarted) is taken over, and the lock of another host never is."""
    _save_one(tmp_path)
    before = (tmp_path / "ckpt" / "manifest.json").read_bytes()
    lock = tmp_path / ".ckpt.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # a live writer: this very process
    with pytest.raises(RuntimeError, match=r"another save to .*ckpt is in progress .*nothing was written"):
        _save_one(tmp_path, steps=1)
    assert (tmp_path / "ckpt" / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".ckpt.staging-*")) and lock.exists()  # someone else's lock: left alone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} other-host-{socket.gethostname()}")  # gone here, but whose host we cannot see
    with pytest.raises(RuntimeError, match=r"another save to .*ckpt is in progress"):
        _save_one(tmp_path, steps=1)
    lock.write_text(f"{dead.pid} {socket.gethostname()}")  # gone, on this host: a cut-off save
    (tmp_path / ".ckpt.staging-cutoff").mkdir()  # what a save cut off before publishing leaves
    _save_one(tmp_path, steps=1)
    assert not lock.exists() and (tmp_path / "ckpt" / "manifest.json").read_bytes() != before
    assert not list(tmp_path.glob(".ckpt.lock*")) and not list(tmp_path.glob(".ckpt.staging-*"))


def test_a_full_disk_while_writing_latest_says_the_checkpoint_was_published(tmp_path, monkeypatch):
    write = files.atomic_write

    def no_space_for_latest(path, data):
        if path.name == commit.LATEST:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(files, "atomic_write", no_space_for_latest)
    with pytest.raises(RuntimeError, match=r"ckpt was published \(commit 1, complete and loadable by its name\), "
                                           r"but .*latest could not be updated .*No space left"):
        _save_one(tmp_path)
    assert checkpoint.read_manifest(tmp_path / "ckpt")["commit"] == 1
    opt = ZeroOptimizer(_model(), torch.optim.AdamW, stage=1, **ADAMW)
    opt.load_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / ".ckpt.lock").exists()


@pytest.fixture(scope="module")
def one_rank_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-faults")
    model = _model()
    ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW).save_checkpoint(root / "ckpt")
    return root / "ckpt"


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["files"][0].update(file="../elsewhere.pt"), "'../elsewhere.pt' must be a plain file name"),
    (lambda m: m["zero"].update(world_size=0), "world_size must be an integer >= 1, got 0"),
    (lambda m: m["zero"].update(world_size=3), r"world_size is 3 but the shard entries are for ranks \[0\] "
                                               r"\(rank 1 has no shard\)"),
    (lambda m: m.pop("zero"), "manifest has no 'zero' section"),
    (lambda m: m["files"][0].pop("sha256"), "has no 'sha256'"),
])
def test_a_malformed_manifest_is_named(one_rank_checkpoint, tmp_path, edit, match):
    bad = tmp_path / "bad"
    shutil.copytree(one_rank_checkpoint, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=1, **ADAMW)
    with pytest.raises(ValueError, match=match):
        opt.load_checkpoint(bad)
    with pytest.raises(ValueError, match=match):
        checkpoint.consolidate(bad)


# --- released parameters and sharded gradients ----------------------------------------------------------------------


def test_released_zero3_parameters_raise_a_clear_error():
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=3, **ADAMW)
    p = model.wte.weight
    assert "released by ZeRO-3" in repr(p) and tuple(p.shape) == (23, 10) and p.requires_grad
    for use in (lambda: p.sum(), lambda: p.data, lambda: copy.deepcopy(model), lambda: model.state_dict(),
                lambda: torch.save(model.state_dict(keep_vars=True), os.devnull), lambda: p + 1):
        with pytest.raises(ReleasedParameterError, match=r"'wte\.weight' is released .*gathered_parameters"):
            use()
    with opt.gathered_parameters():
        state = model.state_dict()
        twin = copy.deepcopy(model)
        assert torch.equal(state["wte.weight"], twin.wte.weight)
    assert GPT(GPTConfig(**CFG)).load_state_dict(state, strict=True)  # a real, loadable state dict


class _External(nn.Module):
    """A parameter-free parent whose forward reads its child's weight without calling the child."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.child = nn.Linear(4, 3)

    def forward(self, x):
        return nn.functional.linear(x, self.child.weight, self.child.bias)


def test_a_parameter_used_outside_its_module_needs_registration_and_then_trains():
    x = torch.randn(5, 4)
    reference = _External()
    reference(x).square().sum().backward()
    model = _External()
    opt = ZeroOptimizer(model, torch.optim.SGD, stage=3, lr=0.1)
    with pytest.raises(ReleasedParameterError, match=r"'child.weight' .*register_external_parameter"):
        model(x)
    opt.register_external_parameter(model, model.child.weight)
    opt.register_external_parameter(model, model.child.bias)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    with opt.gathered_parameters():
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_clip_grad_norm_on_sharded_gradients_raises(stage):
    model = _model()
    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=stage, **ADAMW)
    batches = make_batches(2, batch_size=2, seq_len=6, vocab_size=CFG["vocab_size"], seed=0)
    for batch in batches:  # twice: the stand-in .grad must not break the next backward
        model(*batch)[1].backward()
    with pytest.raises(RuntimeError, match=r"ZeroOptimizer.clip_grad_norm_"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert float(opt.clip_grad_norm_(1.0)) > 0
    opt.step()


# --- ranks that disagree --------------------------------------------------------------------------------------------


def _mismatch_worker(wrapper: str) -> str:
    width = 5 if dist.get_rank() == 1 else 4
    model = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
    try:
        if wrapper == "zero":
            ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3)
        else:
            DataParallel(model)
    except ValueError as e:
        return str(e)
    return "accepted"


@pytest.mark.parametrize("wrapper", ["zero", "dp"])
def test_ranks_holding_different_models_are_named_at_wrap(wrapper):
    for message in spawn(_mismatch_worker, 3, wrapper, timeout=60):
        assert "parameter 0 is '0.weight' shape (4, 3)" in message and "(5, 3)" in message
        assert "rank(s) [1] differ from rank 0" in message


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match="'wte.weight' is on the meta device"):
        ZeroOptimizer(model, torch.optim.AdamW, stage=1, lr=1e-3)
