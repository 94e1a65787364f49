"""Sphinx extension: Markdown that attnkit's own code derives, written at build time.

Before the pages are read it writes, under ``docs/_generated/`` (not tracked):

- ``bench_tables.md``: every table of ``benchmarks/results/cpu.json`` (the JSON that
  ``attnkit bench --json`` writes), rendered by :func:`attnkit.bench.render.to_markdown`,
  the same renderer as the terminal tables;
- ``cost_table.md``: the complexity table that ``attnkit cost --table --markdown`` prints.

Pages pull them in with MyST's ``{include}`` directive, so a number in the docs is the
number in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sphinx.application import Sphinx

#: The bench JSON that the benchmarks page renders, relative to the repository root.
BENCH_JSON = Path("benchmarks") / "results" / "cpu.json"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def write_generated(root: Path, out: Path) -> list[Path]:
    """Write the generated Markdown of the repository at ``root`` into ``out``."""
    from attnkit.bench.render import to_markdown
    from attnkit.bench.results import Report
    from attnkit.cost.table import markdown, rows

    out.mkdir(parents=True, exist_ok=True)
    report = Report.from_json(json.loads((root / BENCH_JSON).read_text("utf-8")))
    files = {
        out / "bench_tables.md": to_markdown(report),
        out / "cost_table.md": markdown(rows()) + "\n",
    }
    for path, text in files.items():
        _write_if_changed(path, text)
    return list(files)


def generate(app: Sphinx) -> None:
    src = Path(app.srcdir)
    write_generated(src.parent, src / "_generated")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
