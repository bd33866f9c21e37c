"""Run a schedule on paper: timeline, bubble, activation memory, deadlocks, and a PNG of the timeline.

Each rank runs its actions in order, one at a time. An action starts when its rank is free and its inputs have
arrived (the data flow in `optimized.pipeline.schedules`): F(i, s) after F(i, s-1) has finished on its rank, B(i, s)
after F(i, s) and B(i, s+1), plus `comm_cost` for every input that crosses ranks. Sends never block (the executor
posts them with `dist.isend`), receives do: exactly the executor's communication order, so a schedule the simulator
finishes runs, and one it finds stuck would hang.

    bubble fraction = idle time / (p * makespan)     summed over ranks, makespan = last end - first start
    GPipe and 1F1B with equal stage costs:  (p - 1) / (m + p - 1)   (GPipe, arXiv 1811.06965; arXiv 2104.04473 Sec. 2.2)

`peak_alive[r]` is the most (micro-batch, stage) activations rank r holds at once: from the start of F(i, s) to the
end of B(i, s). GPipe: m on every rank; 1F1B: min(p - r, m).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from optimized.pipeline.schedules import BACKWARD, FORWARD, Action, Schedule


@dataclass(frozen=True)
class Interval:
    """When one action ran on its rank (simulated units, or seconds on a real run)."""

    action: Action
    start: float
    end: float


Timeline = tuple[tuple[Interval, ...], ...]
"""timeline[r]: rank r's intervals in the order it ran them."""


class Deadlock(RuntimeError):
    """The schedule cannot finish: every rank left is waiting on an input that will never come."""

    def __init__(self, message: str, waiting: dict[int, tuple[Action, Action]]) -> None:
        super().__init__(message)
        self.waiting = waiting
        """rank -> (the action it is stuck at, the action whose output it waits for)."""


