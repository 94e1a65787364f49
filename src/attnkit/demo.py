"""`attnkit demo`: a short, checked tour of the library.

Each section computes something the theory states, prints it next to the
stated value, and records whether they agree. The tour returns False if any
check fails, so the command doubles as a smoke test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import attnkit
from attnkit._timing import format_seconds, time_call


@dataclass
class DemoResult:
    """What the tour checked: (claim, passed) pairs."""

    checks: list[tuple[str, bool]] = field(default_factory=list)

    def record(self, claim: str, passed: bool) -> bool:
        self.checks.append((claim, passed))
        return passed

    @property
    def ok(self) -> bool:
        return all(p for _, p in self.checks)


def _mark(ok: bool) -> str:
    return "[green]✓[/green]" if ok else "[red]✗[/red]"


def argmax_example(console: Console, result: DemoResult) -> None:
    """The worked argmax example (4 keys, 3 channels): output (1, 4, 3)."""
    keys = torch.tensor([[1.0, 2, 0], [0, 3, 4], [5, 0, 0], [0, 0, 1]])
    values = torch.tensor([[2.0, 0, 1], [1, 4, 3], [0, -1, 4], [1, 0, -1]])
    query = torch.tensor([[1.0, 1, 2]])
    scores = query @ keys.T
    out = attnkit.argmax_attention(query[None, None], keys[None, None], values[None, None])[0, 0, 0]
    table = Table(title="Argmax attention: the worked example", title_justify="left")
    for col in ("key", "value", "q·k"):
        table.add_column(col, justify="right")
    best = int(scores.argmax())
    for j in range(keys.shape[0]):
        style = "bold green" if j == best else ""
        table.add_row(
            str(tuple(int(x) for x in keys[j])),
            str(tuple(int(x) for x in values[j])),
            f"{scores[0, j]:.0f}",
            style=style,
        )
    console.print(table)
    got = tuple(float(x) for x in out)
    ok = result.record("argmax worked example -> (1, 4, 3)", got == (1.0, 4.0, 3.0))
    console.print(f"query (1, 1, 2) -> output {got}  expected (1, 4, 3) {_mark(ok)}\n")


def scaling_example(
    console: Console, result: DemoResult, d: int = 64, samples: int = 20000
) -> None:
    """Var(q.k) = d for standard normal q, k; dividing by sqrt(d) brings it to 1."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    k = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    dots = (q * k).sum(-1)
    var, var_scaled = float(dots.var()), float((dots / math.sqrt(d)).var())
    # Var of a sample variance of n draws of a variable with kurtosis ~3: ~ 2 var^2 / n.
    tol = 5 * math.sqrt(2.0 / samples)
    ok1 = result.record(f"Var(q.k) = d = {d}", abs(var / d - 1) < tol)
    ok2 = result.record("Var(q.k / sqrt(d)) = 1", abs(var_scaled - 1) < tol)
    console.print(
        f"[bold]Why divide by sqrt(d)[/bold]: q, k ~ N(0, I_{d}), {samples} samples\n"
        f"  Var(q·k) = {var:.1f}  (theory {d}) {_mark(ok1)}    "
        f"Var(q·k/√d) = {var_scaled:.3f}  (theory 1) {_mark(ok2)}\n"
    )


def linear_equals_quadratic(console: Console, result: DemoResult, seed: int = 0) -> None:
    """Linearised attention with the exact quadratic map equals (q.k + 1)^2 attention."""
    gen = torch.Generator().manual_seed(seed)
    B, H, N, D, M = 2, 3, 37, 8, 5
    q, k = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) / 2 for _ in range(2))
    v = torch.randn(B, H, N, M, generator=gen, dtype=torch.float64)
    phi = attnkit.feature_maps.get("polynomial", degree=2, c=1.0)
    table = Table(
        title=f"Linear attention with phi = exact quadratic map (D={D}, D'={phi.out_dim(D)})",
        title_justify="left",
    )
    table.add_column("variant")
    table.add_column("max |linear - quadratic|", justify="right")
    table.add_column("", justify="center")
    for causal in (False, True):
        lin, _ = attnkit.linear_attention(q, k, v, feature_map=phi, is_causal=causal)
        quad = attnkit.kernel_attention(
            q, k, v, sim="polynomial", is_causal=causal, sim_kwargs={"degree": 2, "c": 1.0}
        )
        err = float((lin - quad).abs().max())
        name = "causal (chunked)" if causal else "non-causal"
        ok = result.record(f"linear == (q.k+1)^2 kernel attention, {name}", err < 1e-10)
        table.add_row(name, f"{err:.2e}", _mark(ok))
    console.print(table)
    want = 1 + D + D * (D + 1) // 2
    ok = result.record("quadratic feature width 1 + D + D(D+1)/2", phi.out_dim(D) == want)
    console.print(f"feature width {phi.out_dim(D)} = 1 + D + D(D+1)/2 = {want} {_mark(ok)}\n")


def _causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmap: str | None) -> object:
    if fmap is None:
        return attnkit.sdpa(q, k, v, is_causal=True)
    return attnkit.linear_attention(q, k, v, feature_map=fmap, is_causal=True)


def timings(console: Console, lengths: Sequence[int], heads: int = 4) -> None:
    """Causal softmax (torch SDPA) against causal linear attention, side by side."""
    variants: list[tuple[str, int, str | None]] = [
        ("softmax (SDPA)", 64, None),
        ("linear elu", 64, "elu"),
        ("linear taylor", 16, "taylor"),
    ]
    table = Table(
        title=f"Causal attention forward, B=1, H={heads}, value width 64 (median of repeats)",
        title_justify="left",
    )
    table.add_column("N", justify="right")
    for name, d, _ in variants:
        table.add_column(f"{name} D={d}", justify="right")
    table.add_column("elu speed-up", justify="right")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing", total=len(lengths) * len(variants))
        for n in lengths:
            row = [str(n)]
            medians = []
            for _name, d, fmap in variants:
                q, k = torch.randn(2, 1, heads, n, d).unbind(0)
                v = torch.randn(1, heads, n, 64)
                t = time_call(partial(_causal_forward, q, k, v, fmap), warmup=3, min_time=0.2)
                medians.append(t.median)
                row.append(format_seconds(t.median))
                progress.advance(task)
            row.append(f"{medians[0] / medians[1]:.2f}x")
            table.add_row(*row)
    console.print(table)


def run_demo(console: Console | None = None, lengths: Sequence[int] = (256, 1024, 4096)) -> bool:
    """Run the tour; returns True when every check agreed with the stated value."""
    console = console or Console()
    result = DemoResult()
    console.rule(f"attnkit {attnkit.__version__} · torch {torch.__version__}")
    argmax_example(console, result)
    scaling_example(console, result)
    linear_equals_quadratic(console, result)
    if lengths:
        timings(console, lengths)
    passed = sum(p for _, p in result.checks)
    colour = "green" if result.ok else "red"
    console.print(f"[{colour}]{passed}/{len(result.checks)} checks agree with the theory")
    return result.ok
