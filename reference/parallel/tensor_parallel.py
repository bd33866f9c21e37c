"""Megatron-LM tensor parallelism, with sequence parallelism, in one process: every layer's weights split over t ranks.

Tensor parallelism (Shoeybi et al. 2019, arXiv 1909.08053, Sec. 3, Fig. 3). A transformer block is two pairs of
matrix products, and each pair is split so that the ranks need one reduction per pair:

    MLP        Y = act(X A), Z = Y B        A split by columns A = [A_1 ... A_t]  (column-parallel: fc_in, fc_gate)
                                            B split by rows    B = [B_1; ...; B_t] (row-parallel: fc_out)
               rank r computes Z_r = act(X A_r) B_r  with no communication (act is elementwise), and Z = sum_r Z_r
    attention  q, k, v projections column-parallel BY WHOLE HEADS (each rank runs its own heads' softmax), the output
               projection row-parallel: O = sum_r attn_r(X) W_r

Two conjugate operators carry the activations in and out of a split pair (Sec. 3, Fig. 3):
    f   identity forward, all-reduce backward   before the column-parallel layer: every rank reads the whole X, and
                                                the gradient wrt X is the sum of the ranks' partial gradients
    g   all-reduce forward, identity backward   after the row-parallel layer: sums the partial outputs Z_r
The row-parallel bias is added once, after g (added on every rank before it, it would be counted t times).

Divisibility: t must divide n_head, n_kv_head and the MLP width. With grouped-query attention (GQA) query head h
reads key/value head h // (n_head / n_kv_head); splitting both head counts by t keeps each rank's query heads next
to their own key/value heads, so attention needs no communication. (Megatron replicates key/value heads when
t > n_kv_head; not written here.)

Sequence parallelism (Korthikanti et al. 2022, arXiv 2205.05198, Sec. 4.2.2, Fig. 5). Between the split pairs the
LayerNorms, residual adds and dropout would run on the whole (B, T, C) activation on every rank, t times over. Instead
each rank keeps its T/t tokens of it there, and the operators change (same bytes on the wire as f and g):
    all-gather along T forward, reduce-scatter backward     replaces f (before the column-parallel layer)
    reduce-scatter along T forward, all-gather backward     replaces g (after the row-parallel layer)
A LayerNorm weight (and a row-parallel bias) then sees only its rank's tokens, so its gradients are partial and are
all-reduced over the ranks after backward. t must divide T.

Shapes below: B batch, T sequence, C = n_embd, t ranks. Each rank's layer is built by taking the full reference
weight and splitting it by rank (`ranks.scatter`), so the split model computes what the reference computes.

    models = shard_model(GPT(config), world_size=2)           # rank r's model: its heads and MLP columns
    losses = forward(models, idx, targets, sequence_parallel=True)
    train_step(models, optimizers, batch, sequence_parallel=True)
    params = gather_parameters(models)                        # name -> full tensor, as the reference names it
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.model import GPT, check_ids
from reference.parallel import ranks
from reference.parallel.data_parallel import Batch, scored_tokens

COLUMN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_gate", "mlp.fc_in")
"""Column-parallel layers of a block: weight (out, in) and bias split along out (dim 0)."""
ROW = ("attn.out_proj", "mlp.fc_out")
"""Row-parallel layers of a block: weight (out, in) split along in (dim 1); the bias whole on every rank."""

Collective = Callable[[Sequence[Tensor]], list[Tensor]]


def _conjugate(forward: Collective, backward: Collective, doc: str) -> Collective:
    """A collective over the ranks' tensors whose backward is `backward` (an autograd.Function over the list)."""

    class _Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *xs: Tensor):
            return tuple(forward(xs))

        @staticmethod
        def backward(ctx, *grads: Tensor):
            return tuple(backward(grads))

    def op(xs: Sequence[Tensor]) -> list[Tensor]:
        return list(_Op.apply(*xs))

    op.__doc__ = doc
    return op


def _identity(xs: Sequence[Tensor]) -> list[Tensor]:
    return [x.clone() for x in xs]


def _own_chunk(xs: Sequence[Tensor]) -> list[Tensor]:
    """Rank r keeps the r-th T/t tokens of its own tensor: (B, T, C) -> (B, T/t, C)."""
    return [x.chunk(len(xs), dim=1)[r].clone() for r, x in enumerate(xs)]


