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
by op alone. Models without such an attribute (transformers' decoder layers call a module-level function) take
"full". A forward that mutates state (a KV cache: transformers' `use_cache=True`) would mutate it again when
recomputed: train with caching off, as transformers' own gradient checkpointing does.

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
import re
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
        targets.append((name, _attention_core_owner(name, block) if policy == "selective" else block))
    for _, module in targets:  # every check passed: change the model
        if policy == "full":
            module.forward = types.MethodType(_checkpointed_forward, module)
        else:
            module.attention = functools.partial(_checkpointed_core, module.attention)
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


def _attention_core_owner(name: str, block: nn.Module) -> nn.Module:
    owners = [m for m in block.modules() if callable(getattr(m, "attention", None))
              and not isinstance(m.attention, nn.Module)]
    if len(owners) != 1:
        raise ValueError(f"policy='selective' needs the block's attention core as a callable attribute `attention` of "
                         f"exactly one of its modules (reference.model.CausalSelfAttention.attention); {name!r} "
                         f"({type(block).__name__}) has {len(owners)}: use policy='full'")
    return owners[0]


def _is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def _core_is_checkpointed(module: nn.Module) -> bool:
    core = module.__dict__.get("attention")
    return isinstance(core, functools.partial) and core.func is _checkpointed_core


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
    return checkpoint(_recompute_first, forward, *args, use_reentrant=False, **kwargs)


def _checkpointed_core(core, *args, **kwargs):
    """The attention core under selective recomputation: only q, k, v (its inputs) are kept."""
    if not torch.is_grad_enabled():
        return core(*args, **kwargs)
    return checkpoint(core, *args, use_reentrant=False, **kwargs)
