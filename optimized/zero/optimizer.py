"""ZeRO stages 1, 2 and 3 and ZeRO-Offload as a torch.optim.Optimizer (ZeRO, Rajbhandari et al. 2020,
arXiv 1910.02054; ZeRO-Offload, Ren et al. 2021, arXiv 2101.06840).

    opt = ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3, weight_decay=0.1)
    for idx, targets in loader:                 # this rank's slice of every batch
        _, loss = model(idx, targets)           # the local mean: gradients are averaged over ranks, as DDP does
        loss.backward()
        opt.clip_grad_norm_(1.0)                # the norm of the whole averaged gradient
        opt.step()                              # consumes the gradients (as DeepSpeed's engine.step does)

Every rank runs the same model on its own data. The trainable parameters of each (parameter group, dtype) form one
flat buffer, padded to a multiple of the world size Nd; rank r owns the r-th slice (partition.py). Each stage
shards one more model state:
    stage 1  optimizer state (and the fp32 master slice when `param_dtype` is half) for the owned slice only.
             Gradients stay whole on every rank; at step time each owner's slice is reduced to its owner,
             the owner updates it and the updated slices are all-gathered: reduce-scatter Ψ + all-gather Ψ.
    stage 2  the gradients too: as backward produces them, gradients are copied into buckets of `bucket_cap_mb`,
             each full bucket is reduced to the owners of its elements and freed; a rank keeps only its slice.
    stage 3  the parameters too: a rank stores only its slice. A module's parameters are gathered (broadcast
             from their owners) just before its forward and again just before its backward, and freed (storage
             resized to 0) right after: 2Ψ gathered + Ψ reduced per step.
    offload  the master slice, the optimizer state and the step move to the CPU; reduced gradient slices are
             copied there, updated slices copied back.
Mixed precision (`param_dtype=torch.bfloat16` or `torch.float16`): the model computes in half precision, the
optimizer updates an fp32 master copy of the owned slice (the paper's 2 + 2 + 12 bytes per parameter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from optimized.clipping import clip_grads_with_norm_, global_grad_norm
from optimized.zero.partition import FlatLayout, Slot

FORMAT_VERSION = 1
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class _Flat:
    """The runtime buffers of one FlatLayout on this rank."""

    layout: FlatLayout
    params: list[nn.Parameter]
    """The model's parameters, in slot order."""
    buffer: Tensor
    """Parameter values in the compute dtype: the whole padded flat buffer (stages 1-2) or this rank's slice (3)."""
    grads: Tensor | None
    """Gradients in the compute dtype: the whole padded buffer (stage 1), this rank's slice (stages 2-3), or None
    (stages 2-3 with offload, where reduced slices go straight to `host_grad`)."""
    master: Tensor
    """What the inner optimizer updates: the owned real elements, fp32 when the compute dtype is half."""
    master_is_view: bool
    """The master is a view of `buffer` (no separate copy: same dtype, no offload)."""
    host_grad: Tensor | None = None
    """Offload: the fp32 gradient of the owned elements, in CPU memory."""


