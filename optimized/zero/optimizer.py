"""ZeRO stages 1, 2 and 3 and ZeRO-Offload as a torch.optim.Optimizer (ZeRO, Rajbhandari et al. 2020,
arXiv 1910.02054; ZeRO-Offload, Ren et al. 2021, arXiv 2101.06840).

    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3, weight_decay=0.1)
    for idx, targets in loader:                 # this rank's slice of every batch
        _, loss = model(idx, targets)           # the local mean: gradients are averaged over ranks, as DDP does
        loss.backward()                         # when it returns, this rank's slice holds the averaged gradient
        opt.clip_grad_norm_(1.0)                # the norm of the whole averaged gradient
        opt.step()                              # skipped on every rank if any gradient is inf/NaN
        opt.zero_grad()                         # (step() also consumes the gradients, as DeepSpeed's engine.step)

Every rank runs the same model on its own data. The trainable parameters of each (parameter group, dtype) form one
flat buffer, padded to a multiple of the world size Nd; rank r owns the r-th slice (partition.py). Each stage
shards one more model state:
    stage 1  optimizer state (and the fp32 master slice when `param_dtype` is half) for the owned slice only.
             Gradients accumulate whole on every rank; at the end of backward each owner's slice is reduced to
             its owner, the owner updates it at step and the updated slices are all-gathered: Ψ reduced + Ψ
             gathered per step.
    stage 2  the gradients too: as backward produces them, gradients are copied into buckets of `bucket_cap_mb`,
             each full bucket is reduced to the owners of its elements and freed; a rank keeps only its slice.
    stage 3  the parameters too: a rank stores only its slice. A module's parameters are gathered (broadcast
             from their owners) just before its forward and again just before its backward, and released right
             after: 2Ψ gathered + Ψ reduced per step (gather.py).
    offload  the master slice, the optimizer state and the step move to the CPU; reduced gradient slices are
             copied there, updated slices copied back.
The coordinator below picks the stage's strategy once at construction (stages.py), which supplies the
gradient-reduction strategy (reduction.py: whole buffer for stage 1, buckets for 2-3) and, for stage 3, the
parameter-gathering one (gather.py). Offload is where the masters live (offload.py); the inf/NaN check, loss scale
and global norm of the master gradients are master_grads.py; state_dict / load_state_dict are state.py and the
sharded checkpoints checkpoint.py.

Mixed precision (`param_dtype=torch.bfloat16` or `torch.float16`): the model computes in half precision, the
optimizer updates an fp32 master copy of the owned slice (the paper's 2 + 2 + 12 bytes per parameter).
Non-finite gradients: at the end of every backward one all-reduce carries [any inf/NaN in my slice, sum of my
squared gradients]; if any rank saw an inf/NaN, step() is skipped on every rank (parameters, masters and optimizer
state untouched; `last_step_skipped`, `skipped_steps`) and clip_grad_norm_ reuses the same reduction. fp16 needs
loss scaling: `loss_scale="dynamic"` (the GradScaler rule, shared with MasterWeightOptimizer; backward on
`opt.scale_loss(loss)`), or torch.amp.GradScaler(scaler.scale(loss).backward(), scaler.unscale_(opt),
scaler.step(opt), scaler.update()): the masters' gradients are ready when backward returns, and a rank whose own
slice is finite while another rank's is not marks its slice non-finite, so every rank's GradScaler skips and
backs off together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from optimized import _validate
from optimized.data_parallel import GradReadyHooks, check_replicas_agree
from optimized.mixed_precision import LossScale
from optimized.zero import checkpoint
from optimized.zero.arguments import check_arguments
from optimized.zero.comm import Group
from optimized.zero.master_grads import MasterGrads
from optimized.zero.offload import Placement
from optimized.zero.partition import FlatBuffers, FlatLayout, Slot, build_layouts
from optimized.zero.reduction import ShardedGrad, sharded_grad
from optimized.zero.stages import STAGES
from optimized.zero.state import ShardedState


class ZeroOptimizer(ShardedState, torch.optim.Optimizer):
    """ZeRO-1/2/3 (+ offload) around any elementwise torch.optim optimizer; see the module docstring.

    model: the same nn.Module on every rank (names, shapes and dtypes are checked across ranks; trainable
        parameters are synchronised from rank 0). The optimizer takes them over: stages 1-2 re-point every
        parameter into a flat buffer, stage 3 releases them.
    optimizer_class, **optimizer_kwargs: the optimizer that updates each rank's slice, e.g. torch.optim.AdamW, lr=.
    stage: 1, 2 or 3. process_group: the data-parallel group (default: the default group; without an initialised
        process group the optimizer runs as a single rank).
    offload: master slice, optimizer state and step on the CPU. param_dtype: None (compute in the parameters' own
        dtype, the optimizer updates them directly) or torch.float16 / torch.bfloat16 (compute in half precision,
        fp32 master slices). bucket_cap_mb: MiB per gradient bucket (stages 2-3).
    param_groups: optional list of dicts {"params": [parameters of model], **options} (e.g. no weight decay on
        biases), each trainable parameter in exactly one; default: one group of all trainable parameters.
    loss_scale, init_scale, growth_factor, backoff_factor, growth_interval: the loss scale (see
        optimized.mixed_precision.LossScale): None (S = 1, the default), a fixed float, or "dynamic".

    A trainable parameter that gets no gradient in a step counts as a zero gradient (as in DeepSpeed), and every
    rank must compute gradients for the same parameters. After backward a parameter's .grad is a ShardedGrad
    stand-in (its use raises): the gradient lives sharded in the optimizer. Stage 3: a parameter used outside its
    own module's forward is gathered with the module that uses it (detected on first use, or declared with
    register_external_parameter). Frozen parameters (requires_grad=False) stay whole on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_class: type[torch.optim.Optimizer],
        *,
        stage: int,
        process_group: dist.ProcessGroup | None = None,
        offload: bool = False,
        param_dtype: torch.dtype | None = None,
        bucket_cap_mb: float = 25.0,
        param_groups: list[dict] | None = None,
        loss_scale: str | float | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        **optimizer_kwargs: Any,
    ) -> None:
        groups, device = check_arguments(model, optimizer_class, stage, offload, param_dtype, bucket_cap_mb,
                                         param_groups, optimizer_kwargs, ZeroOptimizer)
        group = Group.resolve(process_group)
        scaler = LossScale(loss_scale, init_scale=init_scale, growth_factor=growth_factor,
                           backoff_factor=backoff_factor, growth_interval=growth_interval, device=device)
        check_replicas_agree(model, group.process_group if group.distributed else None, "model")

        self.stage = stage
        self._strategy = STAGES[stage]
        """What this stage does differently (stages.py): chosen once, here."""
        self.offload = offload
        self.param_dtype = param_dtype
        self.module = model
        self.device = device
        self._placement = Placement(offload, device)
        self.group = group
        """This rank and the data-parallel group (comm.Group), shared with checkpoint.py."""
        self.process_group = group.process_group
        self.world_size = group.world_size
        self.rank = group.rank
        self.scaler = scaler
        """The loss scale S (LossScale): S = 1 unless loss_scale was given."""
        self.last_step_skipped: bool | None = None
        """Whether the last step() was skipped because a gradient was inf/NaN on some rank."""
        self.skipped_steps = 0
        """Steps skipped so far."""
        self._bucket_bytes = int(bucket_cap_mb * 2**20)
        self._optimizer_name = f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"
        self._group_options = [options for options, _ in groups]
        self._group_names = [[names[0] for names, _ in named] for _, named in groups]

        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        self._frozen = dict(frozen)
        with torch.no_grad():
            for _, p in frozen:
                group.broadcast(p.data, 0)
                if param_dtype is not None and p.is_floating_point():
                    p.data = p.data.to(param_dtype)
            self._flats = [self._build_flat(layout, params)
                           for layout, params in build_layouts(groups, param_dtype, self.world_size)]
        self._where: dict[int, tuple[FlatBuffers, Slot]] = {
            id(p): (flat, slot) for flat in self._flats for p, slot in zip(flat.params, flat.layout.slots, strict=True)
        }
        names = {id(p): names[0] for _, named in groups for names, p in named}
        self._reduction = self._strategy.reduction(self._flats, self._where, group, offload, self._bucket_bytes, device)
        self._gathering = self._strategy.gathering(model, self._flats, self._where, group, device, names)
        trainable = [p for flat in self._flats for p in flat.params]
        self._stand_ins = [(p, sharded_grad(p)) for p in trainable]  # what p.grad shows after backward
        self._hooks: list[Any] = [p.register_hook(partial_clear(p)) for p in trainable]
        self._grad_hooks = GradReadyHooks(trainable, self._on_grad_ready, self._end_of_backward,
                                          on_start=self._start_backward)
        self._require_sync = True
        self._syncing = True
        self._reduced = False
        self._grads = MasterGrads(self._flats, scaler, group, self._placement)

        inner_groups = []
        for g, options in enumerate(self._group_options):
            masters = [f.master for f in self._flats if f.layout.group == g]
            inner_groups.append({**options, "params": masters})
        super().__init__(inner_groups, defaults=dict(optimizer_kwargs))
        self.optimizer = optimizer_class(self.param_groups, **optimizer_kwargs)
        """The optimizer over this rank's master slices (its param_groups and state are this object's)."""
        self.defaults = self.optimizer.defaults

    # The inner optimizer owns param_groups and state; ZeroOptimizer shows them as its own, so LR schedulers and
    # torch.optim tooling see the real hyperparameters (torch.optim.Optimizer.__init__ sets them first).
    @property
    def param_groups(self) -> list[dict]:
        inner = self.__dict__.get("optimizer")
        return inner.param_groups if inner is not None else self.__dict__["_initial_param_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.param_groups = value
        else:
            self.__dict__["_initial_param_groups"] = value

    @property
    def state(self):  # noqa: D102 - torch.optim.Optimizer.state
        inner = self.__dict__.get("optimizer")
        return inner.state if inner is not None else self.__dict__["_initial_state"]

    @state.setter
    def state(self, value) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.state = value
        else:
            self.__dict__["_initial_state"] = value

    def add_param_group(self, param_group: dict) -> None:
        if "optimizer" in self.__dict__:
            raise NotImplementedError(
                "ZeroOptimizer partitions its parameters when it is built; pass every group as param_groups= then"
            )
        super().add_param_group(param_group)

    # --- construction ------------------------------------------------------------------------------------------

    def _build_flat(self, layout: FlatLayout, params: list[nn.Parameter]) -> FlatBuffers:
        """Copy the parameters into a padded flat buffer, keep what this rank stores, re-point the parameters."""
        start, owned = layout.shard_start(self.rank), layout.owned_numel(self.rank)
        source_dtype = torch.float32 if self.param_dtype is not None else layout.dtype
        full = torch.zeros(layout.padded_numel, dtype=source_dtype, device=self.device)
        for p, slot in zip(params, layout.slots, strict=True):
            full[slot.offset : slot.end].copy_(p.detach().reshape(-1))
        self.group.broadcast(full, 0)  # every rank starts from rank 0's values, as DDP does
        compute = full.to(layout.dtype)  # the same tensor when no cast is needed
        buffer = self._strategy.store(compute, params, layout, self.rank)
        master_is_view = self.param_dtype is None and not self.offload
        if master_is_view:
            master = self._strategy.owned(buffer, layout, self.rank)
        else:
            master = self._placement.master(full[start : start + owned])
        grads = self._strategy.grad_buffer(layout, self.device, self.offload)
        return FlatBuffers(layout, params, buffer, grads, master, master_is_view, self._placement.host_grad(master))

    # --- stage 3 ---------------------------------------------------------------------------------------------------

    @contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Stage 3: every parameter whole inside the block (e.g. to read model.state_dict()); no-op otherwise.

        Every rank must enter it (it gathers). Read-only: changes made inside are lost when the block ends; tensors
        read inside (state_dict() values) stay valid after it."""
        if self._gathering is None or self._gathering.pinned:
            yield
            return
        self._gathering.gather(self._gathering.units)
        self._gathering.pinned = True
        try:
            yield
        finally:
            self._gathering.pinned = False
            self._gathering.release_keeping_reads(self._gathering.units)

    def register_external_parameter(self, module: nn.Module, parameter: nn.Parameter) -> None:
        """Stage 3: gather `parameter` whenever `module` runs (for a parameter `module`'s forward reads although
        another module registers it; DeepSpeed's deepspeed.zero.register_external_parameter). Such uses are also
        detected on first use; this declares them up front. A no-op below stage 3."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if id(parameter) not in self._where:
            raise ValueError("parameter is not a trainable parameter managed by this ZeroOptimizer")
        if self._gathering is not None:
            self._gathering.register_external_parameter(module, parameter)

    # --- gradients -----------------------------------------------------------------------------------------------

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Stage 1: backwards inside only accumulate local gradients; the first backward after the block (or
        step()) reduces their sum. Stages 2-3 keep no unreduced gradient, so they refuse it."""
        self._strategy.check_no_sync()
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def _start_backward(self) -> None:
        self._syncing = self._require_sync
        if self._reduced:  # a further backward before step(): its gradients add to the reduced ones
            self._reduced = False
            self._grads.norm_cache = None

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Called by autograd once p.grad holds this backward's gradient: hand it to the reduction, free it."""
        self._reduction.add(p, p.grad)
        p.grad = None
        if self._gathering is not None:
            self._gathering.on_grad_ready(p)

    def _end_of_backward(self) -> None:
        if self._gathering is not None:
            self._gathering.finish_backward()
        if self._syncing:
            self._reduction.finish()
            self._after_reduction()
        for p, stand_in in self._stand_ins:
            p.grad = stand_in

    def _ensure_reduced(self) -> None:
        """step() or clip_grad_norm_ without a synchronised backward since the last step (no backward at all, or
        only no_sync ones): reduce what there is (zeros count as gradients, as in DeepSpeed)."""
        if not self._reduced:
            self._reduction.finish()
            self._after_reduction()

    def _after_reduction(self) -> None:
        """Give every master slice its averaged gradient and check it (one all-reduce, master_grads.py)."""
        self._grads.attach([self._reduction.owned(flat) for flat in self._flats])
        self._reduced = True

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Scale the averaged gradients so that their global norm is at most max_norm; return the norm before.

        Each rank holds the gradient of its own slice, so the norm is that of optimized.clipping.global_grad_norm
        over the slices: sum_ranks sum_slice |g|^p, all-reduced, then the p-th root (max for p = inf). The 2-norm
        comes from the all-reduce that checked for inf/NaN at the end of backward when the gradients are unchanged
        since (no other collective; master_grads.py)."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, Tensor)):
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
            raise ValueError(f"norm_type must be a number >= 1 or inf, got {norm_type!r}")
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not max_norm > 0 or math.isnan(max_norm):
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not (norm_type >= 1.0 or norm_type == math.inf):
            raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type}")
        self._ensure_reduced()
        self._grads.unscale()
        return self._grads.clip(max_norm, norm_type, error_if_nonfinite)

    # --- step ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's slices with the averaged gradients, then make the new values visible to the model.

        Skipped on every rank (nothing changes but the loss scale) when any rank's gradients hold an inf/NaN.
        Consumes the gradients: they are zeroed for the next step (as DeepSpeed's engine.step does)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_reduced()
        self._grads.unscale()
        found = self._grads.found_inf
        self.last_step_skipped = found
        if found:
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            self._publish()
        self.scaler.update(torch.tensor(float(found), device=self.scaler.scale.device))
        self.zero_grad()
        return loss

    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * S (the loss scale): call backward on this when loss_scale was given."""
        return self.scaler.scale_loss(loss)

    @property
    def loss_scale(self) -> float:
        """The current loss scale S."""
        return float(self.scaler.scale)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers (which persist) and set the model's .grad to None. The gradient lives sharded in
        those buffers, so there is no full-size zero tensor to hand back: `set_to_none=False` (torch.optim's
        signature) is refused rather than ignored."""
        if set_to_none is not True:
            raise _validate.fail("set_to_none", set_to_none,
                                 "True (ZeroOptimizer keeps gradients in sharded buffers; the model's .grad is None)")
        self._reduction.zero()
        for flat in self._flats:
            flat.master.grad = None
            for p in flat.params:
                p.grad = None
        self._reduced = False
        self._grads.reset()

    # --- state ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _publish(self) -> None:
        """Copy the master slices into the model's parameters (and all-gather them in stages 1-2)."""
        for flat in self._flats:
            if not flat.master_is_view:
                self._strategy.owned(flat.buffer, flat.layout, self.rank).copy_(flat.master)
            self._strategy.publish(flat, self.group)

    def model_state_tensors(self) -> dict[str, list[Tensor]]:
        """Every tensor of model state this rank holds, by kind, for memory accounting (unique storages count).

        params / grads / optimizer: in accelerator memory; host_grads / host_optimizer: in CPU memory (offload)."""
        out: dict[str, list[Tensor]] = {k: [] for k in ("params", "grads", "optimizer", "host_grads",
                                                        "host_optimizer")}
        out["params"] += [flat.buffer for flat in self._flats] + list(self._frozen.values())
        if self._gathering is not None:  # stage 3: 0 bytes unless gathered
            out["params"] += [unit.full for unit in self._gathering.units]
        out["grads"] += [flat.grads for flat in self._flats if flat.grads is not None]
        state = [v for s in self.optimizer.state.values() for v in tree_flatten(s)[0] if isinstance(v, Tensor)]
        masters = [flat.master for flat in self._flats if not flat.master_is_view]
        for kind, tensors in self._placement.split(masters, state, [f.host_grad for f in self._flats]).items():
            out[kind] += tensors
        return out

    # --- checkpoints (checkpoint.py) -----------------------------------------------------------------------------

    def save_checkpoint(self, path):
        """Write the checkpoint directory `path` and point `latest` beside it at it, committed across ranks (the
        previous checkpoint at `path` stays intact until every shard is written); every rank must call it."""
        return checkpoint.save_checkpoint(self, path)

    def load_checkpoint(self, path) -> None:
        """Load a checkpoint written at any world size, re-partitioned for this one; every rank must call it.

        `path`: a checkpoint directory, or the directory holding `latest`. Every rank loads it or every rank
        raises (checkpoint.py)."""
        checkpoint.load_checkpoint(self, path)

    def barrier(self) -> None:
        self.group.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.group.all_gather_object(obj)


def partial_clear(p: nn.Parameter):
    """A hook that runs before autograd accumulates p's gradient: drop the ShardedGrad stand-in first."""

    def clear(grad: Tensor) -> Tensor:
        if isinstance(p.grad, ShardedGrad):
            p.grad = None
        return grad

    return clear
