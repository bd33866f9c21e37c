"""Our ZeRO against DeepSpeed's on CPU with gloo (`"torch_adam": true`): same tiny GPT, data, AdamW, clipping.

One spawn on 2 ranks trains ours and DeepSpeed's ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-2 with the optimizer offloaded
to the CPU for 10 steps each. DeepSpeed runs in float32 only, where AdamW turns each machine's rounding into ~lr
steps: ours, DeepSpeed and the unsharded run must agree within 10x the float32 reference's own rounding spread
(conformance.tolerance.within_spread); ours must also equal the unsharded run in float64 within its float64 spread.
"""

import importlib.util

import pytest
import torch

from conformance.checks._zero_workload import reference_and_spread
from conformance.checks.zero import PEER_CONFIGS, peer_worker
from conformance.launch import spawn
from conformance.tolerance import assert_equivalent, within_spread

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

STEPS = 10


@pytest.fixture(scope="module")
def trained():
    return spawn(peer_worker, 2, PEER_CONFIGS, STEPS, 0, "cpu", timeout=240)


@pytest.fixture(scope="module")
def reference():
    return {dtype: reference_and_spread(2, STEPS, dtype=dtype) for dtype in (torch.float32, torch.float64)}


@pytest.mark.parametrize("config", PEER_CONFIGS, ids=[f"stage{s}{'-offload' if o else ''}" for s, o in PEER_CONFIGS])
def test_parameters_equal_deepspeed_after_10_steps(trained, reference, config):
    ours, theirs = trained[0]["ours"][config], trained[0]["deepspeed"][config]
    ref32, spread32 = reference[torch.float32]
    assert_equivalent(within_spread(ours, theirs, spread32, name=f"ZeRO {config} ours vs DeepSpeed"))
    # and both equal the unsharded run: DeepSpeed in float32, ours in float64 too
    assert_equivalent(within_spread(theirs, ref32, spread32, name="DeepSpeed vs unsharded"))
    ref64, spread64 = reference[torch.float64]
    ours64 = trained[0]["ours64"][config][-1]
    assert_equivalent(within_spread(ours64, ref64, spread64, name="ours vs unsharded, float64"))


def test_ranks_end_with_the_same_parameters(trained):
    for config in PEER_CONFIGS:
        for k, v in trained[0]["ours"][config].items():
            assert v.equal(trained[1]["ours"][config][k]), (config, k)