def _gather_t(xs):
    return ranks.all_gather(xs, dim=1)  # N x (B, T, C)


def _reduce_scatter_t(xs):
    return ranks.reduce_scatter(xs, dim=1)  # N x (B, T/t, C)


f = _conjugate(_identity, ranks.all_reduce, "f: identity forward, all-reduce backward (Megatron Sec. 3, Fig. 3a).")
g = _conjugate(ranks.all_reduce, _identity, "g: all-reduce forward, identity backward (Megatron Sec. 3, Fig. 3b).")
gather_sequence = _conjugate(_gather_t, _reduce_scatter_t, "All-gather along T forward, reduce-scatter backward: "
                             "f under sequence parallelism (Korthikanti et al. Sec. 4.2.2).")
reduce_scatter_sequence = _conjugate(_reduce_scatter_t, _gather_t, "Reduce-scatter along T forward, all-gather "
                                     "backward: g under sequence parallelism (Korthikanti et al. Sec. 4.2.2).")
scatter_sequence = _conjugate(_own_chunk, _gather_t, "Keep this rank's tokens forward, all-gather backward: the "
                              "replicated embedding output entering the sequence-parallel region.")
gather_replicated = _conjugate(_gather_t, _own_chunk, "All-gather along T forward, keep this rank's tokens "
                               "backward: leaving the sequence-parallel region for a replicated layer (the head).")


