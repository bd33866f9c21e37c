"""ZeRO-1, -2 and -3 in one process: the model states of data parallelism partitioned over the ranks.

ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 5). Plain data parallelism (data_parallel.py) keeps on every
one of N ranks the parameters, the gradients and the optimizer state of the whole model: Ψ parameters each. The
update of Adam(W) is elementwise, so the optimizer state of element i is only ever read by the update of element i:
a rank needs the state of the elements it updates, nothing else. ZeRO partitions, one model state per stage:

    stage 1 (P_os)      optimizer state   rank r keeps Adam's m, v of its partition only and updates only it;
                                          gradients all-reduced (every rank keeps all of them), the updated
                                          partitions all-gathered so every replica has the new weights
    stage 2 (P_os+g)    + gradients       reduce-scatter instead of all-reduce: rank r receives only the summed
                                          gradient of its partition (the one its update reads)
    stage 3 (P_os+g+p)  + parameters      rank r stores only its partition of the weights; a layer's weights are
                                          all-gathered just before its forward (and again before its backward)

The partition. The parameters, in model order, form one flat vector of Ψ elements, padded with zeros to N·S
elements, S = ceil(Ψ / N), so every rank's slice has the same length (what an all-gather / reduce-scatter of equal
chunks needs); rank r owns [r·S, (r+1)·S), of which o_r = min(S, Ψ - r·S) (at least 0) are real. The padding (at
most N - 1 elements, at the end) gets no optimizer state and never enters an update.

    flat:   | wte.weight | wpe.weight | blocks.0.ln_1.weight | ... | lm_head | pad |        (Ψ,) -> (N·S,)
    ranks:  |   rank 0: S elements   |   rank 1: S elements   |   rank 2: S     |         N x (S,)

Bytes per rank (element size e; `rank_bytes`, checked against reference.memory.zero_rank_bytes): parameters N·S·e
(stages 1-2) or S·e (stage 3); gradients N·S·e (stage 1) or S·e (stages 2-3); optimizer state 2·o_r·e (m and v)
plus the step count. Per step each rank sends 2Ψ elements in stages 1-2 (reduce-scatter + all-gather, the
all-reduce's two halves) and 3Ψ in stage 3 (the parameters gathered for forward and for backward: Sec. 7).

Every rank weights its tokens by the whole batch's count, as in data_parallel.py, so the summed gradient is the
gradient of the batch's token mean. The update is reference.optimizers.AdamW on each rank's owned slice.

    zero = Zero(GPT(config), world_size=3, stage=2, lr=1e-3, weight_decay=0.1)
    for batch in batches:
        loss = zero.train_step(batch)
    params = zero.full_parameters()              # name -> tensor, as the unsharded model names them
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from reference.optimizers import AdamW
from reference.parallel import ranks
from reference.parallel.data_parallel import Batch, scored_tokens, slice_batch

STAGES = (1, 2, 3)


def shard_numel(numel: int, world_size: int) -> int:
    """S = ceil(Ψ / N): the length of every rank's slice of the padded flat vector."""
    return -(-numel // world_size)


def owned_numel(numel: int, world_size: int, rank: int) -> int:
    """o_r: real (non-padding) elements in rank r's slice [r·S, (r+1)·S)."""
    s = shard_numel(numel, world_size)
    return max(0, min(s, numel - rank * s))


def layer_ranges(named: list[tuple[str, Tensor]]) -> list[tuple[str, int, int]]:
    """(layer, lo, hi): the ranges [lo, hi) of the flat vector that stage 3 gathers one at a time: each transformer
    block, and each other top-level module (parameters come in model order, so a layer's range is contiguous)."""
    out: list[tuple[str, int, int]] = []
    offset = 0
    for name, p in named:
        parts = name.split(".")
        layer = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]  # "blocks.0", "wte", "ln_f", ...
        if out and out[-1][0] == layer:
            out[-1] = (layer, out[-1][1], offset + p.numel())
        else:
            out.append((layer, offset, offset + p.numel()))
        offset += p.numel()
    return out


