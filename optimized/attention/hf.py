"""`flash_attention` inside Hugging Face transformers models: one call registers the attention function and the
mask that goes with it.

    from optimized.attention import register_transformers
    name = register_transformers()                                   # "pretrain_spec"
    model = LlamaForCausalLM._from_config(config, attn_implementation=name)   # or model.set_attn_implementation(name)

transformers looks an `attn_implementation` up in two registries: `AttentionInterface` (the attention function) and
`AttentionMaskInterface` (what mask the model builds for it). With only the first, no mask is built at all and
padding is silently ignored (a left-padded batch then attends to its pad tokens). Registered here:
- the mask: the (B, M) key padding mask, True = attend, or None when nothing is padded (what transformers does for
  flash-attn); the causal mask is not materialised, `flash_attention` applies it bottom-right aligned, which is
  the KV-cache convention (the N new queries are the last N of the M keys).
- the attention: q (B, H, N, d) and k, v (B, Hkv, M, d) as transformers passes them (GQA heads not repeated),
  the module's `is_causal` (or the call's), its `scaling`, a Mistral-style `sliding_window` (the query and the
  sliding_window - 1 keys before it, transformers' convention) and a Gemma 2 `softcap`. Packed rows with
  `position_ids` that restart at 0 (transformers' padding-free training) go through `flash_attention_varlen`.
  Returns (B, N, H, d) and no attention weights.
transformers is imported inside `register_transformers` only: `import optimized.attention` never needs it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from optimized.attention.dispatch import BACKENDS, flash_attention, flash_attention_varlen

DEFAULT_NAME = "pretrain_spec"


def register_transformers(name: str = DEFAULT_NAME, *, backend: str = "auto") -> str:
    """Register `flash_attention(backend=backend)` and its padding mask with transformers under `name`; returns
    `name`, to pass as `attn_implementation=`."""
    if not isinstance(name, str) or not name or name in _BUILTIN or name.startswith("paged|") or "flash" in name:
        # transformers treats every name containing "flash" as a flash-attn kernel to import from the Hub
        raise ValueError(f"name must be a new attn_implementation name: not one of transformers' own "
                         f"{sorted(_BUILTIN)}, not 'paged|...', and without 'flash' in it (transformers would "
                         f"look for a flash-attn kernel of that name), got {name!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # transformers < 4.53 has no mask registry: padding would be silently dropped
        raise ImportError("register_transformers needs transformers >= 4.53 (AttentionInterface and "
                          f"masking_utils.AttentionMaskInterface): {e}") from e
    AttentionInterface.register(name, functools.partial(transformers_attention, backend=backend))
    AttentionMaskInterface.register(name, padding_mask)
    return name


_BUILTIN = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Tensor | None = None, **_) -> Tensor | None:
    """The mask transformers hands the attention function: the last kv_length columns of the 2-D padding mask as
    (B, kv_length) bool, True = attend, or None when no key is padding."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, -kv_length:].to(torch.bool)  # (B, M)
    return None if bool(keep.all()) else keep


def transformers_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                           sliding_window: int | None = None, softcap: float | None = None,
                           is_causal: bool | None = None, backend: str = "auto", **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, N, d), key, value (B, Hkv, M, d) ->
    ((B, N, H, d), None)."""
    if dropout:
        raise ValueError(f"dropout={dropout}: flash_attention has no attention dropout; set the model's attention "
                         "dropout to 0 (e.g. GPT2Config(attn_pdrop=0.0)) or call model.eval()")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by flash_attention")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be the (B, M) padding mask that register_transformers' mask function "
                         f"builds, got shape {tuple(attention_mask.shape)} (a 4-D mask from another "
                         "attn_implementation?)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    options = dict(is_causal=bool(causal), scale=scaling, softcap=float(softcap or 0.0),
                   window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), backend=backend)
    packed = _packed_documents(kwargs.get("position_ids"), query, key, attention_mask)
    if packed is not None:
        cu_seqlens, longest = packed
        out = flash_attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                     cu_seqlens, cu_seqlens, longest, longest, **options)  # (N, H, d)
        return out.unsqueeze(0), None  # (1, N, H, d)
    out = flash_attention(query, key, value, key_padding_mask=attention_mask, causal_alignment="bottom_right",
                          **options)  # (B, H, N, d)
    return out.transpose(1, 2), None  # (B, N, H, d)


def _packed_documents(position_ids: Tensor | None, query: Tensor, key: Tensor,
                      attention_mask: Tensor | None) -> tuple[Tensor, int] | None:
    """(cu_seqlens, longest) when one row packs documents whose position_ids restart at 0, else None."""
    if position_ids is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    pos = position_ids.reshape(-1)  # (N,)
    if pos.numel() != query.shape[2] or pos.numel() < 2 or bool((pos[1:] == pos[:-1] + 1).all()):
        return None
    starts = (pos == 0).nonzero().view(-1).tolist()
    if not starts or starts[0] != 0:
        return None
    bounds = [*starts, pos.numel()]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    return cu_seqlens, max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
