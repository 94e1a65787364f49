"""Showing a :class:`~attnkit.bench.results.Report`: rich tables and markdown.

Both renderers go through :func:`section_table`, so the terminal, the README and
the JSON (which holds the raw numbers) never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnkit._timing import format_seconds
from attnkit.bench.results import CaseResult, MachinePeaks, Metric, Report, Section, Target

__all__ = [
    "format_bytes",
    "format_target_value",
    "print_report",
    "section_table",
    "targets_table",
    "to_markdown",
]


def format_bytes(n: float) -> str:
    """Binary units: 512 B, 1.5 KiB, 12.0 MiB, 1.25 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n:.0f} B"


#: Extra per-row metrics: key -> (column header, formatter).
METRIC_COLUMNS: dict[str, tuple[str, Callable[[Metric], str]]] = {
    "saved_bytes": ("saved for bwd", lambda v: format_bytes(float(v))),
    "bytes_per_token": ("bytes/token", lambda v: f"{float(v):,.0f}"),
    "peak_bytes": ("peak (CUDA)", lambda v: format_bytes(float(v))),
    "max_abs_err": ("max |Δ| vs attnkit", lambda v: f"{float(v):.1e}"),
    "max_abs_err_dq": ("max |Δ dq| vs attnkit", lambda v: f"{float(v):.1e}"),
}


