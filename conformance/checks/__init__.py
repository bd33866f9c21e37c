"""The checks: one module per check, each declaring `SPEC = CheckSpec(...)` and defining `run(ctx) -> list[Result]`.

A module here is found by name: adding a check is adding a file (README, "Adding a technique"). Its spec says what it
holds against what and which of the seed's claims it answers; its rows are built by `SPEC.row(ctx, name, ...)`,
which fills the fields every row shares, and its plots are `conformance.figure.Figure`s attached to rows (the report
draws them). The report runs the checks in `SPEC.order`.
"""

from __future__ import annotations

import importlib
import pkgutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from conformance.claims import CLAIMS
from conformance.result import Result


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
    """The report folder (for data files a check writes beside the report)."""
    timeout: float = 600.0
    """Seconds a multi-rank run may take before it is killed."""


@dataclass(frozen=True, kw_only=True)
class CheckSpec:
    """What one check holds against what: the defaults of its rows and the claims it answers."""

    name: str
    """The check's name: its module name in conformance/checks and its `--only` name."""
    technique: str
    """The technique its rows are about (e.g. "FlashAttention")."""
    reference: str
    """The spec it holds the optimized code to (e.g. "reference.attention.attention")."""
    optimized: str
    """The implementation under test (e.g. "optimized.attention.flash_attention")."""
    order: int
    """Place in the report, smaller first: foundations (training, attention) before what builds on them."""
    peers: tuple[str, ...] = ()
    """Third-party implementations it also compares against (torch DDP, DeepSpeed, ...)."""
    claims: tuple[str, ...] = ()
    """Ids of the claims in conformance.claims.CLAIMS that its rows answer (a row may answer only these)."""

    def __post_init__(self) -> None:
        unknown = [c for c in self.claims if c not in CLAIMS]
        if unknown:
            raise ValueError(f"check {self.name!r} names unknown claim(s) {unknown}; known: {', '.join(CLAIMS)}")

    def row(self, ctx: Context | None, name: str, **fields) -> Result:
        """A row of this check: `check`, `technique`, `reference`, `optimized` from the spec and `device` from ctx
        unless given in `fields` (any other Result field); a claim must be one the spec lists."""
        claim = fields.get("claim")
        if claim is not None and claim not in self.claims:
            raise ValueError(f"check {self.name!r}: row {name!r} answers claim {claim!r}, which its SPEC.claims "
                             f"{self.claims} does not list")
        fields.setdefault("technique", self.technique)
        fields.setdefault("reference", self.reference)
        fields.setdefault("optimized", self.optimized)
        if ctx is not None:
            fields.setdefault("device", ctx.device.type)
        return Result(check=self.name, name=name, **fields)

    def guarded(self, ctx: Context, section: str, fn: Callable[[Context], list[Result]]) -> list[Result]:
        """`fn(ctx)`'s rows, or one failing row carrying the traceback when it raises: one crashing part of a check
        (or the whole check, section "check") does not hide what the others measured."""
        try:
            return fn(ctx)
        except Exception:  # noqa: BLE001 - the crash becomes a failing row of the report
            return [self.row(ctx, "check crashed" if section == "check" else f"{section}: crashed",
                             world_size=ctx.world_size, error=traceback.format_exc())]


def _modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def specs() -> list[CheckSpec]:
    """Every check's spec, in report order (SPEC.order, then name)."""
    out = []
    for module in _modules():
        spec = getattr(module, "SPEC", None)
        short = module.__name__.rsplit(".", 1)[-1]
        if not isinstance(spec, CheckSpec) or not callable(getattr(module, "run", None)):
            raise TypeError(f"conformance/checks/{short}.py must define SPEC = CheckSpec(...) and run(ctx)")
        if spec.name != short:
            raise ValueError(f"conformance/checks/{short}.py: SPEC.name is {spec.name!r}, expected {short!r}")
        out.append(spec)
    return sorted(out, key=lambda s: (s.order, s.name))


def available() -> list[str]:
    """Names of all checks, in report order."""
    return [s.name for s in specs()]


def _load(name: str) -> ModuleType:
    names = available()
    if name not in names:
        raise ValueError(f"unknown check {name!r}; available: {', '.join(names)}")
    return importlib.import_module(f"{__name__}.{name}")


def run(name: str, ctx: Context) -> list[Result]:
    """Run one check; a crash becomes one failing row, so the other checks still run."""
    module = _load(name)
    return module.SPEC.guarded(ctx, "check", module.run)
