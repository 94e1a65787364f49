"""``attnkit bench``: the benchmark harness on the command line.

Two ways to mount it: ``app`` is a stand-alone Typer app whose only command is
the benchmark (``python -m attnkit.bench.cli --quick``), and
:func:`register` adds the same command to another app under a name::

    from attnkit.bench.cli import register
    register(app)           # in attnkit/cli.py -> `attnkit bench ...`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from attnkit.bench.core import CASES, PROFILES
from attnkit.bench.render import print_report, to_markdown
from attnkit.bench.runner import case_names, run_bench

__all__ = ["app", "bench", "register"]

app = typer.Typer(
    name="bench",
    help="Benchmark attnkit side by side with other libraries and the machine's peaks.",
    add_completion=False,
)


def _list_cases(console: Console) -> None:
    for name in case_names():
        case = CASES.get(name)
        extra = f"  (vs {', '.join(case.competitors)})" if case.competitors else ""
        console.print(f"{name:<20} {case.title}{extra}")


@app.command()
def bench(
    op: Annotated[
        list[str] | None,
        typer.Option(
            "--op",
            "-o",
            metavar="NAME",
            help="Case to run (repeatable); default: all. `--list` shows them. "
            "The `machine` peaks always run first.",
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", metavar="PATH", help="Write the full results as JSON here."),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option("--markdown", metavar="PATH", help="Write the tables as markdown here."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Short lengths, few repeats (well under a minute).")
    ] = False,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Sizes and effort: full (default), quick (= --quick), smoke (tiny, for tests)."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch.set_num_threads for the run.")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Timed repeats per competitor (overrides profile).")
    ] = None,
    device: Annotated[str, typer.Option(help="Device to run on: cpu or cuda.")] = "cpu",
    list_cases: Annotated[bool, typer.Option("--list", help="List the cases and exit.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Time attnkit against fla, performer-pytorch, torch SDPA and the machine's peaks.

    Competitors that are not installed are reported as skipped rows. Exits with
    status 1 if a case failed (its error is in the table and the JSON).
    """
    console = Console()
    if list_cases:
        _list_cases(console)
        return
    if profile is not None and profile not in PROFILES:
        raise typer.BadParameter(
            f"unknown profile {profile!r}; known: {', '.join(PROFILES)}", param_hint="--profile"
        )
    if quick and profile not in (None, "quick"):
        raise typer.BadParameter(
            "--quick conflicts with --profile " + profile, param_hint="--quick"
        )
    chosen = profile or ("quick" if quick else "full")
    unknown = [name for name in op or [] if name not in CASES]
    if unknown:
        raise typer.BadParameter(
            f"unknown case(s) {', '.join(unknown)}; known: {', '.join(case_names())}",
            param_hint="--op",
        )
    if device.startswith("cuda") and not _cuda_available():
        raise typer.BadParameter("CUDA is not available here", param_hint="--device")
    report = run_bench(
        op,
        profile=chosen,
        threads=threads,
        device=device,
        repeats=repeats,
        console=console,
        show_progress=progress,
        command=_canonical_command(op, chosen, threads, repeats, device),
    )
    print_report(report, console)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {json_path}")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(report), encoding="utf-8")
        console.print(f"wrote {markdown}")
    if any(case.error for case in report.cases):
        raise typer.Exit(code=1)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _canonical_command(
    op: list[str] | None, profile: str, threads: int | None, repeats: int | None, device: str
) -> str:
    """The command line that reproduces this run (what the README should show)."""
    parts = ["attnkit", "bench"]
    parts += [f"--op {name}" for name in op or []]
    if profile == "quick":
        parts.append("--quick")
    elif profile != "full":
        parts.append(f"--profile {profile}")
    if threads is not None:
        parts.append(f"--threads {threads}")
    if repeats is not None:
        parts.append(f"--repeats {repeats}")
    if device != "cpu":
        parts.append(f"--device {device}")
    return " ".join(parts)


def register(parent: typer.Typer, name: str = "bench") -> None:
    """Add the benchmark command to ``parent`` as ``name`` (``attnkit bench ...``)."""
    parent.command(name)(bench)


if __name__ == "__main__":  # pragma: no cover
    app()
