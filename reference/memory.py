"""The memory model of training, as formulas: what each rank holds, and why.

Two kinds of memory fill an accelerator during training (ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 3):

1. Model states: parameters, gradients and optimizer state. Adam with mixed precision keeps, per parameter,
       2 bytes  fp16/bf16 parameter (used by forward and backward)
       2 bytes  fp16/bf16 gradient
       K bytes  optimizer state: fp32 master parameter (4) + momentum (4) + variance (4), K = 12
   so plain data parallelism (DP) holds (2 + 2 + K)Ψ = 16Ψ bytes on every one of its Nd ranks (Ψ parameters).
   ZeRO removes the redundancy by sharding over the Nd data-parallel ranks (Sec. 5, Fig. 1):
       ZeRO-1 (P_os)      optimizer state sharded             2Ψ + 2Ψ + KΨ/Nd
       ZeRO-2 (P_os+g)    and the gradients                   2Ψ + (2 + K)Ψ/Nd
       ZeRO-3 (P_os+g+p)  and the parameters                  (2 + 2 + K)Ψ/Nd
   The seed's "4x" and "8x" are the limits of 16Ψ over these as Nd grows: 16/4 and 16/2. In fp32 (4 + 4 + 8 bytes,
   no master copy) the same stages give only 2x and 4x.
2. Activations: the tensors the forward saves for the backward, per transformer layer (`activation_bytes_per_layer`).

Tensor parallelism over t ranks and pipeline parallelism over p stages split the model first (each rank holds
about Ψ/(t·p) parameters: ZeRO Sec. 8 writes Ψ/Nm), and ZeRO then shards that over Nd.

`zero_rank_bytes` is the exact count for one rank of `optimized.zero.ZeroOptimizer`: the paper's formulas with the
padding of each flat buffer to a multiple of Nd spelled out, so measured bytes can be compared byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from reference.model import GPTConfig

STAGES = (0, 1, 2, 3)
"""0 is plain data parallelism (nothing sharded); 1, 2, 3 are the ZeRO stages."""
RECOMPUTE_POLICIES = ("none", "selective", "full")
"""Activation checkpointing: keep everything, recompute the attention core, recompute the whole block."""


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state (ZeRO Sec. 3.1: "2Ψ + 2Ψ + KΨ")."""

    name: str
    param: int
    """Bytes of the parameter copy that forward and backward use."""
    grad: int
    """Bytes of its gradient."""
    optimizer: int
    """K: bytes of optimizer state, an fp32 master copy included when there is one."""
    master: int
    """Bytes of that fp32 master copy inside K (0 when the optimizer updates the parameters themselves)."""


MIXED = Precision("mixed fp16/bf16 + fp32 master, Adam", param=2, grad=2, optimizer=12, master=4)
"""The ZeRO paper's accounting: 2 + 2 + K with K = 12 (master, momentum, variance in fp32)."""
FP32 = Precision("fp32, Adam", param=4, grad=4, optimizer=8, master=0)
"""fp32 training with Adam: the parameters are their own master copy; momentum and variance in fp32."""


@dataclass(frozen=True)
class ModelStateBytes:
    """Model-state bytes of one rank, by kind. `host_*`: what offload keeps in CPU memory instead."""

    params: float
    grads: float
    optimizer: float
    host_grads: float = 0.0
    host_optimizer: float = 0.0

    @property
    def device(self) -> float:
        """Bytes on the accelerator: what the ZeRO paper's formulas count."""
        return self.params + self.grads + self.optimizer

    @property
    def host(self) -> float:
        return self.host_grads + self.host_optimizer


def _check(num_params: float, world_size: int, stage: int, tp: int = 1, pp: int = 1) -> None:
    if not num_params >= 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (0 = plain data parallel), got {stage!r}")


def params_per_model_parallel_rank(num_params: float, *, tp: int = 1, pp: int = 1) -> float:
    """Ψ/(t·p): the parameters one rank holds when tensor parallelism (t) and pipeline parallelism (p) split Ψ.

    Idealised as in ZeRO Sec. 8 (Ψ/Nm): Megatron's LayerNorms and row-parallel biases are replicated across t, and
    a tied embedding lives on the first and the last stage; `gpt_parameters` counts those exactly."""
    _check(num_params, 1, 0, tp, pp)
    return num_params / (tp * pp)


