"""Expert parallelism, one process: the experts of a mixture-of-experts block partitioned over P ranks, each token
sent to the rank of its expert and back with two all-to-alls (GShard, Lepikhin et al. 2020, arXiv 2006.16668,
Sec. 2.2-3.1; Switch Transformer, Fedus et al. 2021, arXiv 2101.03961, Sec. 2.2 and Fig. 3).

Rank r holds experts [r E/P, (r+1) E/P) and a copy of the router and of the shared experts, and its own tokens (its
data-parallel shard, S_r of the N). One forward, on every rank at once:

    1. route      logits = router(x_r), softmax, top-k, renormalise, capacity over the rank's S_r tokens
                  (reference.moe.route: the rank's tokens are one GShard group)
    2. dispatch   for each destination rank d: the rows x_r[t] of the kept assignments (t, j) whose expert lives on
                  d, ordered by expert; all_to_all: sends[r][d] -> rank d receives from every r    (S_r k, C) at most
    3. compute    rank d runs each of its experts on the rows it received for that expert
    4. combine    all_to_all back (the inverse permutation); rank r adds g_tj * y to token t's output
    5. shared     every token through the shared experts, locally

Which rows go where is told alongside: with each row the local index of its expert (a real system first all-to-alls
the per-expert counts, Megatron-Core's tokens_per_expert, then the rows). The auxiliary losses are means over all N
tokens, so the per-rank sums (assignment counts, router probabilities, squared log-sum-exps, token counts) are
all-reduced.

Gradients: autograd flows back through both all-to-alls (the backward of a dispatch is the combine of the gradients,
and the other way round). An expert's weights live on one rank and get their whole gradient there; the router and
the shared experts are replicated, so each copy holds its ranks' share and `gradients()` all-reduces them (as data
parallelism does). The result equals reference.moe.MoE on all N tokens with num_groups = P (the capacity counted per
rank's tokens) and, with capacity_factor None, with any num_groups.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from reference.moe import MoE, MoEOutput, route
from reference.parallel import ranks


def shard_tokens(x: Tensor, world_size: int) -> list[Tensor]:
    """Rank r's tokens: the r-th of P consecutive parts of x (N, C), as reference.moe's groups (tensor_split)."""
    return list(x.tensor_split(world_size))


class ExpertParallelMoE:
    """`moe`'s weights laid out over `world_size` simulated ranks (built from the full block, so equal to it)."""

    def __init__(self, moe: MoE, world_size: int) -> None:
        E = moe.config.num_experts
        if not isinstance(world_size, int) or world_size < 1 or E % world_size:
            raise ValueError(f"world_size must be a positive divisor of num_experts={E}, got {world_size!r}")
        self.config, self.world_size = moe.config, world_size
        self.local = E // world_size
        """Experts per rank: rank r holds global experts r*local .. (r+1)*local - 1."""
        self.routers = [copy.deepcopy(moe.router) for _ in range(world_size)]  # replicated
        self.shared = [copy.deepcopy(moe.shared_experts) for _ in range(world_size)]  # replicated
        self.experts = [copy.deepcopy(moe.experts[r * self.local:(r + 1) * self.local]) for r in range(world_size)]

    def forward(self, xs: list[Tensor]) -> list[MoEOutput]:
        """xs[r]: rank r's tokens (S_r, C). Returns each rank's MoEOutput (out (S_r, C); the losses, equal on every
        rank, over all tokens; tokens_per_expert and dropped over all ranks)."""
        P, c = self.world_size, self.config
        if len(xs) != P:
            raise ValueError(f"xs must hold one tensor per rank ({P}), got {len(xs)}")
        routing = [route(self.routers[r](x), c.top_k, c.capacity_factor) for r, x in enumerate(xs)]

        # 2. Dispatch: sends[r][d] = the rows of rank r's kept assignments whose expert is on rank d, by expert.
        sends, labels, placed = [], [], []
        for x, rt in zip(xs, routing, strict=True):
            token, choice = torch.where(rt.kept)  # (a,) each: rank r's kept assignments
            expert = rt.experts[token, choice]  # (a,) global expert ids
            by_expert = torch.argsort(expert, stable=True)  # (a,)
            token, choice, expert = token[by_expert], choice[by_expert], expert[by_expert]
            dest = expert // self.local  # (a,) the rank holding each assignment's expert
            sends.append([x[token[dest == d]] for d in range(P)])  # P x (a_d, C)
            labels.append([expert[dest == d] % self.local for d in range(P)])  # P x (a_d,) local expert index
            placed.append([(token[dest == d], choice[dest == d]) for d in range(P)])  # to combine on the way back
        received, received_labels = ranks.all_to_all(sends), ranks.all_to_all(labels)  # [d][r]

        # 3. Compute: rank d runs each of its experts on the rows labelled with it, in the order they arrived.
        returns = []
        for d in range(P):
            rows, label = torch.cat(received[d]), torch.cat(received_labels[d])  # (M, C), (M,)
            y = torch.zeros_like(rows)  # (M, C)
            for e, expert in enumerate(self.experts[d]):
                (at,) = torch.where(label == e)  # (m_e,)
                y = y.index_add(0, at, expert(rows[at]))  # (M, C)
            returns.append(list(y.split([len(t) for t in received_labels[d]])))  # P x (a_r, C), one per source
        back = ranks.all_to_all(returns)  # back[r][d]: rank r's rows computed on rank d

        # 4. Combine and 5. shared experts, on each rank.
        outs = []
        for r, (x, rt) in enumerate(zip(xs, routing, strict=True)):
            y = torch.zeros_like(x)  # (S_r, C)
            for d in range(P):
                token, choice = placed[r][d]
                y = y.index_add(0, token, rt.weights[token, choice, None] * back[r][d])  # (S_r, C)
            for shared in self.shared[r]:
                y = y + shared(x)  # (S_r, C)
            outs.append(y)
        return self._with_losses(outs, routing)

    def _with_losses(self, outs: list[Tensor], routing: list) -> list[MoEOutput]:
        """The auxiliary losses over all N tokens: per-rank sums, all-reduced (reference.moe's formulas)."""
        E, k = self.config.num_experts, self.config.top_k
        n = ranks.all_reduce([torch.tensor(float(rt.logits.size(0))) for rt in routing])[0]  # N
        counts = ranks.all_reduce([torch.bincount(rt.experts.reshape(-1), minlength=E).to(rt.probs.dtype)
                                   for rt in routing])[0]  # (E,) assignments before capacity
        prob_sums = ranks.all_reduce([rt.probs.sum(dim=0) for rt in routing])  # (E,) on every rank
        z_sums = ranks.all_reduce([torch.logsumexp(rt.logits, dim=-1).pow(2).sum() for rt in routing])
        kept = ranks.all_reduce([torch.bincount(rt.experts[rt.kept], minlength=E) for rt in routing])[0]  # (E,)
        dropped = sum(int((~rt.kept).sum()) for rt in routing)
        f = counts / (k * n)  # (E,)
        return [MoEOutput(out=y, aux_loss=E * (f * prob_sums[r] / n).sum(), z_loss=z_sums[r] / n,
                          tokens_per_expert=kept, dropped=dropped) for r, y in enumerate(outs)]

    def gradients(self) -> dict[str, Tensor]:
        """Every parameter's gradient under reference.moe.MoE's names: an expert's from its rank, the replicated
        router's and shared experts' all-reduced (summed) over the ranks' copies."""
        grads: dict[str, Tensor] = {}
        for name, _ in self.routers[0].named_parameters():
            copies = [dict(router.named_parameters())[name].grad for router in self.routers]
            grads[f"router.{name}"] = ranks.all_reduce(copies)[0]
        for name, _ in self.shared[0].named_parameters():
            copies = [dict(shared.named_parameters())[name].grad for shared in self.shared]
            grads[f"shared_experts.{name}"] = ranks.all_reduce(copies)[0]
        for r, experts in enumerate(self.experts):
            for name, p in experts.named_parameters():
                e, rest = name.split(".", 1)
                grads[f"experts.{r * self.local + int(e)}.{rest}"] = p.grad
        return grads
