"""``attnkit report`` and ``attnkit lab NAME``: the lab on the command line.

Two ways to mount it: ``app`` is a stand-alone Typer app with the commands ``report``
and ``lab`` (``python -m attnkit.lab.cli report``), and :func:`register` adds the same
two commands to another app::

    from attnkit.lab.cli import register
    register(app)           # in attnkit/cli.py -> `attnkit report`, `attnkit lab NAME`
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from attnkit.lab.core import experiment_names, get_experiment
from attnkit.lab.report import LabRun, run_experiments, write_report

__all__ = ["app", "lab", "register", "report"]


class ProfileName(str, enum.Enum):
    """Sizes and effort of a run."""

    test = "test"
    quick = "quick"
    full = "full"


_PROFILE_HELP = (
    "quick: the default, every experiment in <= 8 minutes on 2 CPU cores; full: bigger "
    "sweeps; test: tiny, seconds (for the test suite)."
)


def _setup_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _summary(console: Console, run: LabRun, index: Path, results: Path) -> None:
    table = Table(title="Claims", title_justify="left")
    for col in ("claim", "measured", "verdict"):
        table.add_column(col)
    for c in run.claims:
        mark = "[green]pass[/green]" if c.passed else "[red]FAIL[/red]"
        table.add_row(c.id, c.measured, mark)
    console.print(table)
    colour = "green" if run.passed == len(run.claims) else "yellow"
    console.print(
        f"[{colour}]{run.passed}/{len(run.claims)} claims pass[/] · wall time "
        f"{run.seconds:.1f} s ({run.cpu_seconds:.1f} s CPU) · profile {run.profile}"
    )
    console.print(f"wrote {index} and {results}")


def _command(words: list[str], profile: str, out: Path, default_out: Path) -> str:
    parts = ["attnkit", *words]
    if profile != "quick":
        parts.append(f"--profile {profile}")
    if out != default_out:
        parts.append(f"--out {out}")
    return " ".join(parts)


def report(
    profile: Annotated[ProfileName, typer.Option(help=_PROFILE_HELP)] = ProfileName.quick,
    out: Annotated[Path, typer.Option(help="Directory for index.html, results.json, figures/.")] = (
        Path("report")
    ),
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="torch.set_num_threads for the run (default: torch's)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    strict: Annotated[bool, typer.Option(help="Exit with status 1 if any claim fails.")] = False,
) -> None:
    """Run every experiment and write a self-contained report (index.html + results.json)."""
    _setup_threads(threads)
    console = Console()
    run = run_experiments(
        experiment_names(),
        profile.value,
        out,
        console=console,
        show_progress=progress,
        command=_command(["report"], profile.value, out, Path("report")),
    )
    index, results = write_report(run, out)
    _summary(console, run, index, results)
    if strict and run.passed != len(run.claims):
        raise typer.Exit(code=1)


def lab(
    name: Annotated[str, typer.Argument(help="Experiment to run (see `--help` for the list).")],
    profile: Annotated[ProfileName, typer.Option(help=_PROFILE_HELP)] = ProfileName.quick,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the report (default: report/NAME).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="torch.set_num_threads for the run (default: torch's)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    strict: Annotated[bool, typer.Option(help="Exit with status 1 if any claim fails.")] = False,
) -> None:
    """Run one experiment: scaling, argmax, decode, complexity, recall or patterns."""
    try:
        get_experiment(name)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="NAME") from None
    _setup_threads(threads)
    default_out = Path("report") / name
    target = default_out if out is None else out
    console = Console()
    run = run_experiments(
        [name],
        profile.value,
        target,
        console=console,
        show_progress=progress,
        command=_command(["lab", name], profile.value, target, default_out),
    )
    index, results = write_report(run, target)
    _summary(console, run, index, results)
    if strict and run.passed != len(run.claims):
        raise typer.Exit(code=1)


def register(parent: typer.Typer) -> None:
    """Add ``report`` and ``lab`` as commands of ``parent`` (e.g. the ``attnkit`` app)."""
    parent.command("report")(report)
    parent.command("lab")(lab)


app = typer.Typer(
    name="lab",
    help="The attnkit lab: experiments that reproduce the theory, and the report.",
    no_args_is_help=True,
    add_completion=False,
)
register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
