"""The launcher: results in rank order, failures and hangs surface fast, nothing is left running."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from conformance.launch import RankError, RankTimeout, spawn


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
    return True


def test_a_hang_is_killed_at_the_timeout_and_named(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"rank\(s\) 2 of 3 did not finish within 8 s"):
        spawn(_hang_on_rank, 3, 2, str(tmp_path), timeout=8)
    assert time.monotonic() - start < 20
    pids = [int(p.read_text()) for p in tmp_path.iterdir()]
    assert len(pids) == 3
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "rank processes left running"


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        spawn(_rank_and_sum, 0, 0.0)
    with pytest.raises(ValueError, match="backend must be 'gloo' or 'nccl'"):
        spawn(_rank_and_sum, 1, 0.0, backend="mpi")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        spawn(_rank_and_sum, 1, 0.0, timeout=0)


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
