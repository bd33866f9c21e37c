"""What kind of model is this? The one registry of model families, and the facts the parallel techniques need about
each: where the embeddings, the list of layers, the final norm and the head live, what a layer's attention and MLP
projections are called, and what in the model's forward a technique must not skip.

    family = family_of(model)        # a Family, or a ValueError listing the known families
    family.layers                    # "model.layers": the nn.ModuleList of transformer layers

Recognised by module names (duck typing: neither transformers nor the project's reference package is imported),
except where two families share their names (transformers' Gemma, Gemma 2, Mistral and Qwen2 copy Llama's): then
`config.model_type` tells them apart, and any other model with Llama's names is a "llama" (as SmolLM or Qwen 3 are).
Asked by optimized.tensor_parallel.plans (the ready plans) and optimized.pipeline.split (the ready layouts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True, kw_only=True)
class Family:
    """One family of models and where its pieces live (paths as in `model.get_submodule`)."""

    name: str
    """Short name: "gpt", "llama", "gpt2", ..."""
    description: str
    """Who writes such models, for messages."""
    recognise: Callable[[nn.Module], bool] = field(compare=False, repr=False)
    """True for a model of this family."""
    token_embedding: str | None = None
    """The nn.Embedding the input ids go through (None: the model has no conventional name for it)."""
    position_embedding: str | None = None
    """A learned position table added to the token embedding (GPT-2), or None."""
    after_embedding: tuple[str, ...] = ()
    """Modules applied to the summed embedding before the first layer (GPT-2's dropout)."""
    layers: str | None = None
    """The nn.ModuleList of transformer layers."""
    final_norm: str | None = None
    """The norm after the last layer."""
    head: str | None = None
    """The output projection to the vocabulary."""
    heads: tuple[str, str | None] = ("", None)
    """The config attributes holding the query and the key/value head counts (None: as many as query heads)."""
    attention: str = "attn"
    """The attention module inside a layer."""
    attention_sizes: tuple[str, ...] = ()
    """Integer attributes of the attention module its forward reads as head counts or widths (GPT-2's split_size)."""
    attention_in: tuple[str, ...] = ()
    """Its projections reading the hidden state (q, k, v; one name when fused)."""
    attention_out: str = ""
    """Its projection writing back to the hidden state."""
    mlp: str = "mlp"
    """The MLP module inside a layer."""
    mlp_in: tuple[str, ...] = ()
    """Its projections reading the hidden state (SwiGLU's gate and up)."""
    mlp_out: str = ""
    """Its projection writing back to the hidden state."""
    layer_keywords: bool = False
    """Its layers take the causal mask and the position ids as keywords (transformers' decoder layers); the model's
    forward makes them once, so a stage that runs some layers must make them too."""
    rotary_embedding: str | None = None
    """The module making the rotary (cos, sin) every layer takes as position_embeddings (transformers' Llama)."""
    scaled_embedding: bool = False
    """The token embedding multiplies its rows by sqrt(hidden_size) inside its own forward (Gemma's
    ScaledWordEmbedding): a layer that replaces it must do the same."""
    logit_softcap: bool = False
    """The causal-LM forward soft-caps the logits after the head (Gemma 2's final_logit_softcapping)."""
    per_layer_attention: bool = False
    """Layers may differ in attention type (config.layer_types: sliding-window and global), each with its own mask."""
    sliding_window: bool = False
    """Every layer attends within config.sliding_window when it is set (Mistral)."""


def has_modules(model: nn.Module, *paths: str) -> bool:
    """The model has a submodule at every one of `paths`."""
    try:
        for path in paths:
            model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


_LLAMA_NAMES = ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.norm",
                "model.rotary_emb", "lm_head")


def _llama_like(model_type: str | None) -> Callable[[nn.Module], bool]:
    def recognise(model: nn.Module) -> bool:
        return (model_type is None or _model_type(model) == model_type) and has_modules(model, *_LLAMA_NAMES)

    return recognise


def _llama(name: str, description: str, model_type: str | None, **facts) -> Family:
    """A family with transformers' Llama names (model.embed_tokens, model.layers, model.norm, lm_head)."""
    return Family(
        name=name, description=description, recognise=_llama_like(model_type),
        token_embedding="model.embed_tokens", layers="model.layers", final_norm="model.norm", head="lm_head",
        heads=("num_attention_heads", "num_key_value_heads"),
        attention="self_attn", attention_in=("q_proj", "k_proj", "v_proj"), attention_out="o_proj",
        mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj",
        layer_keywords=True, rotary_embedding="model.rotary_emb", **facts,
    )


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt", description="the project's GPT (reference.model, GPT-2 and Llama style blocks)",
        recognise=lambda m: has_modules(m, "wte", "blocks", "ln_f", "lm_head") and hasattr(m, "config")
        and hasattr(m, "wpe"),
        token_embedding="wte", position_embedding="wpe", layers="blocks", final_norm="ln_f", head="lm_head",
        heads=("n_head", "n_kv_head"),
        attention_in=("q_proj", "k_proj", "v_proj"), attention_out="out_proj",
        mlp_in=("fc_in", "fc_gate"), mlp_out="fc_out",  # fc_gate only in the Llama-style (SwiGLU) blocks
    ),
    _llama("gemma2", "transformers' Gemma 2", "gemma2", scaled_embedding=True, logit_softcap=True,
           per_layer_attention=True),
    _llama("gemma", "transformers' Gemma", "gemma", scaled_embedding=True),
    _llama("mistral", "transformers' Mistral", "mistral", sliding_window=True),
    _llama("qwen2", "transformers' Qwen2", "qwen2", per_layer_attention=True),
    _llama("llama", "transformers' Llama naming (LlamaForCausalLM and the models that copy it)", None),
    Family(
        name="gpt2", description="transformers' GPT-2 (GPT2LMHeadModel: Conv1D layers, fused c_attn)",
        recognise=lambda m: has_modules(m, "transformer.wte", "transformer.wpe", "transformer.h", "transformer.ln_f",
                                        "lm_head"),
        token_embedding="transformer.wte", position_embedding="transformer.wpe", after_embedding=("transformer.drop",),
        layers="transformer.h", final_norm="transformer.ln_f", head="lm_head",
        heads=("n_head", None), attention_sizes=("split_size", "num_heads"),
        attention_in=("c_attn",), attention_out="c_proj", mlp_in=("c_fc",), mlp_out="c_proj",
        layer_keywords=True,
    ),
    Family(
        name="transformer_encoder", description="a model built on torch's nn.TransformerEncoder",
        recognise=lambda m: any(isinstance(x, nn.TransformerEncoder) for x in m.modules()),
        attention="self_attn", mlp="", mlp_in=("linear1",), mlp_out="linear2",
    ),
)
"""Every known family, in the order they are tried (a family sharing another's names comes before it)."""


def family_of(model: nn.Module, *, among: tuple[str, ...] | None = None, context: str = "unknown model family",
              purpose: str = "") -> Family:
    """The family of `model`, tried in FAMILIES' order (only those named in `among`, if given). Otherwise a ValueError:
    "`context` for <class> (known families: ...); `purpose`" (purpose: what to do for a model no family fits)."""
    candidates = [f for f in FAMILIES if among is None or f.name in among]
    for family in candidates:
        if family.recognise(model):
            return family
    known = ", ".join(f"{f.name} ({f.description})" for f in candidates)
    raise ValueError(f"{context} for {type(model).__name__} (known families: {known})"
                     + (f"; {purpose}" if purpose else ""))
