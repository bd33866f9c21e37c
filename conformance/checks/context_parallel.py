"""Check `context_parallel`: ring attention (optimized.context_parallel) over P = ctx.world_size ranks held to
one-process attention, and its bytes, memory and balance held to reference.memory's formulas (Liu et al. 2023,
arXiv 2310.01889).

1. Equivalence. Both layouts, causal and not, GQA: each rank's rows of out, dq, dk, dv against
   reference.attention.attention on the whole sequence. The claim is algorithmic (the ring computes what one
   process computes), so both sides run in float64 and the bound is the reference's own rounding spread, measured
   beside it (the reference re-run on inputs nudged by one ulp: conformance.tolerance.within_spread), the same on
   any CPU, thread count or world size; the kernel's error in low precision is the attention check's business.
2. Communication (claim context_parallel.communication). Bytes each rank's point-to-point sends carry for one
   attention layer (forward + backward, counted at the call) against reference.memory.ring_attention_bytes_sent.
3. Memory (claim context_parallel.memory). Bytes one transformer block saves for backward on each rank, with ring
   attention as its attention and s/P tokens per rank, for P = 1 .. ctx.world_size, against
   reference.memory.context_parallel_activation_bytes_per_layer; the formula carried to P = 8 in the plot.
4. Balance (claim context_parallel.balance). With a causal mask, the score entries each rank computes
   (optimized.context_parallel.schedule_work), each rank's kernel calls timed alone, and each rank's wall time in
   the ring (which waits for the busiest), contiguous vs zigzag.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.checks._reference_runs import input_spread, one_thread
from conformance.claims import Verdict
from conformance.figure import Figure, Panel, Series
from conformance.launch import spawn
from conformance.measure import CollectiveCounter, saved_tensor_bytes, time_fn
from conformance.result import Metric, Result
from conformance.tolerance import Spread, within_spread
from optimized.attention import blocked_attention
from optimized.context_parallel import LAYOUTS, ring_attention, ring_schedule, schedule_work, shard_sequence
from reference import memory
from reference.attention import attention
from reference.model import Block, GPTConfig

SPEC = CheckSpec(
    name="context_parallel", technique="context parallelism (ring attention)",
    reference="reference.attention.attention (one process); reference.memory ring formulas",
    optimized="optimized.context_parallel.ring_attention", order=126,
    claims=("context_parallel.communication", "context_parallel.memory", "context_parallel.balance"),
)
HEADS = (8, 2)
"""(H, Hkv): GQA with 4 query heads per key/value head."""
HEAD_DIM = 16


def _seq_len(ctx: Context, world_size: int) -> int:
    per_chunk = 16 if ctx.quick else 128
    return per_chunk * 2 * world_size  # divides into 2P zigzag chunks


def _device(device_type: str) -> torch.device:
    return torch.device(device_type, dist.get_rank()) if device_type == "cuda" else torch.device("cpu")


def _inputs(seq_len: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gradient of the whole sequence, in float64."""
    g = torch.Generator().manual_seed(0)
    B, (H, Hkv), d = 2, HEADS, HEAD_DIM
    q, dout = torch.randn(B, H, seq_len, d, generator=g), torch.randn(B, H, seq_len, d, generator=g)
    k, v = torch.randn(B, Hkv, seq_len, d, generator=g), torch.randn(B, Hkv, seq_len, d, generator=g)
    return tuple(t.double() for t in (q, k, v, dout))


