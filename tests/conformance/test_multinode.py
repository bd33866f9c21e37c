"""The suite across nodes: two torchrun agents on this machine stand in for two nodes (`--nnodes 2
--nproc-per-node 1`, c10d rendezvous on 127.0.0.1), and every row gets the verdicts of the single-node run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conformance.__main__ import main
from conformance.compare import compare

ROOT = Path(__file__).resolve().parents[2]
CHECKS = "optimizers,clipping"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["check"], r["name"]): r for r in json.loads(path.read_text())["results"]}


def test_two_nodes_under_torchrun_give_the_single_node_verdicts(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "conformance-test",
           "-m", "conformance", "--only", CHECKS, "--out", str(tmp_path / "two-nodes"), "--timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=240)[0])
    finally:
        for agent in agents:  # a hung agent and its rank die with the test, never outlive it
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    assert [a.returncode for a in agents] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    assert main(["--only", CHECKS, "--world-size", "2", "--out", str(tmp_path / "one-node")]) == 0
    two, one = _rows(tmp_path / "two-nodes" / "report.json"), _rows(tmp_path / "one-node" / "report.json")
    assert any(r["world_size"] == 2 for r in two.values())  # the sharded clipping rows ran across the two "nodes"
    changes = compare(one, two, factor=1e6)
    assert not (changes.regressions or changes.changed or changes.added or changes.gone), changes
    assert {k: (r["equivalence"] or {}).get("passed") for k, r in two.items()} == {
        k: (r["equivalence"] or {}).get("passed") for k, r in one.items()}
