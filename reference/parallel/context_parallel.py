"""Context parallelism, one process: the sequence split over c ranks, attention computed by ring attention
(Liu et al. 2023, "Ring Attention with Blockwise Transformers", arXiv 2310.01889, Sec. 3).

Every layer but attention is token-wise (embeddings, norms, MLP, head): rank r runs it on its own tokens. Attention
needs every key, so the key/value blocks travel around a ring: at step i = 0 .. c-1 rank r holds the K/V block of
rank (r - i) mod c, attends its queries Q_r to it, and passes the block on to rank r+1. Each step gives a partial
output over one block of keys, O_b = softmax(S_b) V_b, and the log-sum-exp of its scores, LSE_b = log sum_j exp(S_bj);
the partials merge exactly (the online softmax of FlashAttention, Dao et al. 2022, arXiv 2205.14135, Sec. 3.1):

    LSE = log(exp(LSE_a) + exp(LSE_b))        O = exp(LSE_a - LSE) O_a + exp(LSE_b - LSE) O_b

since softmax over the union of two key sets weighs each set by its share exp(LSE_x - LSE) of the normaliser.

Positions are GLOBAL. A rank's tokens are not positions 0 .. n-1 of anything: the causal mask compares the global
position of the query with that of the key (key j visible to query i iff pos(j) <= pos(i)), the learned position
table is read at the global positions, and RoPE rotates q and k by the angle pos * theta_i of their global
position. RoPE makes q_t . k_s a function of t - s; rotating each rank's slice as if it started at 0 gives every
rank's keys the wrong offset relative to the other ranks' queries, and the scores across blocks come out wrong
(issue 24 found this in a model-level ring: gradients off by 1.2e-3). Here `positions[r]` travels with the K/V block.

Layouts of the sequence over the ranks, for a causal mask (`positions_of`):
    "contiguous"  rank r holds the r-th of c consecutive slices. Rank r's queries see the keys of ranks 0 .. r only,
                  so the last rank does c times the work of the first.
    "zigzag"      the sequence is cut into 2c chunks; rank r holds chunks r and 2c-1-r, one early and one late, so
                  every rank does the same work (Brandon et al. 2023, "Striped Attention", arXiv 2311.09431, on the
                  imbalance; the zigzag order of ring-flash-attention and torch's context parallel).
Slices need not be equal here (torch.tensor_split): any N and c work, including N < c (a rank with no token).

Gradients: autograd differentiates through the simulated ring (a send's backward is the receive of the gradient,
ranks.py). The ranks hold the same weights; here they are one module, so autograd adds every rank's gradient into
.grad: the all-reduce over the context-parallel group that a real run does (as data parallelism's).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reference.model import GPT, IGNORE_INDEX
from reference.parallel import ranks

LAYOUTS = ("contiguous", "zigzag")


def positions_of(seq_len: int, world_size: int, layout: str = "contiguous") -> list[Tensor]:
    """positions[r]: the global positions of the tokens rank r holds, in its local order, (n_r,) int64."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world_size < 1 or seq_len < 1:
        raise ValueError(f"seq_len and world_size must be >= 1, got {seq_len} and {world_size}")
    everything = torch.arange(seq_len)  # (N,)
    if layout == "contiguous":
        return list(everything.tensor_split(world_size))
    chunks = everything.tensor_split(2 * world_size)  # 2c chunks, the first N % 2c one longer
    return [torch.cat([chunks[r], chunks[2 * world_size - 1 - r]]) for r in range(world_size)]


