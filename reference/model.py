"""A tiny GPT: the shared workload every technique is trained and measured on, in two families.

GPT-2 shaped (Radford et al. 2019; nanoGPT), the default: token + learned position embeddings, `n_layer` pre-norm
blocks (x + attn(ln_1(x)), then x + mlp(ln_2(x))) with LayerNorm and a GeLU MLP, a final LayerNorm and an output
head tied to the token embedding (Press & Wolf 2017).
Llama shaped (Touvron et al. 2023, arXiv 2302.13971), `GPTConfig.llama(...)`: the same blocks with RMSNorm (Zhang &
Sennrich 2019), rotary position embeddings inside attention instead of a position table (Su et al. 2021), a SwiGLU
MLP (Shazeer 2020), grouped-query attention, an untied head and no biases.
Attention is causal and grouped-query capable in both (GQA, Ainslie et al. 2023, arXiv 2305.13245): `n_head` query
heads share `n_kv_head` key/value heads.

Two steps are pluggable: `GPT(config, attention=fn)` calls `fn(q, k, v, is_causal=True)` with q: (B, H, T, d) and
k, v: (B, Hkv, T, d), the signature of `reference.attention.attention` (that is how the optimized FlashAttention is
dropped in), and `GPT(config, loss=fn)` calls `fn(logits, targets, reduction)`, default `token_loss` (that is how
a vocabulary-parallel cross-entropy is dropped in; `model.loss` may also be assigned later).

Module names are part of the contract (tensor and pipeline parallel address layers by them):
    wte, wpe (learned positions only), blocks.{i}.ln_1, blocks.{i}.attn.{q_proj,k_proj,v_proj,out_proj},
    blocks.{i}.ln_2, blocks.{i}.mlp.{fc_gate (SwiGLU only), fc_in, fc_out}, ln_f, lm_head (its weight is
    wte.weight when tie_embeddings).
The attention layer reads the number of heads from the width of q_proj's output at run time, so a layer whose
q/k/v projections hold only some heads (tensor parallel) runs those heads unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Targets equal to this are not scored (the convention of torch.nn.functional.cross_entropy)."""


