"""Autocast that really runs in the half dtype asked for, or a clear error before any work is done.

torch.autocast with a dtype the device does not support warns and silently runs in fp32 (CPU) or raises a
RuntimeError (CUDA bf16 before Ampere). `check_autocast` turns both into one ValueError; `autocast_context` is the
context a training step enters, with dtype=torch.float32 meaning autocast off.
"""

from __future__ import annotations

import contextlib
import warnings
from contextlib import AbstractContextManager

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Raise ValueError unless `torch.autocast(device_type, dtype)` really runs in `dtype` on this machine."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 for autocast, got {dtype}")
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"device type {device_type!r} has no autocast support")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError as err:
            raise ValueError(f"{device_type} has no {dtype} autocast support here: {err}") from err
    if not enabled:
        raise ValueError(f"{device_type} has no {dtype} autocast support here (torch would disable autocast)")


def autocast_context(device_type: str, dtype: torch.dtype) -> AbstractContextManager:
    """torch.autocast(device_type, dtype), or no context for dtype=torch.float32 (autocast off, true fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
