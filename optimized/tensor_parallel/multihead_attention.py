"""torch's nn.MultiheadAttention split by heads (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053, Sec. 3, Fig. 3b).

nn.MultiheadAttention keeps q, k and v in one bare parameter `in_proj_weight` (3E, E) (+ `in_proj_bias` (3E,)), and
its forward (F.multi_head_attention_forward) takes the head width from the query's full embedding width, so its
weights cannot be sharded in place under its own forward. `ParallelMultiheadAttention` replaces that one leaf module
(the parents' forwards, e.g. nn.TransformerEncoderLayer._sa_block, stay untouched) and computes, on rank i of t:

    x_f         = f(x)                                      identity forward, all-reduce backward
    q, k, v     = x_f [W_q; W_k; W_v]_iᵀ + b_i              the rows of this rank's H/t heads: (B, T, E/t) each
    o_i         = softmax(q kᵀ / sqrt(d) + mask) v          scaled-dot-product attention of the local heads
    y           = g(o_i W_o,iᵀ) + b_o                        out_proj row-parallel: all-reduce, bias added once

with nn.MultiheadAttention's mask conventions (F.scaled_dot_product_attention does the attention):
    attn_mask         (T, S) or (B*H, T, S), bool (True = masked out) or float (added to the scores)
    key_padding_mask  (B, S), bool (True = padding, ignored) or float
    is_causal         a hint that attn_mask is the causal mask: with no key_padding_mask the mask is dropped and
                      the attention is causal, exactly as torch does (attn_mask is still required)
    batch_first       (B, T, E) or (T, B, E); unbatched (T, E) input too
need_weights=True is refused (the averaged weights would need every head; pass need_weights=False, as
nn.TransformerEncoderLayer does). Attention dropout draws from each rank's own generator, so with dropout > 0 the
result is not the one-process result bit for bit (the tests run with dropout 0).

The parameters keep nn.MultiheadAttention's names and layout (in_proj_weight, in_proj_bias, out_proj.weight,
out_proj.bias), each holding this rank's slice, so state dicts, `gather_full` and `load_full` see the model's own
names. Rows of in_proj are split section by section (q, k, v), as a fused column-parallel projection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from optimized.tensor_parallel.layers import RowParallelLinear, ShardedLayer, check_divisible
from optimized.tensor_parallel.regions import copy_to_region, group_size


def check_multihead(module: nn.Module, t: int, what: str) -> None:
    """Raise ValueError unless `module` is an nn.MultiheadAttention this layer can split over t ranks."""
    if not isinstance(module, nn.MultiheadAttention):
        raise ValueError(f"{what}: the multihead-attention style needs a torch.nn.MultiheadAttention, got "
                         f"{type(module).__name__}")
    if not module._qkv_same_embed_dim:
        raise ValueError(f"{what}: kdim={module.kdim} and vdim={module.vdim} must equal embed_dim={module.embed_dim} "
                         f"(one packed in_proj_weight)")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(f"{what}: add_bias_kv and add_zero_attn are not supported")
    check_divisible(module.num_heads, t, f"{what}.num_heads")


class ParallelMultiheadAttention(ShardedLayer):
    """nn.MultiheadAttention with this rank's num_heads / t heads: q/k/v rows column-parallel behind f, the output
    projection row-parallel behind g (module docstring). Called like nn.MultiheadAttention; returns (output, None)."""

    _qkv_same_embed_dim = False
    """Read only by torch's fused inference paths (nn.TransformerEncoderLayer's fast path and the nested-tensor path
    nn.TransformerEncoder decides at construction): False keeps them on the plain forward, which calls this module;
    the fused kernels would need every head's weights."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        *,
        dropout: float = 0.0,
        batch_first: bool = False,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_group(process_group)
        check_divisible(embed_dim, num_heads, "embed_dim (by num_heads)")
        check_divisible(num_heads, self.tp_size, "num_heads")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = self.vdim = embed_dim
        self.local_heads = num_heads // self.tp_size
        self.dropout, self.batch_first = dropout, batch_first
        local = 3 * embed_dim // self.tp_size
        self.in_proj_weight = nn.Parameter(torch.empty(local, embed_dim, device=device, dtype=dtype))  # (3E/t, E)
        self.in_proj_bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        self.sections = (embed_dim,) * 3  # q, k, v: each split over the ranks
        self.split_dims = {"in_proj_weight": 0, "in_proj_bias": 0}
        self.out_proj = RowParallelLinear(embed_dim, embed_dim, bias, process_group=process_group, seed=seed + 1,
                                          device=device, dtype=dtype)
        # nn.MultiheadAttention's initialisation: Xavier-uniform in_proj, zero biases, drawn whole then split.
        weight = torch.empty(3 * embed_dim, embed_dim)
        nn.init.xavier_uniform_(weight, generator=torch.Generator().manual_seed(seed))
        self.load_full_(in_proj_weight=weight, in_proj_bias=torch.zeros(3 * embed_dim) if bias else None)
        if bias:
            self.out_proj.load_full_(bias=torch.zeros(embed_dim))

    @classmethod
    def from_dense(cls, dense: nn.MultiheadAttention, process_group: dist.ProcessGroup | None = None, **kwargs):
        """The layer holding this rank's heads of `dense`, equal to it once gathered."""
        check_multihead(dense, group_size(process_group), "from_dense")
        layer = cls(dense.embed_dim, dense.num_heads, dense.in_proj_bias is not None, dropout=dense.dropout,
                    batch_first=dense.batch_first, process_group=process_group,
                    device=dense.in_proj_weight.device, dtype=dense.in_proj_weight.dtype, **kwargs)
        layer._load_dense(dense)
        layer.out_proj._load_dense(dense.out_proj)
        return layer

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, B: int, T: int, S: int) -> Tensor | None:
        """The additive float mask of the local heads, broadcastable to (B, H/t, T, S)."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape == (T, S):
                mask = attn_mask  # (T, S)
            elif attn_mask.dim() == 3 and attn_mask.shape == (B * self.num_heads, T, S):
                heads = slice(self.tp_rank * self.local_heads, (self.tp_rank + 1) * self.local_heads)
                mask = attn_mask.view(B, self.num_heads, T, S)[:, heads]  # (B, H/t, T, S)
            else:
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; allowed: ({T}, {S}) or "
                                 f"(batch * num_heads = {B * self.num_heads}, {T}, {S})")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; allowed: ({B}, {S})")
            pad = key_padding_mask.view(B, 1, 1, S)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("need_weights=True: a tensor-parallel attention holds only its own heads and returns no "
                             "attention weights; call it with need_weights=False (as nn.TransformerEncoderLayer does)")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be (T, E) or batched (3 dims), got shape {tuple(query.shape)}")
        # torch's own canonicalisation: bool masks become float, -inf where True (masked out)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (as nn.MultiheadAttention): pass the causal mask, e.g. "
                             "nn.Transformer.generate_square_subsequent_mask(T)")
        batched = query.dim() == 3
        # f once per distinct input tensor (self-attention: one backward all-reduce for q, k and v)
        xq = copy_to_region(query, self.process_group)
        xk = xq if key is query else copy_to_region(key, self.process_group)
        xv = xq if value is query else xk if value is key else copy_to_region(value, self.process_group)
        if not batched:
            xq, xk, xv = xq.unsqueeze(0), xk.unsqueeze(0), xv.unsqueeze(0)  # (1, T, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            xq, xk, xv = xq.transpose(0, 1), xk.transpose(0, 1), xv.transpose(0, 1)  # (B, T, E)
        B, T, _ = xq.shape
        S = xk.size(1)
        if is_causal and key_padding_mask is None:
            mask = None  # torch drops the mask and lets the kernel apply causality
        else:
            is_causal = False
            mask = self._mask(attn_mask, key_padding_mask, B, T, S)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)  # (E/t, E) each
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        h, d = self.local_heads, self.head_dim
        q = F.linear(xq, w_q, b_q).view(B, T, h, d).transpose(1, 2)  # (B, H/t, T, d)
        k = F.linear(xk, w_k, b_k).view(B, S, h, d).transpose(1, 2)  # (B, H/t, S, d)
        v = F.linear(xv, w_v, b_v).view(B, S, h, d).transpose(1, 2)  # (B, H/t, S, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal)  # (B, H/t, T, d)
        y = self.out_proj(o.transpose(1, 2).reshape(B, T, h * d))  # (B, T, E), reduced over the ranks
        if not batched:
            return y.squeeze(0), None  # (T, E)
        return (y if self.batch_first else y.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (/{self.tp_size} ranks: "
                f"{self.local_heads} here), bias={self.in_proj_bias is not None}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def keep_encoders_on_plain_forward(model: nn.Module) -> None:
    """nn.TransformerEncoder decides at construction whether eval-mode inputs with a key padding mask go through
    nested tensors and fused kernels (`use_nested_tensor`); once its layers hold a ParallelMultiheadAttention that
    path cannot apply, so it is turned off, as torch itself does for attention it cannot fuse."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), ParallelMultiheadAttention) for layer in m.layers):
            m.use_nested_tensor = False
