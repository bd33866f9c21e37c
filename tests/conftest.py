"""Shared test setup: hypothesis profiles, the gpu markers, and Triton's interpreter on machines without CUDA."""

import os

import pytest
import torch
from hypothesis import settings

# triton.jit reads TRITON_INTERPRET when a kernel is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core: one intra-op thread each keeps them from oversubscribing the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("default", deadline=None, max_examples=20, derandomize=True, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=200, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    skip_multi = pytest.mark.skip(reason=f"needs >= 2 CUDA devices ({n_gpus} visible)")
    for item in items:
        if item.get_closest_marker("multigpu") and n_gpus < 2:
            item.add_marker(skip_multi)
        elif item.get_closest_marker("gpu") and n_gpus < 1:
            item.add_marker(skip_gpu)
