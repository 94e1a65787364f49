"""The README's code runs as written: its tour is part of the test suite."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_a_tour() -> None:
    assert _python_blocks(), "README.md lost its ```python tour"


def test_readme_python_blocks_run() -> None:
    namespace: dict[str, object] = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_names_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text


def test_readme_cost_table_is_the_derived_one() -> None:
    """The complexity table in the README is what `attnkit cost --table --markdown` derives."""
    from attnkit.cost.table import markdown, rows

    assert markdown(rows()).strip() in README.read_text(encoding="utf-8")
