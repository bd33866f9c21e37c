"""Check `accumulation`: token-weighted gradient accumulation (optimized.accumulation) against one big batch.

1. k micro-batches of uneven rows and uneven padding vs the whole batch in one forward/backward: loss and every
   gradient to rtol 1e-6 (atol 1e-6 of the largest gradient entry). Beside it, the error of the common shortcut,
   the mean of micro-batch means, measured on the same data.
2. vs reference.training.accumulate_gradients, the spec, on the same micro-batches: bitwise.
3. Data parallel on `world_size` ranks: each rank accumulates its own micro-batches (its own token count) under
   a data-parallel wrapper's `no_sync`, the token count is all-reduced and the wrapper's averaging undone: the
   averaged gradient equals the whole batch's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from conformance.checks import CheckSpec, Context
from conformance.launch import spawn
from conformance.result import Result
from conformance.tolerance import allclose, bitwise, combine
from optimized.accumulation import accumulate_gradients
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX, GPTConfig
from reference.training import accumulate_gradients as reference_accumulate

SPEC = CheckSpec(
    name="accumulation", technique="gradient accumulation",
    reference="one forward/backward of the whole batch (token mean)",
    optimized="optimized.accumulation.accumulate_gradients", order=70,
)
CONFIG = dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=32, seed=0)
ROWS = 12


def _batch():
    (idx, targets), = make_batches(1, batch_size=ROWS, seq_len=24, vocab_size=32, seed=5, vary_length=True)
    return idx, targets


def _split(batch, sizes):
    return list(zip(batch[0].split(sizes), batch[1].split(sizes), strict=True))


def _grads(model):
    return [p.grad.detach().cpu() for p in model.parameters()]


def _close(name, actual, expected, rtol=1e-6):
    scale = max(float(e.abs().max()) for e in expected)
    return combine(name, [allclose(a, e, name=f"grad {i}", rtol=rtol, atol=rtol * scale)
                          for i, (a, e) in enumerate(zip(actual, expected, strict=True))])


def _big_batch(device):
    model = GPT(GPTConfig(**CONFIG)).to(device)
    idx, targets = _batch()
    loss = model(idx.to(device), targets.to(device))[1]
    loss.backward()
    return loss.detach().cpu(), _grads(model)


def _to(micro, device):
    return [(i.to(device), t.to(device)) for i, t in micro]


class _AveragingWrapper(torch.nn.Module):
    """What a data-parallel wrapper does (DDP, optimized.data_parallel): after a backward outside `no_sync`, every
    gradient is all-reduced and divided by the group size. Written out so the check needs no other issue's code."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.synced: list[bool] = []
        """Per forward: whether it ran outside every no_sync (then a real wrapper all-reduces after its backward)."""
        self._no_sync_depth = 0

    @contextlib.contextmanager
    def no_sync(self):
        """Nestable, as DDP's; the depth is restored when the body raises."""
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1

    def forward(self, idx, targets, reduction):
        self.synced.append(self._no_sync_depth == 0)
        return self.module(idx, targets, reduction=reduction)

    def reduce(self):
        """The all-reduce a real wrapper runs in the backward of a micro-batch outside no_sync: none if the last one
        ran under no_sync (then no gradient is ever synchronised)."""
        if not (self.synced and self.synced[-1]):
            return
        for p in self.module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _data_parallel_worker(device_type: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device_type)
    idx, targets = _batch()
    mine = (idx[rank::world], targets[rank::world])  # strided rows: every rank a different token count
    rows = mine[0].size(0)
    sizes = [1, rows - 1] if rows > 1 else [rows]
    model = _AveragingWrapper(GPT(GPTConfig(**CONFIG)).to(device))
    loss = accumulate_gradients(model, _to(_split(mine, sizes), device), no_sync=model.no_sync,
                                process_group=dist.group.WORLD)
    model.reduce()
    n_local = int((mine[1] != IGNORE_INDEX).sum())
    return loss.cpu(), _grads(model.module), n_local, model.synced, len(sizes)