def model_state_bytes(
    num_params: float,
    *,
    world_size: int = 1,
    stage: int = 0,
    precision: Precision = MIXED,
    offload: bool = False,
    tp: int = 1,
    pp: int = 1,
) -> ModelStateBytes:
    """Model-state bytes per rank with Nd = world_size data-parallel ranks (ZeRO Sec. 5.1-5.3, Fig. 1).

    With P, G, K the bytes per parameter of parameters, gradients and optimizer state (Precision):
        stage 0 (DP)   P·Ψ      + G·Ψ      + K·Ψ         every rank holds everything
        stage 1        P·Ψ      + G·Ψ      + K·Ψ/Nd      each rank updates only its 1/Nd of the parameters,
                                                         so it needs the optimizer state of that slice only
        stage 2        P·Ψ      + G·Ψ/Nd   + K·Ψ/Nd      its slice's gradient is all it reads: gradients are
                                                         reduce-scattered instead of all-reduced
        stage 3        P·Ψ/Nd   + G·Ψ/Nd   + K·Ψ/Nd      parameters are gathered just before a layer needs them
    Offload (ZeRO-Offload, Ren et al. 2021, arXiv 2101.06840, Sec. 4): the optimizer state and the step move to
    CPU memory. The host keeps an fp32 master slice (4 bytes: a separate copy even in fp32, since the device
    parameters cannot be updated by a CPU step), the other K - master bytes of state, and an fp32 gradient slice
    (4 bytes), all for Ψ/Nd parameters; the device keeps the parameters, and the full gradient only in stage 1.
    Ψ is first divided by the tensor- and pipeline-parallel degrees (`params_per_model_parallel_rank`)."""
    _check(num_params, world_size, stage, tp, pp)
    psi = params_per_model_parallel_rank(num_params, tp=tp, pp=pp)
    nd = world_size
    params = precision.param * (psi / nd if stage >= 3 else psi)
    grads = precision.grad * (psi / nd if stage >= 2 else psi)
    if not offload:
        optimizer = precision.optimizer * (psi / nd if stage >= 1 else psi)
        return ModelStateBytes(params, grads, optimizer)
    if stage == 0:
        raise ValueError("offload needs a ZeRO stage (1, 2 or 3): the optimizer state it moves is the sharded one")
    host_optimizer = (4 + precision.optimizer - precision.master) * psi / nd
    return ModelStateBytes(params, grads if stage == 1 else 0.0, 0.0, host_grads=4 * psi / nd,
                           host_optimizer=host_optimizer)


def memory_reduction(world_size: int, stage: int, precision: Precision = MIXED) -> float:
    """Plain-DP bytes over ZeRO bytes per rank (the paper's "memory reduction"); independent of Ψ."""
    dp = model_state_bytes(1.0, stage=0, precision=precision).device
    return dp / model_state_bytes(1.0, world_size=world_size, stage=stage, precision=precision).device


def memory_reduction_limit(stage: int, precision: Precision = MIXED) -> float:
    """The reduction as Nd -> infinity: (P+G+K)/(P+G) for stage 1, (P+G+K)/P for stage 2, infinite for stage 3.

    Mixed precision (2+2+12): 4x and 8x, the seed's claims. fp32 (4+4+8): 2x and 4x."""
    _check(0, 1, stage)
    total = precision.param + precision.grad + precision.optimizer
    kept = {0: total, 1: precision.param + precision.grad, 2: precision.param, 3: 0}[stage]
    return total / kept if kept else math.inf


def communication_elements(num_params: float, stage: int) -> float:
    """Elements each rank sends per step with ring collectives, to leading order (ZeRO Sec. 7).

    DP all-reduces the gradients: a reduce-scatter (Ψ) then an all-gather (Ψ), 2Ψ. ZeRO-1 and 2 do the same two
    halves, separately: reduce-scatter the gradients to their owners (Ψ), all-gather the updated parameters (Ψ),
    2Ψ. ZeRO-3 gathers every parameter once for forward and once for backward (2Ψ) and reduce-scatters the
    gradients (Ψ): 3Ψ, 1.5x DP. (Exactly, a ring sends (Nd-1)/Nd of each of these.)"""
    _check(num_params, 1, stage)
    return (3.0 if stage == 3 else 2.0) * num_params


