"""FlexAttention (torch.nn.attention.flex_attention), a peer of the `attention` check: the reference's arguments
turned into one mask_mod (causal, window, padding, documents) and a score_mod (softcap)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def flex_attention_fn(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False, scale: float | None = None,
                      key_padding_mask: Tensor | None = None, causal_alignment: str = "top_left",
                      window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """`reference.attention.attention`'s arguments through torch.nn.attention.flex_attention (Dong et al. 2024,
    arXiv 2412.05496): causal, window and padding as one mask_mod, softcap as a score_mod."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    offset = 0 if causal_alignment == "top_left" else M - N
    left, right = window_size[0], 0 if is_causal else window_size[1]

    def mask_mod(b, h, i, j):
        keep = j >= 0
        if left >= 0:
            keep = keep & (j >= i + offset - left)
        if right >= 0:
            keep = keep & (j <= i + offset + right)
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[b, torch.clamp(j, max=M - 1)] & (j < M)
        return keep

    return _flex(q, k, v, mask_mod, B, scale, softcap, return_lse)


def flex_attention_varlen_fn(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, *, is_causal: bool = False,
                             scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                             softcap: float = 0.0, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """`reference.attention.attention_varlen`'s arguments through flex_attention: one packed row whose mask_mod
    keeps a query to its own document (FlexAttention's "document masking"), bottom-right aligned within it."""
    len_q, len_k = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
    docs = torch.arange(len(len_q), device=q.device)
    doc_q, doc_k = docs.repeat_interleave(len_q), docs.repeat_interleave(len_k)  # (total_q,), (total_k,)
    pos_q = torch.arange(q.shape[0], device=q.device) - cu_seqlens_q.long()[doc_q]  # (total_q,) within its document
    pos_k = torch.arange(k.shape[0], device=q.device) - cu_seqlens_k.long()[doc_k]  # (total_k,)
    diag = pos_q + (len_k - len_q)[doc_q]  # (total_q,) the aligned key position of each query
    left, right = window_size[0], 0 if is_causal else window_size[1]

    last_q, last_k = max(q.shape[0] - 1, 0), max(k.shape[0] - 1, 0)

    def mask_mod(b, h, i, j):
        # Compiled flex kernels may call mask_mod on whole blocks, past the last row and key (suspected cause of
        # the H200 run's varlen failure under torch 2.11, not confirmed): clamp every lookup into range; what lies
        # past the ends is masked by flex_attention itself.
        i, j = torch.clamp(i, max=last_q), torch.clamp(j, max=last_k)
        keep = doc_q[i] == doc_k[j]
        if left >= 0:
            keep = keep & (pos_k[j] >= diag[i] - left)
        if right >= 0:
            keep = keep & (pos_k[j] <= diag[i] + right)
        return keep

    q1, k1, v1 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, d)
    result = _flex(q1, k1, v1, mask_mod, 1, scale, softcap, return_lse)
    out, lse = result if return_lse else (result, None)
    out = out[0].transpose(0, 1)  # (total_q, H, d)
    return (out, lse[0]) if return_lse else out  # lse (H, total_q)


def _flex(q, k, v, mask_mod, B, scale, softcap, return_lse):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    H, N, M = q.shape[1], q.shape[2], k.shape[2]
    block_mask = create_block_mask(mask_mod, B, None, N, M, device=q.device)
    score_mod = (lambda score, b, h, i, j: softcap * torch.tanh(score / softcap)) if softcap else None
    with warnings.catch_warnings():  # eager (uncompiled) flex_attention warns that it materialises the scores
        warnings.simplefilter("ignore", UserWarning)
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=H != k.shape[1], return_aux=AuxRequest(lse=True))
    return (out, aux.lse.float()) if return_lse else out  # (B, H, N, d), (B, H, N)
