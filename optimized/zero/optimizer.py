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
The coordinator below holds one gradient-reduction strategy (reduction.py: whole buffer for stage 1, buckets for
2-3) and, for stage 3, the parameter-gathering strategy, both chosen once at construction.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from optimized import _validate
from optimized.clipping import clip_grads_with_norm_, global_grad_norm
from optimized.distributed.collectives import Group
from optimized.distributed.groups import check_replicas_agree, refuse_meta
from optimized.distributed.hooks import GradReadyHooks
from optimized.mixed_precision import LossScale, unscale_and_check_
from optimized.zero import checkpoint
from optimized.zero.gather import Gathering
from optimized.zero.partition import FlatBuffers, FlatLayout, Slot, build_layouts, parse_groups
from optimized.zero.reduction import Buckets, ShardedGrad, WholeBuffer, sharded_grad

FORMAT_VERSION = 1
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _probe_elementwise(optimizer_class: type, optimizer_kwargs: dict) -> None:
    """Refuse an optimizer whose update is not elementwise, before any state changes.

    ZeRO updates each rank's slice of a flat buffer on its own, so the update of an element may depend only on
    that element's own history (SGD, Adam, AdamW, Adagrad, RMSprop, Lion, ...). Probe: three steps on one (5, 7)
    tensor and on its two halves cut mid-row as separate 1-D tensors must agree; Adafactor (factored moments),
    LAMB/LARS (per-tensor trust ratios) or L-BFGS (a closure over all parameters) do not."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 7, generator=gen)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    whole = nn.Parameter(start.clone())
    halves = [nn.Parameter(start.reshape(-1)[:17].clone()), nn.Parameter(start.reshape(-1)[17:].clone())]
    try:
        opt_whole = optimizer_class([whole], **optimizer_kwargs)
        opt_halves = optimizer_class(halves, **optimizer_kwargs)
        for g in grads:
            whole.grad = g.clone()
            halves[0].grad, halves[1].grad = g.reshape(-1)[:17].clone(), g.reshape(-1)[17:].clone()
            opt_whole.step()
            opt_halves.step()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"optimizer_class {optimizer_class.__name__} with optimizer_kwargs {optimizer_kwargs} could not run a "
            f"probe step ({type(e).__name__}: {e}); ZeroOptimizer needs an elementwise torch.optim.Optimizer that "
            f"steps without a closure"
        ) from e
    joined = torch.cat([h.detach() for h in halves])
    shapes_ok = all(
        not isinstance(v, Tensor) or v.dim() == 0 or v.shape == h.shape
        for h in halves
        for v in opt_halves.state[h].values()
    )
    if not shapes_ok or not torch.allclose(joined, whole.detach().reshape(-1), rtol=1e-5, atol=1e-7):
        raise ValueError(
            f"optimizer_class {optimizer_class.__name__} is not elementwise: updating a tensor in two pieces gives "
            f"a different result than updating it whole (max difference "
            f"{float((joined - whole.detach().reshape(-1)).abs().max()):.3g}), so its state cannot be sharded by "
            f"slices of a flat buffer. Use an elementwise optimizer (SGD, Adam, AdamW, Adagrad, RMSprop, ...)"
        )


class ZeroOptimizer(torch.optim.Optimizer):
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
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise ValueError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        if isinstance(optimizer_class, type) and issubclass(optimizer_class, ZeroOptimizer):
            raise ValueError("optimizer_class cannot be ZeroOptimizer itself")
        if stage not in (1, 2, 3) or isinstance(stage, bool):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        if not isinstance(offload, bool):
            raise ValueError(f"offload must be True or False, got {offload!r}")
        if param_dtype is not None and param_dtype not in HALF_DTYPES:
            raise ValueError(
                f"param_dtype must be None, torch.float16 or torch.bfloat16 (half-precision compute with fp32 "
                f"master weights), got {param_dtype!r}"
            )
        if not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)):
            raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
        refuse_meta(model, "model")
        groups = parse_groups(model, param_groups)
        devices = {p.device for _, named in groups for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
        for _, named in groups:
            for names, p in named:
                if not p.is_floating_point():
                    raise ValueError(f"parameter {names[0]!r} has dtype {p.dtype}; ZeroOptimizer needs floating point")
        _probe_elementwise(optimizer_class, optimizer_kwargs)
        group = Group.resolve(process_group)
        device = devices.pop()
        scaler = LossScale(loss_scale, init_scale=init_scale, growth_factor=growth_factor,
                           backoff_factor=backoff_factor, growth_interval=growth_interval, device=device)
        check_replicas_agree(model, group.process_group if group.distributed else None, "model")

        self.stage = stage
        self.offload = offload
        self.param_dtype = param_dtype
        self.module = model
        self.device = device
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
        if stage == 1:
            self._reduction = WholeBuffer(self._flats, self._where, group, offload)
        else:
            self._reduction = Buckets(self._flats, self._where, group, offload, self._bucket_bytes, device)
        self._gathering = Gathering(model, self._flats, self._where, group, device, names) if stage == 3 else None
        trainable = [p for flat in self._flats for p in flat.params]
        self._stand_ins = [(p, sharded_grad(p)) for p in trainable]  # what p.grad shows after backward
        self._hooks: list[Any] = [p.register_hook(partial_clear(p)) for p in trainable]
        self._grad_hooks = GradReadyHooks(trainable, self._on_grad_ready, self._end_of_backward,
                                          on_start=self._start_backward)
        self._require_sync = True
        self._syncing = True
        self._reduced = False
        self._found_inf = False
        self._unscaled = False
        self._norm_cache: tuple[Tensor, list[int]] | None = None  # (2-norm, versions of the master grads)

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
        if self.stage < 3:
            buffer = compute
            for p, slot in zip(params, layout.slots, strict=True):
                p.data = buffer[slot.offset : slot.end].view(slot.shape)
        else:
            buffer = compute[start : start + layout.shard_numel].clone()  # the parameters get storage in gather.py
        own = buffer[start : start + owned] if self.stage < 3 else buffer[:owned]
        master_is_view = self.param_dtype is None and not self.offload
        if master_is_view:
            master = own
        else:
            master = self._maybe_pin(full[start : start + owned].to(self._host_device(), copy=True))
        grads = None
        if self.stage == 1:
            grads = torch.zeros(layout.padded_numel, dtype=layout.dtype, device=self.device)
        elif not self.offload:
            grads = torch.zeros(layout.shard_numel, dtype=layout.dtype, device=self.device)
        host_grad = self._maybe_pin(torch.zeros_like(master)) if self.offload else None
        return FlatBuffers(layout, params, buffer, grads, master, master_is_view, host_grad)

    def _host_device(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    def _maybe_pin(self, t: Tensor) -> Tensor:
        if self.offload and self.device.type == "cuda":
            return t.pin_memory()
        return t

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
        if self.stage != 1:
            raise RuntimeError(f"no_sync() is for stage 1; stage {self.stage} reduces each gradient bucket during "
                               f"backward and keeps only this rank's slice (as DeepSpeed does)")
        previous = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = previous

    def _start_backward(self) -> None:
        self._syncing = self._require_sync
        if self._reduced:  # a further backward before step(): its gradients add to the reduced ones
            self._reduced = False
            self._norm_cache = None

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

    @torch.no_grad()
    def _after_reduction(self) -> None:
        """Give every master slice its averaged gradient, then one all-reduce of [inf/NaN seen, sum of squares]."""
        for flat in self._flats:
            own = self._reduction.owned(flat)
            flat.master.grad = own if own.dtype == flat.master.dtype and own.device == flat.master.device else (
                own.to(flat.master.device, flat.master.dtype))
        grads = self._master_grads()
        found = torch.zeros((), dtype=torch.float32, device=self._host_device())
        unscale_and_check_(grads, torch.ones((), dtype=torch.float32, device=found.device), found)
        squares = self._local_power_sum(grads, 2.0)
        packed = torch.stack([found.to(squares), squares])  # (2,) in the norm's dtype
        packed = self._all_reduce(packed, dist.ReduceOp.SUM)
        self._found_inf = bool(packed[0] > 0)
        if self._found_inf and not found:
            # GradScaler decides from each rank's own gradients: make this rank's slice say what the group saw,
            # so that every rank skips the step and backs off its scale together.
            for g in grads:
                if g.numel():
                    g.view(-1)[0] = math.nan
                    break
        self._norm_cache = (packed[1].sqrt(), self._versions(grads))
        self._reduced = True
        self._unscaled = False

    def _master_grads(self) -> list[Tensor]:
        return [flat.master.grad for flat in self._flats]

    @staticmethod
    def _versions(grads: list[Tensor]) -> list[int]:
        return [g._version for g in grads]

    def _local_power_sum(self, grads: list[Tensor], norm_type: float) -> Tensor:
        """sum |g|^p over this rank's slices (max |g| for p = inf), in float32 or the gradients' wider dtype (a
        float64 run keeps a float64 norm: its clipping coefficient must not round to float32)."""
        nonempty = [g for g in grads if g.numel()]
        if not nonempty:
            return torch.zeros((), dtype=torch.float32, device=self._host_device())
        norms = torch.stack([n.to(torch.promote_types(n.dtype, torch.float32))
                             for n in torch._foreach_norm(nonempty, norm_type)])
        return norms.max() if norm_type == math.inf else norms.pow(norm_type).sum()

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        """All-reduce a few numbers, on the device the backend needs (NCCL: the GPU, offloaded values included)."""
        if not self.group.active:
            return t
        comm = self.device if self.group.backend == "nccl" else t.device
        moved = t.to(comm)
        self.group.all_reduce(moved, op)
        return moved.to(t.device)

    def _unscale(self) -> None:
        """Divide the masters' gradients by the loss scale S, once per step (nothing to do when S = 1)."""
        if self._unscaled:
            return
        self._unscaled = True
        if self.scaler.dynamic or float(self.scaler.scale) != 1.0:
            grads = self._master_grads()
            in_sync = self._norm_cache is not None and self._norm_cache[1] == self._versions(grads)
            inv = self.scaler.inv_scale()
            unscale_and_check_(grads, inv.to(self._host_device()),
                               torch.zeros((), dtype=torch.float32, device=self._host_device()))
            if in_sync:
                self._norm_cache = (self._norm_cache[0] * inv.to(self._norm_cache[0].device), self._versions(grads))

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Scale the averaged gradients so that their global norm is at most max_norm; return the norm before.

        Each rank holds the gradient of its own slice, so the norm is that of optimized.clipping.global_grad_norm
        over the slices: sum_ranks sum_slice |g|^p, all-reduced, then the p-th root (max for p = inf). The 2-norm
        comes from the all-reduce that checked for inf/NaN at the end of backward when the gradients are unchanged
        since (no other collective)."""
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
        self._unscale()
        grads = self._master_grads()
        if norm_type == 2.0 and self._norm_cache is not None and self._norm_cache[1] == self._versions(grads):
            total = self._norm_cache[0]
        else:
            total = self._global_norm(grads, norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)})")
        clip_grads_with_norm_(grads, max_norm, total)
        return total

    def _global_norm(self, grads: list[Tensor], norm_type: float) -> Tensor:
        pg = self.process_group if self.group.distributed else None
        if self.group.backend == "nccl" and grads and grads[0].device != self.device:
            # Offloaded gradients live on the CPU but NCCL reduces on the GPU. ||g||_p is the p-norm of the
            # per-slice norms, so moving those few numbers is enough.
            grads = [torch.stack(torch._foreach_norm(grads, norm_type)).to(self.device)]
        return global_grad_norm(grads, norm_type=norm_type, process_group=pg)

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
        self._unscale()
        found = self._found_inf
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
        self._found_inf = False
        self._unscaled = False
        self._norm_cache = None

    # --- state ---------------------------------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "stage": self.stage,
            "world_size": self.world_size,
            "rank": self.rank,
            "param_dtype": None if self.param_dtype is None else str(self.param_dtype).removeprefix("torch."),
            "optimizer": self._optimizer_name,
        }

    def layouts(self) -> list[FlatLayout]:
        return [flat.layout for flat in self._flats]

    def state_dict(self) -> dict:
        """This rank's shard: its master slices, the optimizer state of those slices, the hyperparameters, the
        layout they belong to, and the replicated model state (frozen parameters, buffers). Load it with
        load_state_dict at the same world size and rank; save_checkpoint/load_checkpoint reshard."""
        inner = self.optimizer.state_dict()
        return {
            "zero": self._meta(),
            "layouts": [flat.layout.describe() for flat in self._flats],
            "group_params": [list(names) for names in self._group_names],
            "masters": [flat.master.detach().clone() for flat in self._flats],  # a view would save its whole base
            "state": [_clone_state(inner["state"].get(i, {})) for i in range(len(self._flats))],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]],
            "state_dict_keys": list(self.module.state_dict(keep_vars=True)),
            "replicated": {name: t.detach().clone() for name, t in self._replicated().items()},
            "loss_scale": self.scaler.state_dict(),
        }

    def check_compatible(self, meta: dict, layouts: list[dict], replicated: Iterable[str], source: str) -> None:
        """Raise ValueError naming what differs between a saved optimizer (meta, layouts) and this one."""
        mine = self._meta()
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: format version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
        for key in ("stage", "param_dtype", "optimizer"):
            if meta.get(key) != mine[key]:
                raise ValueError(
                    f"{source}: saved with {key}={meta.get(key)!r}, this optimizer has {key}={mine[key]!r}"
                )
        ours = [flat.layout.describe() for flat in self._flats]

        def by_name(lays: list[dict]) -> dict[str, tuple]:
            return {p["names"][0]: (p["shape"], ld["dtype"], ld["group"]) for ld in lays for p in ld["params"]}

        saved, current = by_name(layouts), by_name(ours)
        for name, (shape, dtype, group) in current.items():
            if name not in saved:
                raise ValueError(f"{source}: trainable parameter {name!r} of this model is not in the checkpoint "
                                 f"(a checkpoint of another model?)")
            if saved[name] != (shape, dtype, group):
                s = saved[name]
                raise ValueError(f"{source}: parameter {name!r} was saved with shape {s[0]}, dtype {s[1]}, group "
                                 f"{s[2]}; this model has shape {shape}, dtype {dtype}, group {group}")
        for name in saved:
            if name not in current:
                raise ValueError(f"{source}: parameter {name!r} is in the checkpoint but is not a trainable "
                                 f"parameter of this model (a checkpoint of another model?)")
        if layouts != ours:
            raise ValueError(f"{source}: the same parameters in another order or grouping than in this model")
        missing = sorted(set(self._replicated()) - set(replicated))
        if missing:
            raise ValueError(f"{source}: frozen parameter or buffer {missing[0]!r} is not in the checkpoint")

    def _replicated(self) -> dict[str, Tensor]:
        """Model state every rank holds whole: frozen parameters and buffers, by state_dict name."""
        return {k: v for k, v in self.module.state_dict(keep_vars=True).items() if id(v) not in self._where}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's shard written by state_dict() at the same world size; see load_checkpoint to reshard.

        Everything is checked (check_state_dict) before anything changes."""
        self.check_state_dict(state_dict)
        inner_groups = self.optimizer.state_dict()["param_groups"]
        with torch.no_grad():
            for flat, master in zip(self._flats, state_dict["masters"], strict=True):
                flat.master.copy_(master)
            replicated = self._replicated()
            for name, value in state_dict["replicated"].items():
                if name in replicated:
                    replicated[name].copy_(value)
        self.optimizer.load_state_dict({
            "state": {i: s for i, s in enumerate(state_dict["state"]) if s},
            "param_groups": [{**saved, "params": ours["params"]}
                             for saved, ours in zip(state_dict["param_groups"], inner_groups, strict=True)],
        })
        if "loss_scale" in state_dict:
            self.scaler.load_state_dict(state_dict["loss_scale"])
        self._publish()
        self.zero_grad()

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ValueError naming what in `state_dict` does not fit this optimizer (load_state_dict's checks)."""
        for key in ("zero", "layouts", "replicated", "masters", "state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry (not a ZeroOptimizer.state_dict()?)")
        meta = state_dict["zero"]
        self.check_compatible(meta, state_dict["layouts"], state_dict["replicated"], "state_dict")
        if (meta["world_size"], meta["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"state_dict: saved by rank {meta['rank']} of {meta['world_size']}, this is rank {self.rank} of "
                f"{self.world_size}; use save_checkpoint/load_checkpoint to load at another world size"
            )
        for flat, master in zip(self._flats, state_dict["masters"], strict=True):
            owned = flat.layout.owned_numel(self.rank)
            if tuple(master.shape) != (owned,):
                raise ValueError(f"state_dict: master slice of {flat.layout.slots[0].name!r}... has shape "
                                 f"{tuple(master.shape)}, expected ({owned},)")
        if len(state_dict["masters"]) != len(self._flats) or len(state_dict["state"]) != len(self._flats):
            raise ValueError(f"state_dict: {len(state_dict['masters'])} master slices and {len(state_dict['state'])} "
                             f"state entries, this optimizer has {len(self._flats)} flat buffers")
        for flat, state in zip(self._flats, state_dict["state"], strict=True):
            owned = flat.layout.owned_numel(self.rank)
            for k, v in state.items():
                if isinstance(v, Tensor) and v.dim() == 1 and tuple(v.shape) != (owned,):
                    raise ValueError(f"state_dict: optimizer state {k!r} of the flat buffer starting at "
                                     f"{flat.layout.slots[0].name!r} has shape {tuple(v.shape)}, expected ({owned},)")
        replicated = self._replicated()
        for name, value in state_dict["replicated"].items():
            if name in replicated and tuple(value.shape) != tuple(replicated[name].shape):
                raise ValueError(f"state_dict: {name!r} has shape {tuple(value.shape)}, the model's has "
                                 f"{tuple(replicated[name].shape)}")
        inner_groups = self.optimizer.state_dict()["param_groups"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(inner_groups):
            raise ValueError(f"state_dict: {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(inner_groups)}")

    @torch.no_grad()
    def _publish(self) -> None:
        """Copy the master slices into the model's parameters (and all-gather them in stages 1-2)."""
        for flat in self._flats:
            if not flat.master_is_view:
                start, owned = flat.layout.shard_start(self.rank), flat.layout.owned_numel(self.rank)
                own = flat.buffer[start : start + owned] if self.stage < 3 else flat.buffer[:owned]
                own.copy_(flat.master)
            if self.stage < 3:
                s, start = flat.layout.shard_numel, flat.layout.shard_start(self.rank)
                self.group.all_gather_into(flat.buffer, flat.buffer[start : start + s])

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
        if self.offload:
            out["host_grads"] += [flat.host_grad for flat in self._flats]
            out["host_optimizer"] += masters + state
        else:
            out["optimizer"] += masters + state
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


def _clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}


