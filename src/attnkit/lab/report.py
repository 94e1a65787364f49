"""Running experiments and writing the report: ``index.html`` and ``results.json``.

:func:`run_experiments` runs registered experiments in order under one rich progress
display; :func:`write_report` writes

- ``<out>/figures/*.png``: every figure (written by the experiments);
- ``<out>/index.html``: self-contained (the PNGs are embedded as base64): environment,
  a table of every claim with its verdict and what wrong implementation it would
  catch, one section per experiment (summary, notes, figures each with its
  explanation, claims), and a closing note listing each claim with its measured
  figure and what could make it fail, then the wall and CPU time;
- ``<out>/results.json``: the same numbers, seeds, versions, CPU, threads, profile and
  durations, for machines.

Every number in both files comes from the results of the run.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import attnkit
from attnkit.lab.core import (
    Context,
    ExperimentResult,
    Profile,
    check_profile,
    cpu_time,
    experiment_names,
    get_experiment,
    jsonable,
)

__all__ = ["FORMAT", "LabRun", "cpu_model", "environment", "run_experiments", "write_report"]

FORMAT = "attnkit.lab/1"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """Versions and the machine: what a reader needs to compare numbers across runs."""
    return {
        "attnkit": attnkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


@dataclass
class LabRun:
    """Results of one ``report`` / ``lab`` invocation."""

    profile: Profile
    started: str  # ISO time
    results: list[ExperimentResult] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    # name -> the 1-minute load average when that experiment ended (None where the
    # platform has none): how busy the machine was while the wall times were measured
    load_averages: dict[str, float | None] = field(default_factory=dict)

    @property
    def claims(self) -> list[Any]:
        return [c for r in self.results for c in r.claims]

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.claims)


def _ignore(n: int) -> None:
    return None


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return None


@contextmanager
def _progress(console: Console | None, show: bool) -> Iterator[Progress | None]:
    if not show or console is None:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with bar:
        yield bar


def run_experiments(
    names: Sequence[str],
    profile: str,
    out: Path,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    command: str = "",
) -> LabRun:
    """Run the named experiments (in the given order) and return their results.

    Figures go to ``<out>/figures``. Progress bars and one verdict line per
    experiment go to ``console`` (nothing without one).
    """
    prof = check_profile(profile)
    for name in names:
        get_experiment(name)  # ValueError for an unknown name before anything runs
    run = LabRun(
        profile=prof,
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=environment(),
        command=command,
    )
    t0, c0 = time.perf_counter(), cpu_time()
    with _progress(console, show_progress) as bar:

        def hook(description: str, total: int) -> Callable[[int], None]:
            if bar is None:
                return _ignore
            task = bar.add_task(description, total=max(total, 1))

            def advance(n: int) -> None:
                bar.advance(task, n)

            return advance

        for name in names:
            ctx = Context(profile=prof, figures=Path(out) / "figures", progress=hook)
            result = get_experiment(name)(ctx)
            run.results.append(result)
            run.load_averages[name] = load_average()
            if console is not None:
                ok = sum(c.passed for c in result.claims)
                colour = "green" if result.passed else "yellow"
                console.print(
                    f"[{colour}]{name}[/]: {ok}/{len(result.claims)} claims pass "
                    f"({result.seconds:.1f} s, {result.cpu_seconds:.1f} s CPU)"
                )
    run.seconds = time.perf_counter() - t0
    run.cpu_seconds = cpu_time() - c0
    return run


# ---- writing -------------------------------------------------------------------------------


def to_json(run: LabRun, out: Path) -> dict[str, Any]:
    """The results.json document."""
    claims = run.claims
    doc: dict[str, Any] = jsonable(
        {
            "format": FORMAT,
            "command": run.command,
            "profile": run.profile,
            "started": run.started,
            "seconds": run.seconds,
            "cpu_seconds": run.cpu_seconds,
            "environment": run.environment,
            "seeds": {r.name: r.seed for r in run.results},
            "durations": {r.name: r.seconds for r in run.results},
            "cpu_durations": {r.name: r.cpu_seconds for r in run.results},
            "load_averages": dict(run.load_averages),
            "claims": {
                "total": len(claims),
                "passed": run.passed,
                "failed": len(claims) - run.passed,
                "verdicts": {c.id: c.verdict for c in claims},
            },
            "experiments": {r.name: r.to_json(root=out) for r in run.results},
        }
    )
    return doc


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.35em 0.5em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.pass { background: #e6f4ea; color: #1e6b34; font-weight: bold; text-align: center; }
td.fail { background: #fdecea; color: #a50e0e; font-weight: bold; text-align: center; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.92em; color: #333; margin-top: 0.4em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
.meta { color: #555; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 0.25em; }
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _claims_table(claims: Sequence[Any], with_experiment: bool = False) -> str:
    head = "<tr>" + ("<th>experiment</th>" if with_experiment else "")
    head += "<th>claim</th><th>theory predicts</th><th>measured</th><th>tolerance</th>"
    head += "<th>could fail if</th><th>verdict</th></tr>"
    rows = []
    for c in claims:
        exp = f"<td>{_e(c.id.split('.')[0])}</td>" if with_experiment else ""
        rows.append(
            f"<tr>{exp}<td>{_e(c.text)}</td><td>{_e(c.theory)}</td><td>{_e(c.measured)}</td>"
            f"<td>{_e(c.tolerance)}</td><td>{_e(c.could_fail_if)}</td>"
            f"<td class='{c.verdict}'>{c.verdict.upper()}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _figure_html(path: Path, title: str, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{_e(title)}' src='data:image/png;base64,{data}'>"
        f"<figcaption><b>{_e(title)}.</b> {_e(caption)} "
        f"<span class='meta'>(also saved as <code>figures/{_e(path.name)}</code>)</span>"
        f"</figcaption></figure>"
    )


def to_html(run: LabRun) -> str:
    """The self-contained index.html."""
    env = run.environment
    claims = run.claims
    colour = "#1e6b34" if run.passed == len(claims) else "#a50e0e"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>attnkit lab report ({_e(run.profile)})</title><style>{_CSS}</style></head><body>",
        "<h1>attnkit lab: the theory of attention, reproduced on this machine</h1>",
        f"<p class='meta'>Profile <b>{_e(run.profile)}</b> · started {_e(run.started)} · "
        f"wall time <b>{run.seconds:.1f} s</b> ({run.cpu_seconds:.1f} s CPU) · attnkit "
        f"{_e(env.get('attnkit'))} · torch "
        f"{_e(env.get('torch'))} · Python {_e(env.get('python'))} · CPU {_e(env.get('cpu'))} "
        f"({_e(env.get('cpu_count'))} cores visible, {_e(env.get('torch_threads'))} torch "
        f"threads) · {_e(env.get('platform'))}</p>",
        f"<p style='font-size:1.15em;color:{colour}'><b>{run.passed} of {len(claims)} claims "
        f"pass.</b></p>",
    ]
    if run.command:
        parts.append(f"<p class='meta'>Reproduce with <code>{_e(run.command)}</code>.</p>")
    parts.append("<h2>All claims</h2>")
    parts.append(_claims_table(claims, with_experiment=True))
    for r in run.results:
        parts.append(f"<h2 id='{_e(r.name)}'>{_e(r.name)}: {_e(r.title)}</h2>")
        parts.append(
            f"<p>{_e(r.summary)}</p><p class='meta'>seed {r.seed} · {r.seconds:.1f} s "
            f"({r.cpu_seconds:.1f} s CPU)</p>"
        )
        for note in r.notes:
            parts.append(f"<p class='note'>{_e(note)}</p>")
        for fig in r.figures:
            parts.append(_figure_html(fig.path, fig.title, fig.caption))
        for table in r.tables:
            parts.append(f"<h3>{_e(table.title)}</h3>")
            head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{_e(x)}</td>" for x in row) + "</tr>" for row in table.rows
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        parts.append("<h3>Claims</h3>")
        parts.append(_claims_table(r.claims))
    parts.append("<h2>Closing note</h2><ul>")
    for c in claims:
        parts.append(
            f"<li><b>{_e(c.verdict.upper())}</b> <code>{_e(c.id)}</code>: {_e(c.text)}. "
            f"Measured: {_e(c.measured)} (theory: {_e(c.theory)}). "
            f"Could fail if {_e(c.could_fail_if)}.</li>"
        )
    parts.append(
        f"</ul><p>Wall time of this {_e(run.profile)} run: <b>{run.seconds:.1f} s</b> ("
        + ", ".join(f"{_e(r.name)} {r.seconds:.1f} s" for r in run.results)
        + f"); CPU time of this process (all threads) and its worker processes: "
        f"{run.cpu_seconds:.1f} s ("
        + ", ".join(f"{_e(r.name)} {r.cpu_seconds:.1f} s" for r in run.results)
        + "). On a machine shared with other work the wall time grows; the CPU time "
        "much less."
        + (
            " One-minute load average at the end of each experiment: "
            + ", ".join(f"{_e(k)} {v:.1f}" for k, v in run.load_averages.items() if v is not None)
            + f" ({_e(run.environment.get('cpu_count'))} cores visible)."
            if any(v is not None for v in run.load_averages.values())
            else ""
        )
        + "</p></body></html>\n"
    )
    return "".join(parts)


def write_report(run: LabRun, out: Path) -> tuple[Path, Path]:
    """Write ``<out>/index.html`` and ``<out>/results.json``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index, results = out / "index.html", out / "results.json"
    results.write_text(json.dumps(to_json(run, out), indent=1) + "\n", encoding="utf-8")
    index.write_text(to_html(run), encoding="utf-8")
    return index, results


def all_names() -> list[str]:
    """Every registered experiment, in report order."""
    return experiment_names()
