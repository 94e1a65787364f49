"""``attnkit cost``: a variant's exact cost, its Big-O, numbers at sizes, and a check.

::

    attnkit cost mqa --at b=8,d=1024,h=16,k=64,v=64,n=4096
    attnkit cost softmax --phase train --at L=256,S=256 --check
    attnkit cost --table            # the complexity table of the README, from the model
    attnkit cost --table --markdown

Wiring: ``attnkit.cost.cli.register(app)`` adds the command ``cost`` to a Typer app
(one line in :mod:`attnkit.cli`); ``attnkit.cost.cli.app`` is the same command as a
standalone Typer app (``python -m attnkit.cost.cli``).
"""

from __future__ import annotations

from typing import Annotated

import sympy
import torch
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app", "cost", "register"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _parse_at(text: str) -> dict[str, int]:
    """``"b=8,d=1024"`` -> {"b": 8, "d": 1024}; typer.BadParameter on bad input."""
    from attnkit.cost.symbols import SYMBOLS

    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq or name not in SYMBOLS:
            raise typer.BadParameter(
                f"expected NAME=INT pairs with NAME in {', '.join(SYMBOLS)}; got {part!r}",
                param_hint="--at",
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise typer.BadParameter(
                f"{name} must be an integer, got {value!r}", param_hint="--at"
            ) from None
        if sizes[name] < 0:
            raise typer.BadParameter(f"{name} must be >= 0, got {value}", param_hint="--at")
    return sizes


def _num(x: int) -> str:
    return f"{x:,}"


def _list_variants(console: Console) -> None:
    from attnkit import cost as c

    table = Table(title="attnkit cost VARIANT: variants", title_justify="left")
    table.add_column("variant")
    table.add_column("phases")
    table.add_column("implementation")
    for name in c.variants():
        v = c.get(name)
        table.add_row(name, ", ".join(v.phases), v.implementation)
    console.print(table)


def _print_table(console: Console, as_markdown: bool) -> None:
    from attnkit.cost.table import markdown, rows

    derived = rows()
    if as_markdown:
        typer.echo(markdown(derived))  # raw: a rich console would wrap long rows
        return
    table = Table(
        title="Complexity derived from attnkit's own contractions (attnkit cost --table)",
        title_justify="left",
    )
    for col in (
        "variant",
        "phase",
        "activations",
        "time (FLOPs)",
        "memory",
        "memory is",
        "assumptions",
    ):
        table.add_column(col, overflow="fold")
    notes: list[str] = []
    for r in derived:
        if r.assumptions not in notes:
            notes.append(r.assumptions)
        table.add_row(
            r.variant,
            r.phase,
            r.activations,
            r.time_text,
            r.memory_text,
            r.memory_kind,
            f"({notes.index(r.assumptions) + 1})",
        )
    console.print(table)
    for i, text in enumerate(notes):
        console.print(f"({i + 1}) {text}", markup=False, highlight=False)


def _report(
    console: Console,
    variant: str,
    phase: str | None,
    at: dict[str, int],
    check: bool,
    activations: str | None,
    dtype: torch.dtype,
    assume: str | None,
) -> bool:
    """Print one variant's costs; return False if a pinned check disagrees."""
    from attnkit import cost as c
    from attnkit._timing import format_seconds

    v = c.get(variant)
    phase = v.check_phase(phase)
    activations = v.default_activations if activations is None else activations
    assumptions = v.assumptions if assume is None else assume
    sizes = c.resolve_sizes(v, at, dtype_bytes=dtype.itemsize)
    used = sorted(v.symbols() | {"w"}, key=list(c.SYMBOLS).index)
    # (label, expression, how it is obtained)
    exprs: list[tuple[str, sympy.Expr, str]] = [
        (
            "FLOPs",
            c.flops(v, phase, activations=activations),
            "derived matmuls + typed elementwise",
        ),
        (
            "matmul FLOPs",
            c.flops(v, phase, activations=activations, matmul_only=True),
            "derived",
        ),
        (
            "useful matmul",
            c.flops(v, phase, activations=activations, matmul_only=True, useful=True),
            "derived",
        ),
        ("bytes moved", c.bytes_moved(v, phase, activations=activations), "derived from shapes"),
        ("memory held", c.memory(v, phase, activations=activations), "derived from shapes"),
    ]
    console.print(f"[bold]{v.name}[/bold]: {v.summary}")
    console.print(
        f"implementation {v.implementation}; phase {phase}; activations {activations}",
        highlight=False,
    )
    console.print("sizes " + " ".join(f"{n}={sizes[n]}" for n in used), highlight=False)
    console.print("exact (w = bytes per element):", highlight=False)
    for label, expr, _ in exprs:
        console.print(f"  {label:<13} = {sympy.sstr(sympy.factor_terms(expr))}", highlight=False)

    steps = Table(
        title="FLOPs per step: derived from a declared contraction, or typed per element",
        title_justify="left",
    )
    for col in ("step", "pass", "FLOPs at sizes", "useful", "source"):
        steps.add_column(col, justify="right" if "FLOPs" in col or col == "useful" else "left")
    for row in c.breakdown(v, phase, activations=activations):
        steps.add_row(
            row.name,
            row.pass_,
            _num(c.evaluate(row.flops, sizes)),
            _num(c.evaluate(row.useful, sizes)),
            row.source,
        )
    console.print(steps)

    measured = None
    if check:
        measured = c.measure(variant, sizes, phase, activations=activations, dtype=dtype)
    table = Table(title_justify="left")
    table.add_column("quantity")
    table.add_column("how")
    table.add_column("Big-O")
    table.add_column("model at sizes", justify="right")
    if measured is not None:
        table.add_column("measured", justify="right")
        table.add_column("", justify="center")
    ok = True
    for label, expr, how in exprs:
        value = c.evaluate(expr, sizes)
        cells = [label, how, c.format_big_o(c.big_o(expr, assumptions)), _num(value)]
        if measured is not None:
            if label == "matmul FLOPs":
                same = measured.flops == value
                if measured.runner.pinned:
                    ok = ok and same
                    verdict = "✓ equal" if same else "✗ differs"
                else:
                    verdict = f"not pinned ({measured.flops / value:.2f}x)"
                cells += [_num(measured.flops), verdict]
            else:
                cells += ["", ""]
        table.add_row(*cells)
    if measured is not None and measured.time is not None:
        seconds = measured.time.median
        rate = c.evaluate(exprs[0][1], sizes) / seconds / 1e9 if seconds > 0 else float("nan")
        table.add_row("time", "", "", "", format_seconds(seconds), f"{rate:.1f} GFLOP/s")
    console.print(table)
    console.print(f"Big-O assumptions: {assumptions}", highlight=False)
    console.print(
        "derived: from the contractions the implementation runs and the shapes they name; "
        "typed: a per-element FLOP constant of an elementwise step (a convention); useful: "
        "without masked halves, ones columns and recomputation",
        highlight=False,
    )
    if measured is not None:
        console.print(
            f"measured: {measured.runner.description}, FlopCounterMode (+ CPU SDPA and "
            f"in-place baddbmm formulas); time: median of "
            f"{measured.time.repeats if measured.time else 0} calls",
            highlight=False,
        )
    return ok


def cost(
    variant: Annotated[
        str | None, typer.Argument(help="Variant (omit to list them): softmax, linear, mqa, ...")
    ] = None,
    phase: Annotated[
        str | None, typer.Option(help="decode | forward | train (default: the variant's first).")
    ] = None,
    at: Annotated[str, typer.Option(help="Sizes, e.g. b=8,d=1024,n=4096 (others: defaults).")] = "",
    check: Annotated[
        bool,
        typer.Option("--check", help="Also count FLOPs (FlopCounterMode) and time the real code."),
    ] = False,
    activations: Annotated[
        str | None,
        typer.Option(
            help="keep | recompute: what the backward pass holds (default: what the "
            "variant's implementation does)."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float64 | bfloat16 | float16.")] = "float32",
    assume: Annotated[
        str | None, typer.Option(help="Big-O assumptions, e.g. 'b, n, d >> h; n >= 0'.")
    ] = None,
    table: Annotated[
        bool, typer.Option("--table", help="Print the complexity table (the README's), derived.")
    ] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="With --table: Markdown.")] = False,
) -> None:
    """Exact FLOPs, bytes and memory of an attention variant, derived from its code.

    Prints the exact expressions, their Big-O and their values at the given sizes, and
    per step whether its FLOPs are derived (a declared contraction) or typed (a
    per-element constant); with --check, the matmul FLOPs counted on the real
    implementation and its time.
    Exits with status 1 if a pinned check disagrees with the model.
    """
    from attnkit import cost as c

    console = Console()
    if table:
        _print_table(console, markdown)
        return
    if variant is None:
        _list_variants(console)
        return
    if variant not in c.variants():
        raise typer.BadParameter(
            f"unknown variant {variant!r}; known: {', '.join(c.variants())}", param_hint="VARIANT"
        )
    if activations is not None and activations not in c.ACTIVATIONS:
        raise typer.BadParameter("must be 'keep' or 'recompute'", param_hint="--activations")
    if dtype not in _DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(_DTYPES)}", param_hint="--dtype")
    try:
        ok = _report(
            console, variant, phase, _parse_at(at), check, activations, _DTYPES[dtype], assume
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if not ok:
        raise typer.Exit(code=1)


def register(parent: typer.Typer) -> None:
    """Add ``cost`` as a command of ``parent`` (e.g. the ``attnkit`` app)."""
    parent.command(name="cost")(cost)


#: ``cost`` as a standalone Typer app (a single command, so no sub-command name).
app = typer.Typer(
    name="cost",
    help="Exact cost of attnkit's attention variants, derived from their code.",
    add_completion=False,
)
register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