class Zero:
    """N simulated data-parallel ranks with ZeRO stage 1, 2 or 3 over `model`'s parameters (see the module
    docstring). `model` serves as the skeleton each rank's forward runs through (its own weights are not used after
    construction); lr, betas, eps, weight_decay are AdamW's."""

    def __init__(self, model: nn.Module, world_size: int, stage: int, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        self.model, self.world_size, self.stage = model, world_size, stage
        named = list(model.named_parameters())  # tied weights once, under their first name
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.layers = layer_ranges(named)
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])  # (Ψ,)
        self.numel = flat.numel()
        self.shard = shard_numel(self.numel, world_size)  # S
        padded = F.pad(flat, (0, world_size * self.shard - self.numel))  # (N·S,) zeros at the end
        slices = [s.clone() for s in padded.chunk(world_size)]  # N x (S,)
        self.params = slices if stage == 3 else [padded.clone() for _ in range(world_size)]
        """What rank r stores of the weights: its slice (stage 3), or the whole padded vector (stages 1-2)."""
        self.grads: list[Tensor | None] = [None] * world_size
        """What rank r keeps of the reduced gradient: the whole padded vector (stage 1) or its slice (2-3)."""
        self.masters = [nn.Parameter(self._owned(r)) for r in range(world_size)]
        """Rank r's owned real elements, a view into self.params[r]: what its optimizer updates in place."""
        self.optimizers = [AdamW([m], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) for m in self.masters]

    def _owned(self, rank: int, buffer: Tensor | None = None) -> Tensor:
        """The o_r real elements of rank r's slice within `buffer` (default: what rank r stores of the weights)."""
        buffer = self.params[rank] if buffer is None else buffer
        start = 0 if buffer.numel() == self.shard else rank * self.shard  # a slice starts at 0, the whole at r·S
        return buffer[start:start + owned_numel(self.numel, self.world_size, rank)]  # (o_r,)

    def _gather_layer(self, lo: int, hi: int) -> list[Tensor]:
        """Stage 3: all-gather the range [lo, hi) of the flat vector: each rank contributes the part of its slice
        that falls in the range (possibly nothing), and every rank receives the range whole."""
        pieces = []
        for r, piece in enumerate(self.params):
            a, b = max(lo, r * self.shard), min(hi, (r + 1) * self.shard)  # the overlap, in flat coordinates
            pieces.append(piece[a - r * self.shard:max(a, b) - r * self.shard])  # (overlap,), maybe (0,)
        return ranks.all_gather(pieces)  # N x (hi - lo,)

    def _full_weights(self) -> list[Tensor]:
        """Every rank's view of the whole (unpadded) flat vector, (Ψ,) each. Stages 1-2: what it stores. Stage 3:
        gathered layer by layer; a real rank gathers each layer just before that layer's forward, frees it after,
        and gathers it again before the layer's backward. Here autograd keeps the gathered copy instead: the
        values, and so the result, are the same; only when the memory is held differs."""
        if self.stage < 3:
            return [p[:self.numel].clone() for p in self.params]  # (Ψ,) each
        layers = [self._gather_layer(lo, hi) for _, lo, hi in self.layers]  # per unit: N x (hi - lo,)
        return [torch.cat([layer[r] for layer in layers]) for r in range(self.world_size)]  # (Ψ,) each

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(Ψ,) -> name -> tensor of the parameter's shape (views into `flat`)."""
        views = flat.split([math.prod(s) for s in self.shapes])
        return {n: v.view(s) for n, v, s in zip(self.names, views, self.shapes, strict=True)}

    def forward_backward(self, batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """Each rank: its full weights (stored or gathered), forward and backward on its slice of the batch, weighted
        by the whole batch's scored tokens. Returns (the batch's token-mean loss, each rank's local gradient padded
        to (N·S,))."""
        n = scored_tokens(batch)
        loss, local = torch.zeros(()), []
        for weights, (idx, targets) in zip(self._full_weights(), slice_batch(batch, self.world_size), strict=True):
            weights.requires_grad_(True)
            _, loss_sum = functional_call(self.model, self._unflatten(weights), (idx, targets),
                                          {"reduction": "sum"})
            (loss_sum / n).backward()
            local.append(F.pad(weights.grad, (0, self.world_size * self.shard - self.numel)))  # (N·S,)
            loss = loss + loss_sum.detach() / n
        return loss, local

    def train_step(self, batch: Batch) -> float:
        """One ZeRO step: forward/backward on every rank, the gradient reduction of the stage, each rank's AdamW on
        its own slice, and (stages 1-2) the all-gather of the updated slices. Returns the batch's loss."""
        loss, local = self.forward_backward(batch)
        if self.stage == 1:
            self.grads = ranks.all_reduce(local)  # N x (N·S,): every rank keeps the whole summed gradient
        else:
            self.grads = ranks.reduce_scatter(local)  # N x (S,): rank r receives only its slice of the sum
        for r, (master, opt) in enumerate(zip(self.masters, self.optimizers, strict=True)):
            master.grad = self._owned(r, self.grads[r])  # (o_r,): the only gradient rank r's update reads
            opt.step()
        if self.stage < 3:
            slices = [p[r * self.shard:(r + 1) * self.shard] for r, p in enumerate(self.params)]  # N x (S,)
            with torch.no_grad():
                for p, gathered in zip(self.params, ranks.all_gather(slices), strict=True):
                    p.copy_(gathered)  # (N·S,): every replica gets every rank's updated slice
        return float(loss)

    def full_parameters(self, rank: int = 0) -> dict[str, Tensor]:
        """The whole model's weights as rank `rank` sees them (stage 3: gathered), by parameter name."""
        return {n: t.detach().clone() for n, t in self._unflatten(self._full_weights()[rank]).items()}

    def rank_bytes(self, rank: int) -> dict[str, int]:
        """Model-state bytes rank `rank` holds: params, grads (after a step), optimizer (Adam's m and v of the owned
        elements and its step count)."""
        state = self.optimizers[rank].state.get(self.masters[rank], {})
        grads = self.grads[rank]
        return dict(params=self.params[rank].numel() * self.params[rank].element_size(),
                    grads=0 if grads is None else grads.numel() * grads.element_size(),
                    optimizer=sum(t.numel() * t.element_size() for t in state.values()))
