"""Tensor (intra-layer model) parallel: Megatron-LM (Shoeybi et al. 2019, arXiv 1909.08053), Sec. 3, for any model.

    from optimized.tensor_parallel import parallelize
    parallelize(model)                          # the ready plan for the project's GPT, HF Llama, HF GPT-2 or a
                                                # model on torch's nn.TransformerEncoder
    parallelize(model, plan, process_group=tp)  # any model: module names (globs) -> styles

Read in this order:
    regions.py        f, g, scatter, gather: the conjugate collectives as autograd Functions (Sec. 3, Fig. 3)
    layers.py         column-/row-parallel Linear (nn.Linear and transformers Conv1D, fused q/k/v sections), the
                      vocab-parallel embedding; each built from the full weight so it equals the dense layer
    multihead_attention.py  torch's nn.MultiheadAttention split by heads (replaced whole: its forward needs every head)
    cross_entropy.py  the vocab-parallel cross-entropy (3 numbers per token on the wire, never the full logits) and
                      the adapters that plug it into a model's loss
    styles.py         what a plan says about one module: colwise, rowwise, embedding, vocab_head, LocalHeads, ...
    plans.py          the ready plans, written from optimized.families' facts: megatron_plan (the project's GPT),
                      llama_plan, gpt2_plan, transformer_encoder_plan, plan_for
    parallelize.py    validation before any collective, applying a plan without replacing any forward
    state.py          split_parameters, gather_full, load_full: whole tensors back and in

One transformer layer costs two all-reduces forward and two backward (Megatron Sec. 3, Fig. 4), each of B*T*C
activations; q, k and v (and SwiGLU's gate and up) share one f at their module's input.
"""

from optimized.tensor_parallel.cross_entropy import (
    IGNORE_INDEX,
    VocabParallelCausalLMLoss,
    VocabParallelLoss,
    vocab_parallel_cross_entropy,
)
from optimized.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from optimized.tensor_parallel.multihead_attention import ParallelMultiheadAttention
from optimized.tensor_parallel.parallelize import parallelize
from optimized.tensor_parallel.plans import gpt2_plan, llama_plan, megatron_plan, plan_for, transformer_encoder_plan
from optimized.tensor_parallel.regions import (
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    scatter_to_region,
)
from optimized.tensor_parallel.state import gather_full, load_full, split_parameters
from optimized.tensor_parallel.styles import (
    STYLE_NAMES,
    ColumnParallel,
    LocalHeads,
    Multihead,
    RowParallel,
    SharedInput,
    VocabEmbedding,
    VocabHead,
    fused_qkv,
)

__all__ = [
    "IGNORE_INDEX",
    "STYLE_NAMES",
    "ColumnParallel",
    "ColumnParallelLinear",
    "LocalHeads",
    "Multihead",
    "ParallelMultiheadAttention",
    "RowParallel",
    "RowParallelLinear",
    "SharedInput",
    "VocabEmbedding",
    "VocabHead",
    "VocabParallelCausalLMLoss",
    "VocabParallelEmbedding",
    "VocabParallelLoss",
    "copy_to_region",
    "fused_qkv",
    "gather_from_region",
    "gather_full",
    "gpt2_plan",
    "llama_plan",
    "load_full",
    "megatron_plan",
    "parallelize",
    "plan_for",
    "reduce_from_region",
    "scatter_to_region",
    "split_parameters",
    "transformer_encoder_plan",
    "vocab_parallel_cross_entropy",
]
