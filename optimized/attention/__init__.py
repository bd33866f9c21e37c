"""FlashAttention: exact attention without the N x M matrix (Dao et al. 2022, arXiv 2205.14135; FA2: Dao 2023,
arXiv 2307.08691). `flash_attention` is the drop-in for `reference.attention.attention`:

    from optimized.attention import flash_attention
    out = flash_attention(q, k, v, is_causal=True)            # backend="auto"
    model = GPT(config, attention=flash_attention)

Packed documents: `flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`
(flash-attn's layout). In transformers models: `attn_implementation=register_transformers()`.

`select_backend(q, k, v, **kw)` says which backend "auto" runs and why. Triton is imported only when its backend
is asked about on CUDA or requested, so `import optimized.attention` needs neither triton nor flash-attn.
"""

from optimized.attention.blocked import blocked_attention, blocked_attention_varlen
from optimized.attention.dispatch import (
    BACKENDS,
    BackendChoice,
    BackendUnavailable,
    flash_attention,
    flash_attention_varlen,
    select_backend,
    select_backend_varlen,
    unsupported,
    unsupported_varlen,
)
from optimized.attention.hf import register_transformers

__all__ = [
    "BACKENDS",
    "BackendChoice",
    "BackendUnavailable",
    "blocked_attention",
    "blocked_attention_varlen",
    "flash_attention",
    "flash_attention_varlen",
    "register_transformers",
    "select_backend",
    "select_backend_varlen",
    "unsupported",
    "unsupported_varlen",
]
