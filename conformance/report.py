"""The conformance report: a table in the terminal, and report.json, report.md and the PNG of every figure the checks
returned (conformance.figure) in one folder. This is the one place that draws."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from conformance.claims import CLAIMS, Verdict
from conformance.figure import Figure, Panel
from conformance.result import Metric, Result


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, world_size: int, backend: str) -> dict:
    """What the numbers were measured on: versions, device, backend, ranks, date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "backend": backend,
        "world_size": world_size,
        "cuda": torch.version.cuda,
    }
    for pkg in ("deepspeed", "triton", "flash-attn", "transformers"):
        env[pkg] = _version(pkg)
    return env


def _fmt_number(value: float, unit: str) -> str:
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if unit == "x":
        return f"{value:.3g}x"
    return f"{value:.3g} {unit}".rstrip()


def format_metric(m: Metric) -> str:
    text = f"{m.name}: {_fmt_number(m.measured, m.unit)}"
    return f"{text} (claim {m.claimed})" if m.claimed else text


def _equivalence_cell(r: Result) -> str:
    if r.error is not None:
        return "ERROR"
    e = r.equivalence
    if e is None:
        return "-"
    return f"ok {e.max_error:.2g} <= {e.bound:.2g}" if e.passed else f"FAIL {e.max_error:.2g} > {e.bound:.2g}"


def print_table(results: list[Result], env: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"pretrain-spec conformance  ·  torch {env['torch']}  ·  {env['device_name']}  ·  "
                  f"{env['backend']} x {env['world_size']}", show_lines=True)
    for col in ("check", "row", "ranks", "equivalence (max err vs bound)", "memory", "speed", "other measurements",
                "claim → verdict"):
        table.add_column(col, overflow="fold")
    for r in results:
        style = "red" if r.failed else None
        verdict = f"{r.claim} → {r.verdict.value}" if r.claim and r.verdict else (r.claim or "")
        table.add_row(
            r.check,
            r.name,
            str(r.world_size),
            _equivalence_cell(r),
            "\n".join(format_metric(m) for m in r.memory),
            "\n".join(format_metric(m) for m in r.speed),
            "\n".join(format_metric(m) for m in r.metrics),
            verdict,
            style=style,
        )
    console.print(table)


def _ratio(r: Result) -> float:
    """How close a row's error is to its bound (> 1 fails); crashes are worst."""
    if r.error is not None:
        return math.inf
    e = r.equivalence
    if e is None:
        return -1.0
    if e.bound > 0:
        return e.max_error / e.bound
    return 0.0 if e.max_error == 0 and e.passed else math.inf


def headline(rows: list[Result]) -> Metric | None:
    """The measurement a check is summed up by: the first metric set beside a claimed value in a row that answers
    a claim, else the first metric of such a row, else the first metric of any row."""
    def metrics(r: Result) -> list[Metric]:
        return [*r.memory, *r.speed, *r.metrics]

    for candidates in ([r for r in rows if r.claim], rows):
        for r in candidates:
            claimed = [m for m in metrics(r) if m.claimed]
            if claimed or metrics(r):
                return (claimed or metrics(r))[0]
    return None


_VERDICT_STYLE = {Verdict.HOLDS: "green", Verdict.HOLDS_UNDER_CONDITIONS: "yellow", Verdict.DOES_NOT_HOLD: "red",
                  Verdict.NOT_MEASURABLE: "dim"}


