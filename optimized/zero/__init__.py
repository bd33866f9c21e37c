"""ZeRO-1/2/3 and ZeRO-Offload in readable PyTorch: `ZeroOptimizer`, sharded checkpoints that reshard, `consolidate`.

    from optimized.zero import ZeroOptimizer, consolidate
"""

from optimized.zero.checkpoint import consolidate
from optimized.zero.optimizer import ZeroOptimizer

__all__ = ["ZeroOptimizer", "consolidate"]
