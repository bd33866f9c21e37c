"""Tensor (intra-layer model) parallel: Megatron-LM (Shoeybi et al. 2019, arXiv 1909.08053), Sec. 3.

A Linear Y = X Aᵀ (A: out x in) is split over the t ranks of a group in two ways:
    column parallel  A = [A_1; ...; A_t] by output rows: rank i computes Y_i = X A_iᵀ, its slice of the outputs.
    row parallel     A = [A_1 ... A_t] by input columns: rank i computes X_i A_iᵀ from its slice of the inputs,
                     and Y = sum_i X_i A_iᵀ needs an all-reduce.
The MLP GeLU(X A) B takes A column-parallel and B row-parallel: GeLU is elementwise, so each rank applies it to its
own Y_i, and the block needs one all-reduce forward (after B) and one backward (before A). Attention is split by
heads: q/k/v column-parallel (each rank gets whole heads), out_proj row-parallel. So one transformer layer costs
two all-reduces forward and two backward (Megatron Sec. 3, Fig. 4), each of B*T*C activations.

The conjugate operators (Megatron Sec. 3, Fig. 3), each a tiny autograd.Function:
    f  copy_to_region      identity forward, all-reduce backward   (before a column-parallel layer)
    g  reduce_from_region  all-reduce forward, identity backward   (after a row-parallel layer)
    scatter_to_region      keep this rank's slice of the last dim forward, all-gather backward
    gather_from_region     all-gather the last dim forward, keep this rank's slice backward

Embedding and output head (Megatron Sec. 3, "Input and output embedding"): the token embedding E (V x C) is split
by vocabulary rows; a rank looks up the ids in its range, zeros the others, and g sums the ranks' partial results.
The tied output head uses the same shard of E as a column-parallel linear, so each rank holds the logits of its
vocabulary slice (B, T, V/t). The loss is the vocab-parallel cross-entropy: the softmax's max and sum of
exponentials, and the target's logit, are all-reduced (3 numbers per token instead of V logits), and no rank ever
holds the full (B, T, V) logits. That is the choice made here; `gather_from_region` gives the full logits when a
caller wants them (e.g. for sampling).

Every sharded layer builds the full weight and keeps its slice (`from_dense` slices an existing layer), so a model
parallelised by `parallelize` equals the model it was built from. With t = 1 no collective is issued.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from optimized.data_parallel import group_rank_and_size, single_device

IGNORE_INDEX = -100
"""Targets equal to this are not scored (torch.nn.functional.cross_entropy's convention)."""

PLAN_KINDS = ("colwise", "rowwise", "vocab")


# --- the conjugate operators -----------------------------------------------------------------------------------------


def _all_reduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """A reduced copy of x (never in place: x may be read elsewhere in the graph)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _slice_last_dim(x: Tensor, group) -> Tensor:
    rank, t = group_rank_and_size(group)
    if x.size(-1) % t:
        raise ValueError(f"last dimension {x.size(-1)} must be divisible by the group size {t}")
    return x.chunk(t, dim=-1)[rank].contiguous()  # (..., n / t)


def _gather_last_dim(x: Tensor, group) -> Tensor:
    _, t = group_rank_and_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(t)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)  # (..., n * t)


class CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward (Megatron-LM, arXiv 1909.08053, Sec. 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward (Megatron-LM, arXiv 1909.08053, Sec. 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ScatterToRegion(torch.autograd.Function):
    """Split the last dim and keep this rank's slice forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _slice_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gather_last_dim(grad, ctx.group), None


class GatherFromRegion(torch.autograd.Function):
    """All-gather the last dim forward, keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _slice_last_dim(grad, ctx.group), None


def _group_size(group) -> int:
    return group_rank_and_size(group)[1]


def copy_to_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """f: identity forward, all-reduce backward."""
    return x if _group_size(group) == 1 else CopyToRegion.apply(x, group)


def reduce_from_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """g: all-reduce forward, identity backward."""
    return x if _group_size(group) == 1 else ReduceFromRegion.apply(x, group)


def scatter_to_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's slice of the last dim forward, all-gather backward."""
    return x if _group_size(group) == 1 else ScatterToRegion.apply(x, group)


def gather_from_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All-gather of the last dim forward, this rank's slice backward."""
    return x if _group_size(group) == 1 else GatherFromRegion.apply(x, group)


# --- sharded layers --------------------------------------------------------------------------------------------------


def _check_divisible(value: int, t: int, what: str) -> None:
    if value % t:
        raise ValueError(f"{what}={value} must be divisible by the tensor-parallel size {t}")


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


class _ShardedLayer(nn.Module):
    split_dims: dict[str, int] = {}
    """Parameter name -> the dimension of the full tensor it is a slice of (absent: replicated on every rank)."""

    def _setup_group(self, process_group) -> None:
        self.process_group = process_group
        self.tp_rank, self.tp_size = group_rank_and_size(process_group)

    @torch.no_grad()
    def load_full_(self, **full: Tensor | None) -> None:
        """Copy this rank's slice of each full tensor (weight=..., bias=...) into the shards."""
        for name, tensor in full.items():
            param = getattr(self, name)
            if param is None or tensor is None:
                if (param is None) != (tensor is None):
                    raise ValueError(f"{type(self).__name__}.{name}: full tensor and shard must both exist or not")
                continue
            dim = self.split_dims.get(name)
            piece = tensor if dim is None else tensor.chunk(self.tp_size, dim=dim)[self.tp_rank]
            if piece.shape != param.shape:
                raise ValueError(
                    f"{type(self).__name__}.{name}: full shape {tuple(tensor.shape)} does not give a shard of "
                    f"{tuple(param.shape)} on {self.tp_size} ranks"
                )
            param.copy_(piece)

    def _load_dense(self, dense: nn.Module) -> None:
        """Slice `dense`'s weight (and bias) into the shards, keeping its requires_grad flags."""
        self.load_full_(**{name: getattr(dense, name, None) for name in self._parameters})
        for name, param in self._parameters.items():
            if param is not None:
                param.requires_grad_(getattr(dense, name).requires_grad)


class _ParallelLinear(_ShardedLayer):
    """What the column- and row-parallel layers share: being cut from a dense nn.Linear."""

    @classmethod
    def from_dense(cls, linear: nn.Linear, process_group: dist.ProcessGroup | None = None, **kwargs):
        """The parallel layer holding this rank's slice of `linear` (equal to it once gathered)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, process_group=process_group,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer._load_dense(linear)
        return layer


class ColumnParallelLinear(_ParallelLinear):
    """Y_i = f(X) A_iᵀ + b_i: the outputs split over the group (Megatron Sec. 3). Input (..., in), output
    (..., out / t), or (..., out) with `gather_output=True`.

    `copy_input=False` skips f when the caller has applied it already: several column-parallel layers reading the
    same input (q, k and v) then share one all-reduce in backward, as Megatron's fused QKV does."""

    split_dims = {"weight": 0, "bias": 0}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        process_group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        copy_input: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_group(process_group)
        _check_divisible(out_features, self.tp_size, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.copy_input = gather_output, copy_input
        local = out_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))  # (out/t, in)
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        weight, b = _dense_linear_init(in_features, out_features, bias, seed)
        self.load_full_(weight=weight, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input:
            x = copy_to_region(x, self.process_group)
        y = F.linear(x, self.weight, self.bias)  # (..., out / t)
        return gather_from_region(y, self.process_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (/{self.tp_size} ranks), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, copy_input={self.copy_input}")


class RowParallelLinear(_ParallelLinear):
    """Y = g(sum_i X_i A_iᵀ) + b: the inputs split over the group, the bias added once after the all-reduce.
    Input (..., in / t) (`input_is_parallel=True`, the output of a column-parallel layer) or (..., in), which is
    then scattered. Output (..., out) on every rank."""

    split_dims = {"weight": 1}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        process_group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_group(process_group)
        _check_divisible(in_features, self.tp_size, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        local = in_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))  # (out, in/t)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        weight, b = _dense_linear_init(in_features, out_features, bias, seed)
        self.load_full_(weight=weight, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.process_group)  # (..., in / t)
        y = reduce_from_region(F.linear(x, self.weight), self.process_group)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (/{self.tp_size} ranks), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(_ShardedLayer):
    """The embedding table split by vocabulary rows: rank i holds ids [i V/t, (i+1) V/t). Each rank looks up the ids
    in its range, writes zeros for the others, and g sums the partial results: (..., C) on every rank."""

    split_dims = {"weight": 0}

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
        _check_divisible(num_embeddings, self.tp_size, "num_embeddings (vocabulary size)")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = num_embeddings // self.tp_size
        self.vocab_start = self.tp_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))  # (V/t, C)
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
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)  # (...)
        local = (idx - self.vocab_start).masked_fill(outside, 0)  # (...)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (..., C)
        return reduce_from_region(out, self.process_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (/{self.tp_size} ranks: ids [{self.vocab_start}, {self.vocab_end})), "
                f"{self.embedding_dim}")