@dataclass
class GPTConfig:
    """Shape of the tiny GPT. Defaults give a model of ~0.1M parameters that trains in seconds on a CPU."""

    vocab_size: int = 64
    """Number of token ids."""
    block_size: int = 64
    """Longest sequence the position embedding covers."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of query heads."""
    n_kv_head: int | None = None
    """Number of key/value heads (GQA); None means n_head (multi-head attention), 1 means MQA."""
    n_embd: int = 64
    """Width of the residual stream; must divide by n_head."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of n_embd."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """Share the output head's weight with the token embedding."""
    norm: str = "layernorm"
    """"layernorm" (GPT-2) or "rmsnorm" (Llama)."""
    mlp: str = "gelu"
    """"gelu" (GPT-2: fc_out(gelu(fc_in(x)))) or "swiglu" (Llama: fc_out(silu(fc_gate(x)) * fc_in(x)))."""
    position: str = "learned"
    """"learned" (GPT-2: a wpe table added to the token embedding) or "rope" (Llama: q and k rotated)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies theta_i = base^(-2i/d) (Su et al. 2021, Sec. 3.2.2)."""
    seed: int = 0
    """Seed of the deterministic initialisation."""

    @classmethod
    def llama(cls, **kwargs) -> GPTConfig:
        """The Llama-style family: RMSNorm, RoPE, SwiGLU, untied head, no biases; GQA by passing n_kv_head."""
        family = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False)
        return cls(**{**family, **kwargs})

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head gets n_embd // n_head channels)"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                f"(each key/value head serves n_head // n_kv_head query heads)"
            )
        for name, allowed in (("norm", _NORMS), ("mlp", ("gelu", "swiglu")), ("position", ("learned", "rope"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig.position='rope' rotates channel pairs: head_dim={self.head_dim} must be even")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"GPTConfig.rope_base must be a number > 1, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


AttentionFn = Callable[..., Tensor]
LossFn = Callable[[Tensor, Tensor, str], Tensor]
_NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467, Eq. 4): y = x / sqrt(mean(x^2) + eps) * g.

    LayerNorm without the mean subtraction and the bias: it rescales by the root mean square only."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        z = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32
        rms = torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        return (z * rms).to(x.dtype) * self.weight  # (..., C)


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotary(x: Tensor, base: float) -> Tensor:
    """Rotary position embedding (RoPE; Su et al. 2021, arXiv 2104.09864, Sec. 3.2) of x: (B, H, T, d).

    Channel pair (i, i + d/2) of the token at position t is rotated by the angle t * theta_i, theta_i = base^(-2i/d):
        (x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin)
    so q_t . k_s depends on t - s only. Pairing i with i + d/2 (not 2i with 2i+1 as in the paper) is the GPT-NeoX /
    HF Llama layout: the same rotation on a permutation of the channels."""
    T, d = x.size(-2), x.size(-1)
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32
    theta = base ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)  # (d/2,)
    angle = torch.arange(T, device=x.device, dtype=dtype)[:, None] * theta  # (T, d/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)  # (T, d)
    z = x.to(dtype)
    z1, z2 = z.chunk(2, dim=-1)  # (B, H, T, d/2) each
    rotated_half = torch.cat([-z2, z1], dim=-1)  # (B, H, T, d)
    return (z * cos + rotated_half * sin).to(x.dtype)  # (B, H, T, d)


def _default_attention() -> AttentionFn:
    from reference.attention import attention

    return attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attention: AttentionFn) -> None:
        super().__init__()
        d = config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(config.n_embd, config.n_head * d, bias=config.bias)
        # No key bias, even with config.bias: q·(k + b) = q·k + q·b adds the same number to every score of a query
        # row, and softmax ignores it, so the bias's gradient is zero in exact arithmetic. In floating point it is
        # rounding noise that Adam normalises into full-size steps: a parameter that only adds noise to comparisons.
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * d, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * d, bias=config.bias)
        self.out_proj = nn.Linear(config.n_head * d, config.n_embd, bias=config.bias)
        self.attention = attention
        self.rope_base = config.rope_base if config.position == "rope" else None

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
        if self.rope_base is not None:
            q, k = rotary(q, self.rope_base), rotary(k, self.rope_base)  # positions enter here, not in wte
        y = self.attention(q, k, v, is_causal=True)  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*d)
        return self.out_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """GeLU MLP fc_out(gelu(fc_in(x))) (GPT-2), or SwiGLU fc_out(silu(fc_gate(x)) * fc_in(x)) (Shazeer 2020,
    arXiv 2002.05202, Eq. 6: FFN_SwiGLU(x) = (Swish(x W) * x V) W2). Hidden width mlp_ratio * n_embd in both."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc_gate = nn.Linear(config.n_embd, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        self.fc_in = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.fc_out = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fc_gate is None:
            return self.fc_out(F.gelu(self.fc_in(x)))  # (B, T, C)
        return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attention: AttentionFn) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The tiny GPT. `forward(idx, targets)` returns (logits, loss); loss is None without targets."""

    def __init__(self, config: GPTConfig, attention: AttentionFn | None = None, loss: LossFn | None = None) -> None:
        super().__init__()
        self.config = config
        attention = attention if attention is not None else _default_attention()
        self.loss: LossFn = loss if loss is not None else token_loss
        """(logits (B, T, V), targets (B, T), reduction) -> loss: the pluggable loss."""
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config, attention) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation drawn from a private generator seeded by config.seed, in a fixed order.

        Weights ~ N(0, 0.02); the projections that write into the residual stream (out_proj, fc_out) are scaled by
        1/sqrt(2 * n_layer) so the residual's variance does not grow with depth (GPT-2 paper, Sec. 2.3).
        """
        gen = torch.Generator().manual_seed(self.config.seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.endswith("out_proj.weight") or name.endswith("fc_out.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * residual_std)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif ".ln_" in f".{name}" and name.endswith("weight"):  # norm gains start at 1
                p.fill_(1.0)
            else:
                p.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean"):
        """idx, targets: (B, T) int64. reduction "mean": mean cross-entropy over tokens whose target is not
        IGNORE_INDEX; "sum": their sum (for token-weighted accumulation). A batch with no scored token has
        mean loss 0 (not NaN), so it contributes nothing."""
        check_ids(idx, self.config.vocab_size, self.config.block_size)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1), device=idx.device))  # (B, T, C) + (T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, self.loss(logits, targets, reduction)


def check_ids(idx: Tensor, vocab_size: int, block_size: int, name: str = "idx") -> None:
    """Refuse what an embedding lookup would turn into an obscure IndexError: not (B, T) int64, T = 0,
    T > block_size, an id outside [0, vocab_size)."""
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"{name} must be a (B, T) int64 tensor, got "
                         f"{f'shape {tuple(idx.shape)} dtype {idx.dtype}' if isinstance(idx, Tensor) else idx!r}")
    T = idx.size(1)
    if T == 0 or idx.size(0) == 0:
        raise ValueError(f"{name} must hold at least one token, got shape {tuple(idx.shape)}")
    if T > block_size:
        raise ValueError(f"{name}: sequence length T={T} exceeds GPTConfig.block_size={block_size}")
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside [0, vocab_size={vocab_size})")


def token_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (..., V) logits against (...) targets, skipping IGNORE_INDEX, in at least fp32.

    "sum" is the sum over scored tokens; "mean" divides it by their count (0 when there is none)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if reduction == "sum":
        return total
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)
