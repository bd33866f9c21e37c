"""`python -m conformance plan`: the planner's command line. Every flag is checked by its argparse type, and what
depends on several flags (a shape's heads and width, the degrees against the GPUs) is checked before planning, so
bad input ends in one line naming the flag and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from rich.console import Console

from conformance.flags import (
    Parser,
    fraction,
    in_range,
    parse,
    positive_float,
    positive_int,
    positive_integer,
    writable_file,
)
from reference.memory import gpt_parameters
from reference.model import GPTConfig
from tools.plan.model import (
    CHECKPOINTING,
    GB,
    PRECISIONS,
    PRESETS,
    ZERO_NAMES,
    Cluster,
    PlanError,
    Workload,
    workload,
)
from tools.plan.render import count_text, render
from tools.plan.search import plan

FLAGS = {"num_params": "--params", "seq_len": "--seq-len", "micro_batch": "--micro-batch",
         "global_batch": "--global-batch", "precision": "--precision", "gpus": "--gpus",
         "gpus_per_node": "--gpus-per-node", "headroom": "--headroom", "tp": "--tp", "pp": "--pp", "cp": "--cp",
         "zero": "--zero",
         "offload": "--offload", "attention": "--attention", "checkpointing": "--checkpointing",
         "prefer_simple_within": "--prefer-simple-within"}
"""The flag of each planner input a PlanError can name (PlanError.argument)."""
HARDWARE = (
    ("--gpu-memory", 80.0, "GB (1e9 bytes) of memory per GPU"),
    ("--cpu-memory", 1024.0, "GB of host memory per node, for offload"),
    ("--tflops", 200.0, "achieved (not peak) TFLOP/s per GPU in the chosen precision, for the step-time estimate"),
    ("--intra-node-gbps", 150.0, "GB/s each GPU sends within a node"),
    ("--inter-node-gbps", 25.0, "GB/s each GPU sends across nodes"),
    ("--pcie-gbps", 25.0, "GB/s between a GPU and host memory"),
    ("--cpu-memory-gbps", 100.0, "GB/s of a node's host memory, which bounds offload's CPU optimizer step"),
)
"""The cluster's numbers: (flag, default, what it is), each a positive number (at most 1e12)."""
MAX_GPUS = 1 << 20
"""The most GPUs (and degrees of parallelism) the planner takes: beyond every cluster built."""
MAX_PARAMS = 10**15
"""The largest parameter count the planner takes (a quadrillion: far beyond any model)."""
MAX_TOKENS = 1 << 40
"""The largest sequence length, micro-batch or global batch."""
gpus = positive_integer(MAX_GPUS)
tokens = positive_integer(MAX_TOKENS)