# --- vocab-parallel cross-entropy ------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split by vocabulary (Megatron's vocab_parallel_cross_entropy).

        loss_n = log sum_v exp(z_nv - m_n) - (z_n,target - m_n),   m_n = max_v z_nv
    m_n (all-reduce max), sum_v exp(.) and the target logit (one all-reduce sum of both) are the only traffic.
    Backward needs no communication: d loss_n / d z_nv = softmax_nv - [v == target_n] on each rank's slice."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, vocab_start: int, ignore_index: int, group) -> Tensor:
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, V/t), at least fp32
        multi = _group_size(group) > 1
        m = z.max(dim=-1).values  # (N,)
        if multi:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)  # (N, V/t)
        valid = targets != ignore_index  # (N,)
        local_t = targets - vocab_start  # (N,)
        mine = valid & (local_t >= 0) & (local_t < z.size(-1))  # (N,)
        local_t = local_t.masked_fill(~mine, 0)
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)  # (N,)
        exp_z = z.exp_()  # (N, V/t)
        stats = torch.stack([exp_z.sum(dim=-1), target_z])  # (2, N)
        if multi:
            dist.all_reduce(stats, group=group)
        sum_exp, target_z = stats[0], stats[1]
        loss = (sum_exp.log() - target_z).masked_fill(~valid, 0.0)  # (N,)
        softmax = exp_z.div_(sum_exp.unsqueeze(-1))  # (N, V/t)
        ctx.save_for_backward(softmax, local_t, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        softmax, local_t, mine, valid = ctx.saved_tensors
        g = grad_loss * valid  # (N,)
        grad = softmax * g.unsqueeze(-1)  # (N, V/t)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(g * mine).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    process_group: dist.ProcessGroup | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of vocab-split logits (..., V/t) (rank i holds ids [i V/t, (i+1) V/t)) against targets (...).

    reduction "mean": over the tokens whose target is not `ignore_index` (0 when there is none); "sum"; "none":
    per token, (...). Equals F.cross_entropy on the gathered logits, computed in fp32, without gathering them."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the last dim "
                         f"{tuple(logits.shape[:-1])}")
    rank, _ = group_rank_and_size(process_group)
    loss = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.size(-1)),  # (N, V/t)
        targets.reshape(-1),  # (N,)
        rank * logits.size(-1),
        ignore_index,
        process_group,
    )
    if reduction == "none":
        return loss.view(targets.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


# --- parallelize the tiny GPT ----------------------------------------------------------------------------------------

_GPT_PARTS = ("wte", "wpe", "blocks", "ln_f", "lm_head", "config")


def megatron_plan(model: nn.Module) -> dict[str, str]:
    """Megatron's plan for the tiny GPT: q/k/v and fc_in column-parallel, out_proj and fc_out row-parallel, the token
    embedding and the output head vocab-parallel."""
    plan: dict[str, str] = {}
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        plan.update({f"{b}.attn.q_proj": "colwise", f"{b}.attn.k_proj": "colwise", f"{b}.attn.v_proj": "colwise",
                     f"{b}.attn.out_proj": "rowwise", f"{b}.mlp.fc_in": "colwise", f"{b}.mlp.fc_out": "rowwise"})
    plan["wte"] = "vocab"
    plan["lm_head"] = "vocab"
    return plan


_WEIGHT_SPLIT_DIM = {"colwise": 0, "rowwise": 1, "vocab": 0}
"""The dimension of a layer's weight that each plan kind splits (Linear weights are (out, in), embeddings (V, C))."""


def _validate_plan(model: nn.Module, plan: Mapping[str, str], t: int) -> dict[str, nn.Module]:
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a mapping of module name -> one of {PLAN_KINDS}, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    for name, kind in plan.items():
        if kind not in PLAN_KINDS:
            raise ValueError(f"plan[{name!r}] = {kind!r}; allowed: {PLAN_KINDS}")
        if name not in modules or name == "":
            close = difflib.get_close_matches(str(name), [n for n in modules if n], n=3)
            raise ValueError(f"plan names module {name!r}, which the model does not have"
                             + (f" (did you mean {close}?)" if close else ""))
        m = modules[name]
        if kind in ("colwise", "rowwise") and not isinstance(m, nn.Linear):
            raise ValueError(f"plan[{name!r}] = {kind!r} needs a torch.nn.Linear, but {name!r} is a "
                             f"{type(m).__name__}")
        if kind == "vocab" and not isinstance(m, (nn.Embedding, nn.Linear)):
            raise ValueError(f"plan[{name!r}] = 'vocab' needs an nn.Embedding or the output head (nn.Linear), but "
                             f"{name!r} is a {type(m).__name__}")
        if kind == "colwise":
            _check_divisible(m.out_features, t, f"{name}.out_features")
        elif kind == "rowwise":
            _check_divisible(m.in_features, t, f"{name}.in_features")
        elif isinstance(m, nn.Embedding):
            _check_divisible(m.num_embeddings, t, f"{name}.num_embeddings (vocabulary size)")
        else:
            if name != "lm_head" or not all(hasattr(model, p) for p in _GPT_PARTS):
                raise ValueError(f"plan[{name!r}] = 'vocab' on a Linear is for the output head 'lm_head' of the tiny "
                                 f"GPT (its loss becomes the vocab-parallel cross-entropy)")
            _check_divisible(m.out_features, t, f"{name}.out_features (vocabulary size)")

    # Megatron pairs: a column-parallel layer's sharded output must be read by a row-parallel layer of the same
    # module (MLP: fc_in -> fc_out; attention: q/k/v -> out_proj), or the next layer would see a slice.
    by_parent: dict[str, set[str]] = {}
    for name, kind in plan.items():
        if kind in ("colwise", "rowwise"):
            by_parent.setdefault(name.rpartition(".")[0], set()).add(kind)
    for parent, kinds in by_parent.items():
        if kinds != {"colwise", "rowwise"}:
            raise ValueError(f"module {parent or '<root>'!r}: the plan makes its children only {sorted(kinds)}; a "
                             f"column-parallel layer needs a row-parallel partner in the same module (Megatron pairs)")
        attn = modules[parent]
        if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim")):
            want = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "out_proj": "rowwise"}
            got = {c: plan.get(f"{parent}.{c}") for c in want}
            if got != want:
                raise ValueError(f"attention {parent!r}: plan {got}, but heads split only as {want}")
            n_head = attn.q_proj.out_features // attn.head_dim
            n_kv = attn.k_proj.out_features // attn.head_dim
            if n_head % t or n_kv % t:
                raise ValueError(f"attention {parent!r}: n_head={n_head} query heads and n_kv_head={n_kv} key/value "
                                 f"heads must both be divisible by the tensor-parallel size {t} (whole heads per rank)")

    # Tied weights (lm_head.weight is wte.weight) must be split the same way in every module that holds them.
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight")
        if w is not None and mname not in owners.get(id(w), []):
            owners.setdefault(id(w), []).append(mname)
    for name in plan:
        names = owners[id(modules[name].weight)]
        splits = {n: (plan[n], _WEIGHT_SPLIT_DIM[plan[n]]) if n in plan else None for n in names}
        dims = {s[1] if s else None for s in splits.values()}
        if len(dims) > 1:
            raise ValueError(f"{name}.weight is tied to {[n for n in names if n != name]}; plan {splits} splits "
                             f"them differently: shard all of them along the same dimension, or none")
    return modules


