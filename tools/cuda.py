"""What the GPU tools (the bench, the prepared GPU run) ask of the machine before any work: a visible CUDA device."""

from __future__ import annotations

import sys


def cuda_missing(what: str) -> bool:
    """True, after one line on stderr ("<what> needs a CUDA device"), when no CUDA device is visible: the caller
    then exits with status 2 (a machine that cannot run it is a usage error, not a failed run)."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{what} needs a CUDA device", file=sys.stderr)
    return True
