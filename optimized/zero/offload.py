"""Where the optimizer's side of ZeRO lives: on the compute device, or on the CPU with ZeRO-Offload (Ren et al.
2021, arXiv 2101.06840, Sec. 4).

With offload the master slice, the optimizer state (created by the inner optimizer next to its parameters, the
masters) and an fp32 copy of the averaged gradient slice live in CPU memory; reduced gradient slices are copied
there and updated slices copied back. On CUDA those host tensors are pinned, so the copies can overlap compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Placement:
    """Where the masters, the optimizer state and the host gradient slices of one ZeroOptimizer live."""

    offload: bool
    """Masters, optimizer state and the averaged gradient slices in CPU memory (ZeRO-Offload)."""
    device: torch.device
    """The device the model computes on."""

    @property
    def host(self) -> torch.device:
        """The device of the masters and the optimizer state: the CPU with offload, else the compute device."""
        return torch.device("cpu") if self.offload else self.device

    def pin(self, t: Tensor) -> Tensor:
        """`t` in page-locked memory when it is a host copy of CUDA data, so the copies are asynchronous."""
        if self.offload and self.device.type == "cuda":
            return t.pin_memory()
        return t

    def master(self, owned_values: Tensor) -> Tensor:
        """A separate master slice with the values of `owned_values` (fp32 or the parameters' dtype), on the host."""
        return self.pin(owned_values.to(self.host, copy=True))

    def host_grad(self, master: Tensor) -> Tensor | None:
        """Offload: the zeroed host slice the averaged gradients accumulate into; None without offload."""
        return self.pin(torch.zeros_like(master)) if self.offload else None

    def split(self, masters: list[Tensor], state: list[Tensor], host_grads: list[Tensor]) -> dict[str, list[Tensor]]:
        """The optimizer-side tensors by the memory they occupy, for model_state_tensors."""
        if self.offload:
            return {"host_grads": host_grads, "host_optimizer": masters + state}
        return {"optimizer": masters + state}
