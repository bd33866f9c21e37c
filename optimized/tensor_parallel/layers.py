"""Sharded layers (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053, Sec. 3).

A Linear Y = X Aᵀ (A: out x in) is split over the t ranks of a group in two ways:
    column parallel  A = [A_1; ...; A_t] by output rows: rank i computes Y_i = X A_iᵀ, its slice of the outputs.
    row parallel     A = [A_1 ... A_t] by input columns: rank i computes X_i A_iᵀ from its slice of the inputs,
                     and Y = sum_i X_i A_iᵀ needs an all-reduce (g).
A fused projection (GPT-2's c_attn = [q; k; v]) is column-split section by section, so rank i holds the i-th slice
of q, of k and of v, concatenated: the model's own split of the output into q, k, v then works on local widths.
HF GPT-2's Conv1D stores its weight transposed, (in, out), and computes X A + b; `layout="conv1d"` keeps that
storage so state dicts keep their shapes. The embedding table is split by vocabulary rows.

Every layer builds the full weight and keeps its slice, or (`from_dense`) slices an existing layer, so a model made of
them equals the model it was cut from. `shard` and `unshard` are the one place that knows how a full tensor maps to
the ranks' slices (used by `optimized.tensor_parallel.state`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from optimized.distributed.groups import group_rank_and_size
from optimized.tensor_parallel.regions import copy_to_region, gather_from_region, reduce_from_region, scatter_to_region

LAYOUTS = ("linear", "conv1d")


def check_divisible(value: int, t: int, what: str) -> None:
    if value % t:
        raise ValueError(f"{what}={value} must be divisible by the tensor-parallel size {t}")


def linear_like(module: nn.Module) -> tuple[int, int, str] | None:
    """(in_features, out_features, layout) of an nn.Linear or a transformers Conv1D (found by duck typing, so
    transformers need not be imported); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.nf, "conv1d"
    return None


