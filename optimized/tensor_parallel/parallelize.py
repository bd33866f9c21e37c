"""Parallelize any model by a plan: module names (globs allowed) -> styles, applied in place, forwards untouched.

A plan is data a user can write for any model (torchtitan's parallelize_llama works the same way):

    plan = {
        "model.embed_tokens": "embedding",                      # vocabulary rows split (VocabParallelEmbedding)
        "model.layers.*.self_attn": LocalHeads(32, 8),          # attention runs its local heads
        "model.layers.*.self_attn.[qkv]_proj": "colwise",       # ColumnParallelLinear
        "model.layers.*.self_attn.o_proj": "rowwise",           # RowParallelLinear
        "model.layers.*.mlp": "shared_input",                   # gate and up share one f
        "model.layers.*.mlp.[gu]*_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "vocab_head",                                # logits stay split, loss vocab-parallel
    }

Styles (a string or a style object):
    "colwise" / ColumnParallel(sections=None, gather_output=False)   nn.Linear or transformers Conv1D; `sections`
        for a fused projection (GPT-2's c_attn: (C, C, C); a GQA fused qkv: (H d, Hkv d, Hkv d)), see `fused_qkv`
    "rowwise" / RowParallel()            nn.Linear or Conv1D, its input the output of column-parallel layers
    "embedding" / VocabEmbedding()       nn.Embedding split by vocabulary rows
    "vocab_head" / VocabHead()           the output head column-parallel, logits (..., V/t) not gathered; the model's
        pluggable loss becomes the vocab-parallel cross-entropy: `model.loss` (the project's GPT) or
        `model.loss_function` (transformers). For any other model call
        `optimized.tensor_parallel.vocab_parallel_cross_entropy(logits, targets, process_group)` on the logits.
    "shared_input" / SharedInput()       on a parent module whose input feeds only its column-parallel children:
        f once at its input (one backward all-reduce for q, k and v, as Megatron's fused QKV)
    "mha" / Multihead()                  a torch nn.MultiheadAttention (bare in_proj_weight, forward that needs every
        head) replaced by ParallelMultiheadAttention holding this rank's heads: f, q/k/v rows column-parallel,
        attention of the local heads, out_proj row-parallel; the parent's forward (nn.TransformerEncoderLayer) stays
    LocalHeads(num_heads, num_kv_heads, attributes=(), shared_input=True)   on an attention module: checks that t
        divides both head counts and divides the named integer attributes (e.g. GPT-2's split_size, num_heads) so
        the module's own forward runs on its local heads (torchtitan adjusts n_heads the same way). Attention that
        infers the head count from the projection width (HF Llama, the project's GPT) needs no attribute.

No forward is replaced: layers are swapped (an nn.MultiheadAttention whole, as one leaf), attributes divided, and
hooks read inputs by position or keyword (HF calls self_attn(hidden_states=...)). Every check runs before anything
changes and before any collective.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping

import torch.distributed as dist
from torch import Tensor, nn

from optimized.distributed.groups import group_rank_and_size, single_device
from optimized.tensor_parallel.cross_entropy import VocabParallelCausalLMLoss, VocabParallelLoss
from optimized.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_divisible,
    linear_like,
)
from optimized.tensor_parallel.multihead_attention import (
    ParallelMultiheadAttention,
    check_multihead,
    keep_encoders_on_plain_forward,
)
from optimized.tensor_parallel.plans import plan_for
from optimized.tensor_parallel.regions import copy_to_region
from optimized.tensor_parallel.styles import (
    HOW_TO_WRITE_A_PLAN,
    ColumnParallel,
    LocalHeads,
    Multihead,
    RowParallel,
    SharedInput,
    Style,
    VocabEmbedding,
    VocabHead,
    resolve_style,
)

# --- validation ------------------------------------------------------------------------------------------------------


def _expand(model: nn.Module, plan: Mapping) -> dict[str, Style]:
    """Each plan key matched against the model's module names: {module name: style}."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a mapping of module name (glob) -> style, got {type(plan).__name__}; "
                         + HOW_TO_WRITE_A_PLAN)
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    out: dict[str, Style] = {}
    for key, value in plan.items():
        matched = [n for n in names if fnmatch.fnmatchcase(n, str(key))]
        if not matched:
            close = difflib.get_close_matches(str(key), names, n=3)
            raise ValueError(f"plan names module {key!r}, which the model does not have"
                             + (f" (did you mean {close}?)" if close else "") + f"; {HOW_TO_WRITE_A_PLAN}")
        for name in matched:
            style = resolve_style(name, value, modules[name])
            if name in out and out[name] != style:
                raise ValueError(f"module {name!r} gets two styles from the plan: {out[name]} and {style}")
            out[name] = style
    return out


def _weight_split_dim(style: Style, module: nn.Module) -> int | None:
    shape = linear_like(module)
    conv = shape is not None and shape[2] == "conv1d"
    if isinstance(style, (ColumnParallel, VocabHead)):
        return 1 if conv else 0
    if isinstance(style, RowParallel):
        return 0 if conv else 1
    return 0 if isinstance(style, VocabEmbedding) else None


def _check_module(name: str, style: Style, m: nn.Module, styles: dict[str, Style], t: int) -> None:
    """Does `style` fit module `m`, and does t divide what it splits?"""
    shape = linear_like(m)
    kind = type(m).__name__
    if isinstance(style, (ColumnParallel, RowParallel, VocabHead)):
        if shape is None:
            raise ValueError(f"plan[{name!r}] = {type(style).__name__} needs a torch.nn.Linear or a "
                             f"transformers Conv1D, but {name!r} is a {kind}")
        in_f, out_f, _ = shape
        if isinstance(style, RowParallel):
            check_divisible(in_f, t, f"{name}.in_features")
        else:
            what = " (vocabulary size)" if isinstance(style, VocabHead) else ""
            check_divisible(out_f, t, f"{name}.out_features{what}")
        if isinstance(style, ColumnParallel) and style.sections is not None:
            if sum(style.sections) != out_f:
                raise ValueError(f"plan[{name!r}]: sections {style.sections} must sum to its out_features={out_f}")
            for j, s in enumerate(style.sections):
                check_divisible(s, t, f"{name} section {j} width")
    elif isinstance(style, VocabEmbedding):
        if not isinstance(m, nn.Embedding):
            raise ValueError(f"plan[{name!r}] = 'embedding' needs an nn.Embedding, but {name!r} is a {kind}")
        check_divisible(m.num_embeddings, t, f"{name}.num_embeddings (vocabulary size)")
    elif isinstance(style, Multihead):
        check_multihead(m, t, f"plan[{name!r}] = 'mha': {name}")
        inner = sorted(n for n in styles if n.startswith(name + "."))
        if inner:
            raise ValueError(f"plan[{name!r}] = 'mha' replaces the whole attention module; drop {inner} from the plan")
    elif isinstance(style, LocalHeads):
        kv = style.num_heads if style.num_kv_heads is None else style.num_kv_heads
        if style.num_heads % t or kv % t:
            raise ValueError(f"attention {name!r}: n_head={style.num_heads} query heads and n_kv_head={kv} "
                             f"key/value heads must both be divisible by the tensor-parallel size {t} (whole "
                             f"heads per rank)")
        for attr in style.attributes:
            value = getattr(m, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"LocalHeads on {name!r}: attribute {attr!r} must be an int of the module, got "
                                 f"{value!r}")
            check_divisible(value, t, f"{name}.{attr}")
        unplanned = [c for c, child in m.named_children() if linear_like(child) and f"{name}.{c}" not in styles]
        if unplanned:
            raise ValueError(f"attention {name!r}: heads split only when all its projections are in the plan "
                             f"(column-parallel in, row-parallel out); missing {unplanned}")
    shares_f = isinstance(style, SharedInput) or (isinstance(style, LocalHeads) and style.shared_input)
    if shares_f and not any(n.startswith(name + ".") and isinstance(s, ColumnParallel) for n, s in styles.items()):
        raise ValueError(f"plan[{name!r}] shares f at its input, but the plan makes none of its children "
                         f"column-parallel")


def _check(model: nn.Module, styles: dict[str, Style], t: int) -> None:
    modules = dict(model.named_modules())
    for name, style in styles.items():
        _check_module(name, style, modules[name], styles, t)
    # Megatron pairs: a column-parallel layer's split output must be read by a row-parallel layer of the same module
    # (MLP: fc_in -> fc_out; attention: q/k/v -> out_proj), or the next layer would see a slice.
    by_parent: dict[str, set[str]] = {}
    for name, style in styles.items():
        if isinstance(style, RowParallel) or (isinstance(style, ColumnParallel) and not style.gather_output):
            by_parent.setdefault(name.rpartition(".")[0], set()).add(type(style).__name__)
    for parent, kinds in by_parent.items():
        if kinds != {"ColumnParallel", "RowParallel"}:
            raise ValueError(f"module {parent or '<root>'!r}: the plan makes its children only {sorted(kinds)}; a "
                             f"column-parallel layer needs a row-parallel partner in the same module (Megatron pairs)")
    # Tied weights (an output head sharing the embedding) must be split the same way in every module holding them.
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight")
        if w is not None and mname not in owners.get(id(w), []):
            owners.setdefault(id(w), []).append(mname)
    for name in styles:
        weight = modules[name]._parameters.get("weight")
        if weight is None:
            continue
        holders = owners[id(weight)]
        dims = {n: _weight_split_dim(styles[n], modules[n]) if n in styles else None for n in holders}
        if len(set(dims.values())) > 1:
            raise ValueError(f"{name}.weight is tied to {[n for n in holders if n != name]}; the plan splits them "
                             f"along {dims} (None: whole): shard all of them along the same dimension, or none")


# --- applying a plan -------------------------------------------------------------------------------------------------


class _SharedInputHook:
    """f applied once to a module's hidden-state input (first positional tensor, else `hidden_states=`, else the
    first floating tensor keyword); its column-parallel children recognise that tensor and skip their own f."""

    def __init__(self, process_group) -> None:
        self.process_group = process_group
        self._copied: Tensor | None = None

    def applied_to(self, x: Tensor) -> bool:
        return self._copied is not None and x is self._copied

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        for i, a in enumerate(args):
            if isinstance(a, Tensor):
                self._copied = copy_to_region(a, self.process_group)
                return (*args[:i], self._copied, *args[i + 1:]), kwargs
        keys = ["hidden_states"] if isinstance(kwargs.get("hidden_states"), Tensor) else [
            k for k, v in kwargs.items() if isinstance(v, Tensor) and v.is_floating_point()]
        if keys:
            self._copied = copy_to_region(kwargs[keys[0]], self.process_group)
            return args, {**kwargs, keys[0]: self._copied}
        return None

    def after(self, module: nn.Module, args: tuple, output):
        self._copied = None


def _install_vocab_parallel_loss(model: nn.Module, process_group) -> None:
    if "loss_function" in dir(type(model)):  # transformers' PreTrainedModel: a settable property
        model.loss_function = VocabParallelCausalLMLoss(process_group)
    elif callable(getattr(model, "loss", None)):  # the project's GPT
        model.loss = VocabParallelLoss(process_group)


def parallelize(model: nn.Module, plan: Mapping | None = None,
                process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Apply `plan` (module name or glob -> style, see the module docstring) to `model` in place and return it.

    plan None: the ready plan for the model's layout (`plan_for`: the project's GPT, HF Llama-like, HF GPT-2); any
    other model raises an error saying how to write one. Every shard is sliced from the model's full weights, so the
    result computes what `model` computed; tied weights stay tied (one shard). With a "vocab_head" the model returns
    this rank's logits (..., V/t) and its pluggable loss is the vocab-parallel cross-entropy."""
    if plan is None:
        plan = plan_for(model)
    _, t = group_rank_and_size(process_group)
    styles = _expand(model, plan)
    _check(model, styles, t)
    single_device([*model.parameters(), *model.buffers()], "model")

    shared_weights: dict[int, nn.Parameter] = {}
    new_columns: dict[str, ColumnParallelLinear] = {}
    for name, style in styles.items():
        dense = model.get_submodule(name)
        if isinstance(style, ColumnParallel):
            new = ColumnParallelLinear.from_dense(dense, process_group, sections=style.sections,
                                                  gather_output=style.gather_output)
            new_columns[name] = new
        elif isinstance(style, VocabHead):
            new = ColumnParallelLinear.from_dense(dense, process_group)
        elif isinstance(style, RowParallel):
            new = RowParallelLinear.from_dense(dense, process_group)
        elif isinstance(style, VocabEmbedding):
            new = VocabParallelEmbedding.from_dense(dense, process_group)
        elif isinstance(style, Multihead):
            new = ParallelMultiheadAttention.from_dense(dense, process_group)
        else:
            continue
        if "weight" in new._parameters:
            if id(dense.weight) in shared_weights:
                new.weight = shared_weights[id(dense.weight)]
            else:
                shared_weights[id(dense.weight)] = new.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name, style in styles.items():
        if isinstance(style, LocalHeads):
            module = model.get_submodule(name)
            for attr in style.attributes:
                setattr(module, attr, getattr(module, attr) // t)
        if isinstance(style, SharedInput) or (isinstance(style, LocalHeads) and style.shared_input):
            hook = _SharedInputHook(process_group)
            module = model.get_submodule(name)
            module.register_forward_pre_hook(hook.before, with_kwargs=True)
            module.register_forward_hook(hook.after)
            for cname, column in new_columns.items():
                if cname.startswith(name + "."):
                    column.shared_input = hook
    if any(isinstance(s, VocabHead) for s in styles.values()):
        _install_vocab_parallel_loss(model, process_group)
    keep_encoders_on_plain_forward(model)
    return model
