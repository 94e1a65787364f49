"""The documentation's sources: self-contained, generated tables, runnable examples.

Fast checks that need no Sphinx run (``bash scripts/docs.sh`` builds the site and runs
its examples):

- no tracked file refers to anything outside the repository (a design document, a
  sibling folder, an issue tracker);
- the tables the docs render at build time are exactly what attnkit's own code derives
  (the complexity table, the benchmark tables of the committed bench JSON), and the
  pages include them;
- the benchmark JSON reads back into a report that writes the same JSON;
- every Python example in ``docs/`` is one the doctest build runs, and every link from
  README.md into the repository points at a file that exists.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from attnkit._timing import Timing
from attnkit.bench.results import (
    SCHEMA,
    CaseResult,
    MachinePeaks,
    Report,
    Row,
    Target,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: References to things outside the repository. "issue" in the sense of a problem is
#: fine; "the issue's targets", "issue 12", a design doc or ../shared are not.
OUTSIDE = re.compile(
    r"DESIGN\.md|\.\./shared|(?<![\w/.-])shared/|design doc"
    r"|the (performance|cost|lab|core|HF|kernels) issue"
    r"|\bissues? #?[0-9]|the issue's|(of|from|by) the issue\b|\bcoordinator\b",
    re.IGNORECASE,
)
_SKIP_SUFFIXES = {".png", ".jpg", ".gif", ".pt", ".npy", ".ico", ".woff", ".woff2"}


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [ROOT / n for n in names]


def test_outside_pattern_catches_what_it_should() -> None:
    """The pattern itself: hits on outside references, none on ordinary prose."""
    hits = [
        "see DESIGN.md",
        "../shared/x",
        "in shared/DESIGN",
        "the design doc's table",
        "targets of the issue",
        "the issue's targets",
        "issue 12",
        "issues #3",
        "the performance issue",
        "the coordinator re-measures",
    ]
    misses = [
        "the issue with a padded row is",
        "shared memory",
        "/mnt/shared_runs",
        "a shared filesystem",
        "keys shared by 2 heads",
    ]
    assert all(OUTSIDE.search(t) for t in hits), [t for t in hits if not OUTSIDE.search(t)]
    assert not any(OUTSIDE.search(t) for t in misses), [t for t in misses if OUTSIDE.search(t)]


def test_no_tracked_file_refers_outside_the_repository() -> None:
    me = Path(__file__).resolve()
    found = []
    for path in _tracked_files():
        if path.resolve() == me or path.suffix in _SKIP_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "references outside the repository:\n" + "\n".join(found)


def _extension() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "attnkit_generated", DOCS / "_ext" / "attnkit_generated.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_are_what_the_code_derives(tmp_path: Path) -> None:
    from attnkit.bench.render import to_markdown
    from attnkit.cost.table import markdown, rows

    written = {p.name: p.read_text("utf-8") for p in _extension().write_generated(ROOT, tmp_path)}
    assert written["cost_table.md"].strip() == markdown(rows()).strip()
    data = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text("utf-8"))
    assert written["bench_tables.md"] == to_markdown(Report.from_json(data))
    # Every timed row of the JSON shows up in the rendered tables.
    assert written["bench_tables.md"].count("\n| ") >= sum(
        len(sec["rows"]) for case in data["cases"] for sec in case["sections"]
    )


@pytest.mark.parametrize(
    ("page", "generated"),
    [
        ("howto/cost.md", "_generated/cost_table.md"),
        ("benchmarks.md", "_generated/bench_tables.md"),
    ],
)
def test_pages_include_the_generated_tables(page: str, generated: str) -> None:
    text = (DOCS / page).read_text("utf-8")
    target = (DOCS / page).parent / re.search(r"```\{include\} (\S+)", text)[1]  # type: ignore[index]
    assert target.resolve() == (DOCS / generated).resolve()


def _same(a: object, b: object) -> bool:
    """Equal JSON, floats to 1e-12 relative (peaks go through GFLOP/s and back)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return type(a) is type(b) and a == b