def _one_process(q, k, v, dout, causal: bool) -> dict[str, torch.Tensor]:
    """reference.attention.attention on the whole sequence: out, dq, dk, dv."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, is_causal=causal)  # (B, H, N, d)
    out.backward(dout)
    return dict(zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves], strict=True))


def _reference(seq_len: int, causal: bool) -> tuple[dict[str, torch.Tensor], Spread]:
    """The one-process result in float64 and its rounding spread (the same on inputs nudged by one ulp)."""
    with one_thread():
        return input_spread(functools.partial(_one_process, causal=causal), _inputs(seq_len),
                            origin="float64 attention and its gradients")


def _equivalence_worker(device_type: str, seq_len: int) -> dict:
    """Each rank's out, dq, dk, dv in float64, and the bytes its ring sends in fp32 (the dtype of training)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(device_type)
    q, k, v, dout = _inputs(seq_len)
    out = {}
    for causal in (False, True):
        for layout in LAYOUTS:
            def mine(t, layout=layout):
                return shard_sequence(t, rank=rank, world_size=world, layout=layout)

            local = [mine(t).to(device).requires_grad_() for t in (q, k, v)]
            o = ring_attention(*local, is_causal=causal, layout=layout)  # (B, H, n, d)
            o.backward(mine(dout).to(device))
            got = [o.detach()] + [t.grad for t in local]
            fp32 = [mine(t).to(device, torch.float32).requires_grad_() for t in (q, k, v)]
            with CollectiveCounter() as counter:
                ring_attention(*fp32, is_causal=causal, layout=layout).backward(mine(dout).to(device, torch.float32))
            out[causal, layout] = dict(parts={name: a.cpu() for name, a in zip(("out", "dq", "dk", "dv"), got,
                                                                                strict=True)},
                                       sent=counter.payload_bytes("batch_isend_irecv"))
    return out


def _equivalence_rows(ctx: Context, seq_len: int) -> tuple[list[Result], list[Result]]:
    world = ctx.world_size
    per_rank = spawn(_equivalence_worker, world, ctx.device.type, seq_len, device=ctx.device.type,
                     timeout=ctx.timeout)
    config = GPTConfig(n_head=HEADS[0], n_kv_head=HEADS[1], n_embd=HEADS[0] * HEAD_DIM, block_size=seq_len)
    forward, backward = memory.ring_attention_bytes_sent(config, 2, seq_len, cp=world)
    references = {causal: _reference(seq_len, causal) for causal in (False, True)}
    rows, comm = [], []
    for (causal, layout) in per_rank[0]:
        ref, spread = references[causal]
        eq = within_spread({f"rank {r} {name}": a for r, out in enumerate(per_rank)
                            for name, a in out[causal, layout]["parts"].items()},
                           {f"rank {r} {name}": shard_sequence(e, rank=r, world_size=world, layout=layout)
                            for r in range(world) for name, e in ref.items()},
                           spread, name=f"ring ({layout}, causal={causal}) vs one process")
        rows.append(SPEC.row(
            ctx, f"{layout}, {'causal' if causal else 'full'} mask, out/dq/dk/dv", world_size=world,
            equivalence=eq,
            notes=f"B=2, H={HEADS[0]}, Hkv={HEADS[1]}, N={seq_len} ({seq_len // world} per rank), d={HEAD_DIM}; "
                  f"float64 on both sides, every rank's rows within 10x the reference's own rounding spread "
                  f"{spread.value:.2g} (inputs nudged by one ulp) + 1 ulp"))
        sent = [out[causal, layout]["sent"] for out in per_rank]
        comm.append(Metric(f"bytes sent per rank, {layout}, causal={causal}", max(sent), "bytes",
                           claimed=f"{forward + backward} (fwd {forward} + bwd {backward})"))
    holds = all(m.measured == forward + backward for m in comm)
    verdict = (Verdict.HOLDS if holds else Verdict.DOES_NOT_HOLD) if world > 1 else Verdict.NOT_MEASURABLE
    comm_row = SPEC.row(
        ctx, "bytes sent per rank per attention layer", world_size=world, metrics=comm,
        claim="context_parallel.communication", verdict=verdict,
        notes=f"fp32; K/V blocks of {2 * 2 * (seq_len // world) * HEADS[1] * HEAD_DIM * 4} bytes travel P-1 hops "
              f"forward and again backward, each dK/dV accumulator P hops; the same on every rank and for either "
              f"layout and mask (a skipped block still travels). Counted at batch_isend_irecv, sends only.")
    return rows, [comm_row]