@dataclass(frozen=True)
class SimulationResult:
    """What `simulate` found."""

    schedule: Schedule
    timeline: Timeline
    makespan: float
    """Last end minus first start."""
    bubble_fraction: float
    """Idle time over total time, summed over ranks."""
    peak_alive: tuple[int, ...]
    """Per rank, the most (micro-batch, stage) activations alive at once."""

    def render(self, slot: float = 1.0) -> str:
        """The timeline as text, one column per `slot` time units: `F0 F1 .. B0 B0` (`..` is idle)."""
        return render_timeline(self.timeline, slot=slot, with_stage=self.schedule.stages_per_rank > 1)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the timeline as a PNG (one row per rank, forwards and backwards coloured, idle white)."""
        if title is None:
            s = self.schedule
            title = f"{s.name}, p={s.num_ranks}, m={s.num_microbatches}: bubble {self.bubble_fraction:.1%}"
        return plot_timeline(self.timeline, path, title=title, unit="time units")


def _costs(value: float | Sequence[float], num_stages: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = (float(value),) * num_stages
    else:
        values = tuple(float(x) for x in value)
        if len(values) != num_stages:
            raise ValueError(f"{name} has {len(values)} per-stage costs, the schedule has {num_stages} stages")
    if any(not x >= 0 for x in values):
        raise ValueError(f"{name} must be >= 0 (a number or one per stage), got {value!r}")
    return values


def dependencies(schedule: Schedule, action: Action) -> list[Action]:
    """The actions whose outputs `action` consumes (see the module docstring of schedules)."""
    i, s = action.microbatch, action.stage
    if action.kind == FORWARD:
        return [Action(FORWARD, i, s - 1)] if s > 0 else []
    deps = [Action(FORWARD, i, s)]
    if s < schedule.num_stages - 1:
        deps.append(Action(BACKWARD, i, s + 1))
    return deps


def simulate(
    schedule: Schedule,
    forward_cost: float | Sequence[float] = 1.0,
    backward_cost: float | Sequence[float] = 2.0,
    comm_cost: float = 0.0,
) -> SimulationResult:
    """Run `schedule` with these costs (one number, or one per stage) and return its timeline and statistics.

    Raises `Deadlock` naming every stuck rank, the action it is at and the action it waits for."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be an optimized.pipeline.Schedule, got {type(schedule).__name__}")
    fwd = _costs(forward_cost, schedule.num_stages, "forward_cost")
    bwd = _costs(backward_cost, schedule.num_stages, "backward_cost")
    if not comm_cost >= 0:
        raise ValueError(f"comm_cost must be >= 0, got {comm_cost!r}")
    p = schedule.num_ranks
    finished: dict[Action, float] = {}
    clock = [0.0] * p
    position = [0] * p
    timeline: list[list[Interval]] = [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while position[r] < len(schedule[r]):
                action = schedule[r][position[r]]
                deps = dependencies(schedule, action)
                if any(d not in finished for d in deps):
                    break
                ready = max(
                    [clock[r]]
                    + [finished[d] + (comm_cost if schedule.rank_of(d.stage) != r else 0.0) for d in deps]
                )
                cost = (fwd if action.kind == FORWARD else bwd)[action.stage]
                timeline[r].append(Interval(action, ready, ready + cost))
                finished[action] = clock[r] = ready + cost
                position[r] += 1
                progress = True
    stuck = {r: schedule[r][position[r]] for r in range(p) if position[r] < len(schedule[r])}
    if stuck:
        waiting = {
            r: (a, next(d for d in dependencies(schedule, a) if d not in finished)) for r, a in stuck.items()
        }
        lines = [
            f"rank {r} waits at {a} for {d} on rank {schedule.rank_of(d.stage)}" for r, (a, d) in waiting.items()
        ]
        raise Deadlock(f"{schedule.name} p={p} m={schedule.num_microbatches} deadlocks: " + "; ".join(lines), waiting)
    tl = tuple(tuple(t) for t in timeline)
    return SimulationResult(schedule, tl, makespan(tl), bubble_fraction(tl), peak_alive(schedule))


def makespan(timeline: Timeline) -> float:
    """Last end minus first start over all ranks."""
    intervals = [iv for rank in timeline for iv in rank]
    if not intervals:
        return 0.0
    return max(iv.end for iv in intervals) - min(iv.start for iv in intervals)


def bubble_fraction(timeline: Timeline) -> float:
    """Idle time over total time, summed over ranks: 1 - busy / (p * makespan). Works on measured timelines too."""
    span = makespan(timeline)
    if span <= 0:
        return 0.0
    busy = sum(iv.end - iv.start for rank in timeline for iv in rank)
    return 1.0 - busy / (len(timeline) * span)


def peak_alive(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most forwards whose backward has not finished, walking its actions in order."""
    peaks = []
    for acts in schedule.actions:
        alive = peak = 0
        for a in acts:
            alive += 1 if a.kind == FORWARD else -1
            peak = max(peak, alive)
        peaks.append(peak)
    return tuple(peaks)


def render_timeline(timeline: Timeline, slot: float = 1.0, with_stage: bool = False) -> str:
    """Text grid of a timeline: one line per rank, one column per `slot`, `..` where the rank is idle."""
    if not slot > 0:
        raise ValueError(f"slot must be > 0, got {slot!r}")
    span = max((iv.end for rank in timeline for iv in rank), default=0.0)
    columns = round(span / slot)
    lines = []
    for r, rank in enumerate(timeline):
        cells = [".."] * columns
        for iv in rank:
            for c in range(round(iv.start / slot), round(iv.end / slot)):
                cells[c] = iv.action.label(with_stage)
        width = max((len(c) for c in cells), default=2)
        lines.append(f"rank {r}: " + " ".join(c.ljust(width) for c in cells).rstrip())
    return "\n".join(lines)


def plot_timeline(timeline: Timeline, path: str | Path, *, title: str = "", unit: str = "s") -> Path:
    """Gantt chart of a timeline (simulated or measured) as a PNG at `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    p = len(timeline)
    t0 = min((iv.start for rank in timeline for iv in rank), default=0.0)
    span = makespan(timeline)
    fig, ax = plt.subplots(figsize=(10, 0.6 * p + 1.2))
    # one shade per model chunk of the rank (interleaved schedules hold several), darkest first
    shades = {FORWARD: ["#4c78a8", "#9ecae9", "#2a4a6e"], BACKWARD: ["#f58518", "#ffbf79", "#a35410"]}
    for r, rank in enumerate(timeline):
        chunks = sorted({iv.action.stage for iv in rank})
        for iv in rank:
            chunk = chunks.index(iv.action.stage) % 3
            ax.barh(r, iv.end - iv.start, left=iv.start - t0, height=0.8, color=shades[iv.action.kind][chunk],
                    edgecolor="black", linewidth=0.4)
            if span > 0 and (iv.end - iv.start) / span > 0.015:
                ax.text((iv.start + iv.end) / 2 - t0, r, iv.action.label(), ha="center", va="center",
                        fontsize=7, color="white" if chunk != 1 else "black")
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_xlim(0, span if span > 0 else 1)
    ax.set_title(title or f"pipeline timeline: bubble {bubble_fraction(timeline):.1%}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=shades[k][0]) for k in (FORWARD, BACKWARD)]
    ax.legend(handles, ["forward", "backward"], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
