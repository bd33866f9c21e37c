"""The workload of the `zero` check and its reference: the tiny GPT, AdamW with clipping, each rank's slice of every
batch, one step of ours, and the unsharded reference run (one process, whole batch) with its own rounding spread.

The reference side never uses optimized/: torch.optim.AdamW and clip_grad_norm_ on the whole batch.
"""

from __future__ import annotations

import torch

from conformance.checks._reference_runs import one_thread
from conformance.tolerance import NUDGE_SEEDS, nudge_, rounding_spread
from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.training import accumulate_gradients, split_batch

# Untied embeddings: every parameter belongs to one module, so stage 3 gathers each exactly once per pass and the
# collective bytes can be set beside 3Ψ without a correction for the tied weight (gathered again for lm_head).
CONFIG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False, seed=0)
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MAX_NORM = 1.0
SEQ_LEN = 32
LOCAL_BATCH = 4


def workload_batches(world_size: int, steps: int):
    """`steps` global batches of LOCAL_BATCH sequences per rank."""
    return make_batches(steps, batch_size=LOCAL_BATCH * world_size, seq_len=SEQ_LEN,
                        vocab_size=CONFIG["vocab_size"], seed=3)


def local_slice(batch, rank: int, world_size: int, device: torch.device):
    """Rank `rank`'s slice of a global batch, on `device`."""
    idx, targets = batch
    return idx.chunk(world_size)[rank].to(device), targets.chunk(world_size)[rank].to(device)


def ours_step(model, opt, batch, rank, world, device):
    """One step of ours (a ZeroOptimizer over `model`) on this rank's slice of `batch`, clipped to MAX_NORM."""
    idx, targets = local_slice(batch, rank, world, device)
    _, loss = model(idx, targets)
    loss.backward()
    opt.clip_grad_norm_(MAX_NORM)
    opt.step()
    return loss


def reference_state(world_size: int, steps: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32, nudge_seed: int | None = None,
                    micro_batches: int = 1, trajectory: list | None = None) -> dict[str, torch.Tensor]:
    """Unsharded AdamW + clip_grad_norm_ on the whole batch, one process, on `device` (default CPU), in `dtype`.
    The re-runs whose distance is the rounding spread: `nudge_seed` starts from initial weights nudged by one ulp,
    `micro_batches` > 1 sums the batch's gradient in that many parts (another reduction order). `trajectory`, when
    given, receives the parameters after each step."""
    device = device or torch.device("cpu")
    model = GPT(GPTConfig(**CONFIG)).to(device, dtype)
    if nudge_seed is not None:
        nudge_(model.parameters(), seed=nudge_seed)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    for batch in workload_batches(world_size, steps):
        opt.zero_grad()
        accumulate_gradients(model, split_batch(local_slice(batch, 0, 1, device), micro_batches))
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        if trajectory is not None:
            trajectory.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def reference_and_spread(world_size: int, steps: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32, trajectory: list | None = None):
    """(the reference's parameters, its own rounding spread) in `dtype`: the yardstick of every equivalence row.
    One intra-op thread, as the ranks run."""
    with one_thread():
        ref = reference_state(world_size, steps, device, dtype, trajectory=trajectory)
        variants = [reference_state(world_size, steps, device, dtype, seed) for seed in NUDGE_SEEDS]
        variants.append(reference_state(world_size, steps, device, dtype, micro_batches=max(world_size, 2)))
    origin = (f"AdamW x{steps} in {str(dtype).removeprefix('torch.')}: initial weights nudged by one ulp "
              f"({len(NUDGE_SEEDS)} seeds), the batch summed in {max(world_size, 2)} parts")
    return ref, rounding_spread(ref, variants, origin=origin)