def _dense_linear_init(in_features: int, out_features: int, bias: bool, seed: int) -> tuple[Tensor, Tensor | None]:
    """nn.Linear's default initialisation (Kaiming uniform), drawn from a generator seeded by `seed`, so every rank
    builds the same full weight."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
    b = None
    if bias:
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        b = torch.empty(out_features).uniform_(-bound, bound, generator=gen)
    return weight, b


class ShardedLayer(nn.Module):
    """What every sharded layer shares: its group, and how a full tensor maps to this rank's slice."""

    def _setup_group(self, process_group) -> None:
        self.process_group = process_group
        self.tp_rank, self.tp_size = group_rank_and_size(process_group)
        self.split_dims: dict[str, int] = {}
        """Parameter name -> the dimension of the full tensor it is a slice of (absent: whole on every rank)."""
        self.sections: tuple[int, ...] | None = None
        """Sizes of the fused sections along the split dimension (q, k, v), each split over the ranks; None: one."""

    def shard(self, name: str, full: Tensor) -> Tensor:
        """This rank's slice of the full tensor of parameter `name`."""
        dim = self.split_dims.get(name)
        if dim is None:
            return full
        parts = full.split(self.sections, dim=dim) if self.sections else (full,)
        return torch.cat([p.chunk(self.tp_size, dim=dim)[self.tp_rank] for p in parts], dim=dim)

    def unshard(self, name: str, slices: Sequence[Tensor]) -> Tensor:
        """The full tensor of parameter `name` from every rank's slice (in rank order)."""
        dim = self.split_dims[name]
        if not self.sections:
            return torch.cat(list(slices), dim=dim)
        local = [s // self.tp_size for s in self.sections]
        pieces = [s.split(local, dim=dim) for s in slices]  # [rank][section]
        return torch.cat([pieces[r][j] for j in range(len(local)) for r in range(self.tp_size)], dim=dim)

    @torch.no_grad()
    def load_full_(self, **full: Tensor | None) -> None:
        """Copy this rank's slice of each full tensor (weight=..., bias=...) into the shards."""
        for name, tensor in full.items():
            param = getattr(self, name)
            if param is None or tensor is None:
                if (param is None) != (tensor is None):
                    raise ValueError(f"{type(self).__name__}.{name}: full tensor and shard must both exist or not")
                continue
            piece = self.shard(name, tensor)
            if piece.shape != param.shape:
                raise ValueError(f"{type(self).__name__}.{name}: full shape {tuple(tensor.shape)} does not give a "
                                 f"shard of {tuple(param.shape)} on {self.tp_size} ranks")
            param.copy_(piece)

    def _load_dense(self, dense: nn.Module) -> None:
        """Slice `dense`'s weight (and bias) into the shards, keeping its requires_grad flags."""
        self.load_full_(**{name: getattr(dense, name, None) for name in self._parameters})
        for name, param in self._parameters.items():
            if param is not None:
                param.requires_grad_(getattr(dense, name).requires_grad)


class _ParallelLinear(ShardedLayer):
    """What the column- and row-parallel layers share: an (out, in) or Conv1D (in, out) weight, cut from a dense
    layer by `from_dense`."""

    def _weight(self, local_in: int, local_out: int, layout: str, device, dtype) -> nn.Parameter:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        shape = (local_out, local_in) if layout == "linear" else (local_in, local_out)
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

    def _linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        weight = self.weight if self.layout == "linear" else self.weight.t()  # (out_local, in_local)
        return F.linear(x, weight, bias)

    @classmethod
    def from_dense(cls, dense: nn.Module, process_group: dist.ProcessGroup | None = None, **kwargs):
        """The parallel layer holding this rank's slice of `dense` (an nn.Linear or a transformers Conv1D), equal to
        it once gathered."""
        shape = linear_like(dense)
        if shape is None:
            raise ValueError(f"from_dense needs an nn.Linear or a transformers Conv1D, got {type(dense).__name__}")
        in_features, out_features, layout = shape
        layer = cls(in_features, out_features, dense.bias is not None, process_group=process_group, layout=layout,
                    device=dense.weight.device, dtype=dense.weight.dtype, **kwargs)
        layer._load_dense(dense)
        return layer


class ColumnParallelLinear(_ParallelLinear):
    """Y_i = f(X) A_iᵀ + b_i: the outputs split over the group (Megatron Sec. 3). Input (..., in), output
    (..., out / t), or (..., out) with `gather_output=True`.

    sections: sizes of fused outputs (e.g. q, k, v widths) split one by one, so each rank holds whole heads of each.
    copy_input=False skips f when the caller has applied it already: several column-parallel layers reading the same
    input (q, k and v) then share one all-reduce in backward, as Megatron's fused QKV does. `shared_input` is the
    parallelize-made alternative: f applied once at the parent's input, skipped here for exactly that tensor."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        process_group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        copy_input: bool = True,
        sections: Sequence[int] | None = None,
        layout: str = "linear",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_group(process_group)
        if sections is not None:
            sections = tuple(sections)
            if sum(sections) != out_features or any(not isinstance(s, int) or s < 1 for s in sections):
                raise ValueError(f"sections {sections} must be positive integers summing to out_features="
                                 f"{out_features}")
            for j, s in enumerate(sections):
                check_divisible(s, self.tp_size, f"sections[{j}]")
            self.sections = sections
        check_divisible(out_features, self.tp_size, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.copy_input = gather_output, copy_input
        self.shared_input = None
        """Set by parallelize: the parent's `SharedInput` hook, whose f-applied tensor needs no second f."""
        self.weight = self._weight(in_features, out_features // self.tp_size, layout, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features // self.tp_size, device=device, dtype=dtype)) if bias \
            else None
        self.split_dims = {"weight": 0 if layout == "linear" else 1, "bias": 0}
        weight, b = _dense_linear_init(in_features, out_features, bias, seed)
        self.load_full_(weight=weight if layout == "linear" else weight.t(), bias=b)

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input and not (self.shared_input is not None and self.shared_input.applied_to(x)):
            x = copy_to_region(x, self.process_group)
        y = self._linear(x, self.bias)  # (..., out / t)
        return gather_from_region(y, self.process_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (/{self.tp_size} ranks"
                f"{f', sections {self.sections}' if self.sections else ''}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, layout={self.layout}")


class RowParallelLinear(_ParallelLinear):
    """Y = g(sum_i X_i A_iᵀ) + b: the inputs split over the group, the bias added once after the all-reduce.
    Input (..., in / t) (`input_is_parallel=True`, the output of a column-parallel layer) or (..., in), which is
    then scattered. Output (..., out) on every rank."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        process_group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        layout: str = "linear",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_group(process_group)
        check_divisible(in_features, self.tp_size, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.weight = self._weight(in_features // self.tp_size, out_features, layout, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.split_dims = {"weight": 1 if layout == "linear" else 0}
        weight, b = _dense_linear_init(in_features, out_features, bias, seed)
        self.load_full_(weight=weight if layout == "linear" else weight.t(), bias=b)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.process_group)  # (..., in / t)
        y = reduce_from_region(self._linear(x, None), self.process_group)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (/{self.tp_size} ranks), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, layout={self.layout}")


class VocabParallelEmbedding(ShardedLayer):
    """The embedding table split by vocabulary rows: rank i holds ids [i V/t, (i+1) V/t). Each rank looks up the ids
    in its range, writes zeros for the others, and g sums the partial results: (..., C) on every rank.

    Every rank sees every id, so each refuses an id outside [0, V) itself (as nn.Embedding would), before any
    collective: no rank trains on a silently zero embedding."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_group(process_group)
        check_divisible(num_embeddings, self.tp_size, "num_embeddings (vocabulary size)")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = num_embeddings // self.tp_size
        self.vocab_start = self.tp_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))  # (V/t, C)
        self.split_dims = {"weight": 0}
        full = torch.randn(num_embeddings, embedding_dim, generator=torch.Generator().manual_seed(seed))
        self.load_full_(weight=full)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, process_group: dist.ProcessGroup | None = None, **kwargs):
        """The vocab-parallel embedding holding this rank's rows of `embedding`."""
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise ValueError("embedding: padding_idx, max_norm and sparse gradients are not supported")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, process_group=process_group,
                    device=embedding.weight.device, dtype=embedding.weight.dtype, **kwargs)
        layer._load_dense(embedding)
        return layer

    def forward(self, idx: Tensor) -> Tensor:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_embeddings):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(f"input ids: id {bad} is outside the vocabulary [0, num_embeddings="
                             f"{self.num_embeddings})")
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)  # (...)
        local = (idx - self.vocab_start).masked_fill(outside, 0)  # (...)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (..., C)
        return reduce_from_region(out, self.process_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{self.tp_size} ranks: ids [{self.vocab_start}, {self.vocab_end})), "
                f"{self.embedding_dim}")
