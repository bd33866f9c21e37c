"""Pipeline parallelism, one process: the model's layers cut into p stages, a batch cut into m micro-batches, and
the 1F1B schedule that runs them (PipeDream-Flush: Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2).

Stage s holds a contiguous run of blocks (stage 0 also the embeddings, stage p-1 also ln_f and the head) and lives
on rank s. Micro-batch i flows forward through the stages and its gradient flows back:

    F(i, s): x = receive(activation of i from s-1)    (stage 0 reads idx)      y = stage_s(x)    send y to s+1
    B(i, s): g = receive(d loss / d y from s+1)       (stage p-1 starts from its loss)
             backward of y = stage_s(x) with output gradient g                  send d loss / d x to s-1

Only tensors of shape (B/m, T, C) travel between stages, each sent detached and received as a fresh leaf that
requires grad: exactly what crosses a process boundary, so autograd never reaches across a stage.

The loss is token-weighted (reference/training.py): the last stage scores micro-batch i as sum_t CE_t / n_tokens,
n_tokens the scored tokens of the WHOLE batch, so the gradients the m backwards accumulate add up to the gradient of
the batch's token mean, whatever the padding of each micro-batch.

A schedule is data: per rank, the order of its actions (`F3` = forward of micro-batch 3 on the rank's stage).
    GPipe (Huang et al. 2019, arXiv 1811.06965):  all m forwards, then all m backwards.
    1F1B: rank r runs num_warmup_microbatches = min(p - r - 1, m) forwards (Warmup), then alternates one forward and
    one backward (Steady state), then runs the backwards left (Cooldown). The bubble is GPipe's, (p-1)/(m+p-1), but
    rank r never holds more than min(p - r, m) micro-batches' activations instead of m.
`run_pipeline` executes any such schedule the way ranks would: in rounds, every rank runs its next action when the
input it needs has arrived (and waits otherwise), and it records the order in which each rank actually ran them.

Simulated ranks share one model here: the stages are views of its modules, so each parameter's .grad is the sum of
what every micro-batch's backward adds. With tied embeddings (GPT-2) the first and the last stage both use
wte.weight; autograd adds both stages' contributions into the one tensor, which is what the two copies' gradient
all-reduce of a real pipeline computes (Megatron-LM, arXiv 1909.08053).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reference.model import GPT, IGNORE_INDEX

Action = tuple[str, int]
"""("F", i) or ("B", i): the forward or backward of micro-batch i on the rank's stage."""


