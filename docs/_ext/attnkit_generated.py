"""Sphinx extension: Markdown that attnkit's own code derives, written at build time.

Before the pages are read it writes, under ``docs/_generated/`` (not tracked):

- ``bench_tables.md``: every table of ``benchmarks/results/cpu.json`` (the JSON that
  ``attnkit bench --json`` writes), rendered by :func:`attnkit.bench.render.to_markdown`,
  the same renderer as the terminal tables;
- ``bench_headline.md``: the headline cases alone;
- ``cost_table.md``: the complexity table that ``attnkit cost --table --markdown`` prints.

Pages pull them in with MyST's ``{include}`` directive, so a number in the docs is the
number in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx

#: Cases shown on their own in the headline table (the rest are on the benchmarks page).
HEADLINE = ("softmax_causal", "gated_delta_rule", "linear_chunked")


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def generate(app: Sphinx) -> None:
    from attnkit.bench.render import to_markdown
    from attnkit.bench.results import Report
    from attnkit.cost.table import markdown, rows

    src = Path(app.srcdir)
    out = src / "_generated"
    out.mkdir(exist_ok=True)
    data = json.loads((src.parent / "benchmarks" / "results" / "cpu.json").read_text("utf-8"))
    report = Report.from_json(data)
    _write_if_changed(out / "bench_tables.md", to_markdown(report))
    names = [c.name for c in report.cases]
    chosen = [n for n in HEADLINE if n in names]
    _write_if_changed(out / "bench_headline.md", to_markdown(report, cases=chosen))
    _write_if_changed(out / "cost_table.md", markdown(rows()) + "\n")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
