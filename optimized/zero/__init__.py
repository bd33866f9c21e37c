"""ZeRO-1/2/3 and ZeRO-Offload in readable PyTorch: `ZeroOptimizer` (skips non-finite steps on every rank, works
with torch.amp.GradScaler), checkpoints that commit across ranks and reshard, `consolidate`.

    from optimized.zero import ZeroOptimizer, consolidate
"""

from optimized.zero.checkpoint import consolidate
from optimized.zero.gather import ReleasedParameterError
from optimized.zero.optimizer import ZeroOptimizer

__all__ = ["ReleasedParameterError", "ZeroOptimizer", "consolidate"]