def print_summary(results: list[Result], console: Console, *, verbose: bool = False) -> None:
    """One line per check (rows held / failed, worst error against its bound, headline measurement), then the seed's
    claims with what was measured and the verdict, then each crash's last line (the whole traceback with -v)."""
    by_check: dict[str, list[Result]] = {}
    for r in results:
        by_check.setdefault(r.check, []).append(r)
    table = Table(title="checks", title_justify="left", expand=False)
    for col, justify in (("check", "left"), ("hold", "right"), ("fail", "right"),
                         ("worst error ≤ bound", "left"), ("headline measurement", "left")):
        table.add_column(col, justify=justify, no_wrap=True, overflow="ellipsis",
                         max_width=70 if col.startswith("headline") else None)
    for check, rows in by_check.items():
        failed = sum(r.failed for r in rows)
        worst = max(rows, key=_ratio)
        if worst.error is not None:
            cell = "[red]crashed[/red]"
        elif worst.equivalence is None:
            cell = "-"
        else:
            e = worst.equivalence
            cell = f"{e.max_error:.2g} ≤ {e.bound:.2g}" if e.passed else f"[red]{e.max_error:.2g} > {e.bound:.2g}[/red]"
        m = headline(rows)
        table.add_row(check, str(len(rows) - failed), f"[red]{failed}[/red]" if failed else "0", cell,
                      format_metric(m) if m else "-")
    console.print(table)

    claims = Table(title="the seed's claims", title_justify="left")
    for col, width in (("claim", 46), ("claimed", 18), ("measured", 48), ("verdict", 36)):
        claims.add_column(col, no_wrap=True, overflow="ellipsis", max_width=width)
    for c in CLAIMS.values():
        rows = [r for r in results if r.claim == c.id]
        verdicts = list(dict.fromkeys(r.verdict for r in rows if r.verdict))
        m = headline(rows)
        measured = f"{m.name}: {_fmt_number(m.measured, m.unit)}" if m else ("-" if rows else "not run")
        verdict = "; ".join(f"[{_VERDICT_STYLE[v]}]{v.value}[/]" for v in verdicts) or (
            "-" if rows else "[dim]not run[/dim]")
        claims.add_row(f"{c.technique}: {c.statement}", c.claimed, measured, verdict)
    console.print(claims)
    for r in results:
        if r.error is not None:
            text = r.error.rstrip() if verbose else r.error.rstrip().splitlines()[-1]
            console.print(f"[red]{r.check} / {r.name}:[/red] {text}", highlight=False)


def write_junit(results: list[Result], env: dict, path: Path) -> Path:
    """JUnit XML for CI: one testcase per row (classname conformance.<check>), a <failure> for a failing
    equivalence, an <error> for a crash, the measurements, claim and verdict as <property>s, the notes as
    <system-out>."""
    failures = sum(r.error is None and r.failed for r in results)
    errors = sum(r.error is not None for r in results)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name="conformance", tests=str(len(results)), failures=str(failures),
                          errors=str(errors), skipped="0", time="0",
                          timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    props = ET.SubElement(suite, "properties")
    for k, v in env.items():
        if v is not None:
            ET.SubElement(props, "property", name=k, value=str(v))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.check}", name=r.name, time="0")
        props = ET.SubElement(case, "properties")
        e = r.equivalence
        values = [("world_size", r.world_size), ("reference", r.reference), ("optimized", r.optimized),
                  ("peer", r.peer), ("claim", r.claim), ("verdict", r.verdict.value if r.verdict else None)]
        if e is not None:
            values += [("equivalence.max_error", e.max_error), ("equivalence.mean_error", e.mean_error),
                       ("equivalence.bound", e.bound), ("equivalence.rule", e.rule)]
        values += [(f"{kind}: {m.name} [{m.unit}]", m.measured)
                   for kind, ms in (("memory", r.memory), ("speed", r.speed), ("metric", r.metrics)) for m in ms]
        for name, value in values:
            if value is not None:
                ET.SubElement(props, "property", name=name, value=str(value))
        if r.error is not None:
            ET.SubElement(case, "error", message=r.error.rstrip().splitlines()[-1]).text = r.error
        elif e is not None and not e.passed:
            ET.SubElement(case, "failure", message=f"max error {e.max_error:.3g} > bound {e.bound:.3g}").text = (
                f"{e.name}: {e.rule}")
        if r.notes:
            ET.SubElement(case, "system-out").text = r.notes
    ET.indent(suites)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def write_markdown(results: list[Result], env: dict, path: Path) -> None:
    lines = ["# pretrain-spec conformance report", ""]
    lines += ["| environment | |", "|---|---|"]
    lines += [f"| {k} | {_md_escape(str(v))} |" for k, v in env.items() if v is not None] + [""]
    lines += [
        "| check | row | ranks | equivalence | rule | memory | speed | other | claim | verdict | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r.equivalence
        eq = _equivalence_cell(r) + (f" (mean {e.mean_error:.2g})" if e else "")
        rule = e.rule if e else (r.error.splitlines()[-1] if r.error else "")
        metrics = ["<br>".join(map(format_metric, ms)) for ms in (r.memory, r.speed, r.metrics)]
        cells = [r.check, r.name, str(r.world_size), eq, rule, *metrics, r.claim or "",
                 r.verdict.value if r.verdict else "", r.notes]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    answered = {r.claim for r in results if r.claim}
    lines += ["", "## The seed's claims", "", "| claim | claimed | source | conditions | verdicts in this run |",
              "|---|---|---|---|---|"]
    for c in CLAIMS.values():
        verdicts = sorted({r.verdict.value for r in results if r.claim == c.id and r.verdict})
        status = ", ".join(verdicts) if verdicts else ("measured, no verdict" if c.id in answered else "not run")
        lines.append("| " + " | ".join(_md_escape(x) for x in (c.statement, c.claimed, c.source, c.conditions,
                                                                  status)) + " |")
    plots = [p for r in results for p in r.plots]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in dict.fromkeys(plots)]
    path.write_text("\n".join(lines) + "\n")