def _count(text: str) -> int:
    """'7e9', '7B', '350M', '1.5b', '124000000' -> an integer parameter count."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
    s = text.strip().lower()
    try:
        value = float(s[:-1]) * scale[s[-1]] if s and s[-1] in scale else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 7e9, 7B, 350M)") from None
    if not (math.isfinite(value) and 1 <= value <= MAX_PARAMS):
        raise argparse.ArgumentTypeError(f"the parameter count must be in [1, {MAX_PARAMS:.0e}], got {text!r}")
    return int(round(value))


def _int_list(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): comma-separated positive integers, at least one."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    if any(not 1 <= v <= MAX_GPUS for v in values):
        raise argparse.ArgumentTypeError(f"degrees must be integers in [1, {MAX_GPUS}], got {text!r}")
    return values


def _stages(text: str) -> tuple[int, ...]:
    """'0,1,2,3' -> the data-parallel strategies: 0 plain DP, 1/2/3 ZeRO stages."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated stages, got {text!r}") from None
    if not values or any(v not in ZERO_NAMES for v in values):
        raise argparse.ArgumentTypeError(f"zero stages must be among 0, 1, 2, 3, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    presets = ", ".join(f"{k} ({count_text(gpt_parameters(v))}: {v.n_layer}x{v.n_embd}, {v.n_head} heads)"
                        for k, v in PRESETS.items())
    parser = Parser(
        prog="python -m conformance plan",
        description="Plan a parallel layout: for every way to split the model over the GPUs (tensor x context x "
        "pipeline x data parallel, ZeRO-0/1/2/3, optimizer offload), the bytes per GPU of model states and "
        "activations (naive and flash attention, with and without activation recomputation), whether it fits, the "
        "bytes communicated "
        "per step, the pipeline bubble and an estimated step time, computed from reference/memory.py; then a "
        "recommendation with its reasons.",
        epilog="Examples: python -m conformance plan --model 7b --gpus 64 --gpu-memory 80 | "
        "python -m conformance plan --params 7.5e9 --seq-len 1024 --gpus 64 --zero 0,1,2,3 --json plan.json",
    )
    m = parser.add_argument_group("model (a preset, a parameter count, or a shape; shape flags override a preset)")
    m.add_argument("--model", choices=sorted(PRESETS), default=None, metavar="NAME",
                   help=f"a GPT-shaped preset: {presets}")
    m.add_argument("--params", type=_count, default=None, metavar="N",
                   help="total parameters Ψ (7e9, 7B, 350M); alone it gives model states only (no activations, no "
                   "TP/PP traffic); with a shape it overrides the shape's count")
    m.add_argument("--layers", type=positive_int, default=None, help="transformer blocks")
    m.add_argument("--hidden", type=positive_int, default=None, help="model width h (n_embd)")
    m.add_argument("--heads", type=positive_int, default=None, help="attention (query) heads")
    m.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (GQA; default: --heads)")
    m.add_argument("--vocab", type=positive_int, default=None, help="vocabulary size (default 50257 for a new shape)")
    m.add_argument("--mlp-ratio", type=positive_int, default=None,
                   help="MLP width as a multiple of --hidden (default 4)")
    b = parser.add_argument_group("batch and precision")
    b.add_argument("--seq-len", type=tokens, default=None,
                   help="tokens per sequence (default: the preset's context, else 2048)")
    b.add_argument("--micro-batch", type=tokens, default=1,
                   help="sequences per micro-batch per model replica (default: 1)")
    b.add_argument("--global-batch", type=tokens, default=None,
                   help="sequences per optimizer step (default: 16 x GPUs x micro-batch)")
    b.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16",
                   help="bf16 (default): bf16 compute, fp32 master weights and Adam (2+2+12 bytes per "
                   "parameter); fp32: 4+4+8")
    h = parser.add_argument_group("hardware")
    h.add_argument("--gpus", type=gpus, default=8, help=f"number of GPUs (default: 8; at most {MAX_GPUS})")
    h.add_argument("--gpus-per-node", type=gpus, default=None, help="GPUs per node (default: min(8, --gpus))")
    for flag, default, what in HARDWARE:
        h.add_argument(flag, type=positive_float, default=default, help=f"{what} (default: {default:g})")
    h.add_argument("--headroom", type=fraction, default=0.1,
                   help="fraction of memory kept free for what the model does not count (CUDA context, buffers, "
                   "logits, fragmentation; default: 0.1)")
    s = parser.add_argument_group("search space")
    s.add_argument("--tp", type=_int_list, default=None, metavar="T[,T...]",
                   help="tensor-parallel degrees to consider (default: every divisor of the node that divides the "
                   "heads)")
    s.add_argument("--pp", type=_int_list, default=None, metavar="P[,P...]",
                   help="pipeline-parallel degrees to consider (default: every divisor of --gpus up to --layers)")
    s.add_argument("--cp", type=_int_list, default=None, metavar="C[,C...]",
                   help="context-parallel degrees to consider: ring attention splits each sequence over C ranks "
                   "(default: every divisor of --gpus with --seq-len a multiple of 2C; 1 without the model's shape)")
    s.add_argument("--zero", type=_stages, default=(0, 1, 2, 3), metavar="S[,S...]",
                   help="data-parallel strategies: 0 plain DP, 1/2/3 ZeRO stages (default: 0,1,2,3)")
    s.add_argument("--offload", choices=("consider", "never", "only"), default="consider",
                   help="optimizer offload to CPU (ZeRO-Offload): consider both (default), never, or only offloaded "
                   "layouts")
    s.add_argument("--attention", choices=("flash", "naive"), default="flash",
                   help="the attention whose activations decide the fit (default: flash; both are shown)")
    s.add_argument("--checkpointing", choices=CHECKPOINTING, default="auto",
                   help="activation recomputation: the cheapest of none, selective (the attention core) and full "
                   "that fits (auto, the default), never, selective, or always (full)")
    s.add_argument("--prefer-simple-within", type=in_range(0, 10), default=0.1, metavar="FRACTION",
                   help="layouts whose estimated step time is within this fraction of the fastest count as equally "
                   "fast, and the simplest of them is recommended (no offload, fewest model-parallel dimensions, "
                   "lowest ZeRO stage; default: 0.1)")
    o = parser.add_argument_group("output")
    o.add_argument("--top", type=positive_int, default=15, help="layouts shown in the table (default: 15)")
    o.add_argument("--all", action="store_true", help="show every layout")
    o.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                   help="also write the whole plan as JSON to PATH ('-': JSON on stdout instead of the table)")
    return parser


