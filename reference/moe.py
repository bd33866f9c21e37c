"""A mixture-of-experts (MoE) feed-forward block: the spec. One process, a dense loop over the experts.

The block replaces a transformer's MLP by E expert MLPs and a router that sends each token to k of them (Shazeer et
al. 2017, arXiv 1701.06538; GShard, Lepikhin et al. 2020, arXiv 2006.16668; Switch Transformer, Fedus et al. 2021,
arXiv 2101.03961; Mixtral, Jiang et al. 2024, arXiv 2401.04088). For a token x (C,):

    logits = W_r x                                  (E,)   the router, a linear layer without bias
    p      = softmax(logits)                        (E,)   softmax first, over all E experts
    T      = the k experts of largest p             (k,)   torch.topk (ties: torch.topk's order)
    g_e    = p_e / sum_{j in T} p_j    for e in T   (k,)   renormalised over the chosen k (Mixtral's choice: the
                                                            weights sum to 1 whatever k; Switch, k = 1, keeps p_e)
    y      = sum_{e in T, kept} g_e * Expert_e(x)  +  sum_s Shared_s(x)                                (C,)

Experts are SwiGLU MLPs, Expert(x) = W_out (silu(W_gate x) * W_in x) (Shazeer 2020, arXiv 2002.05202), named like
reference.model.MLP (fc_gate, fc_in, fc_out). Shared experts (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066,
Sec. 3.2) see every token, outside the router, to hold the knowledge every token needs.

Capacity (Switch, Sec. 2.2; GShard, Sec. 2.2): with a capacity factor cf, expert e accepts at most
    capacity = ceil(cf * k * S / E)
assignments from a group of S tokens (k * S / E is its share under perfect balance). Assignments claim slots in
priority order: every token's first choice, in token order, then every second choice, and so on (GShard's
Algorithm 1: the top-2 expert only gets what the top-1 choices left). An assignment past the capacity is dropped: it
contributes nothing (the residual connection around the block carries the token on), and the other weights of its
token are NOT renormalised. cf = None: no limit, no token dropped (Mixtral). The tokens are cut into `num_groups`
groups (torch.tensor_split, in order), each with its own capacity: GShard's groups, which are the token shards of
the ranks under expert parallelism (reference/parallel/expert_parallel.py).

Auxiliary losses (returned, for the trainer to weigh; each is computed over all N tokens of the call):
    load balance (Switch Eq. 4-6):  aux = E * sum_e f_e * P_e,   f_e = (assignments routed to e) / (k N), the
        router's choices before any capacity drop, P_e = mean over tokens of p_e. It is 1 under perfectly uniform
        routing and at most E; gradients flow through P only. For k = 1 it is Switch's; transformers'
        load_balancing_loss_func counts f_e per token (sum_e f_e = k) and so returns k times this.
    router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, Eq. 5): z = mean over tokens of
        (log sum_e exp(logits_e))^2, which keeps the router's logits small (and its softmax stable in low precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True)
class MoEConfig:
    """Shape and routing of one MoE block."""

    dim: int
    """Width C of the tokens (the residual stream)."""
    hidden: int
    """Hidden width of each expert's SwiGLU (and of each shared expert's)."""
    num_experts: int
    """Routed experts E."""
    top_k: int = 2
    """Experts k each token is sent to."""
    capacity_factor: float | None = None
    """Capacity per expert as a multiple of k*S/E (S tokens per group); None: unlimited, nothing dropped."""
    num_shared_experts: int = 0
    """Experts every token goes through besides the routed ones (DeepSeekMoE); 0 = none."""
    seed: int = 0
    """Seed of the deterministic initialisation."""

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.capacity_factor is not None and not (isinstance(self.capacity_factor, (int, float))
                                                     and self.capacity_factor > 0):
            raise ValueError(f"MoEConfig.capacity_factor must be a number > 0 or None, got {self.capacity_factor!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")


class SwiGLU(nn.Module):
    """One expert: fc_out(silu(fc_gate(x)) * fc_in(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_gate = nn.Linear(dim, hidden, bias=False)
        self.fc_in = nn.Linear(dim, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x))  # (n, C)


@dataclass
class Routing:
    """The router's decision for N tokens."""

    logits: Tensor
    """(N, E) router logits."""
    probs: Tensor
    """(N, E) softmax of the logits."""
    experts: Tensor
    """(N, k) int64: the chosen experts, largest probability first."""
    weights: Tensor
    """(N, k): their gate weights g, renormalised over the k."""
    kept: Tensor
    """(N, k) bool: the assignment got a slot (within capacity)."""


def capacity_mask(experts: Tensor, num_experts: int, capacity_factor: float | None, num_groups: int = 1) -> Tensor:
    """kept (N, k) bool for the assignments experts (N, k): per group of tokens, the first `capacity` assignments of
    each expert in priority order (all first choices in token order, then all second choices, ...)."""
    if capacity_factor is None:
        return torch.ones_like(experts, dtype=torch.bool)
    k = experts.size(1)
    kept = []
    for group in experts.tensor_split(num_groups):  # (S, k) each
        S = group.size(0)
        capacity = math.ceil(capacity_factor * k * S / num_experts)
        by_priority = group.t().reshape(-1)  # (k*S,): choice-major, token order within a choice
        one_hot = F.one_hot(by_priority, num_experts)  # (k*S, E)
        slot = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # (k*S,): the slot this assignment takes in its expert
        kept.append((slot < capacity).view(k, S).t())  # (S, k)
    return torch.cat(kept)  # (N, k)


def route(logits: Tensor, top_k: int, capacity_factor: float | None = None, num_groups: int = 1) -> Routing:
    """Softmax, top-k, renormalise, then the capacity (see the module docstring). logits: (N, E)."""
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    top_p, experts = probs.topk(top_k, dim=-1)  # (N, k) each
    weights = top_p / top_p.sum(dim=-1, keepdim=True)  # (N, k)
    kept = capacity_mask(experts, logits.size(-1), capacity_factor, num_groups)  # (N, k)
    return Routing(logits, probs, experts, weights, kept)


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch Eq. 4: E * sum_e f_e P_e with f_e the share of the k*N assignments routed to e (before capacity)."""
    N, E = probs.shape
    f = torch.bincount(experts.reshape(-1), minlength=E).to(probs.dtype) / experts.numel()  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return E * (f * P).sum() if N else probs.new_zeros(())


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE Eq. 5: the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean() if logits.size(0) else logits.new_zeros(())


@dataclass
class MoEOutput:
    """What the block returns."""

    out: Tensor
    """(..., C): the block's output, shaped as its input (the caller adds the residual)."""
    aux_loss: Tensor
    """Load-balancing loss (scalar)."""
    z_loss: Tensor
    """Router z-loss (scalar)."""
    tokens_per_expert: Tensor
    """(E,) int64: the assignments each expert computed (after capacity)."""
    dropped: int
    """Assignments dropped by the capacity."""


class MoE(nn.Module):
    """The MoE block. forward(x: (..., C), num_groups=1) -> MoEOutput; `num_groups` groups share out the capacity."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.dim, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.dim, config.hidden) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(SwiGLU(config.dim, config.hidden)
                                            for _ in range(config.num_shared_experts))
        gen = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():  # N(0, 0.02) everywhere, drawn in a fixed order from a private generator
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

    def forward(self, x: Tensor, num_groups: int = 1) -> MoEOutput:
        c = self.config
        if x.size(-1) != c.dim:
            raise ValueError(f"x must have last dimension dim={c.dim}, got shape {tuple(x.shape)}")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        tokens = x.reshape(-1, c.dim)  # (N, C)
        r = route(self.router(tokens), c.top_k, c.capacity_factor, num_groups)
        y = torch.zeros_like(tokens)  # (N, C)
        for e, expert in enumerate(self.experts):  # each expert on the tokens it kept, weighted by their gate
            token, choice = torch.where((r.experts == e) & r.kept)  # (n_e,) each
            y = y.index_add(0, token, r.weights[token, choice, None] * expert(tokens[token]))  # (N, C)
        for shared in self.shared_experts:
            y = y + shared(tokens)  # (N, C)
        return MoEOutput(
            out=y.view(x.shape),  # (..., C)
            aux_loss=load_balancing_loss(r.probs, r.experts),
            z_loss=router_z_loss(r.logits),
            tokens_per_expert=torch.bincount(r.experts[r.kept], minlength=c.num_experts),
            dropped=int((~r.kept).sum()),
        )
