"""Ready tensor-parallel plans: Megatron's split (arXiv 1909.08053, Sec. 3) written for four naming conventions.

    megatron_plan             the project's GPT (reference.model, both families)
    llama_plan                transformers' Llama naming (LlamaForCausalLM, and the models that copy it: Mistral, ...)
    gpt2_plan                 transformers' GPT2LMHeadModel (Conv1D layers, fused c_attn)
    transformer_encoder_plan  any model built on torch's nn.TransformerEncoder (its self_attn an nn.MultiheadAttention)
    plan_for                  picks one by the model's layout; any other model gets an error saying how to write a plan

In each: attention q/k/v (or the fused qkv) column-parallel and its output projection row-parallel, split by whole
heads (LocalHeads), the MLP's input projections column-parallel and its output projection row-parallel, the token
embedding by vocabulary rows, the output head vocab-parallel (`vocab_head=False` leaves the head whole, so the model's
own loss and full logits are untouched). Norms and position embeddings stay whole on every rank. A model on
nn.TransformerEncoder has no conventional names for its embedding and head, so its plan leaves them whole (add
`"<your embedding>": "embedding", "<your head>": "vocab_head"` to split them).
"""

from __future__ import annotations

from torch import nn

from optimized.tensor_parallel.parallelize import HOW_TO_WRITE_A_PLAN, LocalHeads, fused_qkv


def _head(plan: dict, name: str, vocab_head: bool) -> dict:
    if vocab_head:
        plan[name] = "vocab_head"
    return plan


def megatron_plan(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """The project's GPT: blocks.*.attn.{q,k,v}_proj colwise, out_proj rowwise, mlp.fc_in (and fc_gate) colwise,
    fc_out rowwise, wte embedding, lm_head vocab_head."""
    cfg = model.config
    plan: dict = {
        "wte": "embedding",
        "blocks.*.attn": LocalHeads(cfg.n_head, cfg.n_kv_head),
        "blocks.*.attn.[qkv]_proj": "colwise",
        "blocks.*.attn.out_proj": "rowwise",
        "blocks.*.mlp.fc_in": "colwise",
        "blocks.*.mlp.fc_out": "rowwise",
    }
    if getattr(cfg, "mlp", "gelu") == "swiglu":
        plan["blocks.*.mlp"] = "shared_input"
        plan["blocks.*.mlp.fc_gate"] = "colwise"
    if not vocab_head and model.lm_head.weight is model.wte.weight:
        del plan["wte"]  # a tied head left whole keeps the embedding whole too
    return _head(plan, "lm_head", vocab_head)


def llama_plan(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """transformers' Llama naming: model.layers.*.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
    model.embed_tokens, lm_head. Attention infers its head count from the projection width, so no attribute
    changes."""
    cfg = model.config
    plan: dict = {
        "model.embed_tokens": "embedding",
        "model.layers.*.self_attn": LocalHeads(cfg.num_attention_heads,
                                               getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "model.layers.*.self_attn.[qkv]_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp": "shared_input",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
    }
    if not vocab_head and model.lm_head.weight is model.model.embed_tokens.weight:
        del plan["model.embed_tokens"]
    return _head(plan, "lm_head", vocab_head)


def gpt2_plan(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """transformers' GPT-2 naming: transformer.h.*.attn.c_attn (a Conv1D producing [q; k; v]) fused column,
    attn.c_proj rowwise, mlp.c_fc colwise, mlp.c_proj rowwise, transformer.wte embedding, lm_head (tied) vocab_head.
    The attention's split_size and num_heads are divided by t, because its forward splits c_attn's output by
    split_size."""
    cfg = model.config
    C = cfg.n_embd
    plan: dict = {
        "transformer.wte": "embedding",
        "transformer.h.*.attn": LocalHeads(cfg.n_head, cfg.n_head, attributes=("split_size", "num_heads")),
        "transformer.h.*.attn.c_attn": fused_qkv(C, C, C),
        "transformer.h.*.attn.c_proj": "rowwise",
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
    }
    if not vocab_head and model.lm_head.weight is model.transformer.wte.weight:
        del plan["transformer.wte"]
    return _head(plan, "lm_head", vocab_head)


def transformer_encoder_plan(model: nn.Module) -> dict:
    """Every nn.TransformerEncoder in the model: layers.*.self_attn (an nn.MultiheadAttention) "mha", layers.*.linear1
    colwise, layers.*.linear2 rowwise. The model's embedding and head stay whole."""
    encoders = [name for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoder)]
    if not encoders:
        raise ValueError(f"transformer_encoder_plan: {type(model).__name__} has no torch.nn.TransformerEncoder")
    plan: dict = {}
    for name in encoders:
        layers = f"{name}.layers.*" if name else "layers.*"
        plan.update({f"{layers}.self_attn": "mha", f"{layers}.linear1": "colwise", f"{layers}.linear2": "rowwise"})
    return plan


def _has(model: nn.Module, *paths: str) -> bool:
    try:
        for path in paths:
            model.get_submodule(path)
    except AttributeError:
        return False
    return True


def plan_for(model: nn.Module, *, vocab_head: bool = True) -> dict:
    """The ready plan matching the model's layout; a ValueError saying how to write one for any other model.
    (`vocab_head` does not apply to the nn.TransformerEncoder plan, whose embedding and head stay whole.)"""
    if _has(model, "wte", "blocks.0.attn.q_proj", "lm_head") and hasattr(model, "config"):
        return megatron_plan(model, vocab_head=vocab_head)
    if _has(model, "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
            "lm_head"):
        return llama_plan(model, vocab_head=vocab_head)
    if _has(model, "transformer.wte", "transformer.h.0.attn.c_attn", "lm_head"):
        return gpt2_plan(model, vocab_head=vocab_head)
    if any(isinstance(m, nn.TransformerEncoder) for m in model.modules()):
        return transformer_encoder_plan(model)
    raise ValueError(f"no ready tensor-parallel plan for {type(model).__name__} (known layouts: the project's GPT, "
                     f"transformers Llama naming, transformers GPT-2, torch nn.TransformerEncoder); "
                     f"{HOW_TO_WRITE_A_PLAN}")
