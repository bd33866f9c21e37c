"""The plan in the terminal: inputs, a table of layouts (best first), the recommendation and the assumptions."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tools.plan.model import GB, Cluster, Estimate
from tools.plan.model import decimal_bytes as _gb
from tools.plan.search import Plan

# --- terminal ----------------------------------------------------------------------------------------------


def count_text(n: float) -> str:
    """6.58B, 124M, 108K."""
    return next(f"{n / k:.3g}{u}" for k, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= k or k == 1)


def _fits_cell(e: Estimate) -> str:
    if not e.fits_gpu:
        return "[red]no[/red]"
    if not e.fits_host:
        return "[red]host no[/red]"
    return {"none": "[green]yes[/green]", "selective": "[green]yes + sel[/green]",
            "full": "[green]yes + ckpt[/green]"}[e.recompute]


def _unit(cluster: Cluster) -> tuple[float, str]:
    """GB for real GPUs; MB or kB when the memory given is that small (the tiny GPT's plans)."""
    for scale, name in ((GB, "GB"), (1e6, "MB")):
        if cluster.gpu_memory >= scale:
            return scale, name
    return 1e3, "kB"


def _num(x: float | None, scale: float) -> str:
    return "?" if x is None else f"{x / scale:.3g}"


def render(result: Plan, console: Console, *, top: int | None = 15) -> None:
    """Print the plan: inputs, a table of layouts (best first), the recommendation and the assumptions."""
    w, c = result.workload, result.cluster
    shape = (f"{w.config.n_layer} layers, hidden {w.config.n_embd}, {w.config.n_head} heads"
             + (f" ({w.config.n_kv_head} kv)" if w.config.n_kv_head != w.config.n_head else "")
             + f", vocab {w.config.vocab_size}") if w.config else "shape unknown"
    console.print(f"[bold]model[/bold] Ψ = {count_text(w.num_params)} parameters ({shape}); seq {w.seq_len}, "
                  f"micro-batch {w.micro_batch}, global batch {w.global_batch} sequences "
                  f"({w.tokens_per_step:,} tokens), {w.precision}")
    console.print(f"[bold]cluster[/bold] {c.gpus} GPUs, {c.node_size} per node, {_gb(c.gpu_memory)} each "
                  f"({_gb(c.usable_gpu_memory)} usable), {_gb(c.cpu_memory)} host per node")
    scale, unit = _unit(c)
    table = Table(title=f"layouts, best first (memory in {unit} per GPU; communication in {unit} sent per GPU per "
                  f"step)")
    for col, justify in (("#", "right"), ("layout", "left"), ("m", "right"), ("model states", "right"),
                         ("act. naive", "right"), ("act. flash", "right"), ("act. flash+sel", "right"),
                         ("act. flash+ckpt", "right"), ("total", "right"), ("fits", "left"),
                         ("comm DP/TP/PP/CP", "right"), ("bubble", "right"),
                         ("step s", "right")):
        table.add_column(col, justify=justify)
    shown = result.estimates if top is None else result.estimates[:top]
    for i, e in enumerate(shown, 1):
        a = e.activations
        comm = "/".join(_num(e.communication[k], scale) for k in ("dp", "tp", "pp", "cp"))
        if e.layout.offload:
            comm += f" +PCIe {_num(e.communication['offload'], scale)}"
        style = "bold" if e is result.recommended else None
        table.add_row(str(i), e.name, str(e.microbatches), _num(e.model_states.device, scale),
                      _num(a["naive"], scale) if a else "?", _num(a["flash"], scale) if a else "?",
                      _num(a["flash+selective"], scale) if a else "?", _num(a["flash+ckpt"], scale) if a else "?",
                      _num(e.gpu_bytes, scale), _fits_cell(e), comm,
                      f"{e.bubble:.1%}", f"{e.step_s:.3g}", style=style)
    console.print(table)
    if top is not None and len(result.estimates) > top:
        console.print(f"({len(result.estimates) - top} more layouts: --all shows them, --json writes them)")
    if result.recommended:
        console.print(f"[bold green]recommended: {result.recommended.name}[/bold green]")
    else:
        console.print("[bold red]no layout fits[/bold red]")
    for r in result.reasons:
        console.print(f"  - {r}")
    console.print("[dim]assumptions: " + "; ".join(result.assumptions) + "[/dim]")