def figures(results: list[Result]) -> list[Figure]:
    """Every figure of the rows, once each (rows may share one), in row order."""
    out: dict[str, Figure] = {}
    for r in results:
        for f in r.figures:
            if out.setdefault(f.name, f) is not f:
                raise ValueError(f"two different figures are named {f.name!r} ({r.check}/{r.name})")
    return list(out.values())


_SHADES = ["#4c78a8", "#9ecae9", "#2a4a6e"], ["#f58518", "#ffbf79", "#a35410"], ["#54a24b", "#88d27a", "#2f6b2a"]


def _draw_timeline(ax, panel: Panel, plt) -> None:
    """A Gantt chart: one row per rank, each group (forward, backward, ...) in its colours, one shade per chunk."""
    groups = list(dict.fromkeys(b.group for b in panel.timeline))
    span = max((b.end for b in panel.timeline), default=0.0)
    for b in panel.timeline:
        color = _SHADES[groups.index(b.group) % len(_SHADES)][b.shade % 3]
        ax.barh(b.row, b.end - b.start, left=b.start, height=0.8, color=color, edgecolor="black", linewidth=0.4)
        if span > 0 and (b.end - b.start) / span > 0.015:
            ax.text((b.start + b.end) / 2, b.row, b.label, ha="center", va="center", fontsize=7,
                    color="white" if b.shade % 3 != 1 else "black")
    ax.set_yticks(range(len(panel.row_labels)), panel.row_labels)
    ax.invert_yaxis()
    ax.set_xlim(0, span if span > 0 else 1)
    if panel.legend and groups:
        handles = [plt.Rectangle((0, 0), 1, 1, color=_SHADES[i % len(_SHADES)][0]) for i in range(len(groups))]
        ax.legend(handles, groups, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def _draw_panel(ax, panel: Panel, plt) -> None:
    if panel.timeline:
        _draw_timeline(ax, panel, plt)
    for s in panel.series:
        style = dict(color=s.color, alpha=s.alpha, label=s.label)
        if s.kind == "bars":
            ax.bar(s.x, s.y, width=s.width, **style)
        elif s.kind == "points":
            ax.plot(s.x, s.y, marker=s.marker or "o", linestyle="", **style)
        else:
            ax.plot(s.x, s.y, marker=s.marker, linestyle=s.linestyle, linewidth=s.linewidth, **style)
    for axis, scale in (("x", panel.xscale), ("y", panel.yscale)):
        if scale != "linear":
            getattr(ax, f"set_{axis}scale")("log", base=2 if scale == "log2" else 10)
    if panel.xticks is not None:
        ax.set_xticks([p for p, _ in panel.xticks], [label for _, label in panel.xticks],
                      rotation=panel.xtick_rotation, ha="right" if panel.xtick_rotation else "center")
    for x in panel.vlines:
        ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.grid:
        ax.grid(True, which="both", alpha=0.3)
    if panel.legend and panel.series and any(s.label for s in panel.series):
        ax.legend(fontsize=7)


def draw(figure: Figure, path: Path) -> Path:
    """Draw `figure` as a PNG at `path` (matplotlib, Agg backend, imported here: only drawing needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(figure.panels)
    size = figure.size or (5.5 * n if n > 1 else 6.0, 4.2)
    fig, axes = plt.subplots(1, n, figsize=size, squeeze=False, sharey=figure.sharey)
    try:
        for ax, panel in zip(axes[0], figure.panels, strict=True):
            _draw_panel(ax, panel, plt)
        if figure.title:
            fig.suptitle(figure.title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_report(results: list[Result], env: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json, report.md and every figure's PNG into out_dir; return the paths of the first two."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    drawn = figures(results)
    for f in drawn:
        draw(f, out_dir / f.filename)
    payload = {
        "environment": env,
        "results": [r.to_dict() for r in results],
        "claims": {k: c.to_dict() for k, c in CLAIMS.items()},
        "failed": [f"{r.check}/{r.name}" for r in results if r.failed],
        "figures": {f.name: f.to_dict() for f in drawn},
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    write_markdown(results, env, md_path)
    return json_path, md_path
