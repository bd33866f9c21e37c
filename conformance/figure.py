"""Figures as data: a check describes what to plot (`Figure` of `Panel`s of `Series` or timeline `Bar`s) and
attaches it to its rows; `conformance.report` is the one place that draws them (PNG, one file per figure name) and
writes their numbers into report.json, so a plot can be redrawn or compared without rerunning the check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCALES = ("linear", "log", "log2")
KINDS = ("line", "points", "bars")


@dataclass
class Series:
    """One line, set of points or set of bars of a panel."""

    x: list[float]
    y: list[float]
    label: str | None = None
    """Legend entry; None leaves the series out of the legend."""
    kind: str = "line"
    """"line" (markers optional), "points" (markers only) or "bars" (centred on x, `width` wide)."""
    color: str | None = None
    marker: str | None = None
    linestyle: str = "-"
    alpha: float = 1.0
    linewidth: float | None = None
    width: float = 0.8
    """Bar width, in x units."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Series.kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Series {self.label!r}: {len(self.x)} x values but {len(self.y)} y values")
        self.x, self.y = [float(v) for v in self.x], [float(v) for v in self.y]


@dataclass
class Bar:
    """One interval of a timeline (Gantt) panel: what ran on one row (a rank) from `start` to `end`."""

    row: int
    start: float
    end: float
    label: str
    """Written inside the bar when it is wide enough (e.g. "F3")."""
    group: str
    """Colour family and legend entry (e.g. "forward", "backward")."""
    shade: int = 0
    """0 darkest; a rank holding several model chunks shades each differently."""


@dataclass
class Panel:
    """One set of axes: series (lines, points, bars) or a timeline of bars, one row per rank."""

    series: list[Series] = field(default_factory=list)
    timeline: list[Bar] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    """Timeline only: the label of each row, top to bottom."""
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    xscale: str = "linear"
    """"linear", "log" (base 10) or "log2"."""
    yscale: str = "linear"
    xticks: list[tuple[float, str]] | None = None
    """(position, label) pairs replacing the automatic ticks."""
    xtick_rotation: float = 0.0
    vlines: list[float] = field(default_factory=list)
    """Dotted vertical markers (e.g. the end of warmup)."""
    grid: bool = False
    legend: bool = True

    def __post_init__(self) -> None:
        for axis, scale in (("xscale", self.xscale), ("yscale", self.yscale)):
            if scale not in SCALES:
                raise ValueError(f"Panel.{axis} must be one of {SCALES}, got {scale!r}")
        if self.series and self.timeline:
            raise ValueError("a Panel holds series or a timeline, not both")


@dataclass
class Figure:
    """A PNG of the report: `name`.png, one or more panels side by side."""

    name: str
    """File stem, unique in the report (e.g. "attention_memory")."""
    panels: list[Panel]
    title: str = ""
    size: tuple[float, float] | None = None
    """Inches; default from the number of panels."""
    sharey: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.endswith(".png"):
            raise ValueError(f"Figure.name must be a file stem without '/' or '.png', got {self.name!r}")
        if not self.panels:
            raise ValueError(f"Figure {self.name!r} has no panel")

    @property
    def filename(self) -> str:
        return f"{self.name}.png"

    def to_dict(self) -> dict:
        return asdict(self)