class _CopyInputHook:
    """Forward pre-hook applying f to a module's first input (so q, k and v share one backward all-reduce)."""

    def __init__(self, process_group) -> None:
        self.process_group = process_group

    def __call__(self, module: nn.Module, args: tuple):
        return (copy_to_region(args[0], self.process_group), *args[1:])


def _vocab_parallel_gpt_forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean"):
    """The tiny GPT's forward with a vocab-parallel head: returns (logits of this rank's vocabulary slice
    (B, T, V/t), loss by vocab-parallel cross-entropy). Installed on the model by `parallelize`."""
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"idx must be a (B, T) int64 tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    B, T = idx.shape
    if T > self.config.block_size:
        raise ValueError(f"sequence length T={T} exceeds block_size={self.config.block_size}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pos = torch.arange(T, device=idx.device)  # (T,)
    x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
    for block in self.blocks:
        x = block(x)  # (B, T, C)
    logits = self.lm_head(self.ln_f(x))  # (B, T, V/t)
    if targets is None:
        return logits, None
    if targets.shape != idx.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
    return logits, vocab_parallel_cross_entropy(logits, targets, self.lm_head.process_group, reduction=reduction)


def parallelize(
    model: nn.Module, plan: Mapping[str, str], process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Swap the layers named in `plan` for their tensor-parallel versions, in place, and return `model`.

    plan: module name -> "colwise" (ColumnParallelLinear), "rowwise" (RowParallelLinear), or "vocab"
    (VocabParallelEmbedding for an embedding; for the GPT's `lm_head`, a column-parallel head whose logits stay split
    by vocabulary, and the model's forward then computes the loss by vocab-parallel cross-entropy and returns this
    rank's logits (B, T, V/t)). `megatron_plan(model)` is the full Megatron plan for the tiny GPT.

    Every shard is sliced from the model's full weights, so the result computes what `model` computed. Tied weights
    stay tied (the head and the embedding share one shard). Attention heads are split across ranks: q/k/v must be
    colwise and out_proj rowwise, and both head counts divisible by t; q, k and v share one f at the attention's
    input. All checks run before anything is changed and before any collective."""
    _, t = group_rank_and_size(process_group)
    modules = _validate_plan(model, plan, t)
    single_device([*model.parameters(), *model.buffers()], "model")

    attention_parents = {
        name.rpartition(".")[0] for name, kind in plan.items() if kind == "colwise" and name.endswith(".q_proj")
    }
    shared: dict[int, nn.Parameter] = {}
    for name, kind in plan.items():
        dense = modules[name]
        parent_name, _, child = name.rpartition(".")
        if kind == "colwise":
            new = ColumnParallelLinear.from_dense(dense, process_group, copy_input=parent_name not in attention_parents)
        elif kind == "rowwise":
            new = RowParallelLinear.from_dense(dense, process_group)
        elif isinstance(dense, nn.Embedding):
            new = VocabParallelEmbedding.from_dense(dense, process_group)
        else:
            new = ColumnParallelLinear.from_dense(dense, process_group)
        if id(dense.weight) in shared:
            new.weight = shared[id(dense.weight)]
        else:
            shared[id(dense.weight)] = new.weight
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for parent in attention_parents:
        model.get_submodule(parent).register_forward_pre_hook(_CopyInputHook(process_group))
    if isinstance(modules.get("lm_head"), nn.Linear) and plan.get("lm_head") == "vocab":
        model.forward = types.MethodType(_vocab_parallel_gpt_forward, model)
    return model


# --- whole tensors back, sharded vs replicated ----------------------------------------------------------------------


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, pname = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), pname


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters split over the tensor-parallel group, parameters every rank holds in full): what
    optimized.clipping.global_grad_norm takes as `sharded` and `replicated` to get the full model's norm."""
    sharded, replicated = [], []
    for name, p in model.named_parameters():
        module, pname = _owner(model, name)
        (sharded if pname in getattr(module, "split_dims", {}) else replicated).append(p)
    return sharded, replicated


def gather_full(model: nn.Module, *, grads: bool = False) -> dict[str, Tensor | None]:
    """Every parameter (or, with grads=True, its gradient) at full size, by name, as in the model before
    `parallelize`: split tensors are all-gathered over their layer's group. Every rank of the group must call it."""
    out: dict[str, Tensor | None] = {}
    for name, p in model.named_parameters():
        module, pname = _owner(model, name)
        tensor = p.grad if grads else p.detach()
        dim = getattr(module, "split_dims", {}).get(pname)
        if tensor is None or dim is None or module.tp_size == 1:
            out[name] = None if tensor is None else tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(module.tp_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=module.process_group)
        out[name] = torch.cat(parts, dim=dim)
    return out


@torch.no_grad()
def load_full(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The inverse of `gather_full`: copy full-size tensors by name (a state dict of the model before `parallelize`,
    e.g. a checkpoint) into the model, each split parameter taking this rank's slice. No communication."""
    for name, p in model.named_parameters():
        if name not in state:
            raise ValueError(f"state has no tensor for parameter {name!r}")
        module, pname = _owner(model, name)
        dim = getattr(module, "split_dims", {}).get(pname)
        full = state[name]
        piece = full if dim is None else full.chunk(module.tp_size, dim=dim)[module.tp_rank]
        if piece.shape != p.shape:
            raise ValueError(f"state[{name!r}] has shape {tuple(full.shape)}, which does not give this rank's "
                             f"{tuple(p.shape)}")
        p.copy_(piece)


# --- DP x TP ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessGrid:
    """This rank's place on a dp_size x tp_size grid: global rank = dp_rank * tp_size + tp_rank, so a tensor-parallel
    group is tp_size consecutive ranks (one node, where its per-layer all-reduces are cheapest: Narayanan et al.
    2021, arXiv 2104.04473, Sec. 3.3) and a data-parallel group strides across them."""

    dp_group: dist.ProcessGroup
    """The ranks holding the same shards: gradients are averaged over it (DataParallel's process_group)."""
    tp_group: dist.ProcessGroup
    """The ranks sharing one model replica: parallelize's process_group."""
    dp_rank: int
    tp_rank: int
    dp_size: int
    tp_size: int


def make_process_grid(dp_size: int, tp_size: int) -> ProcessGrid:
    """Build the groups of a dp_size x tp_size grid over the world. Every rank must call it (new_group is collective
    over the world); every rank creates all groups in the same order."""
    for name, value in (("dp_size", dp_size), ("tp_size", tp_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rank, world = group_rank_and_size(None)
    if dp_size * tp_size != world:
        raise ValueError(f"dp_size * tp_size = {dp_size} * {tp_size} = {dp_size * tp_size} must equal the world size "
                         f"{world}")
    dp_rank, tp_rank = divmod(rank, tp_size)
    tp_group = dp_group = None
    for d in range(dp_size):
        group = dist.new_group([d * tp_size + i for i in range(tp_size)])
        if d == dp_rank:
            tp_group = group
    for i in range(tp_size):
        group = dist.new_group([d * tp_size + i for d in range(dp_size)])
        if i == tp_rank:
            dp_group = group
    return ProcessGrid(dp_group, tp_group, dp_rank, tp_rank, dp_size, tp_size)