def rotary_at(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE (Su et al. 2021, arXiv 2104.09864) of x: (B, H, n, d) whose tokens sit at global `positions` (n,):
    channel pair (i, i + d/2) rotated by positions * theta_i, theta_i = base^(-2i/d) (reference.model.rotary's
    layout; it equals rotary(x) when positions = 0 .. n-1)."""
    d = x.size(-1)
    theta = base ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)  # (d/2,)
    angle = positions.to(x.dtype)[:, None] * theta  # (n, d/2)
    cos, sin = angle.cos(), angle.sin()  # (n, d/2) each
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, n, d/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, n, d)


def block_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, *, is_causal: bool,
                    scale: float) -> tuple[Tensor, Tensor]:
    """Queries q: (B, H, n, d) at q_pos against one key block k, v: (B, Hkv, m, d) at k_pos. Returns the partial
    output (B, H, n, d) and the log-sum-exp of the visible scores (B, H, n), -inf (output 0) where none is."""
    groups = q.size(1) // k.size(1)  # GQA: query head h reads key/value head h // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, m, d)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, n, m)
    if is_causal:
        visible = k_pos[None, :] <= q_pos[:, None]  # (n, m): by global position, whatever the layout
        s = s.masked_fill(~visible, float("-inf"))  # (B, H, n, m)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, n)
    finite = torch.where(lse.isinf(), torch.zeros_like(lse), lse)  # a row that sees no key: exp(-inf) = 0, no NaN
    return torch.exp(s - finite[..., None]) @ v, lse  # (B, H, n, d), (B, H, n)


def merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Fold one block's partial (O_b, LSE_b) into the running (O, LSE) by the log-sum-exp rule above. The running
    LSE is finite (step 0 is the rank's own block, where every query sees at least itself)."""
    new = torch.logaddexp(lse, block_lse)  # (B, H, n)
    return (torch.exp(lse - new)[..., None] * out + torch.exp(block_lse - new)[..., None] * block_out), new


def ring_attention(qs: list[Tensor], ks: list[Tensor], vs: list[Tensor], positions: list[Tensor], *,
                   is_causal: bool = True, scale: float | None = None) -> list[Tensor]:
    """Exact attention over a sequence split across len(qs) ranks. qs[r]: (B, H, n_r, d), ks[r], vs[r]:
    (B, Hkv, n_r, d) for the tokens at positions[r]. Returns outs[r]: (B, H, n_r, d), rank r's rows of
    softmax(scale Q K^T + causal mask by global position) V over the whole sequence."""
    world = len(qs)
    scale = 1.0 / math.sqrt(qs[0].size(-1)) if scale is None else scale
    k_held, v_held, pos_held = list(ks), list(vs), list(positions)  # step 0: every rank holds its own block
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for step in range(world):
        for r in range(world):  # what each rank computes at this step, with the block it holds
            o_b, lse_b = block_attention(qs[r], k_held[r], v_held[r], positions[r], pos_held[r],
                                         is_causal=is_causal, scale=scale)
            if step == 0:
                outs.append(o_b)
                lses.append(lse_b)
            else:
                outs[r], lses[r] = merge(outs[r], lses[r], o_b, lse_b)
        if step + 1 < world:  # pass the blocks on: rank r now holds what rank r-1 held
            k_held, v_held, pos_held = ranks.ring_shift(k_held), ranks.ring_shift(v_held), ranks.ring_shift(pos_held)
    return outs


def _heads(linear: nn.Linear, h: Tensor, head_dim: int) -> Tensor:
    """Project h: (B, n, C) and split the heads: (B, heads, n, head_dim)."""
    return linear(h).unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, n, heads*d) -> (B, heads, n, d)


def context_parallel_loss(model: GPT, idx: Tensor, targets: Tensor, world_size: int,
                          layout: str = "contiguous") -> Tensor:
    """The token-mean loss of the batch (idx, targets: (B, N)) through `model` with the sequence split over
    `world_size` simulated ranks in `layout`: what model(idx, targets)[1] computes. Call .backward() on it."""
    positions = positions_of(idx.size(1), world_size, layout)
    xs = []
    for pos in positions:  # embeddings: token-wise, the position table read at global positions
        x = model.wte(idx[:, pos])  # (B, n_r, C)
        xs.append(x + model.wpe(pos) if model.wpe is not None else x)  # (B, n_r, C) + (n_r, C)
    for block in model.blocks:
        attn = block.attn
        hs = [block.ln_1(x) for x in xs]  # (B, n_r, C)
        qs = [_heads(attn.q_proj, h, attn.head_dim) for h in hs]  # (B, H, n_r, d)
        ks = [_heads(attn.k_proj, h, attn.head_dim) for h in hs]  # (B, Hkv, n_r, d)
        vs = [_heads(attn.v_proj, h, attn.head_dim) for h in hs]  # (B, Hkv, n_r, d)
        if attn.rope_base is not None:  # rotate by GLOBAL positions (see the module docstring)
            qs = [rotary_at(q, pos, attn.rope_base) for q, pos in zip(qs, positions, strict=True)]
            ks = [rotary_at(k, pos, attn.rope_base) for k, pos in zip(ks, positions, strict=True)]
        ys = ring_attention(qs, ks, vs, positions, is_causal=True)  # (B, H, n_r, d)
        xs = [x + attn.out_proj(y.transpose(1, 2).flatten(2)) for x, y in zip(xs, ys, strict=True)]  # (B, n_r, C)
        xs = [x + block.mlp(block.ln_2(x)) for x in xs]  # (B, n_r, C)
    loss_sums = [model.loss(model.lm_head(model.ln_f(x)), targets[:, pos], "sum")  # logits (B, n_r, V)
                 for x, pos in zip(xs, positions, strict=True)]
    n_tokens = max(int((targets != IGNORE_INDEX).sum()), 1)  # of the whole sequence, known to every rank
    return ranks.all_reduce([s.reshape(1) for s in loss_sums])[0][0] / n_tokens