class RowShard(nn.Linear):
    """Rank r's part of a row-parallel Linear: Z_r = X_r B_rᵀ, a partial sum. The bias is added after the reduction,
    once (`_plus_bias`)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # (B, T, C) partial


def split_dim(name: str) -> int | None:
    """The dimension a parameter is split along (0 column-parallel, 1 row-parallel weight), None when replicated."""
    module, _, kind = name.rpartition(".")
    if module.endswith(COLUMN):
        return 0
    return 1 if module.endswith(ROW) and kind == "weight" else None


def _shard_linear(dense: nn.Linear, rank: int, world_size: int, row: bool) -> nn.Linear:
    weight = ranks.scatter(dense.weight.detach(), world_size, dim=1 if row else 0)[rank]  # (out, in/t) | (out/t, in)
    layer = (RowShard if row else nn.Linear)(weight.size(1), weight.size(0), bias=dense.bias is not None,
                                             dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if dense.bias is not None:
            layer.bias.copy_(dense.bias if row else ranks.scatter(dense.bias.detach(), world_size)[rank])
    return layer


def shard_model(model: GPT, world_size: int) -> list[GPT]:
    """One model per rank: a copy of `model` whose column-/row-parallel layers hold only that rank's slice of the
    full weight (its heads, its MLP columns); embeddings, norms and the head stay whole on every rank."""
    cfg = model.config
    hidden = cfg.mlp_ratio * cfg.n_embd
    if not isinstance(world_size, int) or world_size < 1 or cfg.n_head % world_size or cfg.n_kv_head % world_size \
            or hidden % world_size:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1 dividing n_head={cfg.n_head}, "
                         f"n_kv_head={cfg.n_kv_head} and the MLP width {hidden}")
    models = []
    for rank in range(world_size):
        local = copy.deepcopy(model)
        for block in local.blocks:
            for path in COLUMN + ROW:
                parent, _, child = path.rpartition(".")
                dense = getattr(block.get_submodule(parent), child)
                if dense is not None:  # fc_gate exists only in the SwiGLU MLP
                    setattr(block.get_submodule(parent), child, _shard_linear(dense, rank, world_size, path in ROW))
        models.append(local)
    return models


def _plus_bias(y: Tensor, layer: nn.Linear) -> Tensor:
    """The row-parallel bias, added once, after the reduction (each rank its own copy of it)."""
    return y if layer.bias is None else y + layer.bias


def _block(blocks: Sequence[nn.Module], xs: list[Tensor], sequence_parallel: bool) -> list[Tensor]:
    """One transformer block on t ranks: x + attn(ln_1(x)), then x + mlp(ln_2(x)), each a split pair.
    xs: N x (B, T, C), or N x (B, T/t, C) under sequence parallelism."""
    enter, leave = (gather_sequence, reduce_scatter_sequence) if sequence_parallel else (f, g)
    hs = enter([b.ln_1(x) for b, x in zip(blocks, xs, strict=True)])  # N x (B, T, C)
    ys = leave([b.attn(h) for b, h in zip(blocks, hs, strict=True)])  # rank r: its heads -> sum over ranks
    xs = [x + _plus_bias(y, b.attn.out_proj) for b, x, y in zip(blocks, xs, ys, strict=True)]  # (B, T or T/t, C)
    hs = enter([b.ln_2(x) for b, x in zip(blocks, xs, strict=True)])  # N x (B, T, C)
    ys = leave([b.mlp(h) for b, h in zip(blocks, hs, strict=True)])  # rank r: its hidden columns -> sum
    return [x + _plus_bias(y, b.mlp.fc_out) for b, x, y in zip(blocks, xs, ys, strict=True)]


def forward(models: Sequence[GPT], idx: Tensor, targets: Tensor, *, sequence_parallel: bool = False) -> list[Tensor]:
    """Every rank's summed token loss (reduction "sum"), each equal to the reference model's."""
    t, T = len(models), idx.size(1)
    check_ids(idx, models[0].config.vocab_size, models[0].config.block_size)
    if sequence_parallel and T % t:
        raise ValueError(f"sequence parallelism splits T={T} over {t} ranks: T must be divisible by world_size")
    xs = [m.wte(idx) for m in models]  # N x (B, T, C), replicated
    if models[0].wpe is not None:
        xs = [x + m.wpe(torch.arange(T, device=idx.device)) for m, x in zip(models, xs, strict=True)]
    if sequence_parallel:
        xs = scatter_sequence(xs)  # N x (B, T/t, C)
    for i in range(len(models[0].blocks)):
        xs = _block([m.blocks[i] for m in models], xs, sequence_parallel)
    xs = [m.ln_f(x) for m, x in zip(models, xs, strict=True)]
    if sequence_parallel:
        xs = gather_replicated(xs)  # N x (B, T, C)
    return [m.loss(m.lm_head(x), targets, "sum") for m, x in zip(models, xs, strict=True)]  # logits (B, T, V)


def in_sequence_region(name: str) -> bool:
    """Replicated parameters that act on this rank's tokens only under sequence parallelism: the norms and the
    row-parallel biases (their gradients are partial sums over the ranks' tokens)."""
    return split_dim(name) is None and not name.startswith(("wte.", "wpe.", "lm_head."))


def forward_backward(models: Sequence[GPT], batch: Batch, *, sequence_parallel: bool = False) -> float:
    """Forward and backward of the whole batch on every rank, token-weighted as reference.training; the gradients of
    the sequence-parallel region's replicated parameters all-reduced. Returns the batch's token-mean loss."""
    n = scored_tokens(batch)
    losses = forward(models, *batch, sequence_parallel=sequence_parallel)
    (torch.stack(losses).sum() / n).backward()  # each rank backpropagates its own loss: the sum over ranks
    if sequence_parallel:
        per_rank = [dict(m.named_parameters()) for m in models]
        for name in filter(in_sequence_region, per_rank[0]):
            for params, reduced in zip(per_rank, ranks.all_reduce([p[name].grad for p in per_rank]), strict=True):
                params[name].grad = reduced
    return float(losses[0].detach()) / n


def train_step(models: Sequence[GPT], optimizers: Sequence[torch.optim.Optimizer], batch: Batch, *,
               sequence_parallel: bool = False) -> float:
    """One optimizer step: each rank's elementwise optimizer updates its own shards (and its copy of the replicated
    parameters, whose gradients are equal on every rank, so the copies stay equal). Returns the batch's loss."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = forward_backward(models, batch, sequence_parallel=sequence_parallel)
    for opt in optimizers:
        opt.step()
    return loss


def gather_parameters(models: Sequence[GPT], *, grads: bool = False) -> dict[str, Tensor]:
    """The full tensors (or their gradients), as the unsharded model names them: split ones concatenated along
    `split_dim` in rank order, replicated ones from rank 0."""
    per_rank = [dict(m.named_parameters()) for m in models]
    out = {}
    for name in per_rank[0]:
        parts = [(p[name].grad if grads else p[name]).detach() for p in per_rank]
        dim = split_dim(name)
        out[name] = parts[0].clone() if dim is None else torch.cat(parts, dim=dim)  # e.g. t x (out/t, in) -> (out, in)
    return out
