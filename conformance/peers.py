"""Third-party peers, imported by the checks that use them and kept quiet.

DeepSpeed logs a warning when it has to guess its accelerator ("Setting accelerator to CPU"), and 0.19 still calls
`torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor`, which torch 2.13 deprecates with a
FutureWarning per call (our own code calls `all_gather_single` / `reduce_scatter_single` where torch has them).
Both are noise in the suite's output: the accelerator is told rather than guessed, and those two deprecation
warnings (only they) are filtered in the process that imports DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import warnings
from types import ModuleType

DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def import_deepspeed(device_type: str) -> ModuleType:
    """`import deepspeed` for a run on `device_type` ("cpu" or "cuda"), quietly (see the module docstring).
    Raises ImportError when DeepSpeed is not installed."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed
