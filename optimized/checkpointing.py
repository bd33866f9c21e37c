"""Activation checkpointing: keep less for backward, recompute the rest when backward needs it.

Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174) keep only some activations and
recompute the others from them during backward; Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198, Sec. 5) name the two policies used for transformers:

    "full"       each transformer block keeps only its input; its whole forward runs again in backward
                 (one more forward: 4 forwards' worth of FLOPs per step instead of 3)
    "selective"  only the attention core (softmax(Q Kᵀ) V, whose N x N probabilities dominate at long sequence
                 lengths while costing few FLOPs) keeps only its inputs q, k, v and runs again in backward

    model = apply_activation_checkpointing(GPT(config), "full")          # the blocks found by name
    model = apply_activation_checkpointing(model, "full", layers=r"encoder\\.layer\\.\\d+")   # named by a regex

Both use torch's non-reentrant `torch.utils.checkpoint.checkpoint` (saved-tensor hooks: module hooks, kwargs and
tensors that do not require grad all work, and the recomputation reproduces the forward's RNG state), so the
gradients are bitwise those of the unwrapped model. The model is changed in place (each block's `forward`, or the
attention module's `attention` callable, is replaced on the instance): parameter names, `state_dict()` and the
module tree stay as they were, so tensor-parallel plans, pipeline splits, DataParallel and ZeroOptimizer address
the same modules before and after.

Selective recomputation wraps the attention core where the model exposes it as a callable attribute `attention` of
a submodule (reference.model's blocks do: `CausalSelfAttention.attention`), rather than torch's op-level selective
policy (`create_selective_checkpoint_contexts`), which would have to tell the core's matmuls from the projections'
by op alone. transformers' attention modules fetch their core at each call from
`ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)`: each chosen
module sees, as its `config`, a view of the model's config whose `_attn_implementation` names RECOMPUTE_ATTENTION,
a function registered with transformers' AttentionInterface (its documented extension point) that looks the model's
own implementation up at each call (eager, sdpa, optimized.attention.register_transformers' name, ...) and
checkpoints it. The forwards stay the model's own; masks are built from the model's config, which is unchanged.

transformers' KV cache, with no user flag: the model builds a cache when `use_cache` is on (its config's default)
and each layer appends its keys to it; a recomputed block would append them a second time (torch raises a
CheckpointError or a shape mismatch). So a block under "full" recomputation runs, when autograd records, without the
cache, as transformers' own `GradientCheckpointingLayer` does: its `use_cache` is False and its cache argument None;
the config is left alone, so generation keeps its cache (a recorded forward's output carries the model's cache,
empty). A cache that already holds this block's keys (one the caller passed, filled by an earlier call) is an error
instead: dropping it would change what attention sees, keeping it would append twice. Without autograd
(`torch.no_grad()`, `generate`) the block's forward runs as is, cache included. Selective recomputation needs none of
this: the cache is updated before the core, outside the checkpoint.

ZeRO-3 gathers a module's parameters before its forward and frees them after, and gathers them again when the
gradient reaches the module's output. Recomputation runs the forward again inside backward; if it runs to the end
of the block (torch's early stop off, `set_checkpoint_early_stop(False)`), it frees the parameters of the module
whose backward asked for it. So the block's output passes through `_RecomputeFirst`, an identity whose backward
unpacks a saved tensor: the recomputation then runs when the gradient reaches the block's output, before any module
inside it has gathered its parameters for backward, with early stop on or off.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
import types
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

POLICIES = ("full", "selective")
BLOCK_LISTS = ("blocks", "layers", "h")
"""Names of the nn.ModuleList whose entries are the transformer blocks: reference.model.GPT and the pipeline stages
(`blocks`), transformers' Llama-family models (`model.layers`) and GPT-2 (`transformer.h`)."""
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Names transformers' decoder layers give the KV cache argument (the current one and older releases')."""
RECOMPUTE_ATTENTION = "recompute_attention_core"
"""The name under which the selective policy registers its wrapper with transformers' AttentionInterface."""


def apply_activation_checkpointing(
    model: nn.Module, policy: str = "full", *, layers: str | Iterable[str] | None = None
) -> nn.Module:
    """Checkpoint the transformer blocks of `model` under `policy` ("full" or "selective"); return `model`.

    layers: None finds the blocks (entries of a ModuleList named one of BLOCK_LISTS); a string is a regular
    expression that must match a module's whole qualified name (`model.named_modules()`); any other iterable lists
    the names. Every named module must exist and at least one must be found; a block already checkpointed is an
    error. Apply it before or after wrapping in DataParallel, ZeroOptimizer, tensor or pipeline parallelism."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if policy not in POLICIES:
        hint = difflib.get_close_matches(str(policy), POLICIES, n=1)
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    blocks = _select_blocks(model, layers)
    targets: list[tuple[str, nn.Module]] = []
    for name, block in blocks:
        if _is_checkpointed(block) or any(_core_is_checkpointed(m) for m in block.modules()):
            raise ValueError(f"layers: module {name!r} is already checkpointed")
        if getattr(block, "gradient_checkpointing", False):
            raise ValueError(f"layers: module {name!r} is already checkpointed by transformers' "
                             "gradient_checkpointing_enable(); call model.gradient_checkpointing_disable() first")
        if policy == "full":
            targets.append(("forward", block))
        else:
            targets.extend(_attention_cores(name, block))
    if any(kind == "transformers" for kind, _ in targets):
        _register_recomputing_attention()
    for kind, module in targets:  # every check passed: change the model
        if kind == "forward":
            module.forward = types.MethodType(_checkpointed_forward, module)
        elif kind == "attribute":
            module.attention = functools.partial(_checkpointed_core, module.attention)
        else:
            module.config = _RecomputingConfig(module.config)
    return model


def checkpointed_modules(model: nn.Module) -> list[str]:
    """Names of the modules of `model` whose forward (full) or attention core (selective) is checkpointed."""
    return [name for name, module in model.named_modules() if _is_checkpointed(module) or _core_is_checkpointed(module)]


# --- finding the blocks ---------------------------------------------------------------------------------------------


def _select_blocks(model: nn.Module, layers: str | Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if layers is None:
        found = [(f"{name}.{i}" if name else str(i), block)
                 for name, module in named.items()
                 if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS
                 for i, block in enumerate(module)]
        if not found:
            raise ValueError(f"layers=None found no transformer blocks: no nn.ModuleList named one of {BLOCK_LISTS} "
                             f"in {type(model).__name__}; name the blocks with layers=")
        return found
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as e:
            raise ValueError(f"layers={layers!r} is not a valid regular expression: {e}") from None
        found = [(name, m) for name, m in named.items() if name and pattern.fullmatch(name)]
        if not found:
            raise ValueError(f"layers={layers!r} matches no module name of {type(model).__name__} (it must match a "
                             f"whole name, e.g. {_examples(named)})")
        return found
    names = list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"layers must be None, a regular expression or a non-empty list of module names, got "
                         f"{layers!r}")
    for n in names:
        if n not in named or not n:
            hint = difflib.get_close_matches(n, [k for k in named if k], n=3)
            raise ValueError(f"layers: {type(model).__name__} has no module named {n!r}"
                             + (f"; close: {hint}" if hint else f"; e.g. {_examples(named)}"))
    return [(n, named[n]) for n in names]


def _examples(named: dict[str, nn.Module]) -> str:
    return ", ".join(repr(n) for n in list(named)[1:6])


def _attention_cores(name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose attention core policy='selective' wraps: ("attribute", the one module with a callable
    `attention`) or ("transformers", each module fetching its core from transformers' AttentionInterface)."""
    owners = [m for m in block.modules() if callable(getattr(m, "attention", None))
              and not isinstance(m.attention, nn.Module)]
    if len(owners) == 1:
        return [("attribute", owners[0])]
    dispatching = [m for m in block.modules() if _fetches_transformers_core(m)]
    if not owners and dispatching:
        for m in dispatching:
            _check_transformers_core(name, m)
        return [("transformers", m) for m in dispatching]
    raise ValueError(f"policy='selective' needs the block's attention core as a callable attribute `attention` of "
                     f"exactly one of its modules (reference.model.CausalSelfAttention.attention) or fetched from "
                     f"transformers' ALL_ATTENTION_FUNCTIONS; {name!r} ({type(block).__name__}) has {len(owners)} "
                     f"such attributes and {len(dispatching)} such modules: use policy='full'")


def _fetches_transformers_core(module: nn.Module) -> bool:
    """Whether `module`'s forward looks its attention core up in transformers' ALL_ATTENTION_FUNCTIONS by
    `self.config._attn_implementation` (every attention module of transformers' AttentionInterface-based models)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return (code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
            and isinstance(getattr(getattr(module, "config", None), "_attn_implementation", None), (str, type(None))))


def _check_transformers_core(name: str, module: nn.Module) -> None:
    where = f"{name!r} ({type(module).__name__})"
    if not callable(getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)):
        raise ValueError(f"policy='selective': {where} fetches its attention core from transformers' "
                         f"ALL_ATTENTION_FUNCTIONS but its module {type(module).__module__} has no "
                         "eager_attention_forward to fall back to under attn_implementation='eager': use policy='full'")
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's option: its own core, chosen when "eager"
        raise ValueError(f"policy='selective': {where} has reorder_and_upcast_attn=True, which computes the core in a "
                         "method of its own instead of the AttentionInterface's: use policy='full'")


def _is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def _core_is_checkpointed(module: nn.Module) -> bool:
    core = module.__dict__.get("attention")
    return (isinstance(core, functools.partial) and core.func is _checkpointed_core) or \
        isinstance(module.__dict__.get("config"), _RecomputingConfig)


# --- the wrappers ---------------------------------------------------------------------------------------------------


class _RecomputeFirst(torch.autograd.Function):
    """Identity forward; backward unpacks a saved tensor, which makes a non-reentrant checkpoint recompute its
    region at once, when the gradient reaches the region's output (see the module docstring: ZeRO-3)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        ctx.saved_tensors  # noqa: B018 - the unpack is the point: it triggers the recomputation
        return grad