# --- exact bytes of optimized.zero, padding included ---------------------------------------------------------------


def shard_numel(numel: int, world_size: int) -> int:
    """S: elements of each rank's slice of a flat buffer of `numel` elements padded to a multiple of Nd."""
    _check(numel, world_size, 0)
    return -(-numel // world_size)


def owned_numel(numel: int, world_size: int, rank: int) -> int:
    """Real (non-padding) elements of rank r's slice [r·S, (r+1)·S) of the padded flat buffer."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    s = shard_numel(numel, world_size)
    return max(0, min(s, numel - rank * s))


def zero_rank_bytes(
    numels: Sequence[int],
    *,
    world_size: int,
    rank: int,
    stage: int,
    precision: Precision = MIXED,
    offload: bool = False,
    scalar_state_bytes: int = 0,
) -> ModelStateBytes:
    """Exact model-state bytes of rank `rank` of optimized.zero.ZeroOptimizer, one flat buffer per entry of `numels`.

    Each flat buffer of n elements is padded to Nd·S, S = ceil(n/Nd); rank r owns o_r = min(S, n - r·S) real
    elements. Full buffers (params in stages 1-2, grads in stage 1) hold Nd·S elements, sharded ones S; the
    optimizer state covers the o_r real elements only (padding never enters an update). `scalar_state_bytes` is
    state kept per flat buffer rather than per element (torch.optim.Adam's 0-dim fp32 `step`: 4 bytes)."""
    _check(sum(numels), world_size, stage)
    if stage == 0:
        raise ValueError("zero_rank_bytes counts a ZeRO stage (1, 2 or 3); use model_state_bytes for plain DP")
    out = dict(params=0, grads=0, optimizer=0, host_grads=0, host_optimizer=0)
    for n in numels:
        s, o = shard_numel(n, world_size), owned_numel(n, world_size, rank)
        out["params"] += precision.param * (s if stage >= 3 else s * world_size)
        if not offload:
            out["grads"] += precision.grad * (s if stage >= 2 else s * world_size)
            out["optimizer"] += precision.optimizer * o + scalar_state_bytes
        else:
            out["grads"] += precision.grad * s * world_size if stage == 1 else 0
            out["host_grads"] += 4 * o
            out["host_optimizer"] += (4 + precision.optimizer - precision.master) * o + scalar_state_bytes
    return ModelStateBytes(**out)


# --- the tiny GPT: parameters and activations ------------------------------------------------------------------------


def gpt_parameters(config: GPTConfig, *, tp: int = 1) -> int:
    """Parameters of reference.model.GPT held by one of t tensor-parallel ranks (t = 1: the whole model).

    Megatron-LM (arXiv 1909.08053, Sec. 3) splits q/k/v and fc_in by output columns (weights and biases) and
    out_proj and fc_out by input rows (weights; their biases are replicated), and the token embedding (with an
    untied output head, that too) by vocabulary rows, ceil(V/t) per rank (Megatron pads V to a multiple of t;
    what optimized.tensor_parallel.megatron_plan does). LayerNorms and the position embedding stay whole.
    The key projection has no bias (its gradient is zero in exact arithmetic, see reference.model)."""
    _check(0, 1, 0, tp)
    c, d, hidden = config.n_embd, config.head_dim, config.mlp_ratio * config.n_embd
    q, kv = config.n_head * d, config.n_kv_head * d
    if config.n_head % tp or config.n_kv_head % tp or hidden % tp:
        raise ValueError(f"tp={tp} must divide n_head={config.n_head}, n_kv_head={config.n_kv_head} and the "
                         f"MLP width {hidden}")
    b = 1 if config.bias else 0
    split = c * q + q * b + 2 * c * kv + kv * b + q * c + c * hidden + hidden * b + hidden * c  # column + row
    replicated = 2 * (c + c * b) + c * b + c * b  # ln_1, ln_2; biases of out_proj and fc_out
    layer = split // tp + replicated
    vocab_rows = -(-config.vocab_size // tp)  # ceil(V / t)
    embeddings = vocab_rows * c + config.block_size * c
    head = 0 if config.tie_embeddings else vocab_rows * c
    return config.n_layer * layer + embeddings + (c + c * b) + head


def activation_bytes_per_layer(
    config: GPTConfig, batch_size: int, seq_len: int, *, attention: str = "naive", tp: int = 1,
    element_bytes: int = 4, recompute: str = "none",
) -> int:
    """Bytes one transformer block of reference.model.GPT saves for its backward (b = B, s = T, h = n_embd).

    Counted tensor by tensor from what autograd keeps (unique storages, parameters excluded), fp32:
        both        the block input and the LayerNorm outputs/residual (ln_1 in, ln_1 out, ln_2 in, ln_2 out):
                    4·bsh; LayerNorm mean and rstd, 2 per LayerNorm: 4·bs; fc_in output (GELU input) and GELU
                    output: 2·bs·r·h; the attention output y fed to out_proj: bsh
        naive       q, and k, v repeated to all H heads, copied by the batched matmuls: 3·bsh; the softmax
                    output P (B, H, s, s): a·b·s²; the causal mask: s² one-byte booleans
        flash       q (bsh) and k, v at Hkv heads (2·bs·Hkv·d) as the projections wrote them; the
                    log-sum-exp (B, H, s): a·b·s; P is never stored (FlashAttention, arXiv 2205.14135, Sec. 3.1)
    The naive a·b·s² term is what makes attention memory quadratic in sequence length; Korthikanti et al. 2022
    (arXiv 2205.05198, Sec. 4.1) count the same block in half precision with dropout as sbh(34 + 5as/h) bytes.
    Tensor parallelism over t ranks (without sequence parallelism) splits every per-head and per-column tensor
    (q, k, v, P, y, the MLP's hidden activations and the log-sum-exp) by t; LayerNorm inputs/outputs, their
    statistics and the mask stay whole on every rank (Korthikanti et al.: sbh(10 + 24/t + 5as/(ht))).

    recompute (activation checkpointing, Korthikanti et al. Sec. 5; `RECOMPUTE_POLICIES`):
        "selective" the attention core keeps only its inputs q (bsh) and k, v (2·bs·Hkv·d) and recomputes the rest
                    in backward: the a·b·s² of P, the mask and the repeated k, v (naive), or the log-sum-exp (flash)
        "full"      the block keeps only its input (bsh, whole on every tensor-parallel rank) and recomputes the
                    rest; while one block recomputes, its full count lives once (`activation_bytes_per_rank`)"""
    if attention not in ("naive", "flash"):
        raise ValueError(f"attention must be 'naive' or 'flash', got {attention!r}")
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("element_bytes", element_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    gpt_parameters(config, tp=tp)  # validates tp against the shape
    b, s, h, a = batch_size, seq_len, config.n_embd, config.n_head
    kv = config.n_kv_head * config.head_dim
    hidden = config.mlp_ratio * h
    if recompute == "full":
        return element_bytes * b * s * h
    replicated = 4 * b * s * h + 4 * b * s  # block input, ln outputs, residual; LayerNorm statistics
    split = b * s * h + 2 * b * s * hidden  # attention output y; MLP hidden activations
    if recompute == "selective":
        split += b * s * h + 2 * b * s * kv  # the core's inputs q, k, v
        mask = 0
    elif attention == "naive":
        split += 3 * b * s * h + a * b * s * s
        mask = s * s
    else:
        split += b * s * h + 2 * b * s * kv + a * b * s
        mask = 0
    return element_bytes * (replicated + split // tp) + mask


def layers_per_stage(n_layer: int, pp: int) -> int:
    """Transformer blocks on the most loaded of p pipeline stages: ceil(n_layer / p)."""
    _check(0, 1, 0, 1, pp)
    return -(-n_layer // pp)


# --- activation recomputation (Korthikanti et al. 2022, arXiv 2205.05198) -------------------------------------------


def korthikanti_activation_bytes(seq_len: int, batch_size: int, n_embd: int, n_head: int, *, recompute: str = "none",
                                 tp: int = 1) -> float:
    """The paper's count of one transformer layer's activation bytes, in its accounting (half precision, dropout
    masks of one byte, 4h MLP), for comparison with the exact count of `activation_bytes_per_layer`:
        none        sbh(10 + 24/t + 5as/(ht))      (Sec. 4.1, Eq. 1 with t = 1: sbh(34 + 5as/h); Sec. 4.2.2)
        selective   sbh(10 + 24/t)                 (Sec. 5: the 5as/h attention-core term is recomputed)
        full        2sbh                           (Sec. 5: only each layer's input is kept)"""
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")
    s, b, h, a, t = seq_len, batch_size, n_embd, n_head, tp
    if recompute == "full":
        return 2.0 * s * b * h
    core = 0.0 if recompute == "selective" else 5.0 * a * s / (h * t)
    return s * b * h * (10.0 + 24.0 / t + core)


def layer_forward_flops(config: GPTConfig, batch_size: int, seq_len: int) -> tuple[float, float]:
    """(all, attention core) FLOPs of one block's forward at 2 FLOPs per multiply-add, the mask ignored.

    Korthikanti et al. Sec. 5 (h = n_embd, 4h MLP, multi-head attention): 24bsh² + 4bs²h, of which 4bs²h is the core
    (Q Kᵀ and P V, 2bs²h each). Here q, k, v, out_proj and fc_in/fc_out are counted at their real widths (GQA, r)."""
    b, s, h = batch_size, seq_len, config.n_embd
    q, kv, hidden = config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.mlp_ratio * h
    core = 4.0 * b * s * s * q
    return 2.0 * b * s * (h * q + 2 * h * kv + q * h + 2 * h * hidden) + core, core


def recompute_flops_per_layer(config: GPTConfig, batch_size: int, seq_len: int, recompute: str) -> float:
    """Extra forward FLOPs one block spends in backward: none 0, selective the attention core (4bs²h), full the whole
    forward (24bsh² + 4bs²h). Against forward + backward (3 forwards, 72bsh² + 12bs²h) full recomputation adds 33%,
    selective 4bs²h / (72bsh² + 12bs²h) = s / (18h + 3s): under 1% for GPT-3's h = 12288, s = 2048."""
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")
    total, core = layer_forward_flops(config, batch_size, seq_len)
    return {"none": 0.0, "selective": core, "full": total}[recompute]


# --- context parallelism: ring attention (Liu et al. 2023, arXiv 2310.01889) ----------------------------------------


def _check_cp(seq_len: int, cp: int) -> None:
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise ValueError(f"cp must be an integer >= 1, got {cp!r}")
    if seq_len % cp:
        raise ValueError(f"seq_len={seq_len} must be a multiple of cp={cp} (each rank holds s/P tokens)")


def context_parallel_activation_bytes_per_layer(config: GPTConfig, batch_size: int, seq_len: int, *, cp: int,
                                                element_bytes: int = 4, recompute: str = "none") -> int:
    """Activation bytes of one block on one of P = cp context-parallel ranks: every tensor of the block is per token
    and each rank holds s/P tokens, so it is `activation_bytes_per_layer` with flash attention at s/P. (Ring
    attention never saves anything N x M; the two K/V blocks in flight are transient, not saved.)"""
    _check_cp(seq_len, cp)
    return activation_bytes_per_layer(config, batch_size, seq_len // cp, attention="flash",
                                      element_bytes=element_bytes, recompute=recompute)


def ring_attention_bytes_sent(config: GPTConfig, batch_size: int, seq_len: int, *, cp: int, element_bytes: int = 4,
                              grad_element_bytes: int | None = None) -> tuple[int, int]:
    """(forward, backward) bytes one of P ranks sends for one attention layer of ring attention.

    A rank's K/V block is X = 2·b·(s/P)·Hkv·d elements. Forward: the blocks travel P - 1 hops, so every rank sends
    P - 1 of them. Backward: K/V travel again (P - 1 sends; no rank keeps the others' blocks), and each block's dK/dV
    accumulator travels with it and then one hop home (P sends). Without GQA and in half precision that is
    4(P-1)/P·bsh bytes forward (Liu et al. Sec. 3.1)."""
    _check_cp(seq_len, cp)
    grad_element_bytes = element_bytes if grad_element_bytes is None else grad_element_bytes
    block = 2 * batch_size * (seq_len // cp) * config.n_kv_head * config.head_dim
    if cp == 1:
        return 0, 0
    return (cp - 1) * block * element_bytes, (cp - 1) * block * element_bytes + cp * block * grad_element_bytes
