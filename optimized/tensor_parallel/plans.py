"""Ready tensor-parallel plans: Megatron's split (arXiv 1909.08053, Sec. 3) written once, from the facts
optimized.families keeps about each model family (where the layers live, what the projections are called).

    megatron_plan             the project's GPT (reference.model, both families)
    llama_plan                transformers' Llama naming (LlamaForCausalLM, and the models that copy it: Mistral, ...)
    gpt2_plan                 transformers' GPT2LMHeadModel (Conv1D layers, fused c_attn)
    transformer_encoder_plan  any model built on torch's nn.TransformerEncoder (its self_attn an nn.MultiheadAttention)
    plan_for                  picks one by the model's family; any other model gets an error saying how to write a plan

In each: attention q/k/v (or the fused qkv) column-parallel and its output projection row-parallel, split by whole
heads (LocalHeads), the MLP's input projections column-parallel and its output projection row-parallel, the token
embedding by vocabulary rows, the output head vocab-parallel (`vocab_head=False` leaves the head whole, so the model's
own loss and full logits are untouched). Norms and position embeddings stay whole on every rank. A model on
nn.TransformerEncoder has no conventional names for its embedding and head, so its plan leaves them whole (add
`"<your embedding>": "embedding", "<your head>": "vocab_head"` to split them).
"""

from __future__ import annotations

from torch import nn

from optimized.families import FAMILIES, Family, family_of, has_modules
from optimized.tensor_parallel.styles import HOW_TO_WRITE_A_PLAN, LocalHeads, fused_qkv

_FAMILY = {f.name: f for f in FAMILIES}


def _plan(family: Family, model: nn.Module, vocab_head: bool) -> dict:
    """The Megatron split of a causal LM of `family`: embedding, each layer's attention and MLP, head."""
    cfg = model.config
    query_heads = getattr(cfg, family.heads[0])
    kv_heads = (getattr(cfg, family.heads[1], None) if family.heads[1] else None) or query_heads
    attn = f"{family.layers}.*.{family.attention}"
    mlp = f"{family.layers}.*.{family.mlp}"
    plan: dict = {family.token_embedding: "embedding",
                  attn: LocalHeads(query_heads, kv_heads, attributes=family.attention_sizes)}
    if family.attention_in == ("q_proj", "k_proj", "v_proj"):
        plan[f"{attn}.[qkv]_proj"] = "colwise"
    else:  # one fused projection producing [q; k; v]
        width = model.get_submodule(family.token_embedding).embedding_dim
        head_dim = width // query_heads
        plan[f"{attn}.{family.attention_in[0]}"] = fused_qkv(width, kv_heads * head_dim, kv_heads * head_dim)
    plan[f"{attn}.{family.attention_out}"] = "rowwise"
    mlp_in = [n for n in family.mlp_in if has_modules(model, f"{family.layers}.0.{family.mlp}.{n}")]
    if len(mlp_in) > 1:
        plan[mlp] = "shared_input"  # gate and up read one input: one f for both
    plan.update({f"{mlp}.{n}": "colwise" for n in mlp_in})
    plan[f"{mlp}.{family.mlp_out}"] = "rowwise"
    if vocab_head:
        plan[family.head] = "vocab_head"
    elif model.get_submodule(family.head).weight is model.get_submodule(family.token_embedding).weight:
        del plan[family.token_embedding]  # a tied head left whole keeps the embedding whole too
    return plan


def megatron_plan(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """The project's GPT: blocks.*.attn.{q,k,v}_proj colwise, out_proj rowwise, mlp.fc_in (and fc_gate) colwise,
    fc_out rowwise, wte embedding, lm_head vocab_head."""
    return _plan(_FAMILY["gpt"], model, vocab_head)


def llama_plan(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """transformers' Llama naming: model.layers.*.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
    model.embed_tokens, lm_head. Attention infers its head count from the projection width, so no attribute
    changes."""
    return _plan(_FAMILY["llama"], model, vocab_head)


def gpt2_plan(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """transformers' GPT-2 naming: transformer.h.*.attn.c_attn (a Conv1D producing [q; k; v]) fused column,
    attn.c_proj rowwise, mlp.c_fc colwise, mlp.c_proj rowwise, transformer.wte embedding, lm_head (tied) vocab_head.
    The attention's split_size and num_heads are divided by t, because its forward splits c_attn's output by
    split_size."""
    return _plan(_FAMILY["gpt2"], model, vocab_head)


def transformer_encoder_plan(model: nn.Module) -> dict:
    """Every nn.TransformerEncoder in the model: layers.*.self_attn (an nn.MultiheadAttention) "mha", layers.*.linear1
    colwise, layers.*.linear2 rowwise. The model's embedding and head stay whole."""
    encoders = [name for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoder)]
    if not encoders:
        raise ValueError(f"transformer_encoder_plan: {type(model).__name__} has no torch.nn.TransformerEncoder")
    family = _FAMILY["transformer_encoder"]
    plan: dict = {}
    for name in encoders:
        layers = f"{name}.layers.*" if name else "layers.*"
        plan.update({f"{layers}.{family.attention}": "mha", f"{layers}.{family.mlp_in[0]}": "colwise",
                     f"{layers}.{family.mlp_out}": "rowwise"})
    return plan


def plan_for(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """The ready plan of the model's family; a ValueError saying how to write one for any other model.
    (`vocab_head` does not apply to the nn.TransformerEncoder plan, whose embedding and head stay whole.)"""
    family = family_of(model, context="no ready tensor-parallel plan", purpose=HOW_TO_WRITE_A_PLAN)
    if family.name == "transformer_encoder":
        return transformer_encoder_plan(model)
    if family.scaled_embedding:
        raise ValueError(f"no ready tensor-parallel plan for {type(model).__name__} ({family.description}): its token "
                         f"embedding {family.token_embedding} scales its rows by sqrt(hidden_size) in its own "
                         f"forward, which a VocabParallelEmbedding would drop; pass llama_plan(model) without its "
                         f"{family.token_embedding!r} entry (and, with a tied head, vocab_head=False), or "
                         + HOW_TO_WRITE_A_PLAN)
    return _plan(family, model, vocab_head)
