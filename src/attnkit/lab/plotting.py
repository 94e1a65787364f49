"""Figures for the lab: matplotlib's object API on the Agg canvas (no pyplot, no GUI).

Using :class:`matplotlib.figure.Figure` with an explicit Agg canvas never touches
pyplot's global backend, so importing the lab changes nothing for the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter, NullLocator

from attnkit.lab.core import Context, Figure

__all__ = ["COLORS", "color", "geometric_ticks", "legend", "new_figure", "plain_log_labels", "save"]

#: One colour per recurring series name, so a variant looks the same in every plot.
COLORS: dict[str, str] = {
    "softmax": "#1f77b4",
    "softmax (SDPA)": "#1f77b4",
    "hard": "#d62728",
    "straight_through": "#2ca02c",
    "gumbel": "#9467bd",
    "elu": "#ff7f0e",
    "relu": "#8c564b",
    "taylor": "#2ca02c",
    "polynomial": "#9467bd",
    "favor": "#e377c2",
    "identity": "#7f7f7f",
    "argmax (ST)": "#d62728",
    "kernel (q.k+1)^2": "#17becf",
    "MHA": "#1f77b4",
    "GQA (g=2)": "#ff7f0e",
    "MQA": "#2ca02c",
}
_FALLBACK = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def color(name: str, index: int = 0) -> str:
    """The colour of series ``name`` (a fixed palette entry, else by ``index``)."""
    return COLORS.get(name, _FALLBACK[index % len(_FALLBACK)])


def new_figure(
    ncols: int = 1, *, width: float = 6.4, height: float = 4.4, nrows: int = 1
) -> tuple[MplFigure, list[Axes]]:
    """A figure with ``nrows x ncols`` axes (flattened, row-major) on an Agg canvas."""
    fig = MplFigure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes: list[Axes] = [ax for row in grid for ax in row]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes


def save(
    fig: MplFigure, ctx: Context, name: str, title: str, caption: str, *, dpi: int = 110
) -> Figure:
    """Write ``fig`` to ``<ctx.figures>/<name>.png`` and describe it."""
    path = Path(ctx.figures) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return Figure(name=name, path=path, title=title, caption=caption)


def legend(ax: Axes, **kwargs: Any) -> None:
    """A legend with the lab's defaults (small font, translucent frame)."""
    ax.legend(**{"fontsize": "small", "framealpha": 0.85, **kwargs})


def geometric_ticks(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    """Label the measured sizes themselves on a log axis (2, 8, 32, ... not 10^k only)."""
    labels = [f"{v:g}" for v in values]
    if axis == "x":
        ax.set_xticks(list(values), labels)
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.set_yticks(list(values), labels)
        ax.yaxis.set_minor_locator(NullLocator())


def _plain(value: float, _pos: object = None) -> str:
    return f"{value:g}"


def plain_log_labels(ax: Axes, axis: str = "y") -> None:
    """Label a log axis with plain numbers (0.2, 0.5, 1, 2) instead of 2x10^-1."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(_plain))
    target.set_minor_formatter(FuncFormatter(lambda v, p: _plain(v) if f"{v:e}"[0] in "25" else ""))
