"""Pipeline schedules as data: for every rank, the ordered list of forward and backward actions it runs.

A model cut into S stages runs on p ranks (stage s lives on rank s % p: one stage per rank, or v = S / p "virtual"
stages per rank looping around the ranks, Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2.2). A batch is cut into
m micro-batches. `F3` is the forward of micro-batch 3 on this rank's stage, `B3` its backward; with several stages
per rank the stage is spelled out, `F3@5`. Sends and receives are implied by the data flow:

    F(i, s) needs the activation of F(i, s-1)          (received from rank (s-1) % p unless s == 0)
    B(i, s) needs F(i, s) and the gradient of B(i, s+1) (received from rank (s+1) % p unless s == S-1)

A schedule is only the order in which each rank runs its actions. It can be printed, simulated
(`optimized.pipeline.simulate`: timeline, bubble, memory, deadlocks) and executed (`PipelineExecutor`), each on its
own, as in torch.distributed.pipelining.

    >>> print(one_f_one_b(2, 4))
    1f1b p=2 m=4
    rank 0: F0 F1 B0 F2 B1 F3 B2 B3
    rank 1: F0 B0 F1 B1 F2 B2 F3 B3
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

FORWARD = "F"
BACKWARD = "B"


@dataclass(frozen=True, order=True)
class Action:
    """One unit of pipeline work: the forward or backward of one micro-batch through one stage."""

    kind: str
    """"F" (forward) or "B" (backward)."""
    microbatch: int
    """Index of the micro-batch, 0 .. m-1."""
    stage: int
    """Index of the model stage, 0 .. S-1 (the rank that runs it is stage % p)."""

    def __post_init__(self) -> None:
        if self.kind not in (FORWARD, BACKWARD):
            raise ValueError(f"Action.kind must be 'F' or 'B', got {self.kind!r}")
        if self.microbatch < 0 or self.stage < 0:
            raise ValueError(f"Action microbatch and stage must be >= 0, got {self.microbatch}, {self.stage}")

    def label(self, with_stage: bool = False) -> str:
        """`F3`, or `F3@5` (micro-batch 3 on stage 5) when a rank holds several stages."""
        return f"{self.kind}{self.microbatch}@{self.stage}" if with_stage else f"{self.kind}{self.microbatch}"

    def __str__(self) -> str:
        return self.label(with_stage=True)


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists of one pipeline step (one batch, m micro-batches, forward and backward)."""

    name: str
    """What produced it ("gpipe", "1f1b", "interleaved-1f1b", or a name of your own)."""
    num_ranks: int
    """Pipeline ranks p."""
    num_microbatches: int
    """Micro-batches m per step."""
    stages_per_rank: int
    """Virtual stages v per rank; the model has S = p * v stages and stage s runs on rank s % p."""
    actions: tuple[tuple[Action, ...], ...]
    """actions[r]: what rank r runs, in order."""

    def __post_init__(self) -> None:
        for field, value in (("num_ranks", self.num_ranks), ("num_microbatches", self.num_microbatches),
                             ("stages_per_rank", self.stages_per_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Schedule.{field} must be a positive integer, got {value!r}")
        if len(self.actions) != self.num_ranks:
            raise ValueError(
                f"Schedule.actions has {len(self.actions)} rank lists, expected num_ranks={self.num_ranks}"
            )
        for rank, acts in enumerate(self.actions):
            expected = {
                Action(kind, i, s)
                for s in self.stages_of(rank)
                for i in range(self.num_microbatches)
                for kind in (FORWARD, BACKWARD)
            }
            seen: set[Action] = set()
            for a in acts:
                if a in seen:
                    raise ValueError(f"rank {rank} runs {a} twice")
                if a not in expected:
                    raise ValueError(
                        f"rank {rank} runs {a}, which is not its work: it holds stages {list(self.stages_of(rank))} "
                        f"and micro-batches 0..{self.num_microbatches - 1}"
                    )
                seen.add(a)
            missing = sorted(expected - seen)
            if missing:
                raise ValueError(f"rank {rank} never runs {', '.join(map(str, missing))}")

    @property
    def num_stages(self) -> int:
        """Model stages S = p * v."""
        return self.num_ranks * self.stages_per_rank

    def rank_of(self, stage: int) -> int:
        """The rank that runs `stage` (looping placement: stage s on rank s % p)."""
        return stage % self.num_ranks

    def stages_of(self, rank: int) -> range:
        """The stages rank `rank` holds, in model order."""
        return range(rank, self.num_stages, self.num_ranks)

    def __getitem__(self, rank: int) -> tuple[Action, ...]:
        return self.actions[rank]

    def format_rank(self, rank: int) -> str:
        """One rank's actions as `F0 F1 B0 ...`."""
        with_stage = self.stages_per_rank > 1
        return " ".join(a.label(with_stage) for a in self.actions[rank])

    def __str__(self) -> str:
        v = f" v={self.stages_per_rank}" if self.stages_per_rank > 1 else ""
        head = f"{self.name} p={self.num_ranks} m={self.num_microbatches}{v}"
        return "\n".join([head] + [f"rank {r}: {self.format_rank(r)}" for r in range(self.num_ranks)])

    @classmethod
    def parse(cls, text: str | Sequence[str], *, stages_per_rank: int = 1, name: str = "custom") -> Schedule:
        """Build a schedule from its printed form: one line per rank, `rank 0: F0 F1 B0 B1` or just `F0 F1 B0 B1`.

        Without `@stage` an action is on the rank's only stage (stages_per_rank must then be 1)."""
        lines = text.splitlines() if isinstance(text, str) else list(text)
        lines = [ln.strip() for ln in lines if ln.strip() and not re.match(r"^\S+ p=\d+", ln.strip())]
        if not lines:
            raise ValueError("Schedule.parse: no rank lines in the text")
        actions: list[tuple[Action, ...]] = []
        max_mb = -1
        for r, line in enumerate(lines):
            m = re.match(r"^rank\s+(\d+)\s*:(.*)$", line)
            if m:
                if int(m.group(1)) != r:
                    raise ValueError(
                        f"Schedule.parse: line {r} is for rank {m.group(1)}; give ranks 0, 1, ... in order"
                    )
                line = m.group(2)
            acts = []
            for token in line.split():
                t = re.fullmatch(r"([FB])(\d+)(?:@(\d+))?", token)
                if not t:
                    raise ValueError(
                        f"Schedule.parse: rank {r}: cannot read action {token!r} (expected F3, B3 or F3@5)"
                    )
                if t.group(3) is None and stages_per_rank != 1:
                    raise ValueError(f"Schedule.parse: rank {r}: {token!r} needs @stage when stages_per_rank > 1")
                stage = int(t.group(3)) if t.group(3) is not None else r
                acts.append(Action(t.group(1), int(t.group(2)), stage))
                max_mb = max(max_mb, int(t.group(2)))
            actions.append(tuple(acts))
        return cls(name, len(lines), max_mb + 1, stages_per_rank, tuple(actions))


def _check_shape(num_stages: object, num_microbatches: object) -> None:
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe (Huang et al. 2019, arXiv 1811.06965): all m forwards, then all m backwards, on every rank.

    With equal stage costs the bubble is (p-1)/(m+p-1) of the step, and every rank holds the activations of all m
    micro-batches at the end of the forward phase."""
    _check_shape(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    actions = tuple(
        tuple(Action(FORWARD, i, r) for i in range(m)) + tuple(Action(BACKWARD, i, r) for i in range(m))
        for r in range(p)
    )
    return Schedule("gpipe", p, m, 1, actions)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B, PipeDream-Flush (Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2.1; Megatron-LM, picotron).

    Rank r runs three phases:
        Warmup:       num_warmup_microbatches = min(p - r - 1, m) forwards
        Steady state: m - num_warmup_microbatches pairs (forward of the next micro-batch, backward of the oldest)
        Cooldown:     the num_warmup_microbatches backwards left
    The bubble equals GPipe's, (p-1)/(m+p-1), but rank r never holds more than min(p - r, m) micro-batches'
    activations. With m < p it still runs (warmup is capped at m); it is then GPipe's order on the first ranks."""
    _check_shape(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    actions = []
    for r in range(p):
        num_warmup_microbatches = min(p - r - 1, m)
        num_steady_microbatches = m - num_warmup_microbatches
        acts = [Action(FORWARD, i, r) for i in range(num_warmup_microbatches)]
        for k in range(num_steady_microbatches):
            acts.append(Action(FORWARD, num_warmup_microbatches + k, r))
            acts.append(Action(BACKWARD, k, r))
        acts += [Action(BACKWARD, i, r) for i in range(num_steady_microbatches, m)]
        actions.append(tuple(acts))
    return Schedule("1f1b", p, m, 1, tuple(actions))


def interleaved_one_f_one_b(num_stages: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2.2; Megatron-LM's virtual pipeline).

    `num_stages` ranks each hold `stages_per_rank` = v model chunks: stage s = chunk * p + r on rank r. Each rank
    walks its m*v (micro-batch, chunk) forwards in groups of p micro-batches per chunk: forward k runs micro-batch
    (k // (p*v)) * p + k % p on chunk (k // p) % v; backward k the same micro-batch on chunk v - 1 - (k // p) % v.
        Warmup:       num_warmup_microbatches = min((p - r - 1) * 2 + (v - 1) * p, m*v) forwards
        Steady state: one forward, one backward
        Cooldown:     the backwards left
    The bubble shrinks by v: (p-1)/(v*m + p-1) with equal chunk costs. Needs m to be a multiple of p (the groups of
    p micro-batches must be whole; otherwise a rank would wait on a chunk its neighbour has not reached)."""
    _check_shape(num_stages, num_microbatches)
    if not isinstance(stages_per_rank, int) or isinstance(stages_per_rank, bool) or stages_per_rank < 1:
        raise ValueError(f"stages_per_rank must be a positive integer, got {stages_per_rank!r}")
    p, m, v = num_stages, num_microbatches, stages_per_rank
    if m % p:
        raise ValueError(
            f"interleaved 1F1B cannot run num_microbatches={m} on num_stages={p} ranks: num_microbatches must be a "
            f"multiple of num_stages (micro-batches go through each chunk in groups of {p})"
        )
    total = m * v

    def step(k: int, kind: str, r: int) -> Action:
        group, within = divmod(k, p * v)
        chunk = within // p
        if kind == BACKWARD:
            chunk = v - 1 - chunk
        return Action(kind, group * p + within % p, chunk * p + r)

    actions = []
    for r in range(p):
        num_warmup_microbatches = min((p - r - 1) * 2 + (v - 1) * p, total)
        num_steady_microbatches = total - num_warmup_microbatches
        acts = [step(k, FORWARD, r) for k in range(num_warmup_microbatches)]
        for k in range(num_steady_microbatches):
            acts.append(step(num_warmup_microbatches + k, FORWARD, r))
            acts.append(step(k, BACKWARD, r))
        acts += [step(k, BACKWARD, r) for k in range(num_steady_microbatches, total)]
        actions.append(tuple(acts))
    return Schedule("interleaved-1f1b", p, m, v, tuple(actions))