def run(ctx: Context) -> list[Result]:
    device = ctx.device
    batch = _batch()
    sizes = [1, 4, 7]  # uneven rows; vary_length gives uneven padding
    micro = _split(batch, sizes)
    counts = [int((t != IGNORE_INDEX).sum()) for _, t in micro]
    loss_big, g_big = _big_batch(device)

    model = GPT(GPTConfig(**CONFIG)).to(device)
    loss = accumulate_gradients(model, _to(micro, device)).cpu()
    g_acc = _grads(model)
    eq = combine("3 micro-batches vs one batch", [allclose(loss, loss_big, name="loss", rtol=1e-6, atol=0.0),
                                                  _close("gradients", g_acc, g_big)])
    buggy = GPT(GPTConfig(**CONFIG)).to(device)
    for i, t in _to(micro, device):
        (buggy(i, t)[1] / len(micro)).backward()
    g_bug = _grads(buggy)
    rel_bug = float(torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(g_bug, g_big, strict=True)]))
                    / torch.linalg.vector_norm(torch.cat([b.flatten() for b in g_big])))
    rel_ours = float(torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(g_acc, g_big, strict=True)]))
                     / torch.linalg.vector_norm(torch.cat([b.flatten() for b in g_big])))
    rows = [SPEC.row(
        ctx, "token-weighted micro-batches vs one batch", device=device.type, equivalence=eq,
        notes=f"micro-batches of {sizes} rows holding {counts} scored tokens; relative gradient error "
              f"{rel_ours:.2g} (token-weighted) vs {rel_bug:.2g} for the mean of micro-batch means")]

    spec_model, opt_model = GPT(GPTConfig(**CONFIG)).to(device), GPT(GPTConfig(**CONFIG)).to(device)
    even = _to(_split(batch, [4, 4, 4]), device)
    spec_loss = reference_accumulate(spec_model, even)
    opt_loss = accumulate_gradients(opt_model, even)
    parts = [bitwise(opt_loss.cpu(), spec_loss.cpu(), name="loss")]
    parts += [bitwise(a, b, name=f"grad {i}") for i, (a, b) in enumerate(zip(_grads(opt_model), _grads(spec_model),
                                                                             strict=True))]
    rows.append(SPEC.row(
        ctx, "vs reference.training.accumulate_gradients", reference="reference.training.accumulate_gradients",
        device=device.type, equivalence=combine("3 equal micro-batches", parts),
        notes="the same arithmetic (summed loss / token count of the whole batch), so bitwise"))

    ws = ctx.world_size
    per_rank = spawn(_data_parallel_worker, ws, device.type, device=device.type, timeout=ctx.timeout)
    parts = []
    for r, (loss_r, grads_r, _, synced, count) in enumerate(per_rank):
        expected = [0.0] * (count - 1) + [1.0]  # every micro-batch but the last under no_sync, the last synchronised
        parts += [allclose(loss_r, loss_big, name=f"rank {r} loss", rtol=1e-6, atol=0.0),
                  _close(f"rank {r} gradients", grads_r, g_big),
                  bitwise(torch.tensor([float(x) for x in synced], dtype=torch.float64),
                          torch.tensor(expected, dtype=torch.float64), name=f"rank {r} no_sync pattern")]
    rows.append(SPEC.row(
        ctx, f"{ws} ranks, no_sync + token count all-reduced",
        optimized="optimized.accumulation.accumulate_gradients(no_sync=..., process_group=...)",
        device=device.type, world_size=ws, equivalence=combine(f"{ws} ranks vs one batch", parts),
        notes=f"scored tokens per rank {[r[2] for r in per_rank]}; micro-batches run outside no_sync (rank 0): "
              f"{per_rank[0][3]}; gradients averaged over ranks once, after the last micro-batch, as DDP does"))
    return rows
