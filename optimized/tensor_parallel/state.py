"""Whole tensors back from a parallelised model, and whole tensors into it: sharded vs replicated parameters,
all-gathered full parameters or gradients, and loading a full state dict (e.g. a checkpoint of the unsplit model).

Each sharded layer (optimized.tensor_parallel.layers.ShardedLayer) knows how its full tensors map to the ranks'
slices (`shard` / `unshard`, fused sections and Conv1D storage included); these functions only walk the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, pname = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), pname


def _split_dim(module: nn.Module, pname: str) -> int | None:
    return getattr(module, "split_dims", {}).get(pname)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters split over the tensor-parallel group, parameters every rank holds in full): what
    optimized.clipping.global_grad_norm takes as `sharded` and `replicated` to get the full model's norm."""
    sharded, replicated = [], []
    for name, p in model.named_parameters():
        module, pname = _owner(model, name)
        (sharded if _split_dim(module, pname) is not None else replicated).append(p)
    return sharded, replicated


def gather_full(model: nn.Module, *, grads: bool = False) -> dict[str, Tensor | None]:
    """Every parameter (or, with grads=True, its gradient) at full size, by name, as in the model before
    `parallelize`: split tensors are all-gathered over their layer's group. Every rank of the group must call it."""
    out: dict[str, Tensor | None] = {}
    for name, p in model.named_parameters():
        module, pname = _owner(model, name)
        tensor = p.grad if grads else p.detach()
        if tensor is None or _split_dim(module, pname) is None or module.tp_size == 1:
            out[name] = None if tensor is None else tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(module.tp_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=module.process_group)
        out[name] = module.unshard(pname, parts)
    return out


@torch.no_grad()
def load_full(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The inverse of `gather_full`: copy full-size tensors by name (a state dict of the model before `parallelize`,
    e.g. a checkpoint) into the model, each split parameter taking this rank's slice. No communication."""
    for name, p in model.named_parameters():
        if name not in state:
            raise ValueError(f"state has no tensor for parameter {name!r}")
        module, pname = _owner(model, name)
        full = state[name]
        piece = module.shard(pname, full) if _split_dim(module, pname) is not None else full
        if piece.shape != p.shape:
            raise ValueError(f"state[{name!r}] has shape {tuple(full.shape)}, which does not give this rank's "
                             f"{tuple(p.shape)}")
        p.copy_(piece)
