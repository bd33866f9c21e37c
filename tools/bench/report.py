"""The bench's results for a reader: the table of TFLOP/s (and % of the dense peak), the memory ratio, the headline
ratios (ours / SDPA-flash at HEADLINE) and the plot of TFLOP/s against N."""

from __future__ import annotations

from pathlib import Path

from tools.bench.cases import CONVENTION, HEADLINE, MODES
from tools.bench.measure import CaseResult, MemoryResult, Timing


def _cell(t: Timing | None, notes: list[str]) -> str:
    if t is None:
        return "-"
    if t.na is not None:
        if t.na not in notes:
            notes.append(t.na)
        return f"n/a [{notes.index(t.na) + 1}]"
    pct = f" ({t.pct_peak:.0f}%)" if t.pct_peak is not None else ""
    return f"{rate(t.tflops)}{pct}"


def rate(tflops: float) -> str:
    """TFLOP/s as printed: one decimal from 10 up, three significant digits below."""
    return f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}"


def render_table(results: list[CaseResult], impls: tuple[str, ...], modes: tuple[str, ...] = MODES,
                 memory: MemoryResult | None = None, device_name: str = "", peak: float | None = None) -> str:
    """The bench as plain text: one line per case and mode, TFLOP/s (and % of the dense peak) per implementation,
    then the notes (why an implementation has no number) and the memory ratio."""
    notes: list[str] = []
    header = ["case", "mode", *impls]
    rows = [[r.case.label, mode, *(_cell(r.timings.get(i, {}).get(mode), notes) for i in impls)]
            for r in results for mode in modes]
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    peak_text = f", dense peak {peak:g} TFLOP/s" if peak else ", peak unknown for this GPU (no %)"
    lines = [f"attention TFLOP/s on {device_name or 'this device'}{peak_text}", CONVENTION,
             fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in rows)]
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    if memory is not None:
        lines.append(render_memory(memory))
    return "\n".join(lines)


def render_memory(memory: MemoryResult) -> str:
    c = memory.case
    if memory.naive_bytes is None:
        return f"memory at {c.label}: naive attention could not run"
    parts = [f"{impl} {memory.naive_bytes / b:.1f}x" if isinstance(b, int) and b > 0 else f"{impl} n/a ({str(b)[:80]})"
             for impl, b in memory.flash_bytes.items()]
    return (f"peak memory naive / flash, forward + backward, {c.label} B={c.B} H={c.H} "
            f"(naive {memory.naive_bytes / 2**20:.0f} MiB): " + ", ".join(parts) + " (paper: 20x at 4K)")


def headline_ratios(results: list[dict]) -> dict[str, float | None]:
    """ours (triton) / sdpa-flash in TFLOP/s, at HEADLINE causal and not, fwd and fwd_bwd; from bench.json cases."""
    dtype, d, n = HEADLINE
    out: dict[str, float | None] = {}
    for causal in (True, False):
        for mode in MODES:
            key = f"{'causal' if causal else 'full'} {mode}"
            out[key] = None
            for r in results:
                if (r["dtype"], r["d"], r["N"], r["causal"]) == (dtype, d, n, causal):
                    ours = r["timings"].get("triton", {}).get(mode, {}).get("tflops")
                    peer = r["timings"].get("sdpa-flash", {}).get(mode, {}).get("tflops")
                    out[key] = ours / peer if ours and peer else None
    return out


def plot(results: list[CaseResult], impls: tuple[str, ...], path: Path, title: str) -> None:
    """TFLOP/s vs N: one panel per (dtype, d, causal) and mode, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.case.dtype, r.case.d, r.case.causal) for r in results})
    if not groups:
        return
    fig, axes = plt.subplots(len(MODES), len(groups), figsize=(3.4 * len(groups), 6.4), squeeze=False)
    for col, (dtype, d, causal) in enumerate(groups):
        chosen = sorted((r for r in results if (r.case.dtype, r.case.d, r.case.causal) == (dtype, d, causal)),
                        key=lambda r: r.case.N)
        for row, mode in enumerate(MODES):
            ax = axes[row][col]
            for impl, marker in zip(impls, "osD^v", strict=False):
                points = [(r.case.N, r.timings[impl][mode].tflops) for r in chosen
                          if impl in r.timings and mode in r.timings[impl] and r.timings[impl][mode].tflops]
                if points:
                    ax.plot(*zip(*points, strict=True), marker=marker, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dtype} d={d} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
