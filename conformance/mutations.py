"""The mutations `python -m conformance mutate` injects: realistic bugs in optimized/, each one the conformance
checks it names must catch (FAIL a row or crash). Data only; the runner is conformance/mutate.py.

A mutation replaces `original`, which must occur exactly once in `file`, by `replacement`. The runner refuses one
whose snippet is missing or ambiguous, so an edit of optimized/ that moves a snippet turns into a loud error here,
not a mutation that silently tests nothing. Only optimized/ is mutated: reference/ is the spec the checks hold it to.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Mutation:
    """One injected bug."""

    id: str
    """Short unique name (`--only` takes these)."""
    file: str
    """Path under optimized/, relative to the repository root."""
    original: str
    """The exact text replaced; must occur exactly once in `file`."""
    replacement: str
    """What it becomes."""
    description: str
    """The realistic bug, in one line."""
    checks: tuple[str, ...]
    """The conformance checks that must catch it."""
    cpu_env: tuple[tuple[str, str], ...] = ()
    """Environment the suite needs on a CPU-only run to reach the mutated code (TRITON_INTERPRET=1: the Triton
    kernels run only on CUDA or under Triton's interpreter); its baseline runs with the same environment."""

    def __post_init__(self) -> None:
        if not self.file.startswith("optimized/"):
            raise ValueError(f"mutation {self.id!r}: file {self.file!r} is not under optimized/ (reference/ is the "
                             f"spec and is never mutated)")
        if self.original == self.replacement:
            raise ValueError(f"mutation {self.id!r}: replacement equals the original")
        if not self.checks:
            raise ValueError(f"mutation {self.id!r}: names no check that should catch it")


def _m(id: str, file: str, original: str, replacement: str, description: str, *checks: str,
       cpu_env: tuple[tuple[str, str], ...] = ()) -> Mutation:
    return Mutation(id=id, file=f"optimized/{file}", original=original, replacement=replacement,
                    description=description, checks=tuple(checks), cpu_env=cpu_env)


TRITON_INTERPRETER = (("TRITON_INTERPRET", "1"),)


MUTATIONS: tuple[Mutation, ...] = (
    # --- attention -------------------------------------------------------------------------------------------------
    _m("attention-blocked-causal-off-by-one", "attention/blocked.py",
       "hi = (i + p.causal_offset + 1).clamp(0, p.M)",
       "hi = (i + p.causal_offset + 2).clamp(0, p.M)",
       "blocked attention's causal mask lets query i see key i + 1 (off by one: one future token leaks)",
       "attention"),
    _m("attention-triton-causal-off-by-one", "attention/triton/forward.py",
       "last_key = offs_m + causal_offset  # causal: query i sees keys j <= i + offset",
       "last_key = offs_m + causal_offset + 1  # causal: query i sees keys j <= i + offset",
       "the Triton forward kernel's causal mask is one key too wide (j <= i + 1)",
       "attention", cpu_env=TRITON_INTERPRETER),
    _m("attention-blocked-no-rescale", "attention/blocked.py",
       "o_i = alpha.unsqueeze(-1) * o_i + p_tilde @ v_j",
       "o_i = o_i + p_tilde @ v_j",
       "online softmax: the running output is not rescaled by exp(m_old - m_new) when the row max grows",
       "attention"),
    # --- data parallel ---------------------------------------------------------------------------------------------
    _m("dp-missing-average", "data_parallel.py",
       "            bucket.buffer.div_(self.world_size)\n",
       "",
       "DataParallel sums the gradients over ranks instead of averaging them (missing 1/world)",
       "data_parallel"),
    _m("dp-naive-missing-average", "data_parallel.py",
       "            p.grad.div_(self.world_size)\n",
       "",
       "NaiveDataParallel.sync_gradients sums instead of averaging (missing 1/world)",
       "data_parallel"),
    # --- accumulation ----------------------------------------------------------------------------------------------
    _m("accumulation-drop-last", "accumulation.py",
       "for j, batch in enumerate(micro_batches):\n        context = no_sync()",
       "for j, batch in enumerate(micro_batches[:-1]):\n        context = no_sync()",
       "gradient accumulation skips the last micro-batch (an off-by-one loop bound)",
       "accumulation"),
    _m("accumulation-microbatch-mean", "accumulation.py",
       "loss = loss_sum / denom if group_size == 1 else loss_sum * group_size / denom",
       "loss = loss_sum / torch.as_tensor(count).clamp(min=1) if group_size == 1 else loss_sum * group_size / denom",
       "each micro-batch averaged over its own tokens, not the batch's (a sum of means: wrong scale and weighting)",
       "accumulation"),
    _m("accumulation-no-sync-last", "accumulation.py",
       "context = no_sync() if (no_sync is not None and j < last) else contextlib.nullcontext()",
       "context = no_sync() if (no_sync is not None and j <= last) else contextlib.nullcontext()",
       "the last micro-batch's backward also runs under no_sync: gradients are never all-reduced",
       "accumulation", "data_parallel"),
    # --- mixed precision -------------------------------------------------------------------------------------------
    _m("mp-unscale-wrong-factor", "precision/master_weights.py",
       "unscale_and_check_(grads, self.scaler.inv_scale(), found_inf)",
       "unscale_and_check_(grads, self.scaler.scale, found_inf)",
       "MasterWeightOptimizer 'unscales' by S instead of 1/S (gradients S^2 too large; AdamW's scale invariance "
       "hides it)",
       "mixed_precision"),
    _m("mp-master-skip-missing", "precision/master_weights.py",
       "self.last_step_skipped = bool(found_inf.item())",
       "self.last_step_skipped = False",
       "MasterWeightOptimizer steps on an inf/NaN gradient instead of skipping it",
       "mixed_precision"),
    _m("mp-amp-skip-missing", "precision/amp.py",
       "scaler.step(optimizer)  # skips optimizer.step() when unscale_ found an inf/NaN",
       "optimizer.step()  # skips optimizer.step() when unscale_ found an inf/NaN",
       "amp_step calls optimizer.step() directly: GradScaler's skip of a non-finite step never happens",
       "mixed_precision"),
    _m("mp-clip-before-unscale", "precision/amp.py",
       "    if scaler is not None:\n"
       "        scaler.unscale_(optimizer)  # true gradients from here on: clipping must see them\n"
       "    params = [p for group in optimizer.param_groups for p in group[\"params\"] if p.grad is not None]\n"
       "    if max_grad_norm is not None:\n"
       "        norm = clip_grad_norm_(params, max_grad_norm)\n"
       "    else:\n"
       "        norm = global_grad_norm([p.grad for p in params])\n",
       "    params = [p for group in optimizer.param_groups for p in group[\"params\"] if p.grad is not None]\n"
       "    if max_grad_norm is not None:\n"
       "        norm = clip_grad_norm_(params, max_grad_norm)\n"
       "    else:\n"
       "        norm = global_grad_norm([p.grad for p in params])\n"
       "    if scaler is not None:\n"
       "        scaler.unscale_(optimizer)  # true gradients from here on: clipping must see them\n",
       "amp_step clips the still-scaled fp16 gradients (clip before unscale_): the threshold is S times too high",
       "mixed_precision"),
    # --- activation checkpointing ----------------------------------------------------------------------------------
    _m("checkpointing-full-rng", "checkpointing.py",
       "return checkpoint(_recompute_first, forward, *args, use_reentrant=False, **kwargs)",
       "return checkpoint(_recompute_first, forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)",
       "full recomputation does not restore the RNG state: dropout draws another mask in backward",
       "checkpointing"),
    _m("checkpointing-selective-rng", "checkpointing.py",
       "return checkpoint(core, *args, use_reentrant=False, **kwargs)",
       "return checkpoint(core, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)",
       "selective recomputation of the attention core does not restore the RNG state (attention dropout)",
       "checkpointing"),
    _m("checkpointing-hf-cache", "checkpointing.py",
       "    args, kwargs = _without_cache(self, args, kwargs)\n",
       "",
       "full recomputation keeps transformers' KV cache in the recomputed block: it appends the keys a second time",
       "checkpointing"),
    # --- optimizers ------------------------------------------------------------------------------------------------
    _m("optimizers-no-decay-rule", "optimizers.py",
       "    return param.dim() < 2\n",
       "    return param.dim() <= 2\n",
       "the default no-decay rule also exempts matrices and embeddings from weight decay",
       "optimizers"),
    _m("optimizers-adam-is-adamw", "optimizers.py",
       "        return torch.optim.Adam(groups,",
       "        return torch.optim.AdamW(groups,",
       "build_optimizer('adam') builds AdamW: decoupled instead of L2 weight decay",
       "optimizers"),
    _m("optimizers-lion-beta", "optimizers.py",
       "torch._foreach_lerp_(ms, gs, 1 - beta2)",
       "torch._foreach_lerp_(ms, gs, 1 - beta1)",
       "Lion's momentum is updated with beta1 instead of beta2",
       "optimizers"),
    _m("optimizers-sgd-nesterov-dropped", "optimizers.py",
       "weight_decay=weight_decay, nesterov=nesterov, **impl)",
       "weight_decay=weight_decay, nesterov=False, **impl)",
       "build_optimizer('sgd', nesterov=True) silently builds plain momentum SGD",
       "optimizers"),
    _m("adam-bias-correction-resume", "zero/checkpoint.py",
       "                state[key] = value\n",
       "                state[key] = value + 1 if key == \"step\" else value\n",
       "a resharded ZeRO resume restores Adam's step one too far: bias correction 1 - beta^t off by one step (the "
       "only place optimized/ touches Adam's step; the update itself is torch.optim's)",
       "zero"),
    # --- clipping --------------------------------------------------------------------------------------------------
    _m("clipping-local-norm", "clipping.py",
       "    elif distributed:\n        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)\n",
       "    elif distributed:\n        pass\n",
       "the sharded global norm is this rank's local norm (no all-reduce of the power sums)",
       "clipping"),
    _m("clipping-no-clamp", "clipping.py",
       "coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)",
       "coef = max_norm / (total_norm + 1e-6)",
       "clipping scales gradients up when their norm is below max_norm (missing clamp at 1)",
       "clipping"),
    _m("clipping-replicated-per-rank", "clipping.py",
       "local = _local_power_sum(sharded, norm_type, device)",
       "local = _local_power_sum(sharded + replicated, norm_type, device)",
       "replicated gradients (LayerNorm under TP) are summed over ranks, counted once per rank",
       "clipping"),
    _m("clipping-sum-of-norms", "clipping.py",
       "total = torch.linalg.vector_norm(norms, norm_type)",
       "total = norms.sum()",
       "clip_grad_norm_ totals the per-tensor norms by a sum instead of their p-norm",
       "clipping"),
    # --- ZeRO ------------------------------------------------------------------------------------------------------
    _m("zero-stale-shard", "zero/stages.py",
       "        group.all_gather_into(flat.buffer, flat.buffer[start : start + s])\n",
       "        pass\n",
       "ZeRO-1/2 never all-gathers the updated slices: other ranks' shards stay stale after the step",
       "zero"),
    _m("zero-local-norm-and-inf", "zero/master_grads.py",
       "packed = self._all_reduce(packed, dist.ReduceOp.SUM)",
       "packed = packed",
       "ZeRO clips by this rank's shard norm and decides the inf/NaN skip locally (no all-reduce)",
       "zero"),
    _m("zero-stage1-missing-average", "zero/reduction.py",
       "            flat.grads[start : start + owned].div_(n)\n",
       "",
       "ZeRO-1 reduces the gradient slices to their owners but does not divide by the world size",
       "zero"),
    _m("zero-buckets-missing-average", "zero/reduction.py",
       "piece.div_(self.group.world_size)",
       "piece",
       "ZeRO-2/3 bucket reduction sums instead of averaging",
       "zero"),
    # --- tensor parallel -------------------------------------------------------------------------------------------
    _m("tp-row-missing-allreduce", "tensor_parallel/layers.py",
       "y = reduce_from_region(self._linear(x, None), self.process_group)",
       "y = self._linear(x, None)",
       "RowParallelLinear returns its partial sum: the all-reduce g is missing",
       "tensor_parallel"),
    _m("tp-f-backward-missing-allreduce", "tensor_parallel/regions.py",
       "return _all_reduce(grad, ctx.group), None",
       "return grad, None",
       "f (copy to region) skips its backward all-reduce: the input gradient of a column-parallel layer is partial",
       "tensor_parallel"),
    _m("tp-row-bias-per-rank", "tensor_parallel/layers.py",
       "y = reduce_from_region(self._linear(x, None), self.process_group)  # (..., out)\n"
       "        return y if self.bias is None else y + self.bias",
       "y = reduce_from_region(self._linear(x, self.bias), self.process_group)  # (..., out)\n"
       "        return y",
       "RowParallelLinear adds its bias before the all-reduce: the bias counts t times",
       "tensor_parallel"),
    _m("tp-vocab-ce-local-max", "tensor_parallel/cross_entropy.py",
       "            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)\n",
       "            pass\n",
       "vocab-parallel cross-entropy shifts each rank's logits by its own max (no MAX all-reduce)",
       "tensor_parallel"),
    # --- pipeline --------------------------------------------------------------------------------------------------
    _m("pipeline-1f1b-lifo", "pipeline/schedules.py",
       "            acts.append(Action(BACKWARD, k, r))\n"
       "        acts += [Action(BACKWARD, i, r) for i in range(num_steady_microbatches, m)]",
       "            acts.append(Action(BACKWARD, num_warmup_microbatches + k, r))\n"
       "        acts += [Action(BACKWARD, i, r) for i in reversed(range(num_warmup_microbatches))]",
       "1F1B runs backwards newest-first instead of oldest-first (micro-batches out of order; the warm-up "
       "activations are held to the end)",
       "pipeline"),
    _m("pipeline-microbatch-mean", "pipeline/executor.py",
       "out = loss_sum / denom",
       "out = loss_sum / max(int((targets_mb[i] != IGNORE_INDEX).sum()), 1)",
       "the last stage averages each micro-batch's loss over its own tokens (gradients m times too large, "
       "mis-weighted)",
       "pipeline"),
    # --- context parallel ------------------------------------------------------------------------------------------
    _m("cp-wrong-causal-block", "context_parallel.py",
       "if kg + c - 1 <= qg]",
       "if qg + c - 1 <= kg]",
       "ring attention attends the key blocks after the queries instead of those before (the wrong causal block)",
       "context_parallel"),
    _m("cp-own-block-unmasked", "context_parallel.py",
       "steps.append([Meeting(0, n, 0, n, True)])",
       "steps.append([Meeting(0, n, 0, n, False)])",
       "ring attention's own (diagonal) block is computed without the causal mask",
       "context_parallel"),
    # --- LR schedules ----------------------------------------------------------------------------------------------
    _m("schedules-warmup-off-by-one", "schedules.py",
       "return float(step) / float(max(1, self.warmup_steps))",
       "return float(step + 1) / float(max(1, self.warmup_steps))",
       "linear warmup is one step ahead: lr = (step + 1) / W, not 0 at step 0 (the warmup boundary off by one)",
       "schedules"),
    _m("schedules-wsd-decay-length", "schedules.py",
       "_FALL[self.decay_type](float(step - w - s) / float(max(1, d)))",
       "_FALL[self.decay_type](float(step - w - s) / float(max(1, d - 1)))",
       "warmup-stable-decay reaches its floor one step early (decay over d - 1 steps)",
       "schedules"),
    _m("schedules-inverse-sqrt-offset", "schedules.py",
       "return 1.0 / math.sqrt((step - self.warmup_steps + self.timescale) / self.timescale)",
       "return 1.0 / math.sqrt((step + self.timescale) / self.timescale)",
       "inverse-sqrt decay counts from step 0 instead of the end of warmup (a drop at the warmup boundary)",
       "schedules"),
)
