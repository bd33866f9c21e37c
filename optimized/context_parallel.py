"""Context parallelism: ring attention over the blocked FlashAttention, the sequence split across P ranks.

Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers", arXiv 2310.01889, Sec. 3): each of
the P ranks of a process group holds a slice of the sequence (its queries and its keys/values). The K/V blocks
travel around the ring: at step i = 0 .. P-1 rank r holds the K/V block of rank (r - i) mod P, attends its queries to
it with the blocked FlashAttention-2 kernel (optimized.attention.blocked, which also returns the log-sum-exp), and
meanwhile sends the block on to rank r+1 and receives the next from rank r-1 (point to point, batch_isend_irecv).
The partial outputs merge exactly through their log-sum-exps (the online softmax of FlashAttention, Dao et al.
2022, arXiv 2205.14135, Sec. 3.1, applied across blocks):

    LSE = log(exp(LSE_a) + exp(LSE_b))        O = exp(LSE_a - LSE) O_a + exp(LSE_b - LSE) O_b

The backward recomputes nothing across ranks that it can avoid: with the final O and LSE saved, each block's
dQ, dK, dV follow from FA2's backward (Dao 2023, arXiv 2307.08691, Algorithm 2: P = exp(S - LSE), D = rowsum(dO ∘ O)).
K/V travel the ring again, and each block's dK/dV accumulator travels with it, collecting every rank's contribution,
and takes one last hop home. A rank keeps its own K/V (saved for backward) and at most two blocks of the ring at a
time: the one it computes with and the one arriving (in backward also two dK/dV accumulators: the one it adds to
and the one arriving).

Layouts (`layout=`), for a causal mask:
    "contiguous"  rank r holds tokens [r·n, (r+1)·n) (n = N/P). Rank r's queries see the blocks of ranks 0..r only,
                  so rank P-1 does P times the work of rank 0 while the others wait.
    "zigzag"      the sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r (one early, one late), so
                  every rank does the same work (Brandon et al. 2023, "Striped Attention", arXiv 2311.09431, for
                  the imbalance; the zigzag order of zhuzilin/ring-flash-attention and torch's context parallel).
`shard_sequence` cuts a full sequence into a rank's slice in either layout and `local_positions` gives the global
positions of its tokens (for position embeddings). `ring_schedule` is the per-step plan as data: which query rows
meet which key rows and whether causally; `schedule_work` counts the score entries each rank computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import distributed_c10d as c10d

from optimized.attention._inputs import Problem, check_inputs
from optimized.attention.blocked import DEFAULT_BLOCK, _backward, _forward

LAYOUTS = ("contiguous", "zigzag")
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


# --- layouts and the schedule, as data ------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def _check_split(seq_len: int, world_size: int, layout: str, argument: str = "sequence length") -> None:
    parts = world_size * _chunks_per_rank(layout)
    if seq_len < parts or seq_len % parts:
        raise ValueError(f"{argument} {seq_len} must be a positive multiple of {parts} for layout={layout!r} on "
                         f"{world_size} ranks ({_chunks_per_rank(layout)} equal chunk(s) per rank)")


def local_positions(seq_len: int, *, rank: int, world_size: int, layout: str = "contiguous") -> Tensor:
    """The global positions of the tokens rank `rank` holds, in its local order: (seq_len / world_size,) int64."""
    _check_layout(layout)
    _check_split(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if layout == "contiguous":
        n = seq_len // world_size
        return torch.arange(rank * n, (rank + 1) * n)
    c = seq_len // (2 * world_size)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)])


def shard_sequence(x: Tensor, *, rank: int, world_size: int, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Rank `rank`'s slice of a full sequence along `dim` (2 for (B, H, N, d)), in `layout`."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    positions = local_positions(x.shape[dim], rank=rank, world_size=world_size, layout=layout)
    return x.index_select(dim, positions.to(x.device))


@dataclass(frozen=True)
class Meeting:
    """One kernel call of a ring step: local query rows [q0, q1) against rows [k0, k1) of the K/V block in hand."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    """Top-left causal (the two ranges are the same chunk of the sequence, or the rank's whole slice at step 0)."""

    @property
    def scores(self) -> int:
        """Score entries this call computes: (q1-q0)(k1-k0), or the causal triangle n(n+1)/2."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        return n * (n + 1) // 2 if self.causal else n * m


def ring_schedule(rank: int, world_size: int, n: int, *, layout: str = "contiguous",
                  is_causal: bool = False) -> list[list[Meeting]]:
    """Per ring step i (holding the K/V of rank (rank - i) mod P), the kernel calls rank `rank` makes; n is its
    local length. Every chunk of the sequence has the same length, so a key chunk is either the query chunk itself
    (causal), wholly before it (all visible) or wholly after it (skipped)."""
    _check_layout(layout)
    _check_split(n * world_size, world_size, layout, "n * world_size")

    def chunks(r: int) -> list[tuple[int, int]]:  # (first global position, first local row) of each chunk
        pos = local_positions(n * world_size, rank=r, world_size=world_size, layout=layout)
        c = n // _chunks_per_rank(layout)
        return [(int(pos[j]), j) for j in range(0, n, c)]

    c = n // _chunks_per_rank(layout)
    steps = []
    for i in range(world_size):
        if not is_causal:
            steps.append([Meeting(0, n, 0, n, False)])
            continue
        if i == 0:  # own block: local order follows global order in both layouts, so one top-left causal call
            steps.append([Meeting(0, n, 0, n, True)])
            continue
        src = (rank - i) % world_size
        calls: list[Meeting] = []
        for kg, kl in chunks(src):
            rows = [ql for qg, ql in chunks(rank) if kg + c - 1 <= qg]  # chunks wholly after the key chunk
            if rows:  # the query chunks that see the key chunk whole are adjacent locally: one call
                calls.append(Meeting(min(rows), max(rows) + c, kl, kl + c, False))
        steps.append(_merge_keys(calls))
    return steps


def _merge_keys(calls: list[Meeting]) -> list[Meeting]:
    """Join calls with the same query rows over adjacent key rows (zigzag: both key chunks for the late queries)."""
    out: list[Meeting] = []
    for m in sorted(calls, key=lambda m: (m.q0, m.q1, m.k0)):
        last = out[-1] if out else None
        if last and (last.q0, last.q1, last.k1) == (m.q0, m.q1, m.k0) and not (last.causal or m.causal):
            out[-1] = Meeting(m.q0, m.q1, last.k0, m.k1, False)
        else:
            out.append(m)
    return out


def schedule_work(world_size: int, seq_len: int, *, layout: str = "contiguous", is_causal: bool = True) -> list[int]:
    """Score entries (query-key pairs) each rank computes in the forward: the per-rank work of the ring."""
    _check_split(seq_len, world_size, layout)
    n = seq_len // world_size
    return [sum(m.scores for step in ring_schedule(r, world_size, n, layout=layout, is_causal=is_causal)
                for m in step) for r in range(world_size)]


# --- the ring -------------------------------------------------------------------------------------------------------


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    process_group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
) -> Tensor:
    """Exact attention over a sequence split across the ranks of `process_group` (default: the default group).

    q: (B, H, n, d), k, v: (B, Hkv, n, d): this rank's n tokens, in `layout` (`shard_sequence`); every rank holds
    the same n, and H % Hkv == 0 (GQA). Returns this rank's rows of softmax(scale·Q Kᵀ + causal mask) V over the
    whole sequence, (B, H, n, d). Local arguments are checked first; then one small all-gather of every rank's
    shapes, dtype and options makes all ranks raise the same error if they disagree, before any K/V moves."""
    problem = check_inputs(q, k, v, is_causal=is_causal, scale=scale, key_padding_mask=None,
                           causal_alignment="top_left", return_lse=False)
    _check_layout(layout)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must hold the same tokens as q: local lengths q {q.shape[2]}, k {k.shape[2]}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring_attention needs an initialised torch.distributed process group")
    if process_group is c10d.GroupMember.NON_GROUP_MEMBER or dist.get_rank(process_group) < 0:
        raise ValueError(f"process_group: this rank (global rank {dist.get_rank()}) is not a member of it")
    world_size = dist.get_world_size(process_group)
    chunks = _chunks_per_rank(layout)
    if problem.N < chunks or problem.N % chunks:
        raise ValueError(f"layout={layout!r} needs a local length n that is a positive multiple of {chunks} "
                         f"({chunks} equal chunk(s) per rank), got n={problem.N}")
    _agree(problem, q.dtype, is_causal, layout, process_group, world_size)
    return _RingAttention.apply(q, k, v, problem, layout, process_group)


def _agree(p: Problem, dtype: torch.dtype, is_causal: bool, layout: str, group, world_size: int) -> None:
    """All ranks compare (B, H, Hkv, n, d, dtype, causal, layout, scale) and raise the same error on a mismatch."""
    mine = torch.tensor([p.B, p.H, p.Hkv, p.N, p.d, _DTYPE_CODES[dtype], int(is_causal), LAYOUTS.index(layout),
                         int(math.frexp(p.scale)[0] * 2**52), math.frexp(p.scale)[1]], dtype=torch.int64)
    if world_size == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    every = [torch.empty_like(mine, device=device) for _ in range(world_size)]
    dist.all_gather(every, mine.to(device), group=group)
    rows = [tuple(t.tolist()) for t in every]
    if len(set(rows)) > 1:
        names = ("B", "H", "Hkv", "n", "d", "dtype", "is_causal", "layout", "scale", "scale")
        differ = sorted({names[i] for i in range(len(names)) if len({r[i] for r in rows}) > 1})
        lengths = [r[3] for r in rows]
        raise ValueError(f"ranks disagree on {', '.join(differ)}: every rank must hold the same slice shape and pass "
                         f"the same options (local lengths n per rank: {lengths}; a sequence that does not divide "
                         f"into equal slices is not supported)")


def _ring_exchange(send: list[Tensor], group, rank: int, world_size: int) -> tuple[list[Tensor], list]:
    """Start sending `send` to rank+1 and receiving tensors like them from rank-1; return (buffers, works)."""
    nxt = dist.get_global_rank(group, (rank + 1) % world_size) if group is not None else (rank + 1) % world_size
    prv = dist.get_global_rank(group, (rank - 1) % world_size) if group is not None else (rank - 1) % world_size
    recv = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in send]  # contiguous, whatever t's strides
    # P2POp needs torch's own isend/irecv (batch_isend_irecv tells them apart by identity), whatever wraps dist.*.
    ops = [dist.P2POp(c10d.isend, t.contiguous(), nxt, group) for t in send]
    ops += [dist.P2POp(c10d.irecv, t, prv, group) for t in recv]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _problem(p: Problem, n: int, m: int, causal: bool) -> Problem:
    return Problem(p.B, p.H, p.Hkv, n, m, p.d, p.scale, 0 if causal else None)


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold one block's (O_b, LSE_b) into the running (O, LSE), in place, through the log-sum-exp."""
    new = torch.logaddexp(lse, block_lse)  # (B, H, rows)
    safe = torch.where(new == float("-inf"), 0.0, new)  # rows that have seen no key yet stay 0 instead of NaN
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(torch.exp(block_lse - safe).unsqueeze(-1) * block_out)
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    """Ring forward merging blocked FA2 partials by LSE; ring backward sending K/V and the dK/dV accumulators."""

    @staticmethod
    def forward(ctx, q, k, v, problem: Problem, layout: str, group):
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        n = problem.N
        schedule = ring_schedule(rank, world_size, n, layout=layout, is_causal=problem.causal_offset is not None)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(problem.B, problem.H, n, problem.d, dtype=acc, device=q.device)  # (B, H, n, d)
        lse = torch.full((problem.B, problem.H, n), float("-inf"), dtype=acc, device=q.device)  # (B, H, n)
        kv = [k, v]
        for step, calls in enumerate(schedule):
            if step + 1 < world_size:  # send the block in hand on while computing with it
                incoming, works = _ring_exchange(kv, group, rank, world_size)
            for m in calls:
                o_b, lse_b = _forward(q[:, :, m.q0:m.q1], kv[0][:, :, m.k0:m.k1], kv[1][:, :, m.k0:m.k1], None,
                                      _problem(problem, m.q1 - m.q0, m.k1 - m.k0, m.causal), DEFAULT_BLOCK,
                                      DEFAULT_BLOCK)  # (B, H, rows, d), (B, H, rows)
                _merge(out[:, :, m.q0:m.q1], lse[:, :, m.q0:m.q1], o_b.to(acc), lse_b)
            if step + 1 < world_size:
                _wait(works)
                kv, incoming, works = incoming, None, []  # a finished Work still holds its tensors: drop it
        # (B, H, n, d) over (B, n, H, d) memory, as torch's SDPA kernels return it: the model's
        # transpose(1, 2).reshape(B, n, H*d) is then a view, and the tensor saved here is the one out_proj saves.
        out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, n, d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.schedule, ctx.group = problem, schedule, group
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        problem, group = ctx.problem, ctx.group
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        acc = lse.dtype
        d_out = d_out.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, n, d)
        kv = [k, v]
        travelling, d_works = None, []  # the dK/dV accumulator of the block in hand, arriving from rank-1
        for step, calls in enumerate(ctx.schedule):
            if step + 1 < world_size:
                incoming, works = _ring_exchange(kv, group, rank, world_size)
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2)]  # (B, Hkv, n, d) x 2
            for m in calls:
                dq_b, dk_b, dv_b = _backward(
                    q[:, :, m.q0:m.q1], kv[0][:, :, m.k0:m.k1], kv[1][:, :, m.k0:m.k1], out[:, :, m.q0:m.q1],
                    lse[:, :, m.q0:m.q1], d_out[:, :, m.q0:m.q1], None,
                    _problem(problem, m.q1 - m.q0, m.k1 - m.k0, m.causal), DEFAULT_BLOCK, DEFAULT_BLOCK)
                dq[:, :, m.q0:m.q1] += dq_b
                dkv[0][:, :, m.k0:m.k1] += dk_b
                dkv[1][:, :, m.k0:m.k1] += dv_b
            if travelling is not None:
                _wait(d_works)
                dkv, travelling, d_works = [t.add_(mine) for t, mine in zip(travelling, dkv, strict=True)], None, []
            if world_size == 1:
                travelling = dkv
            else:  # on to rank+1, with the block's K/V; after step P-1 this is the hop home
                travelling, d_works = _ring_exchange(dkv, group, rank, world_size)
            if step + 1 < world_size:
                _wait(works)
                kv, incoming, works = incoming, None, []  # a finished Work still holds its tensors: drop it
        _wait(d_works)
        dk, dv = travelling
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
