"""Our ZeRO against DeepSpeed's on CPU with gloo (`"torch_adam": true`): same tiny GPT, data, AdamW, clipping.

One spawn on 2 ranks trains ours and DeepSpeed's ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-2 with the optimizer offloaded
to the CPU for 10 steps each; every parameter must agree within torch.testing's fp32 defaults.
"""

import importlib.util

import pytest

from conformance.checks.zero import PEER_CONFIGS, peer_worker, reference_state
from conformance.launch import spawn
from conformance.tolerance import allclose, assert_equivalent, combine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

STEPS = 10


@pytest.fixture(scope="module")
def trained():
    return spawn(peer_worker, 2, PEER_CONFIGS, STEPS, 0, "cpu", timeout=240)


@pytest.fixture(scope="module")
def reference():
    return reference_state(2, STEPS)


@pytest.mark.parametrize("config", PEER_CONFIGS, ids=[f"stage{s}{'-offload' if o else ''}" for s, o in PEER_CONFIGS])
def test_parameters_equal_deepspeed_after_10_steps(trained, reference, config):
    ours, theirs = trained[0]["ours"][config], trained[0]["deepspeed"][config]
    assert_equivalent(combine(f"ZeRO {config} ours vs DeepSpeed", [allclose(ours[k], theirs[k], name=k) for k in ours]))
    # and both equal the unsharded run
    assert_equivalent(combine("DeepSpeed vs unsharded", [allclose(theirs[k], v, name=k) for k, v in reference.items()]))


def test_ranks_end_with_the_same_parameters(trained):
    for config in PEER_CONFIGS:
        for k, v in trained[0]["ours"][config].items():
            assert v.equal(trained[1]["ours"][config][k]), (config, k)
