"""The launcher: results in rank order, failures and hangs surface fast, nothing is left running."""

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conformance.launch import RankError, RankTimeout, spawn
from conformance.liveness import gone, hold_alive_lock, write_atomically
from tests.conformance.launch_faults import die_mid_collective, stop_mid_collective

ROOT = Path(__file__).resolve().parents[2]


def _rank_and_sum(offset):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item() + offset,
            "tensor": torch.full((2,), float(dist.get_rank()))}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_in_rank_order(world_size):
    results = spawn(_rank_and_sum, world_size, 0.5, timeout=60)
    expected_sum = sum(range(world_size)) + 0.5
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["world"] == world_size and r["sum"] == expected_sum for r in results)
    assert torch.equal(results[-1]["tensor"], torch.full((2,), float(world_size - 1)))


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # the other ranks would wait here forever for rank 1


def test_a_raising_rank_fails_the_call_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 of 3 raised") as info:
        spawn(_raise_on_rank_one, 3, timeout=60)
    assert "deliberate failure on rank 1" in str(info.value)
    assert "_raise_on_rank_one" in str(info.value)  # the traceback, not just the message
    assert time.monotonic() - start < 20


def _hang_on_rank(rank_to_hang, pid_dir):
    with open(os.path.join(pid_dir, str(dist.get_rank())), "w") as f:
        f.write(str(os.getpid()))
    if dist.get_rank() == rank_to_hang:
        time.sleep(3600)
    return dist.get_rank()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended; it only waits for its parent to read its exit status
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return not Path("/proc/self").exists()


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_a_hang_is_killed_at_the_timeout_and_named(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"rank\(s\) 2 of 3 did not finish within 8 s.*; rank\(s\) 0, 1 had returned"):
        spawn(_hang_on_rank, 3, 2, str(tmp_path), timeout=8)
    assert time.monotonic() - start < 20
    pids = [int(p.read_text()) for p in tmp_path.iterdir()]
    assert len(pids) == 3
    assert not _wait_gone(pids, 5), "rank processes left running"


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        spawn(_rank_and_sum, 0, 0.0)
    with pytest.raises(ValueError, match="backend must be 'gloo' or 'nccl'"):
        spawn(_rank_and_sum, 1, 0.0, backend="mpi")


def test_a_stopped_rank_is_named_alone_and_its_waiting_peers_apart():
    """Rank 1 is SIGSTOPped inside the collectives; ranks 0 and 2 wait for it in an all-reduce. The timeout names
    rank 1 as the one that stopped making progress, and 0 and 2 only as waiting on it."""
    start = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        spawn(stop_mid_collective, 3, 1, timeout=6)
    message = str(info.value)
    assert time.monotonic() - start < 20
    assert message.startswith("rank(s) 1 of 3 stopped making progress (rank 1: its process is stopped"), message
    assert "rank(s) 0, 2 were still running, waiting on them" in message, message


def test_world_size_beyond_the_cpu_cap_is_refused_before_anything_starts():
    from conformance.flags import MAX_CPU_RANKS

    start = time.monotonic()
    with pytest.raises(ValueError, match=f"world_size=1000 exceeds the {MAX_CPU_RANKS} gloo ranks"):
        spawn(_rank_and_sum, 1000, 0.0)
    with pytest.raises(ValueError, match=f"world_size={MAX_CPU_RANKS + 1} exceeds"):
        spawn(_rank_and_sum, MAX_CPU_RANKS + 1, 0.0)
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("timeout", [0, -1.0, math.inf, math.nan, True, "60", None, 1e300, 7 * 24 * 3600 + 1])
def test_a_timeout_that_cannot_end_a_hang_is_refused(timeout):
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0 .*got " + re.escape(
            repr(timeout))):
        spawn(_rank_and_sum, 1, 0.0, timeout=timeout)


def _sum_of(tensors):
    return float(sum(t.sum() for t in tensors))


def test_many_tensor_arguments_travel_to_every_rank():
    tensors = [torch.full((3,), float(i)) for i in range(2000)]
    assert spawn(_sum_of, 2, tensors, timeout=60) == [3.0 * sum(range(2000))] * 2


def _raise_on_rank_one_in_place():
    if dist.get_rank() == 1:
        raise ValueError("in-place failure on rank 1")
    return "fine"


def _as_if_under_torchrun():
    # The outer launcher made the group; with RANK/WORLD_SIZE set, spawn runs in place as under torchrun.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(dist.get_rank()), str(dist.get_world_size())
    first = spawn(_rank_and_sum, dist.get_world_size(), 0.0)
    try:
        spawn(_raise_on_rank_one_in_place, dist.get_world_size())
    except RankError as e:
        failure = str(e)
    else:
        failure = None
    after = spawn(_rank_and_sum, dist.get_world_size(), 1.0)  # the ranks are still in step
    return first[1]["sum"], failure, after[0]["sum"]


