"""The `attnkit` command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="attnkit",
    help="attnkit: the attention family, executable and checked.",
    no_args_is_help=True,
    add_completion=False,
)


def _parse_lengths(text: str) -> list[int]:
    if not text.strip():
        return []
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in lengths):
        raise typer.BadParameter(f"lengths must be positive, got {text!r}")
    return lengths


@app.command()
def demo(
    lengths: Annotated[
        str, typer.Option(help="Comma-separated sequence lengths to time; empty to skip timing.")
    ] = "256,1024,4096",
) -> None:
    """Tour: argmax example, score scaling, linear == quadratic, timings.

    Exits with status 1 if any check disagrees with the value theory states.
    """
    from attnkit.demo import run_demo

    if not run_demo(Console(), _parse_lengths(lengths)):
        raise typer.Exit(code=1)


@app.command()
def maps(
    dim: Annotated[int, typer.Option(help="Input width D to report D' for.")] = 16,
) -> None:
    """List the registered feature maps and their output widths D'."""
    from attnkit import feature_maps

    table = Table(title=f"Feature maps (input width D = {dim})", title_justify="left")
    table.add_column("name")
    table.add_column("D'", justify="right")
    table.add_column("positive", justify="center")
    table.add_column("what")
    for name in feature_maps.available():
        fmap = feature_maps.get(name)
        doc = (type(fmap).__doc__ or "").strip().splitlines()[0]
        table.add_row(name, str(fmap.out_dim(dim)), "yes" if fmap.positive else "no", doc)
    Console().print(table)


@app.command()
def version() -> None:
    """Print attnkit's and torch's versions."""
    import torch

    import attnkit

    typer.echo(f"attnkit {attnkit.__version__} (torch {torch.__version__})")


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    }
)
def train(ctx: typer.Context) -> None:
    """Train a TinyLM on MQAR, on one process or under torchrun (see: attnkit train --help)."""
    from attnkit.train import main

    raise typer.Exit(code=main(list(ctx.args), prog="attnkit train"))


def _register_subcommands() -> None:
    from attnkit.bench.cli import register as register_bench
    from attnkit.cost.cli import register as register_cost
    from attnkit.lab.cli import register as register_lab
    from attnkit.linearize_cli import register as register_linearize
    from attnkit.patterns.cli import register as register_patterns

    register_lab(app)
    register_patterns(app)
    register_cost(app)
    register_bench(app)
    register_linearize(app)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    app()
