"""optimized.accumulation: k token-weighted micro-batches give the gradient of one big batch; the mean of
micro-batch means does not; no_sync wraps all but the last micro-batch; data parallel with torch DDP."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.launch import spawn
from optimized.accumulation import accumulate_gradients, count_tokens
from reference.data import make_batches
from reference.model import GPT, IGNORE_INDEX
from reference.training import accumulate_gradients as reference_accumulate
from tests.models import tiny_config

CFG = tiny_config()


def batch(rows=8, seed=0):
    (idx, targets), = make_batches(1, batch_size=rows, seq_len=12, vocab_size=CFG.vocab_size, seed=seed,
                                   vary_length=True)
    return idx, targets


def split_rows(b, sizes):
    idx, targets = b
    return list(zip(idx.split(sizes), targets.split(sizes), strict=True))


def assert_close_scaled(actual, expected, rtol):
    """|a - e| <= rtol * (|e| + max|e|) elementwise, max over all tensors (some gradients are 0 analytically,
    e.g. the key bias's: softmax ignores a constant added to all keys, so theirs is rounding noise)."""
    scale = max(float(e.abs().max()) for e in expected)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def big_batch_grads(b):
    model = GPT(CFG)
    _, loss = model(*b)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def accumulated_grads(micro, **kwargs):
    model = GPT(CFG)
    loss = accumulate_gradients(model, micro, **kwargs)
    return loss, [p.grad for p in model.parameters()]


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True), seed=st.integers(0, 3))
def test_uneven_micro_batches_equal_one_big_batch(cuts, seed):
    """Micro-batches of uneven rows and uneven padding (vary_length): loss and every gradient equal the big
    batch's to rtol 1e-6 (atol 1e-6 of the largest gradient entry: fp32 sums in another order differ by ulps)."""
    b = batch(rows=9, seed=seed)
    bounds = sorted(set(cuts) | {9})
    sizes = [hi - lo for lo, hi in zip([0] + bounds[:-1], bounds, strict=True) if hi > lo]
    loss_big, g_big = big_batch_grads(b)
    loss_acc, g_acc = accumulated_grads(split_rows(b, sizes))
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-6, atol=0)
    assert_close_scaled(g_acc, g_big, rtol=1e-6)


def test_equals_the_reference_accumulation_bitwise():
    micro = split_rows(batch(), [4, 4])
    loss, grads = accumulated_grads(micro)
    model = GPT(CFG)
    ref_loss = reference_accumulate(model, micro)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))


def test_mean_of_micro_batch_means_is_a_different_loss():
    """The bug this helper avoids: backpropagating mean_j / k. With uneven real tokens per micro-batch its gradient
    misses the big batch's by far more than rounding; with equal token counts the two coincide."""
    b = batch(seed=1)
    micro = split_rows(b, [4, 4])
    counts = [int((t != IGNORE_INDEX).sum()) for _, t in micro]
    assert counts[0] != counts[1]
    _, g_big = big_batch_grads(b)
    model = GPT(CFG)
    for idx, targets in micro:
        (model(idx, targets)[1] / len(micro)).backward()
    g_bug = [p.grad for p in model.parameters()]
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(g_bug, g_big, strict=True) if b.norm() > 0)
    assert rel > 1e-2
    # Same counts: copy each micro-batch's padding pattern onto the other, the two rules agree again.
    idx, targets = b
    even = (idx, torch.cat([targets[:4], targets[:4]]))
    _, g_even = big_batch_grads(even)
    model = GPT(CFG)
    for i, t in split_rows(even, [4, 4]):
        (model(i, t)[1] / 2).backward()
    torch.testing.assert_close([p.grad for p in model.parameters()], g_even, rtol=1e-5, atol=1e-8)


def test_no_sync_wraps_every_micro_batch_but_the_last():
    events = []

    @contextlib.contextmanager
    def no_sync():
        events.append("enter")
        yield
        events.append("exit")

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPT(CFG)

        def forward(self, idx, targets, reduction):
            events.append("forward")
            return self.gpt(idx, targets, reduction=reduction)

    accumulate_gradients(Recording(), split_rows(batch(), [3, 2, 3]), no_sync=no_sync)
    assert events == ["enter", "forward", "exit"] * 2 + ["forward"]


