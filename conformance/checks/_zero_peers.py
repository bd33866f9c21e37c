"""The peers of the `zero` check: DeepSpeed's ZeRO (CPU + gloo with torch's AdamW) and torch's own, FSDP2 for the
ZeRO-2/3 layouts and ZeroRedundancyOptimizer over DDP for ZeRO-1, each trained on the workload of _zero_workload.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from conformance.checks._zero_workload import ADAMW, CONFIG, MAX_NORM, local_slice
from conformance.peers import import_deepspeed
from reference.model import GPT, GPTConfig

TORCH_PEERS = {1: "ZeroRedundancyOptimizer (DDP)", 2: "FSDP2 (reshard_after_forward=False)",
               3: "FSDP2 (reshard_after_forward=True)"}


def deepspeed_engine(model: torch.nn.Module, *, stage: int, offload: bool = False, micro_batch: int,
                     device: torch.device):
    """DeepSpeed's ZeRO over the process group the launcher already initialised, with torch's AdamW.

    DeepSpeed is imported here, not at module level: the import is slow and optional. It wants LOCAL_RANK in the
    environment (its launchers set it); `__compatible_ops__ = {}` keeps it from compiling its shared-memory
    all-reduce op and from probing a compiler for every C++ op at start-up: with "torch_adam" no op is needed."""
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() if device.type == "cpu" else device.index or 0))
    import_deepspeed(device.type)  # told its accelerator, its deprecated torch collectives' warnings filtered
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        deepspeed.ops.__dict__["__compatible_ops__"] = {}
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {**ADAMW, "betas": list(ADAMW["betas"]), "torch_adam": True}},
        "gradient_clipping": MAX_NORM,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                           dist_init_required=False)
    return engine


def deepspeed_state(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below stage 3
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def ds_step(engine, batch, rank, world, device):
    """One step of DeepSpeed's engine on this rank's slice of `batch` (it clips by its config)."""
    idx, targets = local_slice(batch, rank, world, device)
    _, loss = engine(idx, targets)
    engine.backward(loss)
    engine.step()
    return loss


def deepspeed_version() -> str | None:
    """The installed DeepSpeed's version, None without it (the DeepSpeed rows are then left out)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


# --- the torch-native peers: FSDP2 (ZeRO-2/3 layouts) and ZeroRedundancyOptimizer (ZeRO-1) -----------------------


def torch_peer(stage: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, step function, state function) of torch's own ZeRO of `stage`: ZeroRedundancyOptimizer over DDP for
    stage 1; FSDP2 (fully_shard on each block, then the root) for 2 (reshard_after_forward=False: parameters stay
    gathered from forward to backward, gradients reduce-scattered) and 3 (reshard_after_forward=True); in `dtype`."""
    model = GPT(GPTConfig(**CONFIG)).to(device, dtype)
    if stage == 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(wrapped.parameters(), optimizer_class=torch.optim.AdamW, **ADAMW)
        clip = lambda: torch.nn.utils.clip_grad_norm_(wrapped.parameters(), MAX_NORM)  # noqa: E731

        def state():
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=stage == 3)
        fully_shard(model, mesh=mesh, reshard_after_forward=stage == 3)
        wrapped = model
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)

        def clip():  # the global norm of DTensor gradients (as torchtitan clips)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm(grads, 2.0)
            total = total.full_tensor() if isinstance(total, DTensor) else total
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), MAX_NORM, total)

        def state():
            return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                    for k, v in model.state_dict().items()}

    def step(batch, rank, world):
        idx, targets = local_slice(batch, rank, world, device)
        _, loss = wrapped(idx, targets)
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad()
        return loss

    return step, state