def _recompute_first(fn, *args, **kwargs):
    out = fn(*args, **kwargs)
    flat, spec = tree_flatten(out)
    for i, t in enumerate(flat):
        if isinstance(t, Tensor) and t.requires_grad:
            flat[i] = _RecomputeFirst.apply(t)
            break
    return tree_unflatten(flat, spec)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """A block's forward under full recomputation: only the inputs are kept."""
    forward = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    args, kwargs = _without_cache(self, args, kwargs)
    return checkpoint(_recompute_first, forward, *args, use_reentrant=False, **kwargs)


def _checkpointed_core(core, *args, **kwargs):
    """The attention core under selective recomputation: only q, k, v (its inputs) are kept."""
    if not torch.is_grad_enabled():
        return core(*args, **kwargs)
    return checkpoint(core, *args, use_reentrant=False, **kwargs)


# --- transformers: the KV cache (full) and the attention core (selective) ------------------------------------------


def _without_cache(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's arguments for a recorded, recomputed forward: no KV cache and use_cache=False (see the module
    docstring), found by name among the keyword arguments and, through the forward's signature, the positional ones."""
    args, kwargs = list(args), dict(kwargs)
    for i, name in enumerate(_positional_names(type(block))[:len(args)]):
        args[i] = _cache_free(block, name, args[i])
    for name in set(kwargs) & {*CACHE_ARGUMENTS, "use_cache"}:
        kwargs[name] = _cache_free(block, name, kwargs[name])
    return tuple(args), kwargs


@functools.cache
def _positional_names(cls: type) -> tuple[str, ...]:
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):  # no signature to read: only keyword arguments are looked at
        return ()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in positional)


def _cache_free(block: nn.Module, name: str, value):
    if name == "use_cache":
        return False if value else value
    if name not in CACHE_ARGUMENTS or value is None:
        return value
    held = _cached_positions(block, name, value)
    if held:
        raise ValueError(f"{name}: the KV cache given to the checkpointed block {type(block).__name__} already holds "
                         f"{held} positions of its keys; recomputing the block in backward would append them a second "
                         f"time. Train with {name}=None (use_cache=False), decode under torch.no_grad(), or leave this "
                         "block out of apply_activation_checkpointing(layers=...)")
    return None


def _cached_positions(block: nn.Module, name: str, cache) -> int:
    """How many positions `cache` holds for `block` (its layer_idx, read from the block's attention module)."""
    if isinstance(cache, (tuple, list)):  # the legacy tuple of (key, value) tensors, (B, H, M, d)
        return max((t.shape[-2] for t in tree_flatten(cache)[0] if isinstance(t, Tensor) and t.dim() >= 2), default=0)
    seq_length = getattr(cache, "get_seq_length", None)
    if not callable(seq_length):
        raise ValueError(f"{name}: a checkpointed block cannot tell whether the {type(cache).__name__} it was given "
                         "holds keys (it has no get_seq_length()); pass None (use_cache=False) while training")
    layer_idx = next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), 0)
    return int(seq_length(layer_idx))


class _RecomputingConfig:
    """The `config` a transformers attention module sees under selective recomputation: the model's config in every
    attribute (read and written through), but `_attn_implementation`, which names RECOMPUTE_ATTENTION."""

    def __init__(self, config) -> None:
        self.__dict__["model_config"] = config

    @property
    def _attn_implementation(self) -> str:
        return RECOMPUTE_ATTENTION

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "model_config":  # copy and pickle look for dunders: not the config's
            raise AttributeError(name)
        return getattr(self.model_config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.model_config, name, value)


def _register_recomputing_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(RECOMPUTE_ATTENTION, _recomputing_attention)


def _recomputing_attention(module: nn.Module, *args, **kwargs):
    """transformers' attention-function contract (module, query, key, value, attention_mask, **options): the core
    the model's config names now, under selective recomputation."""
    return _checkpointed_core(functools.partial(_transformers_core(module), module), *args, **kwargs)


def _transformers_core(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    implementation = module.config.model_config._attn_implementation
    if implementation == RECOMPUTE_ATTENTION:
        raise ValueError(f"the model's attn_implementation is {RECOMPUTE_ATTENTION!r}, the selective policy's wrapper: "
                         "set the model's own attention implementation (model.set_attn_implementation)")
    return eager if implementation in (None, "eager") else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
