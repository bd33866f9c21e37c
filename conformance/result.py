"""The record every check returns, one per row of the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from conformance.claims import Verdict, claim
from conformance.figure import Figure
from conformance.tolerance import Equivalence


@dataclass
class Metric:
    """One measured number, with the claim it answers when there is one."""

    name: str
    """What was measured, with its conditions (e.g. "saved-for-backward bytes, naive / blocked, N=2048")."""
    measured: float
    unit: str
    """"x" for ratios, "bytes", "s", "TFLOP/s", "fraction", ..."""
    claimed: str | None = None
    """The claimed value it is set beside, as written in the claim (e.g. "10x @2K")."""


@dataclass
class Result:
    """One row of the conformance report."""

    check: str
    """The check that produced it (module name in conformance/checks)."""
    name: str
    """Row label (e.g. "blocked vs naive fp32 fwd+bwd")."""
    technique: str
    reference: str
    """The spec it is held to (e.g. "reference.attention.attention")."""
    optimized: str
    """The implementation under test."""
    peer: str | None = None
    """A third-party implementation compared too (torch SDPA, DeepSpeed, ...)."""
    device: str = "cpu"
    world_size: int = 1
    equivalence: Equivalence | None = None
    memory: list[Metric] = field(default_factory=list)
    speed: list[Metric] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    """Other measured numbers (losses, bubble fractions, bytes communicated, ...)."""
    claim: str | None = None
    """Id of the claim in conformance.claims.CLAIMS that this row answers."""
    verdict: Verdict | None = None
    notes: str = ""
    figures: list[Figure] = field(default_factory=list)
    """Plots of this row, as data; the report draws each once into the report folder (`Figure.filename`)."""
    error: str | None = None
    """Set when the check itself crashed; such a row fails the run."""

    def __post_init__(self) -> None:
        if self.claim is not None:
            claim(self.claim)  # unknown ids fail loudly
        if self.verdict is not None and self.claim is None:
            raise ValueError(f"{self.check}/{self.name}: a verdict needs the claim it answers")

    @property
    def plots(self) -> list[str]:
        """File names of this row's figures in the report folder."""
        return [f.filename for f in self.figures]

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.equivalence is not None and not self.equivalence.passed)

    def to_dict(self) -> dict:
        """The row for report.json; figures by file name (their data is in the report's "figures")."""
        d = asdict(self)
        del d["figures"]
        d["plots"] = self.plots
        d["verdict"] = self.verdict.value if self.verdict else None
        return d
