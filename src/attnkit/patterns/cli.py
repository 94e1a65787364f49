"""``attnkit patterns PATH``: attention maps, head scores and a page for a saved model.

Mounted on the ``attnkit`` app by :func:`register`; the heavy imports (matplotlib,
transformers) happen when the command runs, not when ``attnkit --help`` does.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["patterns", "register"]


class MethodName(str, enum.Enum):
    """How attnkit layers' weights are read."""

    auto = "auto"
    implicit = "implicit"


def _parse_tokens(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(
            f"expected integers separated by spaces or commas, got {text!r}",
            param_hint="--tokens",
        ) from None
    if len(ids) < 2:
        raise typer.BadParameter("need at least 2 token ids", param_hint="--tokens")
    return ids


def patterns(
    path: Annotated[
        Path,
        typer.Argument(
            help="A TinyLM checkpoint (TinyLM.save) or a Hugging Face model directory "
            "(save_pretrained).",
            exists=True,
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Directory for index.html, the PNGs and scores.json.")
    ] = Path("patterns"),
    tokens: Annotated[
        str | None,
        typer.Option(help="Token ids of one input sequence, e.g. '5 9 2 5 9 2'."),
    ] = None,
    text: Annotated[
        str | None, typer.Option(help="Input text (HF models with a tokenizer only).")
    ] = None,
    period: Annotated[
        int,
        typer.Option(min=1, help="Default input: this many random tokens, repeated twice."),
    ] = 32,
    batch: Annotated[int, typer.Option(min=1, help="Default input: number of sequences.")] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the default input.")] = 0,
    head: Annotated[
        list[str] | None,
        typer.Option(
            help="LAYER.HEAD to draw with its tokens (repeatable); default: the "
            "top head of each behaviour."
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share a head needs to get a label.")
    ] = 0.4,
    method: Annotated[
        MethodName, typer.Option(help="attnkit models: 'auto' or 'implicit' (one-hot values).")
    ] = MethodName.auto,
) -> None:
    """Capture every head's attention, score and label the heads, write a self-contained page."""
    from attnkit.patterns.analyze import analyze
    from attnkit.patterns.views import write_page

    heads: list[tuple[int, int]] | None = None
    if head:
        heads = []
        for item in head:
            try:
                n, h = (int(x) for x in item.split("."))
            except ValueError:
                raise typer.BadParameter(
                    f"expected LAYER.HEAD such as 1.0, got {item!r}", param_hint="--head"
                ) from None
            heads.append((n, h))
    console = Console()
    try:
        maps = analyze(
            path,
            tokens=_parse_tokens(tokens),
            text=text,
            period=period,
            batch=batch,
            seed=seed,
            method=method.value,
        )
        command = f"attnkit patterns {path}" + ("" if out == Path("patterns") else f" --out {out}")
        index = write_page(
            maps,
            out,
            title=f"attnkit patterns: {path.name}",
            heads=heads,
            threshold=threshold,
            command=command,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    table = Table(title=f"{maps.source}: head scores", title_justify="left")
    rows = maps.table(threshold)
    names = [k for k in rows[0] if k not in ("layer", "layer_name", "head", "label")]
    for col in ("layer", "head", "label", *names):
        table.add_column(col, justify="left" if col == "label" else "right")
    for r in rows:
        table.add_row(str(r["layer"]), str(r["head"]), r["label"], *(f"{r[k]:.2f}" for k in names))
    console.print(table)
    console.print(f"wrote {index}")


def register(parent: typer.Typer) -> None:
    """Add ``patterns`` as a command of ``parent`` (the ``attnkit`` app)."""
    parent.command("patterns")(patterns)