def test_committed_bench_json_reads_back_unchanged() -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text("utf-8"))
    assert data["schema"] == SCHEMA and data["cases"], "an empty or foreign bench JSON"
    assert _same(Report.from_json(data).to_json(), data)


def test_report_round_trip_keeps_every_field() -> None:
    """A report built here: timings, skips, metrics, targets, NaN, peaks."""
    peaks = MachinePeaks(matmul_flops_per_s=2e11, copy_bytes_per_s=4e10)
    case = CaseResult("c", "A case", config={"B": 1, "dtype": "float32"}, seconds=1.5)
    sec = case.section("fwd", baseline="ref", ratio="time", notes=["a note"])
    sec.add(Row("ref", {"N": 64}, Timing(2e-3, 1e-3, 3e-3, 5), flops=1e9, nbytes=1e6))
    sec.add(
        Row(
            "fast",
            {"N": 64},
            Timing(1e-3, 9e-4, 2e-3, 5),
            flops=1e9,
            computed_flops=1.3e9,
            metrics={"saved_bytes": 1024, "max_abs_err": 1e-7, "note": "x"},
        )
    )
    sec.add(Row("other", {"N": 64}, skipped="not installed"))
    sec.add(Row("untimed", {"N": 64}, metrics={"bytes_per_token": 12.5}))
    sec.compare()
    case.targets.append(Target("speed", 2.0, 1.5, ">=", "x"))
    case.targets.append(Target("missing", None, 0.4, "<=", "%"))
    case.summary.update({"speedup": 2.0, "nan": math.nan, "label": "ok"})
    report = Report({"command": "attnkit bench", "date": "today"}, peaks, [case])
    data = report.to_json()
    again = Report.from_json(json.loads(json.dumps(data)))
    assert _same(again.to_json(), json.loads(json.dumps(data)))
    row = again.cases[0].sections[0].rows[1]
    assert row.timing == Timing(1e-3, 9e-4, 2e-3, 5) and row.speedup == pytest.approx(2.0)
    assert again.peaks == peaks and again.cases[0].targets[0].met is True


def test_report_from_json_rejects_another_schema() -> None:
    with pytest.raises(ValueError, match=re.escape(f"expected {SCHEMA!r}")):
        Report.from_json({"schema": "attnkit-bench/0", "meta": {}, "cases": []})


_FENCE = re.compile(r"(?P<before>[^\n]*)\n(?P<fence>```+)(?P<info>[^\n`]*)\n")


def test_every_python_example_in_the_docs_runs_in_the_build() -> None:
    """Python shown in docs/ is a {testcode}/{doctest} block (or a literalinclude of a
    file that a hidden {testcode} runs); a plain ```python fence would be shown but
    never run, so it must say why: a line ``<!-- not run: REASON -->`` before it."""
    loose = []
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts or "_generated" in page.parts:
            continue
        text = page.read_text("utf-8")
        for m in _FENCE.finditer(text):
            info = m["info"].strip()
            if info in {"python", "py", "python3", "pycon"} and "<!-- not run:" not in m["before"]:
                loose.append(f"{page.relative_to(ROOT)}: ```{info}")
            if info.startswith("{literalinclude}") and info.endswith(".py"):
                name = Path(info.split()[-1]).name
                assert name in text.split(m.group(0), 1)[1], f"{page}: nothing runs {name}"
    assert not loose, f"Python blocks that the doctest build does not run: {loose}"


def test_readme_links_into_the_repository_exist() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    links = re.findall(r"\]\((?!https?:|#)([^)#\s]+)", text)
    assert links, "README.md links to no docs page"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_docs_toctrees_include_the_theory_pages() -> None:
    assert "theory/index" in (DOCS / "index.md").read_text("utf-8")