def _build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Workload, Cluster]:
    shape_flags = {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads, "n_kv_head": args.kv_heads,
                   "vocab_size": args.vocab, "mlp_ratio": args.mlp_ratio}
    flag_of = {"n_layer": "--layers", "n_embd": "--hidden", "n_head": "--heads", "n_kv_head": "--kv-heads",
               "vocab_size": "--vocab", "mlp_ratio": "--mlp-ratio"}
    given = {k: v for k, v in shape_flags.items() if v is not None}
    config = None
    if args.model is not None:
        base = PRESETS[args.model]
        if "n_head" in given and "n_kv_head" not in given:
            given["n_kv_head"] = given["n_head"]
        fields = {**dataclasses.asdict(base), **given}
    elif given:
        missing = [flag_of[k] for k in ("n_layer", "n_embd", "n_head") if k not in given]
        if missing:
            parser.error(f"a model shape needs {', '.join(missing)} too (or use --model, or --params alone)")
        fields = {"vocab_size": 50257, "n_kv_head": given["n_head"], **given}
    if args.model is not None or given:
        if fields["n_embd"] % fields["n_head"]:
            parser.error(f"argument --hidden: {fields['n_embd']} must be divisible by --heads {fields['n_head']}")
        if fields["n_head"] % fields["n_kv_head"]:
            parser.error(f"argument --kv-heads: {fields['n_kv_head']} must divide --heads {fields['n_head']}")
        config = GPTConfig(**fields)
    if config is None and args.params is None:
        parser.error("give the model: --model NAME, --params N, or --layers/--hidden/--heads")
    seq_len = args.seq_len if args.seq_len is not None else (config.block_size if args.model is not None else 2048)
    global_batch = args.global_batch if args.global_batch is not None else 16 * args.gpus * args.micro_batch
    gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None else min(8, args.gpus)
    work = workload(config, num_params=args.params, seq_len=seq_len, micro_batch=args.micro_batch,
                    global_batch=global_batch, precision=args.precision)
    cluster = Cluster(args.gpus, gpus_per_node, args.gpu_memory * GB, args.cpu_memory * GB, args.tflops,
                      args.intra_node_gbps * GB, args.inter_node_gbps * GB, args.pcie_gbps * GB,
                      args.cpu_memory_gbps * GB, args.headroom)
    return work, cluster


def main(argv: list[str] | None = None) -> int:
    """`python -m conformance plan ...`: print (and optionally write as JSON) a plan. 0 on success, 2 on bad input."""
    p = parser()
    args = parse(p, argv)
    if isinstance(args, int):
        return args
    try:
        work, cluster = _build(args, p)
        result = plan(work, cluster, tp=args.tp, pp=args.pp, cp=args.cp, zero=args.zero, offload=args.offload,
                      attention=args.attention, checkpointing=args.checkpointing,
                      prefer_simple_within=args.prefer_simple_within)
    except PlanError as error:
        flag = FLAGS.get(error.argument or "")
        return _fail(p, f"argument {flag}: {error}" if flag else str(error))
    except SystemExit as exit_:  # parser.error in _build
        return int(exit_.code or 0)
    data = json.dumps(result.to_dict(), indent=2)
    if args.json is not None and str(args.json) == "-":
        print(data)
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)
    render(result, console, top=None if args.all else args.top)
    if args.json is not None:
        args.json.write_text(data + "\n")
        console.print(f"plan written to {args.json}")
    return 0


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as exit_:
        return int(exit_.code or 0)