def _check(num_stages: int, num_microbatches: int) -> None:
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def gpipe(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """GPipe: every rank runs the m forwards, then the m backwards."""
    _check(num_stages, num_microbatches)
    m = num_microbatches
    return [[("F", i) for i in range(m)] + [("B", i) for i in range(m)] for _ in range(num_stages)]


def one_f_one_b(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """1F1B (PipeDream-Flush), per rank: Warmup, Steady state, Cooldown (picotron's train_step_pipeline_1f1b)."""
    _check(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    forwards, backwards = [("F", i) for i in range(m)], [("B", i) for i in range(m)]  # each in micro-batch order
    schedule = []
    for rank in range(p):
        # Warmup: fill the pipe. Rank r must run p - r - 1 forwards before the first backward reaches it.
        num_warmup_microbatches = min(p - rank - 1, m)
        num_microbatches_remaining = m - num_warmup_microbatches
        actions = forwards[:num_warmup_microbatches]
        # Steady state: one forward of the next micro-batch, then one backward of the oldest in flight.
        for f, b in zip(forwards[num_warmup_microbatches:], backwards, strict=False):
            actions += [f, b]
        # Cooldown: drain the micro-batches still in flight.
        schedule.append(actions + backwards[num_microbatches_remaining:])
    return schedule


def format_schedule(schedule: list[list[Action]]) -> str:
    """`rank 0: F0 F1 B0 ...`, one line per rank (optimized.pipeline.Schedule prints and parses the same lines)."""
    return "\n".join(f"rank {r}: " + " ".join(f"{kind}{i}" for kind, i in acts) for r, acts in enumerate(schedule))


def stage_boundaries(n_layer: int, num_stages: int) -> list[range]:
    """The blocks of each stage: contiguous, as equal as possible, the first stages one longer when n_layer % p."""
    if not 1 <= num_stages <= n_layer:
        raise ValueError(f"num_stages must be in 1 .. n_layer={n_layer} (every stage needs a block), got {num_stages}")
    sizes = [n_layer // num_stages + (s < n_layer % num_stages) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


class Stage(nn.Module):
    """Stage s of `model`: embeddings (first stage), its blocks, ln_f and the head (last stage). Shares the model's
    modules. forward(x) takes idx (B, T) on the first stage, the hidden state (B, T, C) elsewhere; it returns the
    hidden state, or on the last stage the summed token loss against `targets`."""

    def __init__(self, model: GPT, blocks: range, index: int, num_stages: int) -> None:
        super().__init__()
        self.model, self.blocks, self.index = model, blocks, index
        self.is_first, self.is_last = index == 0, index == num_stages - 1

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        m = self.model
        if self.is_first:
            idx = x
            x = m.wte(idx)  # (B, T, C)
            if m.wpe is not None:
                x = x + m.wpe(torch.arange(idx.size(1)))  # (B, T, C) + (T, C)
        for i in self.blocks:
            x = m.blocks[i](x)  # (B, T, C)
        if not self.is_last:
            return x
        logits = m.lm_head(m.ln_f(x))  # (B, T, V)
        return m.loss(logits, targets, "sum")


@dataclass
class PipelineRun:
    """What `run_pipeline` did."""

    loss: Tensor
    """The whole batch's token-mean loss (detached), as the last stage sums it."""
    order: list[list[str]]
    """order[r]: the actions rank r ran, in the order it ran them (`F0`, `B0`, ...)."""
    rounds: list[list[str]]
    """rounds[t]: what each rank did in round t (`-` = waited), the pipeline's timeline with unit-cost actions."""


def run_pipeline(model: GPT, idx: Tensor, targets: Tensor, num_stages: int, num_microbatches: int,
                 schedule: list[list[Action]] | None = None, *, verbose: bool = False) -> PipelineRun:
    """One forward and backward of the batch (idx, targets: (B, T)) through `num_stages` stages, following
    `schedule` (default 1F1B); gradients are accumulated into the model's .grad. With verbose=True, prints the
    schedule and each round's actions."""
    p, m = num_stages, num_microbatches
    schedule = one_f_one_b(p, m) if schedule is None else schedule
    if len(schedule) != p:
        raise ValueError(f"schedule has {len(schedule)} rank lists, expected num_stages={p}")
    if idx.size(0) % m:
        raise ValueError(f"batch of {idx.size(0)} rows does not split into num_microbatches={m} equal parts")
    stages = [Stage(model, blocks, s, p) for s, blocks in enumerate(stage_boundaries(len(model.blocks), p))]
    idx_mb, targets_mb = idx.chunk(m), targets.chunk(m)  # m x (B/m, T)
    n_tokens = max(int((targets != IGNORE_INDEX).sum()), 1)  # of the whole batch: token-weighted

    # Point-to-point messages in flight: (kind, micro-batch, receiving stage) -> tensor.
    mailbox: dict[tuple[str, int, int], Tensor] = {}
    kept: list[dict[int, tuple[Tensor | None, Tensor]]] = [{} for _ in range(p)]  # per rank: i -> (input, output)
    loss = torch.zeros(())
    order: list[list[str]] = [[] for _ in range(p)]
    rounds: list[list[str]] = []
    position = [0] * p  # the next action of each rank
    if verbose:
        print(format_schedule(schedule))

    def ready(rank: int, kind: str, i: int) -> bool:
        if kind == "F":
            return rank == 0 or ("F", i, rank) in mailbox
        return i in kept[rank] and (rank == p - 1 or ("B", i, rank) in mailbox)

    while any(position[r] < len(schedule[r]) for r in range(p)):
        # Every rank looks at its next action; those whose input has arrived run it in this round. Sends are
        # delivered after the round, so a message takes one round to cross, as a real send does.
        runnable = [r for r in range(p) if position[r] < len(schedule[r]) and ready(r, *schedule[r][position[r]])]
        if not runnable:
            waiting = {r: schedule[r][position[r]] for r in range(p) if position[r] < len(schedule[r])}
            raise RuntimeError(f"pipeline deadlock: every rank waits for a message that never comes: {waiting}")
        outbox: dict[tuple[str, int, int], Tensor] = {}
        for r in runnable:
            kind, i = schedule[r][position[r]]
            if kind == "F":
                x = idx_mb[i] if r == 0 else mailbox.pop(("F", i, r)).requires_grad_()  # a fresh leaf
                if r == p - 1:
                    y = stages[r](x, targets_mb[i]) / n_tokens  # this micro-batch's share of the batch mean
                    loss = loss + y.detach()
                else:
                    y = stages[r](x)  # (B/m, T, C)
                    outbox[("F", i, r + 1)] = y.detach()  # send the activation on
                kept[r][i] = (None if r == 0 else x, y)
            else:
                x, y = kept[r].pop(i)
                grad_y = None if r == p - 1 else mailbox.pop(("B", i, r))  # (B/m, T, C) from stage r+1
                torch.autograd.backward(y, grad_y)  # adds this micro-batch's gradient to the stage's .grad
                if r > 0:
                    outbox[("B", i, r - 1)] = x.grad  # send d loss / d x back
            order[r].append(f"{kind}{i}")
            position[r] += 1
        mailbox.update(outbox)
        rounds.append([order[r][-1] if r in runnable else "-" for r in range(p)])
        if verbose:
            print(f"round {len(rounds) - 1:3d}: " + " ".join(f"{a:>4}" for a in rounds[-1]))
    return PipelineRun(loss, order, rounds)


if __name__ == "__main__":  # a student's first run: python -m reference.parallel.pipeline
    from reference.data import make_batches
    from reference.model import GPTConfig

    demo = GPT(GPTConfig(n_layer=4))
    ids, tgt = make_batches(1, batch_size=8, seq_len=16, vocab_size=64, seed=0)[0]
    result = run_pipeline(demo, ids, tgt, num_stages=4, num_microbatches=4, verbose=True)
    print(f"loss {float(result.loss):.4f}")
