"""The conformance report: a table in the terminal, report.json and report.md in one folder beside the checks' PNGs."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from conformance.claims import CLAIMS
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


def write_report(results: list[Result], env: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.md into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    payload = {
        "environment": env,
        "results": [r.to_dict() for r in results],
        "claims": {k: c.to_dict() for k, c in CLAIMS.items()},
        "failed": [f"{r.check}/{r.name}" for r in results if r.failed],
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    write_markdown(results, env, md_path)
    return json_path, md_path