def _fmt_metric(key: str, value: Metric) -> str:
    if key in METRIC_COLUMNS:
        return METRIC_COLUMNS[key][1](value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def section_table(sec: Section, peaks: MachinePeaks | None) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells of one section; columns that no row fills are left out."""
    rows = sec.rows
    params: list[str] = []
    metrics: list[str] = []
    for row in rows:
        params += [k for k in row.params if k not in params]
        metrics += [k for k in row.metrics if k not in metrics]
    timed = any(r.timing is not None for r in rows)
    has_ratio = sec.baseline is not None and any(r.speedup is not None for r in rows)
    has_flops = any(r.flops is not None and r.timing is not None for r in rows)
    has_computed = any(r.computed_flops is not None and r.timing is not None for r in rows)
    has_bytes = any(r.nbytes is not None and r.timing is not None for r in rows)

    headers = ["variant", *params]
    if timed:
        headers += ["median", "min"]
    if has_ratio:
        headers.append("time / baseline" if sec.ratio == "time" else "speed-up")
    if has_flops:
        headers += ["useful GFLOP/s", "% matmul peak (useful)"]
    if has_computed:
        headers.append("% peak (computed)")
    if has_bytes:
        headers += ["GB/s", "% copy BW"]
    headers += [METRIC_COLUMNS[k][0] if k in METRIC_COLUMNS else k for k in metrics]

    cells: list[list[str]] = []
    for row in rows:
        line = [row.label, *(str(row.params.get(k, "")) for k in params)]
        if row.skipped is not None:
            # The reason goes in the first column after the params; the rest stay empty.
            rest = len(headers) - len(line)
            if rest:
                line += [f"skipped: {row.skipped}"] + [""] * (rest - 1)
            else:
                line[0] += f" (skipped: {row.skipped})"
            cells.append(line)
            continue
        t = row.timing
        if timed:
            line += [format_seconds(t.median), format_seconds(t.low)] if t else ["", ""]
        if has_ratio:
            value = row.time_ratio if sec.ratio == "time" else row.speedup
            line.append("" if value is None else f"{value:.2f}x")
        if has_flops:
            rate = row.flops_per_s
            line += ["" if rate is None else f"{rate / 1e9:.1f}", _pct(row.frac_matmul(peaks))]
        if has_computed:
            line.append(_pct(row.frac_matmul_computed(peaks)))
        if has_bytes:
            bw = row.bytes_per_s
            line += ["" if bw is None else f"{bw / 1e9:.2f}", _pct(row.frac_copy(peaks))]
        line += [_fmt_metric(k, row.metrics[k]) if k in row.metrics else "" for k in metrics]
        cells.append(line)
    return headers, cells


def format_target_value(target: Target, value: float | None) -> str:
    """A target's value or goal in its unit ("x", "%" or plain)."""
    if value is None:
        return "n/a"
    if target.unit == "%":
        return f"{100 * value:.1f}%"
    if target.unit == "x":
        return f"{value:.2f}x"
    return f"{value:g}"


def _mark(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[met]


def targets_table(cases: Sequence[CaseResult]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of every case's targets: case, target, measured, goal, met."""
    headers = ["case", "target", "measured", "goal", "met"]
    cells = [
        [
            case.name,
            t.name,
            format_target_value(t, t.value),
            f"{t.sense} {format_target_value(t, t.goal)}",
            _mark(t.met),
        ]
        for case in cases
        for t in case.targets
    ]
    return headers, cells


def _config_line(case: CaseResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.config.items())


def _ratio_note(sec: Section) -> str:
    if sec.baseline is None:
        return ""
    if sec.ratio == "time":
        return f"time / baseline: median time over that of {sec.baseline!r} (lower is better)"
    return f"speed-up: median time of {sec.baseline!r} over the row's (higher is better)"


def _machine_line(report: Report) -> str:
    m = report.meta
    threads = m.get("threads", "?")
    line = (
        f"{m.get('device_name', m.get('cpu', '?'))}, {threads} thread"
        f"{'' if threads == 1 else 's'}, "
        f"torch {m.get('torch', '?')}, profile {m.get('profile', '?')}"
    )
    if report.peaks is not None:
        line += (
            f"; measured peaks: fp32 matmul {report.peaks.matmul_flops_per_s / 1e9:.1f} GFLOP/s, "
            f"copy {report.peaks.copy_bytes_per_s / 1e9:.2f} GB/s"
        )
    return line


def print_report(report: Report, console: Console) -> None:
    """One rich table per section, the notes under it, then the targets."""
    console.print(f"[bold]attnkit bench[/bold]: {escape(_machine_line(report))}")
    for case in report.cases:
        for sec in case.sections:
            headers, cells = section_table(sec, report.peaks)
            caption = " · ".join(x for x in (_config_line(case), _ratio_note(sec)) if x)
            table = Table(
                title=escape(f"{case.title} — {sec.title}"),
                title_justify="left",
                caption=escape(caption),
                caption_justify="left",
            )
            for i, h in enumerate(headers):
                table.add_column(escape(h), justify="left" if i == 0 else "right")
            for line in cells:
                table.add_row(*(escape(c) for c in line))
            console.print(table)
            for note in sec.notes:
                console.print(f"  [dim]{escape(note)}[/dim]")
        for note in case.notes:
            console.print(f"  [dim]{escape(note)}[/dim]")
        if case.error:
            console.print(f"  [red]case failed: {escape(case.error)}[/red]")
    headers, cells = targets_table(report.cases)
    if cells:
        table = Table(title="Targets", title_justify="left")
        for h in headers:
            table.add_column(h)
        style = {"yes": "green", "NO": "red", "n/a": "dim"}
        for line in cells:
            table.add_row(*(escape(c) for c in line[:-1]), f"[{style[line[-1]]}]{line[-1]}[/]")
        console.print(table)


def _md_table(
    headers: list[str], cells: list[list[str]], right: Sequence[bool] | None = None
) -> list[str]:
    """A markdown table; ``right[i]`` right-aligns column i (default: all but the first)."""

    def esc(x: str) -> str:
        return x.replace("|", "\\|")

    right = right if right is not None else [i > 0 for i in range(len(headers))]
    align = ["---:" if r else "---" for r in right]
    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
    return out


def to_markdown(
    report: Report, *, cases: Sequence[str] | None = None, with_targets: bool = True
) -> str:
    """The report as markdown for the README: a header line, one table per section, targets.

    ``cases`` picks (and orders) case names; by default every case of the report.
    """
    chosen = (
        report.cases
        if cases is None
        else [c for name in cases for c in report.cases if c.name == name]
    )
    cmd = report.meta.get("command", "attnkit bench")
    lines = [
        f"Measured with `{cmd}` ({report.meta.get('date', '')}) on {_machine_line(report)}.",
        "Medians of interleaved repeats in one process; speed-ups are ratios of medians.",
        "",
    ]
    for case in chosen:
        for sec in case.sections:
            headers, cells = section_table(sec, report.peaks)
            lines.append(f"**{case.title} — {sec.title}** ({_config_line(case)})")
            lines.append("")
            lines += _md_table(headers, cells)
            notes = [n for n in (_ratio_note(sec), *sec.notes) if n]
            if notes:
                lines.append("")
                lines += [f"- {n}" for n in notes]
            lines.append("")
    if with_targets:
        headers, cells = targets_table(chosen)
        if cells:
            lines.append("**Targets**")
            lines.append("")
            lines += _md_table(headers, cells, right=[False, False, True, True, False])
            lines.append("")
    return "\n".join(lines)