def _memory_worker(device_type: str, seq_len: int, layout: str) -> int:
    device = _device(device_type)
    world = dist.get_world_size()
    config = GPTConfig(n_head=HEADS[0], n_kv_head=HEADS[1], n_embd=HEADS[0] * HEAD_DIM, block_size=seq_len)
    block = Block(config, functools.partial(ring_attention, layout=layout)).to(device)
    x = torch.randn(2, seq_len // world, config.n_embd, device=device, requires_grad=True)  # (B, s/P, C)
    y, saved = saved_tensor_bytes(block, x, exclude=list(block.parameters()))
    y.sum().backward()
    return saved


def _memory_row(ctx: Context, seq_len: int) -> Result:
    config = GPTConfig(n_head=HEADS[0], n_kv_head=HEADS[1], n_embd=HEADS[0] * HEAD_DIM, block_size=seq_len)
    degrees = [p for p in range(1, ctx.world_size + 1) if seq_len % (2 * p) == 0]
    measured = {p: max(spawn(_memory_worker, p, ctx.device.type, seq_len, "zigzag", device=ctx.device.type,
                             timeout=ctx.timeout)) for p in degrees}
    formula = {p: memory.context_parallel_activation_bytes_per_layer(config, 2, seq_len, cp=p)
               for p in (1, 2, 4, 8) if seq_len % p == 0}
    naive = memory.activation_bytes_per_layer(config, 2, seq_len, attention="naive")
    exact = all(measured[p] == memory.context_parallel_activation_bytes_per_layer(config, 2, seq_len, cp=p)
                for p in degrees)
    metrics = [Metric(f"saved bytes per block per rank, P={p}", measured[p], "bytes",
                      claimed=str(memory.context_parallel_activation_bytes_per_layer(config, 2, seq_len, cp=p)))
               for p in degrees]
    figure = Figure("context_parallel_memory", [Panel(
        series=[Series(list(formula), list(formula.values()), label="ring attention (formula)", color="C0"),
                Series(list(measured), list(measured.values()), label="measured (largest rank)", kind="points",
                       marker="o", color="C0"),
                Series(list(formula), [naive] * len(formula), label="one process, naive attention", color="C3",
                       linestyle="--")],
        xscale="log2", yscale="log", xlabel="context-parallel ranks P", ylabel="bytes saved per block per rank",
        title=f"N={seq_len}, B=2, h={config.n_embd}, fp32", grid=True)])
    verdict = (Verdict.HOLDS if exact else Verdict.DOES_NOT_HOLD) if len(degrees) > 1 else Verdict.NOT_MEASURABLE
    return SPEC.row(
        ctx, "activation bytes per rank vs P", world_size=ctx.world_size, memory=metrics,
        claim="context_parallel.memory", verdict=verdict, figures=[figure],
        notes=f"one block of the tiny GPT with ring attention (zigzag); measured equals the formula (flash "
              f"attention's count at s/P tokens) to the byte: {exact}. The one-process naive block saves {naive}.")


def _balance_worker(device_type: str, seq_len: int, reps: int) -> dict:
    device = _device(device_type)
    world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(1)
    B, (H, Hkv), d = 1, HEADS, HEAD_DIM
    n = seq_len // world
    q = torch.randn(B, H, n, d, generator=g).to(device).requires_grad_()
    k, v = (torch.randn(B, Hkv, n, d, generator=g).to(device).requires_grad_() for _ in range(2))
    out = {}
    for layout in LAYOUTS:
        def step(layout=layout):
            ring_attention(q, k, v, is_causal=True, layout=layout).sum().backward()

        # Each rank's own time for the work its schedule gives it; the ring's sends are included, so a rank that
        # waits for a slower neighbour shows it.
        out[layout] = time_fn(step, warmup=1, reps=reps, device=device).median_s
    out["rank"] = rank
    return out


def _compute_seconds(ctx: Context, seq_len: int, layout: str, rank: int) -> float:
    """One rank's kernel work alone, forward + backward, timed in this process without the ring: the blocked
    attention calls of its ring_schedule on tensors of its shapes (the fastest of a few repetitions)."""
    world = ctx.world_size
    n = seq_len // world
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, HEADS[0], n, HEAD_DIM, generator=g).to(ctx.device).requires_grad_()
    k, v = (torch.randn(1, HEADS[1], n, HEAD_DIM, generator=g).to(ctx.device).requires_grad_() for _ in range(2))
    calls = [m for step in ring_schedule(rank, world, n, layout=layout, is_causal=True) for m in step]

    def work():
        for m in calls:
            blocked_attention(q[:, :, m.q0:m.q1], k[:, :, m.k0:m.k1], v[:, :, m.k0:m.k1],
                              is_causal=m.causal).sum().backward()

    return time_fn(work, warmup=1, reps=5 if ctx.quick else 10, device=ctx.device).min_s


