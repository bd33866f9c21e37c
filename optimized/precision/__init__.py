"""Mixed-precision training for a plain PyTorch loop, in the two styles people use; one job per module.

1. Autocast over fp32 weights (PyTorch AMP), `amp.amp_step` / `amp.amp_train`: the parameters, their gradients and
   the optimizer state stay fp32; inside `torch.autocast` the matmuls run on half-precision copies of their inputs,
   so the activations saved for backward are mostly half precision. fp16 needs loss scaling (torch.amp.GradScaler),
   bf16 does not.
2. Half-precision weights with an fp32 master copy inside the optimizer, `master_weights.MasterWeightOptimizer`
   (Micikevicius et al. 2018, arXiv 1710.03740, Sec. 3.1; Megatron-LM's Float16Optimizer; the layout ZeRO shards).

    autocast.py        which half dtypes autocast really runs on this device (`check_autocast`), the autocast context
    scaler.py          the loss scale S and its update rule (`LossScale`), the unscale-and-check kernel, and the
                       torch.amp.GradScaler a dtype needs (`make_grad_scaler`)
    amp.py             style 1: `amp_step`, `amp_train`
    master_weights.py  style 2: `MasterWeightOptimizer`

Memory per parameter with Adam (bytes, "ZeRO accounting" counts params + grads + optimizer state):
    fp32 training                        4 + 4 + 8 = 16
    autocast over fp32 weights           4 + 4 + 8 = 16, plus 2 per matmul weight for its half copy while a
                                                          forward's graph is alive
    MasterWeightOptimizer                2 + 2 + (4 master + 8 Adam) = 16 resident; from the end of backward to
                                                          the end of step() the fp32 gradient copies add 4
Model state is not halved by any of them: only the activations saved for backward are (conformance measures it).
"""

from optimized.precision.amp import AmpHistory, StepResult, amp_step, amp_train
from optimized.precision.autocast import HALF_DTYPES, check_autocast
from optimized.precision.master_weights import MasterWeightOptimizer
from optimized.precision.scaler import LossScale, make_grad_scaler, unscale_and_check_

__all__ = [
    "HALF_DTYPES",
    "AmpHistory",
    "LossScale",
    "MasterWeightOptimizer",
    "StepResult",
    "amp_step",
    "amp_train",
    "check_autocast",
    "make_grad_scaler",
    "unscale_and_check_",
]
