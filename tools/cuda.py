"""What the GPU tools (the bench, the prepared GPU run) ask of the machine before any work: a visible CUDA device."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def cuda_missing(what: str) -> bool:
    """True, after one line on stderr ("<what> needs a CUDA device"), when no CUDA device is visible: the caller
    then exits with status 2 (a machine that cannot run it is a usage error, not a failed run)."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{what} needs a CUDA device", file=sys.stderr)
    return True


def args_for_cuda(parse_args: Callable[[list[str]], argparse.Namespace], argv: list[str],
                  what: str) -> argparse.Namespace | int:
    """The parsed flags of a GPU tool, or the status to exit with before any work: 2 for a bad flag (argparse has
    printed its one line) or a machine without CUDA, 0 for --help."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # a bad flag (2) or --help (0), as a status
        return int(exit_.code or 0)
    return 2 if cuda_missing(what) else args
