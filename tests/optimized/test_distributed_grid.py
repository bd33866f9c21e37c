"""optimized.distributed.grid: the pp x dp x cp x tp grid (tp innermost, ZeRO's dp_shard inside dp) against tables
written out by hand, world sizes 1 to 8; then the real groups on 3, 4 and 8 gloo ranks (members and an all-reduce
over each); bad degrees refused with a ValueError before any group is created."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conformance.launch import spawn
from optimized.distributed.grid import GROUPS, ParallelDims, make_process_grid

TIMEOUT = 120.0

# Each case: the degrees, each rank's coordinates as four digits "pp dp cp tp" (rank 0 first), and the groups
# that are not one rank each ("dp_shard" and "dp_cp" default to "dp"'s groups, as they are when dp_shard = dp and
# cp = 1), each group in group-rank order.
TABLES = {
    "one rank": (dict(), "0000", {}),
    "cp 2": (dict(cp=2), "0000 0010", {"cp": [[0, 1]], "dp_cp": [[0, 1]]}),
    "tp 3": (dict(tp=3), "0000 0001 0002", {"tp": [[0, 1, 2]]}),
    "dp 3": (dict(dp=3), "0000 0100 0200", {"dp": [[0, 1, 2]]}),
    "pp 3": (dict(pp=3), "0000 1000 2000", {"pp": [[0, 1, 2]]}),
    "dp 4, ZeRO over 2": (
        dict(dp=4, dp_shard=2), "0000 0100 0200 0300",
        {"dp": [[0, 1, 2, 3]], "dp_shard": [[0, 1], [2, 3]], "dp_replicate": [[0, 2], [1, 3]]},
    ),
    "pp 5": (dict(pp=5), "0000 1000 2000 3000 4000", {"pp": [[0, 1, 2, 3, 4]]}),
    "dp 3 x tp 2": (
        dict(dp=3, tp=2), "0000 0001 0100 0101 0200 0201",
        {"tp": [[0, 1], [2, 3], [4, 5]], "dp": [[0, 2, 4], [1, 3, 5]]},
    ),
    "pp 2 x tp 3": (
        dict(pp=2, tp=3), "0000 0001 0002 1000 1001 1002",
        {"tp": [[0, 1, 2], [3, 4, 5]], "pp": [[0, 3], [1, 4], [2, 5]]},
    ),
    "dp 7": (dict(dp=7), "0000 0100 0200 0300 0400 0500 0600", {"dp": [list(range(7))]}),
    "pp 2 x dp 2 x tp 2": (
        dict(pp=2, dp=2, tp=2),
        "0000 0001 0100 0101 1000 1001 1100 1101",
        {"tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
         "pp": [[0, 4], [1, 5], [2, 6], [3, 7]]},
    ),
    "dp 2 x cp 2 x tp 2": (
        dict(dp=2, cp=2, tp=2),
        "0000 0001 0010 0011 0100 0101 0110 0111",
        {"tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
         "dp": [[0, 4], [1, 5], [2, 6], [3, 7]], "dp_cp": [[0, 2, 4, 6], [1, 3, 5, 7]]},
    ),
    "pp 2 x dp 2 x cp 2": (
        dict(pp=2, dp=2, cp=2),
        "0000 0010 0100 0110 1000 1010 1100 1110",
        {"cp": [[0, 1], [2, 3], [4, 5], [6, 7]], "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
         "pp": [[0, 4], [1, 5], [2, 6], [3, 7]], "dp_cp": [[0, 1, 2, 3], [4, 5, 6, 7]]},
    ),
}


def _expected_groups(world: int, groups: dict) -> dict[str, list[list[int]]]:
    out = {name: groups.get(name, [[r] for r in range(world)]) for name in GROUPS}
    for name in ("dp_shard", "dp_cp"):
        out[name] = groups.get(name, out["dp"])
    return out


def test_the_world_sizes_of_the_tables_cover_one_to_eight():
    assert sorted({len(coords.split()) for _, coords, _ in TABLES.values()}) == list(range(1, 9))


@pytest.mark.parametrize("case", sorted(TABLES))
def test_coordinates_and_groups_match_the_hand_written_table(case):
    degrees, coords, groups = TABLES[case]
    dims = ParallelDims(**degrees)
    world = len(coords.split())
    assert dims.world_size == world
    for rank, code in enumerate(coords.split()):
        got = dims.coordinates(rank)
        assert f"{got['pp']}{got['dp']}{got['cp']}{got['tp']}" == code, rank
    for name, partition in _expected_groups(world, groups).items():
        assert dims.partition(name) == partition, name
        for group in partition:
            for rank in group:
                assert dims.members(name, rank) == group, (name, rank)


def _grid_worker(degrees: dict) -> dict:
    grid = make_process_grid(**degrees)
    members, sums = {}, {}
    for name in GROUPS:
        group = grid.group(name)
        members[name] = dist.get_process_group_ranks(group)
        x = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(x, group=group)
        sums[name] = x.item()
    c = grid.coordinates
    return {"coords": f"{c['pp']}{c['dp']}{c['cp']}{c['tp']}", "members": members, "sums": sums,
            "ranks": f"{grid.pp_rank}{grid.dp_rank}{grid.cp_rank}{grid.tp_rank}",
            "sizes": (grid.pp_size, grid.dp_size, grid.cp_size, grid.tp_size, grid.dp_cp_size),
            "tp_group_is_named": grid.tp_group is grid.group("tp")}


@pytest.mark.parametrize("case", ["tp 3", "dp 4, ZeRO over 2", "dp 2 x cp 2 x tp 2"])
def test_the_groups_built_on_gloo_ranks_hold_the_table_members(case):
    degrees, coords, groups = TABLES[case]
    world = len(coords.split())
    expected = _expected_groups(world, groups)
    sizes = tuple(degrees.get(n, 1) for n in ("pp", "dp", "cp", "tp"))
    results = spawn(_grid_worker, world, degrees, timeout=TIMEOUT)
    for rank, got in enumerate(results):
        assert got["coords"] == got["ranks"] == coords.split()[rank]
        assert got["sizes"] == (*sizes, sizes[1] * sizes[2]) and got["tp_group_is_named"]
        for name, partition in expected.items():
            mine = next(g for g in partition if rank in g)
            assert got["members"][name] == mine, (rank, name)
            assert got["sums"][name] == sum(mine), (rank, name)


@pytest.mark.parametrize(("degrees", "message"), [
    (dict(dp=0), r"dp must be a positive integer, got 0"),
    (dict(tp=True), r"tp must be a positive integer, got True"),
    (dict(pp=1.5), r"pp must be a positive integer, got 1.5"),
    (dict(dp=4, dp_shard=3), r"dp_shard=3 must divide dp=4"),
])
def test_bad_degrees_are_refused(degrees, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**degrees)


def _bad_grid_worker() -> list[str]:
    created = []
    real = dist.new_group
    dist.new_group = lambda *a, **k: created.append(a) or real(*a, **k)
    messages = []
    try:
        for call in (lambda: make_process_grid(dp=2, tp=2), lambda: make_process_grid(cp=0, tp=3),
                     lambda: make_process_grid(ParallelDims(tp=3), tp=3), lambda: make_process_grid(dp=3).group("ep")):
            with pytest.raises(ValueError) as info:
                call()
            messages.append(str(info.value))
    finally:
        dist.new_group = real
    # the last call built a valid dp=3 grid before asking for an unknown group: its groups are the only ones made
    assert created == [*[([r],) for r in range(3)], ([0, 1, 2],)], created
    return messages


def test_a_grid_that_does_not_fill_the_world_is_refused_before_any_group_is_created():
    messages = spawn(_bad_grid_worker, 3, timeout=TIMEOUT)[0]
    assert messages[0] == "pp=1 * dp=2 * cp=1 * tp=2 = 4 must equal the world size 3"
    assert messages[1] == "cp must be a positive integer, got 0"
    assert "pass either a ParallelDims or degrees" in messages[2]
    assert messages[3].startswith("group must be one of [") and "'ep'" in messages[3]
