"""The workload and the bounds the optimized.precision tests share: the tiny GPT, its batches, the fp32 / float64 /
naive-bf16 reference runs, and the loss-trajectory bound.

Two kinds of bound appear in those tests, both derived from the low dtype's precision rather than tuned to the
measurements:

* The error-ratio rule (conformance.tolerance.error_ratio, the FlashAttention rule): against a float64 reference,
  mixed precision may be at most 2x (outputs) or 3x (gradients) as wrong as the naive computation done entirely
  in the same low dtype (the model cast to bf16/fp16, no fp32 anywhere), plus a floor of 4 ulps. Mixed precision
  keeps more in fp32 than the naive version, so it must not be worse than it by more than that factor.
* The loss-trajectory bound |L_mixed(t) - L_fp32(t)| <= 2 * u * L_fp32(t) at every step t, with u the unit
  roundoff of the half dtype (bf16: 2^-8, fp16: 2^-11), `trajectory_bound`. A loss held in that dtype cannot be
  resolved more finely than u * L; two trajectories that stay within two such units of each other are the same
  training run seen at the dtype's resolution, while a bug (a wrong scale, a missed unscale, a skipped step,
  accumulation weighted wrongly) moves the loss by far more within a few steps
  (test_precision_amp.py::test_trajectory_bound_catches_small_bugs).
"""

from __future__ import annotations

import functools

import torch

from reference.data import make_batches
from reference.model import GPT, GPTConfig
from reference.training import History, train

CONFIG = GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32)
STEPS = 10
LR = 3e-3
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tiny_batches(device="cpu"):
    """Three (idx, targets) batches of the copy task, 4 rows of 13 tokens."""
    return [(i.to(device), t.to(device)) for i, t in
            make_batches(3, batch_size=4, seq_len=13, vocab_size=CONFIG.vocab_size, task="copy", seed=3)]


def tiny_model(dtype=torch.float32, device="cpu"):
    """The tiny GPT (seeded by its constructor: every call builds the same weights), in `dtype` on `device`."""
    return GPT(CONFIG).to(device=device, dtype=dtype)


def trajectory_bound(mixed: list[float], fp32: list[float], dtype: torch.dtype) -> None:
    """Assert |mixed(t) - fp32(t)| <= 2 u |fp32(t)| at every step (u: `dtype`'s unit roundoff)."""
    u = UNIT_ROUNDOFF[dtype]
    for t, (a, b) in enumerate(zip(mixed, fp32, strict=True)):
        assert abs(a - b) <= 2 * u * abs(b), f"step {t}: mixed {a:.6f} vs fp32 {b:.6f}, bound {2 * u * abs(b):.3g}"


@functools.cache
def reference_runs() -> dict[str, History]:
    """The reference runs every trajectory test compares against, computed once per process: fp32 and float64
    reference.training, and the naive low-precision baseline (model cast to bf16, trained by the same loop)."""
    batches = tiny_batches()
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64), ("naive_bf16", torch.bfloat16)):
        model = tiny_model(dtype)
        out[name] = train(model, torch.optim.AdamW(model.parameters(), lr=LR), batches, steps=STEPS)
    return out


def assert_trains_like_fp32(losses: list[float], dtype: torch.dtype) -> None:
    """`trajectory_bound` against the fp32 reference run of `reference_runs` (STEPS steps of AdamW at LR)."""
    trajectory_bound(losses, reference_runs()["fp32"].loss, dtype)


def poison_once(param: torch.Tensor, value: float):
    """Make the next gradient of `param` non-finite (as an fp16 overflow would), once; returns the hook handle."""
    state = {"armed": True}

    def hook(grad):
        if state["armed"]:
            state["armed"] = False
            return torch.full_like(grad, value)
        return grad

    return param.register_hook(hook)
