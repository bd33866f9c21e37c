"""Cut a GPT into pipeline stages: embedding and the first blocks, then blocks, then the last blocks and the head.

Works on any module laid out like the tiny GPT: `wte`, `wpe` (embeddings), `blocks` (a ModuleList of residual
blocks), `ln_f`, `lm_head`. Stage s holds a contiguous run of blocks; stage 0 adds the embeddings in front, the last
stage adds ln_f and lm_head behind. Every stage holds at least one block.

Without `boundaries` the cut minimises the largest stage's parameter count (the usual proxy for balanced memory and
compute), counting the output head on the last stage even when it is tied to wte: on separate ranks each holds its
own copy (Megatron-LM keeps the word embedding on the first and the last stage and all-reduces its gradient between
them; arXiv 1909.08053, and `PipelineExecutor` does the same).

The stages share the model's modules (nothing is copied): run on one rank, stage by stage, they compute what the
model computes and their gradients land in the model's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Targets equal to this are not scored (torch.nn.functional.cross_entropy's convention, the tiny GPT's too)."""


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of cross-entropy over the tokens whose target is not IGNORE_INDEX (fp32)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class PipelineStage(nn.Module):
    """One contiguous piece of the GPT.

    forward(x, targets=None): x is idx (B, T) int64 on the first stage, the hidden state (B, T, C) elsewhere. Returns
    the hidden state (B, T, C), or on the last stage the logits (B, T, V), or with `targets` the summed token loss.
    """

    def __init__(
        self,
        index: int,
        num_stages: int,
        blocks: Sequence[nn.Module],
        block_indices: range,
        *,
        hidden_size: int,
        wte: nn.Embedding | None = None,
        wpe: nn.Embedding | None = None,
        ln_f: nn.Module | None = None,
        lm_head: nn.Linear | None = None,
        tied_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        self.block_indices = block_indices
        """Indices of the model's blocks this stage runs."""
        self.hidden_size = hidden_size
        """Width C of the hidden state sent between stages."""
        self.tied_embeddings = tied_embeddings
        """The model's lm_head.weight is its wte.weight: first and last stage each use it."""
        self.wte = wte
        self.wpe = wpe
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = ln_f
        self.lm_head = lm_head

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def tied_weight(self) -> nn.Parameter | None:
        """The embedding weight shared by the first and last stage (the one this stage uses), if tied."""
        if not self.tied_embeddings:
            return None
        if self.is_first:
            return self.wte.weight
        if self.is_last:
            return self.lm_head.weight
        return None

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.is_first:
            pos = torch.arange(x.size(1), device=x.device)  # (T,)
            x = self.wte(x) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        if not self.is_last:
            return x
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        return token_loss_sum(logits, targets)

    def extra_repr(self) -> str:
        parts = ["wte, wpe"] if self.is_first else []
        parts.append(f"blocks {self.block_indices.start}..{self.block_indices.stop - 1}")
        if self.is_last:
            parts.append("ln_f, lm_head")
        return f"stage {self.index} of {self.num_stages}: " + ", ".join(parts)


def _count(modules: Sequence[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def balanced_boundaries(costs: Sequence[int], num_stages: int, first: int = 0, last: int = 0) -> list[int]:
    """Cut points b_1 < ... < b_{S-1} of blocks with these costs into S contiguous non-empty runs, minimising the
    largest run's cost, where the first run also pays `first` and the last `last` (dynamic programming)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> int:  # stage s holds blocks i .. j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0) + (last if s == num_stages - 1 else 0)

    # best[s][j]: (largest stage cost, cut points) for blocks 0 .. j-1 in stages 0 .. s
    inf = (float("inf"), [])
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = (cost(0, 0, j), [])
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            options = [(max(best[s - 1][i][0], cost(s, i, j)), best[s - 1][i][1] + [i]) for i in range(s, j)]
            best[s][j] = min(options, key=lambda o: o[0])
    return best[num_stages - 1][n][1]


def split(model: nn.Module, num_stages: int, boundaries: Sequence[int] | None = None) -> list[PipelineStage]:
    """Cut `model` into `num_stages` PipelineStages.

    boundaries: the S-1 block indices where stages 1 .. S-1 begin, strictly increasing in 1 .. n_layer-1 (e.g. [2]
    puts blocks 0, 1 on stage 0 and 2 .. on stage 1). Default: balanced by parameter count."""
    missing = [name for name in ("wte", "wpe", "blocks", "ln_f", "lm_head") if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"model must have the tiny GPT's layout (wte, wpe, blocks, ln_f, lm_head); "
            f"{type(model).__name__} lacks {', '.join(missing)}"
        )
    n_layer = len(model.blocks)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if num_stages > n_layer:
        raise ValueError(
            f"num_stages={num_stages} exceeds the model's {n_layer} blocks: every stage needs at least one block"
        )
    if boundaries is None:
        costs = [_count([b]) for b in model.blocks]
        cuts = balanced_boundaries(
            costs, num_stages, first=_count([model.wte, model.wpe]), last=_count([model.ln_f, model.lm_head])
        )
    else:
        cuts = list(boundaries)
        if len(cuts) != num_stages - 1:
            raise ValueError(
                f"boundaries must hold num_stages - 1 = {num_stages - 1} block indices, got {len(cuts)}: {cuts}"
            )
        if any(not isinstance(b, int) or isinstance(b, bool) for b in cuts):
            raise ValueError(f"boundaries must be integers, got {cuts}")
        if any(b <= a for a, b in zip([0] + cuts, cuts + [n_layer], strict=True)):
            raise ValueError(
                f"boundaries must be strictly increasing block indices in 1 .. {n_layer - 1} (every stage needs a "
                f"block), got {cuts}"
            )
    tied = model.lm_head.weight is model.wte.weight
    hidden_size = model.wte.embedding_dim
    edges = [0] + cuts + [n_layer]
    stages = []
    for s in range(num_stages):
        indices = range(edges[s], edges[s + 1])
        first, last = s == 0, s == num_stages - 1
        stages.append(
            PipelineStage(
                s,
                num_stages,
                [model.blocks[i] for i in indices],
                indices,
                hidden_size=hidden_size,
                wte=model.wte if first else None,
                wpe=model.wpe if first else None,
                ln_f=model.ln_f if last else None,
                lm_head=model.lm_head if last else None,
                tied_embeddings=tied,
            )
        )
    return stages