def test_batch_without_scored_tokens_contributes_nothing():
    idx, targets = batch()
    loss, grads = accumulated_grads(split_rows((idx, torch.full_like(targets, IGNORE_INDEX)), [4, 4]))
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    assert int(count_tokens([(idx, targets)])) == int((targets != IGNORE_INDEX).sum())


def test_known_token_count_and_custom_loss_and_scaling():
    micro = split_rows(batch(), [5, 3])
    n = int(count_tokens(micro))
    loss_a, g_a = accumulated_grads(micro)
    loss_b, g_b = accumulated_grads(micro, num_tokens=n, loss_fn=lambda m, b: (m(*b, reduction="sum")[1], 0),
                                    scale_loss=lambda loss: loss * 4.0)
    assert torch.equal(loss_a, loss_b)
    torch.testing.assert_close([g * 4.0 for g in g_a], g_b)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="micro_batches"):
        accumulate_gradients(GPT(CFG), [])
    with pytest.raises(ValueError, match="num_tokens"):
        accumulate_gradients(GPT(CFG), split_rows(batch(), [8]), num_tokens=-1)
    for bad in (float("nan"), float("inf"), 2.5, True, "8", torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=r"num_tokens must be an integer >= 0 .*got"):
            accumulate_gradients(GPT(CFG), split_rows(batch(), [8]), num_tokens=bad)
    with pytest.raises(ValueError, match=r"micro_batches\[0\] is a str without targets to count: pass num_tokens="):
        accumulate_gradients(GPT(CFG), ["text"])
    with pytest.raises(ValueError, match=r"loss_fn scored 0 tokens but the micro-batches hold \d+ scored targets"):
        accumulate_gradients(GPT(CFG), split_rows(batch(), [8]), loss_fn=lambda m, b: (m(*b, reduction="sum")[1], 0))


class AveragingDataParallel(torch.nn.Module):
    """The contract of a data-parallel wrapper, by hand: after a backward outside `no_sync()`, every gradient is
    all-reduced and divided by the group size."""

    def __init__(self, module):
        super().__init__()
        self.module, self.sync = module, True

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        yield
        self.sync = True

    def forward(self, idx, targets, reduction):
        return self.module(idx, targets, reduction=reduction)

    def finish(self):
        for p in self.module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _data_parallel_worker(use_ddp):
    """Rank r holds rows of its own with its own padding; two micro-batches of unequal rows per rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = torch.nn.parallel.DistributedDataParallel(GPT(CFG)) if use_ddp else AveragingDataParallel(GPT(CFG))
    b = batch(rows=9, seed=0)
    mine = (b[0][rank::world], b[1][rank::world])
    rows = mine[0].size(0)
    loss = accumulate_gradients(model, split_rows(mine, [1, rows - 1]), no_sync=model.no_sync,
                                process_group=dist.group.WORLD)
    if not use_ddp:
        model.finish()
    return loss, [p.grad for p in model.module.parameters()]


@pytest.mark.parametrize("world, use_ddp", [(2, True), (3, False)], ids=["torch-ddp-2", "by-hand-3"])
def test_data_parallel_no_sync_equals_one_big_batch(world, use_ddp):
    """Ranks with different token counts: the token count is all-reduced, the wrapper's averaging undone, so the
    averaged gradient is the whole batch's token mean (torch DDP on 2 ranks; a hand-written wrapper on 3, cheaper
    to start than DDP)."""
    loss_big, g_big = big_batch_grads(batch(rows=9, seed=0))
    for loss, grads in spawn(_data_parallel_worker, world, use_ddp, timeout=120):
        torch.testing.assert_close(loss, loss_big, rtol=1e-6, atol=0)
        assert_close_scaled(grads, g_big, rtol=1e-6)


@pytest.mark.gpu
def test_uneven_micro_batches_on_cuda_equal_one_big_batch():
    b = batch(rows=9, seed=2)
    model = GPT(CFG).cuda()
    _, loss = model(b[0].cuda(), b[1].cuda())
    loss.backward()
    g_big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    acc = accumulate_gradients(model, [(i.cuda(), t.cuda()) for i, t in split_rows(b, [2, 3, 4])])
    torch.testing.assert_close(acc, loss.detach(), rtol=1e-6, atol=0)
    assert_close_scaled([p.grad for p in model.parameters()], g_big, rtol=1e-5)