@dataclass
class _Bucket:
    """A contiguous range [lo, hi) of one flat buffer whose gradients are reduced together (stages 2-3)."""

    flat: int
    lo: int
    hi: int
    params: list[nn.Parameter]
    buffer: Tensor | None = None
    ready: set[int] = field(default_factory=set)


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

    model: the same nn.Module on every rank (its trainable parameters are synchronised from rank 0). The
        optimizer takes them over: stages 1-2 re-point every parameter into a flat buffer, stage 3 frees them.
    optimizer_class, **optimizer_kwargs: the optimizer that updates each rank's slice, e.g. torch.optim.AdamW, lr=.
    stage: 1, 2 or 3. process_group: the data-parallel group (default: the default group; without an initialised
        process group the optimizer runs as a single rank).
    offload: master slice, optimizer state and step on the CPU. param_dtype: None (compute in the parameters' own
        dtype, the optimizer updates them directly) or torch.float16 / torch.bfloat16 (compute in half precision,
        fp32 master slices). bucket_cap_mb: MiB per gradient bucket (stages 2-3).
    param_groups: optional list of dicts {"params": [parameters of model], **options} (e.g. no weight decay on
        biases), each trainable parameter in exactly one; default: one group of all trainable parameters.

    A trainable parameter that gets no gradient in a step counts as a zero gradient (as in DeepSpeed), and every
    rank must compute gradients for the same parameters. Stage 3 needs each parameter to be used only inside the
    forward of the module(s) that register it. Frozen parameters (requires_grad=False) stay whole on every rank.
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
        groups = _parse_groups(model, param_groups)
        devices = {p.device for _, named in groups for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
        for _, named in groups:
            for names, p in named:
                if not p.is_floating_point():
                    raise ValueError(f"parameter {names[0]!r} has dtype {p.dtype}; ZeroOptimizer needs floating point")
        _probe_elementwise(optimizer_class, optimizer_kwargs)

        self.stage = stage
        self.offload = offload
        self.param_dtype = param_dtype
        self.module = model
        self.device = devices.pop()
        self._distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self._distributed:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        self.process_group = process_group if process_group is not None or not self._distributed else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group) if self._distributed else 1
        self.rank = dist.get_rank(self.process_group) if self._distributed else 0
        self._bucket_bytes = int(bucket_cap_mb * 2**20)
        self._optimizer_name = f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"
        self._group_options = [options for options, _ in groups]
        self._group_names = [[names[0] for names, _ in named] for _, named in groups]

        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        self._frozen = dict(frozen)
        with torch.no_grad():
            for _, p in frozen:
                self._broadcast(p.data, 0)
                if param_dtype is not None and p.is_floating_point():
                    p.data = p.data.to(param_dtype)
            self._flats = [self._build_flat(layout, params) for layout, params in _layouts(groups, param_dtype,
                                                                                         self.world_size)]
        self._where: dict[int, tuple[_Flat, Slot]] = {
            id(p): (flat, slot) for flat in self._flats for p, slot in zip(flat.params, flat.layout.slots, strict=True)
        }
        self._grads_ready = False
        self._backward_queued = False
        self._hooks: list[Any] = []
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        if stage >= 2:
            self._build_buckets()
            for flat in self._flats:
                for p in flat.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        self._gathered: set[int] = set()
        self._pinned = False
        if stage == 3:
            self._register_module_hooks(model)

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

    def _build_flat(self, layout: FlatLayout, params: list[nn.Parameter]) -> _Flat:
        """Copy the parameters into a padded flat buffer, keep what this rank stores, re-point the parameters."""
        start, owned = layout.shard_start(self.rank), layout.owned_numel(self.rank)
        source_dtype = torch.float32 if self.param_dtype is not None else layout.dtype
        full = torch.zeros(layout.padded_numel, dtype=source_dtype, device=self.device)
        for p, slot in zip(params, layout.slots, strict=True):
            full[slot.offset : slot.end].copy_(p.detach().reshape(-1))
        self._broadcast(full, 0)  # every rank starts from rank 0's values, as DDP does
        compute = full.to(layout.dtype)  # the same tensor when no cast is needed
        if self.stage < 3:
            buffer = compute
            for p, slot in zip(params, layout.slots, strict=True):
                p.data = buffer[slot.offset : slot.end].view(slot.shape)
        else:
            buffer = compute[start : start + layout.shard_numel].clone()
            for p, slot in zip(params, layout.slots, strict=True):
                p.data = torch.empty(slot.shape, dtype=layout.dtype, device=self.device)
                p.untyped_storage().resize_(0)
        own = buffer[start : start + owned] if self.stage < 3 else buffer[:owned]
        master_is_view = self.param_dtype is None and not self.offload
        if master_is_view:
            master = own
        else:
            master = full[start : start + owned].to(self._host_device(), copy=True)
            master = self._maybe_pin(master)
        grads = None
        if self.stage == 1:
            grads = torch.zeros(layout.padded_numel, dtype=layout.dtype, device=self.device)
            for p, slot in zip(params, layout.slots, strict=True):
                p.grad = grads[slot.offset : slot.end].view(slot.shape)
        elif not self.offload:
            grads = torch.zeros(layout.shard_numel, dtype=layout.dtype, device=self.device)
        host_grad = self._maybe_pin(torch.zeros_like(master)) if self.offload else None
        return _Flat(layout, params, buffer, grads, master, master_is_view, host_grad)

    def _host_device(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    def _maybe_pin(self, t: Tensor) -> Tensor:
        if self.offload and self.device.type == "cuda":
            return t.pin_memory()
        return t

    def _build_buckets(self) -> None:
        """Buckets in reverse model order (roughly the order backward produces gradients), one flat at a time."""
        for i, flat in enumerate(self._flats):
            cap = max(1, self._bucket_bytes // flat.buffer.element_size())
            current: list[tuple[nn.Parameter, Slot]] = []
            for p, slot in reversed(list(zip(flat.params, flat.layout.slots, strict=True))):
                if current and current[0][1].end - slot.offset > cap:
                    self._add_bucket(i, current)
                    current = []
                current.append((p, slot))
            if current:
                self._add_bucket(i, current)

    def _add_bucket(self, flat: int, members: list[tuple[nn.Parameter, Slot]]) -> None:
        bucket = _Bucket(flat, members[-1][1].offset, members[0][1].end, [p for p, _ in members])
        self._buckets.append(bucket)
        for p, _ in members:
            self._bucket_of[id(p)] = bucket

    def _register_module_hooks(self, model: nn.Module) -> None:
        for module in model.modules():
            own = [p for p in module._parameters.values() if p is not None and id(p) in self._where]
            if own:
                self._hooks.append(module.register_forward_pre_hook(partial(self._before_forward, own)))
                self._hooks.append(module.register_forward_hook(partial(self._after_forward, own)))

    # --- collectives ---------------------------------------------------------------------------------------------

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.process_group, group_rank)

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        if self._distributed and self.world_size > 1:
            dist.broadcast(tensor, src=self._global_rank(src), group=self.process_group)

    def _reduce(self, tensor: Tensor, dst: int) -> None:
        if self._distributed and self.world_size > 1:
            dist.reduce(tensor, dst=self._global_rank(dst), group=self.process_group)

    def _all_gather_flat(self, flat: _Flat) -> None:
        """Every rank's updated slice to every rank: all-gather into the flat buffer, in place."""
        if not (self._distributed and self.world_size > 1):
            return
        s, start = flat.layout.shard_numel, flat.layout.shard_start(self.rank)
        mine = flat.buffer[start : start + s]
        if hasattr(dist, "all_gather_single"):
            dist.all_gather_single(flat.buffer, mine, group=self.process_group)
        else:  # torch < 2.10
            dist.all_gather_into_tensor(flat.buffer, mine, group=self.process_group)

    # --- stage 3: gather before use, free after ------------------------------------------------------------------

    def _gather(self, params: Iterable[nn.Parameter]) -> None:
        """Give each parameter its full storage back and fill it: each owner broadcasts its piece."""
        for p in params:
            if id(p) in self._gathered:
                continue
            flat, slot = self._where[id(p)]
            layout = flat.layout
            p.untyped_storage().resize_(slot.numel * p.element_size())
            full = p.data.view(-1)  # .data: writing here must not bump the version autograd checks
            for r, a, b in layout.pieces(slot.offset, slot.end):
                piece = full[a - slot.offset : b - slot.offset]
                if r == self.rank:
                    piece.copy_(flat.buffer[a - layout.shard_start(r) : b - layout.shard_start(r)])
                self._broadcast(piece, r)
            self._gathered.add(id(p))

    def _release(self, params: Iterable[nn.Parameter]) -> None:
        if self._pinned:
            return
        for p in params:
            if id(p) in self._gathered:
                p.untyped_storage().resize_(0)  # autograd's saved views share this storage: they are freed too
                self._gathered.discard(id(p))

    def _before_forward(self, params: list[nn.Parameter], module: nn.Module, args: Any) -> None:
        self._gather(params)

    def _after_forward(self, params: list[nn.Parameter], module: nn.Module, args: Any, output: Any) -> None:
        self._release(params)
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if isinstance(t, Tensor) and t.requires_grad:
                    t.register_hook(partial(self._before_backward, params))

    def _before_backward(self, params: list[nn.Parameter], grad: Tensor) -> None:
        self._gather(params)

    @contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Stage 3: every parameter whole inside the block (e.g. to read model.state_dict()); no-op otherwise.

        Read-only: changes made inside are lost when the parameters are freed at the end."""
        if self.stage < 3 or self._pinned:
            yield
            return
        self._gather(p for flat in self._flats for p in flat.params)
        self._pinned = True
        try:
            yield
        finally:
            self._pinned = False
            self._release([p for flat in self._flats for p in flat.params])

    # --- gradients -----------------------------------------------------------------------------------------------

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Stages 2-3, called by autograd once p.grad holds this backward's gradient: bucket it, free it."""
        if not self._backward_queued:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        bucket = self._bucket_of[id(p)]
        flat, slot = self._where[id(p)]
        if bucket.buffer is None:
            bucket.buffer = torch.zeros(bucket.hi - bucket.lo, dtype=flat.layout.dtype, device=self.device)
        bucket.buffer[slot.offset - bucket.lo : slot.end - bucket.lo].add_(p.grad.reshape(-1))
        p.grad = None
        bucket.ready.add(id(p))
        if self.stage == 3:
            self._release([p])
        if len(bucket.ready) == len(bucket.params):
            self._reduce_bucket(bucket)

    def _end_of_backward(self) -> None:
        """Reduce the buckets some of whose parameters got no gradient; free what stage 3 still holds."""
        for bucket in self._buckets:
            if bucket.buffer is not None:
                self._reduce_bucket(bucket)
        if self.stage == 3:
            self._release([p for flat in self._flats for p in flat.params])
        self._backward_queued = False

    def _reduce_bucket(self, bucket: _Bucket) -> None:
        """Sum the bucket over ranks, piece by piece to each piece's owner, which averages it into its slice."""
        flat = self._flats[bucket.flat]
        layout = flat.layout
        for r, a, b in layout.pieces(bucket.lo, bucket.hi):
            piece = bucket.buffer[a - bucket.lo : b - bucket.lo]
            self._reduce(piece, r)
            if r == self.rank:
                start = layout.shard_start(r)
                target = flat.host_grad if self.offload else flat.grads
                target[a - start : b - start].add_(piece.div_(self.world_size).to(target.device, target.dtype))
        bucket.buffer = None
        bucket.ready.clear()

    def _adopt_param_grads(self, flat: _Flat) -> None:
        """Stage 1: make every p.grad a view of the flat gradient buffer again (after model.zero_grad(), say)."""
        for p, slot in zip(flat.params, flat.layout.slots, strict=True):
            view = flat.grads[slot.offset : slot.end].view(slot.shape)
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            else:
                continue
            p.grad = view

    def _prepare_grads(self) -> None:
        """Once per step: finish the reduction and give every master slice its averaged gradient."""
        if self._grads_ready:
            return
        for flat in self._flats:
            layout = flat.layout
            start, owned = layout.shard_start(self.rank), layout.owned_numel(self.rank)
            if self.stage == 1:
                self._adopt_param_grads(flat)
                for r in range(self.world_size):
                    lo, hi = layout.owned_range(r)
                    if hi > lo:
                        self._reduce(flat.grads[lo:hi], r)
                own = flat.grads[start : start + owned]
                own.div_(self.world_size)
                if self.offload:
                    flat.host_grad.copy_(own)
            else:
                own = flat.grads[:owned] if flat.grads is not None else None
            if self.offload:
                flat.master.grad = flat.host_grad
            elif own.dtype == flat.master.dtype:
                flat.master.grad = own
            else:
                flat.master.grad = own.to(flat.master.dtype)
        self._grads_ready = True

    def _master_grads(self) -> list[Tensor]:
        return [flat.master.grad for flat in self._flats]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Scale the averaged gradients so that their global norm is at most max_norm; return the norm before.

        Each rank holds the gradient of its own slice, so the norm is that of optimized.clipping.global_grad_norm
        over the slices: sum_ranks sum_slice |g|^p, all-reduced, then the p-th root (max for p = inf)."""
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not max_norm > 0 or math.isnan(max_norm):
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not (norm_type >= 1.0 or norm_type == math.inf):
            raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type}")
        self._prepare_grads()
        grads = self._master_grads()
        total = self._global_norm(grads, norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)})")
        clip_grads_with_norm_(grads, max_norm, total)
        return total

    def _global_norm(self, grads: list[Tensor], norm_type: float) -> Tensor:
        pg = self.process_group if self._distributed else None
        comm_device = self.device if self._distributed and dist.get_backend(pg) == "nccl" else None
        if comm_device is not None and grads and grads[0].device != comm_device:
            # Offloaded gradients live on the CPU but NCCL reduces on the GPU. ||g||_p is the p-norm of the
            # per-slice norms, so moving those few numbers is enough.
            grads = [torch.stack(torch._foreach_norm(grads, norm_type)).to(comm_device)]
        return global_grad_norm(grads, norm_type=norm_type, process_group=pg)

    # --- step ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's slices with the averaged gradients, then make the new values visible to the model.

        Consumes the gradients: they are zeroed for the next step (as DeepSpeed's engine.step does)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare_grads()
        self.optimizer.step()
        self._publish()
        self.zero_grad()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers (which persist: `set_to_none` only affects stage 2-3 model .grad, always None)."""
        for flat in self._flats:
            if flat.grads is not None:
                flat.grads.zero_()
            if flat.host_grad is not None:
                flat.host_grad.zero_()
            flat.master.grad = None
            for p, slot in zip(flat.params, flat.layout.slots, strict=True):
                p.grad = flat.grads[slot.offset : slot.end].view(slot.shape) if self.stage == 1 else None
        for bucket in self._buckets:
            bucket.buffer = None
            bucket.ready.clear()
        self._grads_ready = False

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
        layout they belong to, and the frozen parameters. Load it with load_state_dict at the same world size and
        rank; save_checkpoint/load_checkpoint reshard to another world size."""
        inner = self.optimizer.state_dict()
        return {
            "zero": self._meta(),
            "layouts": [flat.layout.describe() for flat in self._flats],
            "group_params": [list(names) for names in self._group_names],
            "masters": [flat.master.detach().clone() for flat in self._flats],  # a view would save its whole base
            "state": [_clone_state(inner["state"].get(i, {})) for i in range(len(self._flats))],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]],
            "frozen": {name: p.detach().clone() for name, p in self._frozen.items()},
        }

    def check_compatible(self, meta: dict, layouts: list[dict], frozen: Iterable[str], source: str) -> None:
        """Raise ValueError naming what differs between a saved optimizer (meta, layouts) and this one."""
        mine = self._meta()
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: format version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
        for key in ("stage", "param_dtype", "optimizer"):
            if meta.get(key) != mine[key]:
                raise ValueError(f"{source}: saved with {key}={meta.get(key)!r}, this optimizer has {key}={mine[key]!r}")
        ours = [flat.layout.describe() for flat in self._flats]
        saved_params = {tuple(p["names"]): (p["shape"], ld["dtype"], ld["group"]) for ld in layouts for p in ld["params"]}
        our_params = {tuple(p["names"]): (p["shape"], ld["dtype"], ld["group"]) for ld in ours for p in ld["params"]}
        for names, (shape, dtype, group) in our_params.items():
            if names not in saved_params:
                raise ValueError(f"{source}: parameter {names[0]!r} of this model is not in the checkpoint "
                                 f"(a checkpoint of another model?)")
            if saved_params[names] != (shape, dtype, group):
                s = saved_params[names]
                raise ValueError(f"{source}: parameter {names[0]!r} was saved with shape {s[0]}, dtype {s[1]}, group "
                                 f"{s[2]}; this model has shape {shape}, dtype {dtype}, group {group}")
        extra = set(saved_params) - set(our_params)
        if extra:
            raise ValueError(f"{source}: parameter {sorted(extra)[0][0]!r} is in the checkpoint but not trainable in "
                             f"this model (a checkpoint of another model?)")
        if [(ld["group"], ld["dtype"], ld["numel"]) for ld in layouts] != [
            (ld["group"], ld["dtype"], ld["numel"]) for ld in ours
        ] or layouts != ours:
            raise ValueError(f"{source}: the parameters are in another order than in this model")
        missing = set(self._frozen) - set(frozen)
        if missing:
            raise ValueError(f"{source}: frozen parameter {sorted(missing)[0]!r} is not in the checkpoint")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's shard written by state_dict() at the same world size; see load_checkpoint to reshard."""
        meta = state_dict["zero"]
        self.check_compatible(meta, state_dict["layouts"], state_dict["frozen"], "state_dict")
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
        inner_groups = self.optimizer.state_dict()["param_groups"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(inner_groups):
            raise ValueError(f"state_dict: {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(inner_groups)}")
        with torch.no_grad():
            for flat, master in zip(self._flats, state_dict["masters"], strict=True):
                flat.master.copy_(master)
            for name, value in state_dict["frozen"].items():
                if name in self._frozen:
                    self._frozen[name].copy_(value)
        self.optimizer.load_state_dict({
            "state": {i: s for i, s in enumerate(state_dict["state"]) if s},
            "param_groups": [{**saved, "params": ours["params"]}
                             for saved, ours in zip(saved_groups, inner_groups, strict=True)],
        })
        self._publish()
        self.zero_grad()

    @torch.no_grad()
    def _publish(self) -> None:
        """Copy the master slices into the model's parameters (and all-gather them in stages 1-2)."""
        for flat in self._flats:
            if not flat.master_is_view:
                start, owned = flat.layout.shard_start(self.rank), flat.layout.owned_numel(self.rank)
                own = flat.buffer[start : start + owned] if self.stage < 3 else flat.buffer[:owned]
                own.copy_(flat.master)
            if self.stage < 3:
                self._all_gather_flat(flat)

    def model_state_tensors(self) -> dict[str, list[Tensor]]:
        """Every tensor of model state this rank holds, by kind, for memory accounting (unique storages count).

        params / grads / optimizer: in accelerator memory; host_grads / host_optimizer: in CPU memory (offload)."""
        out: dict[str, list[Tensor]] = {k: [] for k in ("params", "grads", "optimizer", "host_grads",
                                                        "host_optimizer")}
        out["params"] += [flat.buffer for flat in self._flats] + list(self._frozen.values())
        out["params"] += [p for flat in self._flats for p in flat.params]  # stage 3: 0 bytes unless gathered
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

    def save_checkpoint(self, path) -> None:
        """Write this rank's shard and (rank 0) the manifest into directory `path`; every rank must call it."""
        from optimized.zero.checkpoint import save_checkpoint

        save_checkpoint(self, path)

    def load_checkpoint(self, path) -> None:
        """Load a checkpoint written at any world size, re-partitioned for this one; every rank must call it."""
        from optimized.zero.checkpoint import load_checkpoint

        load_checkpoint(self, path)

    def barrier(self) -> None:
        if self._distributed and self.world_size > 1:
            dist.barrier(group=self.process_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not (self._distributed and self.world_size > 1):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out


def _clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def _parse_groups(model: nn.Module, param_groups: list[dict] | None) -> list[tuple[dict, list]]:
    """[(options, [(names, parameter)])]: the trainable parameters by group, deduplicated (tied weights once, with
    all their names), in model order within each group."""
    names_of: dict[int, list[str]] = {}
    order: list[nn.Parameter] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in names_of:
            names_of[id(p)] = []
            order.append(p)
        names_of[id(p)].append(name)
    trainable = [p for p in order if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    if param_groups is None:
        return [({}, [(tuple(names_of[id(p)]), p) for p in trainable])]
    if not isinstance(param_groups, (list, tuple)) or not param_groups:
        raise ValueError(f"param_groups must be a non-empty list of dicts with a 'params' key, got {param_groups!r}")
    position = {id(p): i for i, p in enumerate(order)}
    seen: dict[int, int] = {}
    out = []
    for g, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"param_groups[{g}] must be a dict with a 'params' key, got {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if id(p) not in position:
                raise ValueError(f"param_groups[{g}] holds a tensor that is not a parameter of model")
            if not p.requires_grad:
                raise ValueError(f"param_groups[{g}] holds the frozen parameter {names_of[id(p)][0]!r}")
            if id(p) in seen:
                raise ValueError(f"parameter {names_of[id(p)][0]!r} is in param_groups[{seen[id(p)]}] and "
                                 f"param_groups[{g}]; each parameter must be in exactly one group")
            seen[id(p)] = g
        params.sort(key=lambda p: position[id(p)])
        options = {k: v for k, v in group.items() if k != "params"}
        out.append((options, [(tuple(names_of[id(p)]), p) for p in params]))
    missing = [names_of[id(p)][0] for p in trainable if id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameter {missing[0]!r} is in no group of param_groups "
                         f"({len(missing)} missing); freeze it (requires_grad=False) or add it to a group")
    return out


def _layouts(groups: list[tuple[dict, list]], param_dtype: torch.dtype | None,
             world_size: int) -> list[tuple[FlatLayout, list[nn.Parameter]]]:
    """One FlatLayout per (group, compute dtype), in group order, dtypes in order of first appearance."""
    out = []
    for g, (_, named) in enumerate(groups):
        by_dtype: dict[torch.dtype, list] = {}
        for names, p in named:
            by_dtype.setdefault(param_dtype or p.dtype, []).append((names, p))
        for dtype, members in by_dtype.items():
            layout = FlatLayout.build(g, dtype, [(names, tuple(p.shape)) for names, p in members], world_size)
            out.append((layout, [p for _, p in members]))
    return out
