"""The checks: one module per check name, each defining `run(ctx: Context) -> list[Result]`.

A module here is found by name; adding a check is adding a file. `ORDER` lists the known checks in report order
(foundation first); a module not listed runs after them, alphabetically.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from conformance.result import Result

ORDER = (
    "training",
    "attention",
    "mixed_precision",
    "optimizers",
    "schedules",
    "clipping",
    "accumulation",
    "warmup",
    "data_parallel",
    "tensor_parallel",
    "pipeline",
    "zero",
    "plan",
)


@dataclass(frozen=True)
class Context:
    """What every check is given: where to run, how big, where to write plots."""

    device: torch.device
    """cpu, or cuda (the current device of this process)."""
    world_size: int
    """Ranks for the multi-rank checks (gloo on CPU, NCCL on CUDA)."""
    quick: bool
    """Small sizes (CI smoke run) instead of the full measurement sizes."""
    out_dir: Path
    """The report folder; plots go here."""
    timeout: float = 300.0
    """Seconds a multi-rank run may take before it is killed."""


CheckFn = Callable[[Context], list[Result]]


def available() -> list[str]:
    """Names of all checks, in report order."""
    names = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def load(name: str) -> CheckFn:
    names = available()
    if name not in names:
        raise ValueError(f"unknown check {name!r}; available: {', '.join(names)}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.run
