"""Run a pipeline schedule over real ranks with point-to-point messages (torch.distributed, gloo).

Each rank holds the stages `schedule.stages_of(rank)` and walks its action list:

    F(i, s): receive the activation of micro-batch i from stage s-1 (blocking `dist.recv`; stage 0 reads idx),
             run the stage, keep (input, output) for the backward, post the output to stage s+1 (`dist.isend`).
             The last stage computes the summed token loss of micro-batch i and scales it by 1 / n_tokens, the
             scored tokens of the WHOLE batch (token-weighted accumulation: the gradients add up to the gradient
             of the batch's token-mean loss, however the padding falls across micro-batches).
    B(i, s): receive d(loss)/d(output) from stage s+1 (the last stage starts from its scaled loss), backward
             through the stage, post d(loss)/d(input) to stage s-1, free the kept tensors.

Sends never block and receives wait: the communication order `optimized.pipeline.simulate` models, so a schedule
is simulated before anything is sent and one that would deadlock raises `Deadlock` on every rank instead of hanging.
Messages carry a tag naming (stage, micro-batch, direction), so the pairing of sends and receives does not depend on
their order (gloo honours tags; NCCL does not, and is not supported here).

Tied embeddings: when the head's weight is the token embedding's, the first and the last stage each hold a copy
(Megatron-LM, arXiv 1909.08053). At construction the last stage's copy is overwritten with the first stage's;
after each step's backwards the two ranks exchange their partial gradients and each adds the other's (an
all-reduce over the pair, written as one message each way). Both copies then have the single-process gradient
and stay equal under any optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optimized.pipeline.schedules import BACKWARD, FORWARD, Schedule
from optimized.pipeline.simulate import Interval, simulate
from optimized.pipeline.split import IGNORE_INDEX, PipelineStage


@dataclass
class StepResult:
    """What one pipeline step returns on one rank."""

    loss: Tensor | None
    """Token-mean loss of the whole batch (detached scalar) on the rank holding the last stage; None elsewhere."""
    timeline: tuple[Interval, ...]
    """This rank's compute actions in the order run, with time.perf_counter() start and end in seconds (waits for
    messages are not inside the intervals)."""


class PipelineExecutor:
    """Runs `schedule` on this rank's stages; every rank of `process_group` constructs one and calls `step` together.

    stages: this rank's PipelineStage (or its list of stages, in model order, for interleaved schedules), e.g.
    `split(model, schedule.num_stages)[rank]`. process_group: the pipeline's ranks (default: the world); pipeline
    rank r is group rank r. Without an initialised process group a one-rank schedule runs in this process."""

    def __init__(
        self,
        stages: PipelineStage | Sequence[PipelineStage],
        schedule: Schedule,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be an optimized.pipeline.Schedule, got {type(schedule).__name__}")
        stages = [stages] if isinstance(stages, PipelineStage) else list(stages)
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(process_group)
            world = dist.get_world_size(process_group)
        elif schedule.num_ranks == 1:
            self.rank, world = 0, 1
        else:
            raise ValueError(
                f"a schedule over num_ranks={schedule.num_ranks} needs an initialised torch.distributed process group"
            )
        if world != schedule.num_ranks:
            raise ValueError(
                f"schedule has num_ranks={schedule.num_ranks} but the process group has {world} ranks"
            )
        expected = list(schedule.stages_of(self.rank))
        given = [s.index if isinstance(s, PipelineStage) else type(s).__name__ for s in stages]
        if given != expected or any(s.num_stages != schedule.num_stages for s in stages):
            raise ValueError(
                f"rank {self.rank} must hold PipelineStages {expected} of {schedule.num_stages} (from split(model, "
                f"{schedule.num_stages})), got {given}"
            )
        simulate(schedule)  # raises Deadlock on every rank before anything is sent
        self.schedule = schedule
        self.stages = {s.index: s for s in stages}
        self.process_group = process_group
        if world > 1:
            self._check_ranks_agree()
        self._tied = self._tied_partner()
        if self._tied is not None:
            self._sync_tied_weight()

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters (each once), for its optimizer."""
        seen: dict[int, nn.Parameter] = {}
        for stage in self.stages.values():
            for p in stage.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _check_ranks_agree(self) -> None:
        """Every rank must have cut the same model (names, shapes, dtypes) and send hidden states of one width and
        dtype, or the first mismatched message would abort inside gloo. One all_gather_object, at wrap time."""
        stage = next(iter(self.stages.values()))
        param = next(stage.parameters(), None)
        mine = {"hidden_size": stage.hidden_size, "dtype": str(param.dtype if param is not None else None),
                "model": stage.model_signature}
        world = dist.get_world_size(self.process_group)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine, group=self.process_group)
        ref = everyone[0]
        for rank, other in enumerate(everyone[1:], start=1):
            for key in ("hidden_size", "dtype"):
                if other[key] != ref[key]:
                    raise ValueError(f"pipeline ranks disagree: {key} is {ref[key]} on rank 0 but {other[key]} on "
                                     f"rank {rank}; every rank must split the same model")
            for a, b in zip(ref["model"], other["model"], strict=False):
                if a != b:
                    raise ValueError(f"pipeline ranks disagree on the model: parameter {a[0]!r} {a[1]} {a[2]} on "
                                     f"rank 0, {b[0]!r} {b[1]} {b[2]} on rank {rank}; every rank must split the "
                                     f"same model")
            if len(ref["model"]) != len(other["model"]):
                raise ValueError(f"pipeline ranks disagree on the model: {len(ref['model'])} parameters on rank 0, "
                                 f"{len(other['model'])} on rank {rank}")

    def _check_batch_agrees(self, idx: Tensor) -> None:
        """All ranks must pass batches of one shape: one all-gather of (B, T) per step."""
        world = dist.get_world_size(self.process_group)
        shape = torch.tensor(idx.shape, dtype=torch.long)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape, group=self.process_group)
        for rank, other in enumerate(shapes):
            if not torch.equal(other, shapes[0]):
                raise ValueError(f"pipeline ranks disagree on the batch: idx shape {tuple(shapes[0].tolist())} on "
                                 f"rank 0 but {tuple(other.tolist())} on rank {rank}; every rank passes the same batch")

    # -- messages -------------------------------------------------------------------------------------------------
    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.process_group, rank) if self.process_group is not None else rank

    def _tag(self, kind: str, microbatch: int, stage: int) -> int:
        """Unique per message of a step: the producing (stage, micro-batch) and the direction."""
        return 2 * (stage * self.schedule.num_microbatches + microbatch) + (0 if kind == FORWARD else 1)

    def _tied_partner(self) -> int | None:
        """The other rank holding the tied embedding, when this rank holds one of the two copies."""
        last = self.schedule.num_stages - 1
        first_rank, last_rank = self.schedule.rank_of(0), self.schedule.rank_of(last)
        any_stage = next(iter(self.stages.values()))
        if not any_stage.tied_embeddings or first_rank == last_rank:
            return None
        if self.rank == first_rank:
            return last_rank
        if self.rank == last_rank:
            return first_rank
        return None

    def _tied_weight(self) -> nn.Parameter:
        first = self.stages.get(0)
        return first.tied_weight() if first is not None else self.stages[self.schedule.num_stages - 1].tied_weight()

    @torch.no_grad()
    def _sync_tied_weight(self) -> None:
        weight = self._tied_weight()
        if 0 in self.stages:
            dist.send(weight.data.contiguous(), self._global(self._tied), group=self.process_group)
        else:
            buf = torch.empty_like(weight)
            dist.recv(buf, self._global(self._tied), group=self.process_group)
            weight.copy_(buf)

    @torch.no_grad()
    def _reduce_tied_grad(self) -> None:
        """grad <- own partial + partner's partial; a + b == b + a in floating point, so both copies agree."""
        weight = self._tied_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        mine = weight.grad.clone()
        theirs = torch.empty_like(mine)
        work = dist.isend(mine, self._global(self._tied), group=self.process_group)
        dist.recv(theirs, self._global(self._tied), group=self.process_group)
        work.wait()
        weight.grad.add_(theirs)

    # -- one step -------------------------------------------------------------------------------------------------
    def _check_batch(self, idx: Tensor, targets: Tensor) -> None:
        m = self.schedule.num_microbatches
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) int64 tensor, got {getattr(idx, 'shape', idx)!r}")
        if not isinstance(targets, Tensor) or targets.shape != idx.shape:
            raise ValueError(
                f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(getattr(targets, 'shape', ()))}"
            )
        if idx.size(0) % m:
            raise ValueError(
                f"batch of {idx.size(0)} rows does not split into num_microbatches={m} equal micro-batches "
                f"(the batch size must be a multiple of {m})"
            )

    def step(self, idx: Tensor, targets: Tensor) -> StepResult:
        """Forward and backward of the whole batch (idx, targets: (B, T)) through the pipeline; gradients are
        accumulated into `.grad` of this rank's parameters. Every rank passes the same batch."""
        self._check_batch(idx, targets)
        if self.schedule.num_ranks > 1:
            self._check_batch_agrees(idx)
        sched, m = self.schedule, self.schedule.num_microbatches
        any_stage = next(iter(self.stages.values()))
        param = next(any_stage.parameters())
        device, dtype = param.device, param.dtype
        idx, targets = idx.to(device), targets.to(device)
        B, T = idx.shape
        idx_mb = idx.view(m, B // m, T)  # (m, B/m, T)
        targets_mb = targets.view(m, B // m, T)  # (m, B/m, T)
        denom = max(int((targets != IGNORE_INDEX).sum()), 1)
        hidden_shape = (B // m, T, any_stage.hidden_size)  # (B/m, T, C)

        kept: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}
        local: dict[tuple[str, int, int], Tensor] = {}  # messages between two stages of this rank
        sends: list[tuple[object, Tensor]] = []
        loss_sums: dict[int, Tensor] = {}
        timeline: list[Interval] = []

        def post(tensor: Tensor, kind: str, microbatch: int, from_stage: int, to_stage: int) -> None:
            if sched.rank_of(to_stage) == self.rank:
                local[(kind, microbatch, from_stage)] = tensor
                return
            tensor = tensor.contiguous()
            work = dist.isend(tensor, self._global(sched.rank_of(to_stage)), group=self.process_group,
                              tag=self._tag(kind, microbatch, from_stage))
            sends.append((work, tensor))

        def fetch(kind: str, microbatch: int, from_stage: int) -> Tensor:
            if sched.rank_of(from_stage) == self.rank:
                return local.pop((kind, microbatch, from_stage))
            buf = torch.empty(hidden_shape, device=device, dtype=dtype)
            dist.recv(buf, self._global(sched.rank_of(from_stage)), group=self.process_group,
                      tag=self._tag(kind, microbatch, from_stage))
            return buf

        for action in sched[self.rank]:
            i, s = action.microbatch, action.stage
            stage = self.stages[s]
            if action.kind == FORWARD:
                x = idx_mb[i] if stage.is_first else fetch(FORWARD, i, s - 1).requires_grad_()
                start = time.perf_counter()
                if stage.is_last:
                    loss_sum = stage(x, targets_mb[i])
                    loss_sums[i] = loss_sum.detach()
                    out = loss_sum / denom
                else:
                    out = stage(x)  # (B/m, T, C)
                end = time.perf_counter()
                kept[(i, s)] = (None if stage.is_first else x, out)
                if not stage.is_last:
                    post(out.detach(), FORWARD, i, s, s + 1)
            else:
                grad_out = None if stage.is_last else fetch(BACKWARD, i, s + 1)
                x, out = kept.pop((i, s))
                start = time.perf_counter()
                torch.autograd.backward(out, grad_out)
                end = time.perf_counter()
                if not stage.is_first:
                    post(x.grad, BACKWARD, i, s, s - 1)
            timeline.append(Interval(action, start, end))
            # a posted tensor lives until its send completes: drop finished sends now, or 1F1B would hold all m
            sends = [(work, t) for work, t in sends if not work.is_completed()]

        if self._tied is not None:
            self._reduce_tied_grad()
        for work, _ in sends:
            work.wait()
        loss = None
        if sched.num_stages - 1 in self.stages:
            total = torch.zeros((), device=device)
            for i in range(m):  # micro-batch order, as single-process accumulation adds them
                total = total + loss_sums[i]
            loss = total / denom
        return StepResult(loss, tuple(timeline))
