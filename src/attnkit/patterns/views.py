"""Views of attention maps: a layers x heads grid, a head-score table, one head with its tokens.

Figures use matplotlib's object API on the Agg canvas (no pyplot, no display), so they
render anywhere, also on a server. :func:`write_page` writes them as PNGs and one
self-contained ``index.html``: the PNGs are embedded as ``data:`` URIs and the page has
no script, no external stylesheet and no web font, so it looks the same offline, from
a file, in a mail attachment or in CI (a page that pulls its scripts from a CDN, as
bertviz's does, stays blank offline).

Every map is drawn as its row distributions P (|A| divided by its row sum; equal to A
for softmax, argmax and normalised linear attention), on one colour scale from 0 to 1.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attnkit._validation import check_int
from attnkit.patterns.maps import AttentionMaps
from attnkit.patterns.scores import LABELS, SCORE_NAMES, row_distributions

__all__ = [
    "CMAP",
    "grid_figure",
    "head_figure",
    "page_html",
    "save_figure",
    "scores_figure",
    "write_page",
]

CMAP = "viridis"

#: How each score is described in tables and plots.
SCORE_TITLES: dict[str, str] = {
    "induction": "induction",
    "previous": "previous token",
    "next": "next token",
    "first": "first token (sink)",
    "delimiter": "delimiters",
    "entropy": "entropy (nats)",
    "distance": "mean distance (tokens)",
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (creating the directory); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi)
    return target


def _show(ax: Axes, P: Any, *, ticks: bool) -> Any:
    image = ax.imshow(P, vmin=0.0, vmax=1.0, cmap=CMAP, interpolation="nearest", aspect="equal")
    if not ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def grid_figure(
    maps: AttentionMaps, sequence: int = 0, threshold: float = 0.4, cell: float = 1.7
) -> Figure:
    """A layers x heads grid of one sequence's maps, each titled with its label and score."""
    check_int("sequence", sequence, 0)
    if sequence >= maps.batch:
        raise ValueError(f"sequence must be < {maps.batch}, got {sequence}")
    N, H = maps.n_layers, maps.n_heads
    scores = maps.scores()
    labels = maps.labels(threshold)
    fig = _figure(cell * H + 1.0, cell * N + 0.6)
    axes = fig.subplots(N, H, squeeze=False)
    P, _ = row_distributions(maps.weights[:, sequence])  # [N, H, L, L]
    image = None
    for n in range(N):
        for h in range(H):
            ax = axes[n][h]
            image = _show(ax, P[n, h].numpy(), ticks=False)
            label = labels[n][h]
            key = next((k for k, v in LABELS.items() if v == label), None)
            value = f" {float(scores[key][n, h]):.2f}" if key is not None else ""
            ax.set_title(f"L{n} H{h}: {label}{value}", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"layer {n}\nquery", fontsize=7)
            if n == N - 1:
                ax.set_xlabel("key", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(f"{maps.source}: every head on sequence {sequence} (L = {maps.length})")
    return fig


def scores_figure(maps: AttentionMaps, cell: float = 0.45) -> Figure:
    """One heat map per score, layers x heads, each cell annotated with its value.

    Shares are drawn on 0..1, entropy on 0..ln L (uniform attention over all L keys),
    distance on 0..L - 1.
    """
    scores = maps.scores()
    names = [n for n in SCORE_NAMES if n in scores]
    N, H, L = maps.n_layers, maps.n_heads, maps.length
    tops = {"entropy": max(math.log(L), 1e-9), "distance": max(L - 1.0, 1e-9)}
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    width = max(3.0, cell * H + 1.4)
    height = max(2.4, cell * N + 1.2)
    fig = _figure(width * ncols, height * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    annotate = N * H <= 150
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    for ax, name in zip(axes, names, strict=False):
        values = scores[name].numpy()
        vmax = tops.get(name, 1.0)
        image = ax.imshow(values, vmin=0.0, vmax=vmax, cmap=CMAP, aspect="auto")
        ax.set_title(SCORE_TITLES[name], fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(N))
        if annotate:
            for n in range(N):
                for h in range(H):
                    v = float(values[n, h])
                    ax.text(
                        h,
                        n,
                        f"{v:.2f}" if name not in tops else f"{v:.1f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v < 0.6 * vmax else "black",
                    )
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{maps.source}: head scores (averaged over {maps.batch} sequences)")
    return fig


def head_figure(
    maps: AttentionMaps, layer: int, head: int, sequence: int = 0, max_ticks: int = 64
) -> Figure:
    """One head's map on one sequence with its tokens on both axes (every k-th if long)."""
    A = maps.head(layer, head, sequence)
    P, _ = row_distributions(A)
    L = maps.length
    tokens = maps.labels_of(sequence)
    step = max(1, math.ceil(L / max_ticks))
    size = min(14.0, max(5.5, 0.16 * min(L, max_ticks) + 2.0))
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    image = _show(ax, P.numpy(), ticks=True)
    where = list(range(0, L, step))
    ax.set_xticks(where, [tokens[i] for i in where], rotation=90, fontsize=7)
    ax.set_yticks(where, [tokens[i] for i in where], fontsize=7)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    scores = maps.scores()
    label = maps.labels()[layer][head]
    parts = ", ".join(
        f"{SCORE_TITLES[name]} {float(scores[name][layer, head]):.2f}" for name in scores
    )
    lines = textwrap.wrap(parts, width=int(12 * size))
    ax.set_title("\n".join([f"{maps.layers[layer]}, head {head}: {label}", *lines]), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return fig


def _pick_heads(maps: AttentionMaps, threshold: float) -> list[tuple[int, int, str]]:
    """The top head of each behaviour score present (over all layers): (layer, head, why)."""
    scores = maps.scores()
    picked: list[tuple[int, int, str]] = []
    for name in LABELS:
        if name not in scores:
            continue
        n, h, value = maps.best(name)
        if value >= threshold and (n, h) not in [(a, b) for a, b, _ in picked]:
            picked.append((n, h, f"top {SCORE_TITLES[name]} score, {value:.2f}"))
    if not picked:
        picked.append((0, 0, "layer 0, head 0 (no head reaches the label threshold)"))
    return picked


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1300px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f4f4f4; }
td.label { text-align: left; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #555; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 0.25em; }
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _cell(value: float, bounded: bool) -> str:
    # The cell's shade says the value at a glance (0 white, 1 deep blue).
    if not bounded:
        return f"<td>{value:.2f}</td>"
    a = min(max(value, 0.0), 1.0)
    colour = "#fff" if a >= 0.6 else "#000"
    return (
        f"<td style='background: rgba(31, 119, 180, {0.85 * a:.2f}); color: {colour}'>"
        f"{value:.2f}</td>"
    )


def page_html(
    maps: AttentionMaps,
    images: Sequence[tuple[str, Path, str]],
    *,
    title: str,
    threshold: float = 0.4,
    command: str = "",
) -> str:
    """The self-contained page: the score table, then each (heading, PNG, caption) inline."""
    rows = maps.table(threshold)
    names = [n for n in SCORE_NAMES if n in rows[0]] if rows else []
    head = "".join(f"<th>{_e(SCORE_TITLES[n])}</th>" for n in names)
    body = "".join(
        f"<tr><td>{r['layer']}</td><td>{r['head']}</td><td class='label'>{_e(r['label'])}</td>"
        + "".join(_cell(r[n], n not in ("entropy", "distance")) for n in names)
        + "</tr>"
        for r in rows
    )
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='meta'>{_e(maps.source)} · {maps.n_layers} layers x {maps.n_heads} heads · "
        f"{maps.batch} sequence(s) of {maps.length} tokens.</p>",
    ]
    if command:
        parts.append(f"<p class='meta'>Reproduce with <code>{_e(command)}</code>.</p>")
    parts += [
        "<h2>Head scores</h2>",
        "<p>Each score is the share of a query's attention (averaged over queries and "
        "sequences) that goes where the score looks: <b>induction</b> to the token after "
        "the previous occurrence of the current token, <b>previous token</b> to position "
        "i - 1, <b>next token</b> to i + 1, <b>first token</b> to position 0 (a sink), "
        "<b>delimiters</b> to [CLS]/[SEP]-like tokens; entropy is in nats, distance in "
        f"tokens. A head's label is its top share when that reaches {threshold:g}, "
        "else <i>mixed</i>.</p>",
        f"<table><tr><th>layer</th><th>head</th><th>label</th>{head}</tr>{body}</table>",
    ]
    for heading, path, caption in images:
        parts.append(
            f"<h2>{_e(heading)}</h2><figure><img alt='{_e(heading)}' src='{_data_uri(path)}'>"
            f"<figcaption>{_e(caption)} <span class='meta'>(also saved as "
            f"<code>{_e(path.name)}</code>)</span></figcaption></figure>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)


def write_page(
    maps: AttentionMaps,
    out: str | os.PathLike[str],
    *,
    title: str = "attnkit patterns",
    heads: Sequence[tuple[int, int]] | None = None,
    sequence: int = 0,
    threshold: float = 0.4,
    command: str = "",
) -> Path:
    """Write the PNGs, ``scores.json`` and a self-contained ``index.html`` into ``out``.

    ``heads`` [(layer, head), ...] get a page section each with their tokens on the
    axes; by default the top head of every behaviour score that reaches ``threshold``.
    Returns the path of ``index.html``.
    """
    for n, h in heads or ():
        maps.head(n, h)  # ValueError for a head the maps do not have, before any drawing
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, Path, str]] = []
    grid = save_figure(grid_figure(maps, sequence, threshold), target / "grid.png", dpi=90)
    images.append(
        (
            "Every head",
            grid,
            f"Attention of every head on sequence {sequence}: row = query, column = key, "
            "brighter = more weight. A previous-token head is a line just below the "
            "diagonal, an induction head on a repeated sequence a line T - 1 below it, a "
            "sink a bright first column.",
        )
    )
    sc = save_figure(scores_figure(maps), target / "scores.png")
    images.append(("Scores as heat maps", sc, "The table above, one heat map per score."))
    chosen = (
        [(n, h, "requested") for n, h in heads]
        if heads is not None
        else _pick_heads(maps, threshold)
    )
    for n, h, why in chosen:
        path = save_figure(
            head_figure(maps, n, h, sequence), target / f"head_L{n}_H{h}.png", dpi=90
        )
        images.append((f"Layer {n}, head {h}", path, f"{why}; tokens on the axes."))
    (target / "scores.json").write_text(
        json.dumps({"source": maps.source, "heads": maps.table(threshold)}, indent=1) + "\n",
        encoding="utf-8",
    )
    index = target / "index.html"
    index.write_text(
        page_html(maps, images, title=title, threshold=threshold, command=command),
        encoding="utf-8",
    )
    return index
