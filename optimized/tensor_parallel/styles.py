"""Tensor-parallel styles: what a plan says about one module (a string shortcut or a style object).

    "colwise" / ColumnParallel(sections=None, gather_output=False)   nn.Linear or transformers Conv1D split by outputs
    "rowwise" / RowParallel()            split by inputs, its input the output of column-parallel layers
    "embedding" / VocabEmbedding()       nn.Embedding split by vocabulary rows
    "vocab_head" / VocabHead()           the output head split by vocabulary, the loss vocab-parallel
    "shared_input" / SharedInput()       f once at a parent module's input, for all its column-parallel children
    "mha" / Multihead()                  a torch nn.MultiheadAttention replaced by ParallelMultiheadAttention
    LocalHeads(num_heads, num_kv_heads, attributes=(), shared_input=True)   an attention module split by whole heads

Data only: optimized.tensor_parallel.parallelize checks and applies them, optimized.tensor_parallel.plans writes
them for the known model families.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ColumnParallel:
    """Split an nn.Linear / Conv1D by outputs (ColumnParallelLinear)."""

    sections: tuple[int, ...] | None = None
    """Widths of fused outputs split one by one (q, k, v); None: one output."""
    gather_output: bool = False
    """All-gather the outputs so every rank holds (..., out)."""


@dataclass(frozen=True)
class _Marker:
    """A style without options: equal to every other instance of its own class."""


class RowParallel(_Marker):
    """Split an nn.Linear / Conv1D by inputs (RowParallelLinear), input already split."""


class VocabEmbedding(_Marker):
    """Split an nn.Embedding by vocabulary rows (VocabParallelEmbedding)."""


class VocabHead(_Marker):
    """The output head split by vocabulary; the model's loss becomes the vocab-parallel cross-entropy."""


class SharedInput(_Marker):
    """f once at this module's input; its column-parallel children skip their own."""


class Multihead(_Marker):
    """Replace an nn.MultiheadAttention by ParallelMultiheadAttention (this rank's heads, sliced from its weights)."""


@dataclass(frozen=True)
class LocalHeads:
    """An attention module whose projections are split by heads."""

    num_heads: int
    """Query heads of the whole layer."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA); None: num_heads."""
    attributes: tuple[str, ...] = ()
    """Integer attributes of the module divided by t (head counts, widths its forward reads)."""
    shared_input: bool = True
    """Apply f once at the module's input (its q/k/v read it)."""


Style = ColumnParallel | RowParallel | VocabEmbedding | VocabHead | SharedInput | LocalHeads | Multihead
STYLE_NAMES: dict[str, Style] = {"colwise": ColumnParallel(), "rowwise": RowParallel(), "embedding": VocabEmbedding(),
                                 "vocab_head": VocabHead(), "shared_input": SharedInput(), "mha": Multihead()}
"""The string shortcuts; "vocab" is also accepted (embedding on an nn.Embedding, vocab_head on a head)."""


def fused_qkv(q: int, k: int, v: int) -> ColumnParallel:
    """The style of one projection producing [q; k; v] of these widths (GPT-2's c_attn: fused_qkv(C, C, C))."""
    return ColumnParallel(sections=(q, k, v))


def resolve_style(name: str, value, module: nn.Module) -> Style:
    """The style object plan[name] = value means for `module` (a string shortcut or a style object)."""
    if isinstance(value, str):
        if value == "vocab":
            return VocabEmbedding() if isinstance(module, nn.Embedding) else VocabHead()
        if value in STYLE_NAMES:
            return STYLE_NAMES[value]
    elif isinstance(value, Style):
        return value
    raise ValueError(f"plan[{name!r}] = {value!r}; allowed: {sorted(STYLE_NAMES) + ['vocab']} or a style object "
                     f"(ColumnParallel, RowParallel, VocabEmbedding, VocabHead, SharedInput, LocalHeads, Multihead)")


HOW_TO_WRITE_A_PLAN = (
    "write a plan: a dict from module names (globs allowed, e.g. 'layers.*.attn.q_proj') to styles "
    "('colwise' for the projections that read the hidden state, 'rowwise' for the ones that write it back, "
    "LocalHeads(num_heads, num_kv_heads) on each attention module, 'embedding' and 'vocab_head' for the vocabulary); "
    "see optimized.tensor_parallel.parallelize's module docstring and megatron_plan / llama_plan / gpt2_plan"
)