def test_in_place_ranks_fail_together_and_stay_in_step():
    for first_sum, failure, after_sum in spawn(_as_if_under_torchrun, 2, timeout=60):
        assert first_sum == 1.0 and after_sum == 2.0
        assert failure is not None and "rank 1 of 2 raised" in failure and "in-place failure on rank 1" in failure


# ---- faults: the rank that failed first is named, whatever killed it -------------------------------------------------


_DEATHS = {"exit": "died with exit code 3", "sigkill": "died: killed by signal SIGKILL",
           "segv": "died: killed by signal SIGSEGV"}


def test_a_killed_rank_is_named_as_the_cause_every_time():
    """20 trials, 3 ranks: the victim (each rank in turn) dies by os._exit, SIGKILL or a segfault while its peers
    wait in an all-reduce. The survivors fail too ("Connection reset/closed by peer"), and those failures are on
    disk first; the message must still open with the victim and list the survivors after it."""
    named = []
    for trial in range(20):
        victim, how = trial % 3, ("exit", "sigkill", "segv")[(trial // 3) % 3]  # every pair within 9 trials
        with pytest.raises(RankError) as info:
            spawn(die_mid_collective, 3, victim, how, timeout=60)
        message = str(info.value)
        first_line = message.splitlines()[0]
        named.append(first_line == f"rank {victim} of 3 {_DEATHS[how]}" + (
            " (exit code -9)" if how == "sigkill" else " (exit code -11)" if how == "segv" else ""))
        assert named[-1], (trial, how, message)
        survivors = [r for r in range(3) if r != victim]
        # Each survivor is accounted for after the cause: a consequence of the death, or killed by the launcher.
        assert all(f"then rank {r} raised" in message or "were killed" in message for r in survivors), message
    assert all(named)


def _exit_cleanly_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(0)
    return "rank 0 finished"


def test_a_rank_that_exits_without_a_result_is_a_rank_error():
    with pytest.raises(RankError, match="rank 1 of 2 exited with code 0 without returning a result") as info:
        spawn(_exit_cleanly_on_rank_one, 2, timeout=60)
    assert "rank(s) 0 had returned and were waiting for the others" in str(info.value)


def _return_at_once_on_rank_zero():
    pair = dist.new_group([1, 2])  # every rank takes part in creating a group
    if dist.get_rank() == 0:
        return "no collective"
    dist.barrier(group=pair)  # ranks 1 and 2 still talk after rank 0 has returned
    return "after a barrier"


def test_a_rank_that_returns_first_does_not_break_its_peers():
    """Rank 0 returns before its peers are done with their connections; it waits for them before it exits (its
    exit would close connections they still use: "Connection closed by peer" inside their init or barrier)."""
    for _ in range(2):  # the race it guards against is rare: seen once in about 30 runs of a 2-rank version
        assert spawn(_return_at_once_on_rank_zero, 3, timeout=60) == ["no collective"] + ["after a barrier"] * 2


def test_result_and_error_files_are_never_seen_half_written(tmp_path):
    """A reader polling the file while it is rewritten sees either no file or one whole version, never a prefix."""
    path = str(tmp_path / "error_0.json")
    size, versions, seen, stop = 4 << 20, b"abcdefgh", [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                with open(path, "rb") as f:
                    seen.append(f.read())
            except FileNotFoundError:
                pass

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for v in versions:
            write_atomically(path, lambda tmp, v=v: Path(tmp).write_bytes(bytes([v]) * size))
    finally:
        stop.set()
        thread.join()
    assert seen, "the reader never saw the file"
    assert all(len(s) == size and s == s[:1] * size for s in seen)


def _end_by(pid, seconds):
    """Reap child `pid`, SIGKILLing it if it has not ended within `seconds` (a test never hangs). True if it ended."""
    deadline = time.monotonic() + seconds
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return False
            time.sleep(0.01)
    except ChildProcessError:  # reaped already
        pass
    return True


def test_a_rank_is_gone_when_it_dies_even_if_a_process_it_forked_lives_on(tmp_path):
    """The liveness lock that tells a cause from its consequences: held while the rank lives, released when it dies,
    and not kept by a child the rank forked (a DataLoader worker outliving it)."""
    ready, end_rank, end_child = os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the "rank"
        try:
            hold_alive_lock(str(tmp_path), 1)
            if os.fork() == 0:  # its child, which inherits every descriptor
                os.read(end_child[0], 1)
                os._exit(0)
            os.write(ready[1], b"x")
            os.read(end_rank[0], 1)
        finally:
            os._exit(3)
    os.close(ready[1])  # the rank's end only: a rank that dies early gives EOF here, not a hang
    try:
        assert os.read(ready[0], 1) == b"x", "the rank did not start"
        assert not gone(str(tmp_path), 1), "a live rank must not look gone"
        assert not gone(str(tmp_path), 0), "a rank that never started must not look gone"
        os.write(end_rank[1], b"x")
        assert _end_by(pid, 30), "the rank did not end"
        assert gone(str(tmp_path), 1), "a dead rank must look gone while its forked child lives"
        (tmp_path / "result_1.pt").write_bytes(b"")
        assert not gone(str(tmp_path), 1), "a rank that returned a result has finished, not failed"
    finally:
        os.write(end_rank[1], b"x")
        os.write(end_child[1], b"x")  # the child (reparented when the rank ended) exits on this byte
        _end_by(pid, 10)
        for fd in (ready[0], *end_rank, *end_child):
            os.close(fd)


# ---- the caller killed: nothing outlives it --------------------------------------------------------------------------


_CALLER = """
import sys, threading, time
import multiprocessing.forkserver as fs, multiprocessing.resource_tracker as rt
from pathlib import Path
import conformance.launch
from conformance.launch import spawn
from tests.conformance import launch_faults

out, fn = sys.argv[1], getattr(launch_faults, sys.argv[2])
conformance.launch._FORKSERVER_PRELOAD = ["torch", "torch.distributed"]  # faster start; nothing here needs more

def report_helpers():
    while not (fs._forkserver._forkserver_pid and rt._resource_tracker._pid):
        time.sleep(0.05)
    Path(out, "helpers").write_text(f"{fs._forkserver._forkserver_pid} {rt._resource_tracker._pid}")

threading.Thread(target=report_helpers, daemon=True).start()
spawn(fn, 2, out, timeout=600)
"""


def _in_session(sid):
    """Live processes (not zombies) of session `sid`: everything the caller started, however deep."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("fn", ["report_and_block", "report_and_stop"], ids=["blocked", "one-stopped"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT], ids=["SIGTERM", "SIGKILL", "SIGINT"])
def test_a_killed_caller_leaves_no_process_and_no_temp_dir(tmp_path, request, sig, fn):
    """The caller is killed while rank 0 waits in an all-reduce for rank 1, which sleeps or is stopped (SIGSTOP: it
    can notice nothing). No rank, forkserver or resource tracker stays behind, nor the launcher's temp dir."""
    # The caller's TMPDIR must be short: multiprocessing puts the forkserver's socket there, and an AF_UNIX path
    # has at most 107 bytes (pytest's tmp_path under xdist is already close to that).
    out, tmp = tmp_path / "out", Path(tempfile.mkdtemp(prefix="launch-test-"))
    out.mkdir()
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    caller = subprocess.Popen([sys.executable, "-c", _CALLER, str(out), fn], cwd=ROOT, env=env,
                              start_new_session=True)  # its own session and process group: found and ended below

    def end_the_session():  # whatever the outcome, nothing of this test outlives it (SIGKILL ends stopped ones too)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(caller.pid, signal.SIGKILL)

    request.addfinalizer(end_the_session)
    try:
        deadline = time.monotonic() + 120
        names = ("rank0", "rank1", "helpers")
        while not all((out / n).exists() for n in names):
            assert caller.poll() is None, f"the caller ended early with {caller.returncode}"
            assert time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.1)
        time.sleep(0.2)  # rank 0 is inside its all-reduce
        ranks = [int((out / n).read_text()) for n in names[:2]]
        helpers = [int(p) for p in (out / "helpers").read_text().split()]
        assert list(tmp.glob("pretrain-spec-launch-*")), "the launcher's temp dir should exist while it runs"
        caller.send_signal(sig)
        assert caller.wait(timeout=30) == -sig
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    left = _wait_gone(ranks + helpers, 15)
    assert not left, f"still running after the caller was killed: {left} (ranks {ranks}, forkserver and " \
                     f"resource tracker {helpers})"
    assert not _in_session(caller.pid), "a process of the caller's session is still running"
    # Only the launcher's own dir: multiprocessing's pymp-* (the forkserver's socket) and torch's caches are theirs.
    assert not list(tmp.glob("pretrain-spec-launch-*")), "the launcher's temp dir was left behind"


def _matmul_precision():
    return torch.get_float32_matmul_precision()


def test_ranks_compute_with_the_callers_matmul_precision():
    """A rank is a fresh interpreter: without the hand-over it would run float32 matmuls at "highest" while the
    caller (say under "medium", bf16 on an AMX CPU) computes the expected values another way."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert spawn(_matmul_precision, 2, timeout=60) == ["medium", "medium"]
    finally:
        torch.set_float32_matmul_precision(before)
    assert spawn(_matmul_precision, 1, timeout=60) == [before]
