"""The tiny models the tests train: one place for their shapes, so a test names what it needs instead of spelling it.

- `tiny_gpt(**overrides)`: the project's GPT (reference/model.py) at a named size, `GPTConfig` fields overridden by
  keyword; `TINY` (1 layer, width 16) for single-process unit tests, `SMALL` (2 layers, GQA-free, width 32) for
  multi-rank runs.
- `hf_causal_lm(family, ...)`: transformers' causal LMs nobody here wrote (Llama with GQA, GPT-2, Mistral with a
  sliding window, Gemma-2 with softcap), built from a tiny config (never downloaded), dropout off, eager attention
  unless asked.
- `EncoderLM`: a causal LM made of torch's own `nn.TransformerEncoder` layers.

Every builder seeds torch before it draws weights, so two calls give the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.model import GPT, GPTConfig

TINY = dict(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16)
"""One layer, two heads, width 16: an optimizer or schedule unit test."""
SMALL = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32)
"""Two layers, four heads, width 32: a multi-rank run with something to split."""


def tiny_config(base: dict | None = None, /, **overrides) -> GPTConfig:
    """`GPTConfig` of `base` (default TINY) with `overrides`; `llama=True` gives the Llama-shaped family."""
    fields = {**(TINY if base is None else base), **overrides}
    llama = fields.pop("llama", False)
    return GPTConfig.llama(**fields) if llama else GPTConfig(**fields)


def tiny_gpt(base: dict | None = None, /, *, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    """The project's GPT of `tiny_config(base, **overrides)` in `dtype`."""
    return GPT(tiny_config(base, **overrides)).to(dtype)


HF_FAMILIES = ("llama", "gpt2", "mistral", "gemma2")


def hf_config(family: str, *, vocab: int = 64, width: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2,
              ffn: int | None = None, positions: int = 64, **extra):
    """A tiny transformers config of `family` (one of HF_FAMILIES); `extra` goes to the config unchanged."""
    import transformers

    ffn = 2 * width if ffn is None else ffn
    if family == "gpt2":
        return transformers.GPT2Config(**{"bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                          "attn_pdrop": 0.0, **extra}, vocab_size=vocab, n_embd=width,
                                       n_layer=layers, n_head=heads, n_positions=positions)
    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions)
    if family == "llama":
        return transformers.LlamaConfig(**common, **extra)
    if family == "mistral":  # a sliding window of 4 tokens
        return transformers.MistralConfig(**{"sliding_window": 4, **common, **extra})
    if family == "gemma2":  # softcap on the attention logits, every other layer a sliding window
        head_dim = width // heads
        return transformers.Gemma2Config(**{"head_dim": head_dim, "sliding_window": 4, "attn_logit_softcapping": 2.0,
                                            "query_pre_attn_scalar": head_dim, **common, **extra})
    raise ValueError(f"family must be one of {HF_FAMILIES}, got {family!r}")


def hf_causal_lm(family: str, *, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32,
                 seed: int = 0, **config) -> nn.Module:
    """transformers' causal LM of `family` from `hf_config(family, **config)`, weights drawn from `seed`."""
    import transformers

    classes = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
               "mistral": transformers.MistralForCausalLM, "gemma2": transformers.Gemma2ForCausalLM}
    torch.manual_seed(seed)
    model = classes[family]._from_config(hf_config(family, **config), attn_implementation=attn_implementation)
    return model.to(dtype)


class EncoderLM(nn.Module):
    """A causal LM on torch's own layers: embedding, `nn.TransformerEncoder` under a causal mask, optional final
    norm, head. `forward(idx)` returns the logits (B, T, V)."""

    def __init__(self, vocab: int = 64, width: int = 32, heads: int = 4, layers: int = 2, ffn: int | None = None,
                 *, norm_first: bool = False, final_norm: bool = False, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=heads, dim_feedforward=2 * width if ffn is None else ffn,
                                           dropout=0.0, batch_first=True, norm_first=norm_first, bias=bias)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(idx.size(1), dtype=self.head.weight.dtype)  # (T, T)
        x = self.encoder(self.embed(idx), mask=mask, is_causal=True)  # (B, T, C)
        return self.head(self.norm(x))  # (B, T, V)