def _balance_row(ctx: Context, seq_len: int) -> Result:
    world = ctx.world_size
    work = {layout: schedule_work(world, seq_len, layout=layout, is_causal=True) for layout in LAYOUTS}
    compute = {layout: [_compute_seconds(ctx, seq_len, layout, r) for r in range(world)] for layout in LAYOUTS}
    times = spawn(_balance_worker, world, ctx.device.type, seq_len, 3 if ctx.quick else 10, device=ctx.device.type,
                  timeout=ctx.timeout)
    metrics = []
    for layout in LAYOUTS:
        metrics.append(Metric(f"score entries, max rank / min rank, {layout}", max(work[layout]) / min(work[layout]),
                              "x", claimed="1x" if layout == "zigzag" else f"about {2 * world - 1}x"))
    speed = [Metric(f"kernel time fwd+bwd, busiest rank / idlest rank, {layout}",
                    max(compute[layout]) / min(compute[layout]), "x") for layout in LAYOUTS]
    speed += [Metric(f"ring fwd+bwd wall time, slowest rank / fastest rank, {layout}",
                     max(t[layout] for t in times) / min(t[layout] for t in times), "x") for layout in LAYOUTS]
    balanced = max(work["zigzag"]) == min(work["zigzag"])
    verdict = (Verdict.HOLDS if balanced else Verdict.DOES_NOT_HOLD) if world > 1 else Verdict.NOT_MEASURABLE
    return SPEC.row(
        ctx, "per-rank causal work, contiguous vs zigzag", world_size=world, metrics=metrics, speed=speed,
        claim="context_parallel.balance", verdict=verdict,
        notes=f"N={seq_len}; score entries per rank: contiguous {work['contiguous']}, zigzag {work['zigzag']}. "
              f"Contiguous: rank r computes r full blocks and one triangle, about 2r+1 times rank 0's. Kernel time "
              f"per rank (ms, each rank's calls timed alone): " + "; ".join(
                  f"{layout} " + ", ".join(f"{t * 1e3:.1f}" for t in compute[layout]) for layout in LAYOUTS)
              + ". Ring wall time per rank (ms): " + "; ".join(
                  f"{layout} " + ", ".join(f"{t[layout] * 1e3:.1f}" for t in times) for layout in LAYOUTS)
              + ": every ring step waits for the neighbour's block, so all ranks take the busiest rank's time.")


def run(ctx: Context) -> list[Result]:
    seq_len = _seq_len(ctx, ctx.world_size)
    eq_rows: list[Result] = []
    comm_rows: list[Result] = []

    def equivalence(c: Context) -> list[Result]:
        rows, comm = _equivalence_rows(c, seq_len)
        comm_rows.extend(comm)
        return rows

    eq_rows = SPEC.guarded(ctx, "equivalence", equivalence)
    return (eq_rows + comm_rows + SPEC.guarded(ctx, "memory", lambda c: [_memory_row(c, seq_len)])
            + SPEC.guarded(ctx, "balance", lambda c: [_balance_row(c, seq_len)]))
