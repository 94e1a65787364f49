"""The README's code runs as written: every Python block is part of the test suite.

- A block fenced ```python runs here, in one namespace shared by the blocks in order.
- A block fenced ```py is a script that needs its own launcher; its first line says
  how to run it, ``# NAME.py -- run with: COMMAND`` (e.g. ``torchrun --nproc_per_node=2
  NAME.py``), and the test saves it as NAME.py and runs COMMAND (torchrun as
  ``python -m torch.distributed.run --standalone``, a free port on this machine).
- Any other Python-looking fence (```python3, ```pycon, ...) must be preceded by a
  line ``<!-- not run: REASON -->``; otherwise the test fails, so no block can slip
  out of the suite unnoticed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<info>[^\n`]*)\n(?P<body>.*?)```", re.S)
_PYTHONISH = {"python", "py", "python3", "py3", "pycon", "ipython"}
_SCRIPT = re.compile(r"#\s*(?P<name>[\w-]+\.py)\s+--\s+run with:\s*(?P<cmd>.+)")


def _blocks() -> list[tuple[str, str, str]]:
    """(info string, body, the line before the fence) of every fenced block."""
    text = README.read_text(encoding="utf-8")
    return [(m["info"].strip(), m["body"], m["before"]) for m in _FENCE.finditer(text)]


def _python_blocks() -> list[str]:
    return [body for info, body, _ in _blocks() if info == "python"]


def _script_blocks() -> list[str]:
    return [body for info, body, _ in _blocks() if info == "py"]


def test_readme_has_a_tour() -> None:
    assert _python_blocks(), "README.md lost its ```python tour"


def test_every_python_block_is_run_or_says_why_not() -> None:
    unrunnable = [
        (info, body.splitlines()[0] if body else "")
        for info, body, before in _blocks()
        if info in _PYTHONISH - {"python", "py"} and "<!-- not run:" not in before
    ]
    assert not unrunnable, f"Python blocks that no test runs: {unrunnable}"
    for body in _script_blocks():
        first = body.splitlines()[0] if body else ""
        assert _SCRIPT.match(first), (
            f"a ```py block must start with '# NAME.py -- run with: COMMAND', got {first!r}"
        )


def test_readme_python_blocks_run() -> None:
    namespace: dict[str, object] = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)


def _launcher(command: str, script: Path) -> list[str]:
    """The block's own command, with torchrun run from this interpreter on a free port."""
    words = shlex.split(command)
    if words and words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    elif words and words[0] in ("python", "python3"):
        words = [sys.executable, *words[1:]]
    return [str(script) if w == script.name else w for w in words]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_script_blocks())))
def test_readme_scripts_run_with_their_own_command(index: int, tmp_path: Path) -> None:
    """E.g. the sequence-parallel example, under torchrun with 2 gloo processes."""
    body = _script_blocks()[index]
    match = _SCRIPT.match(body.splitlines()[0])
    assert match is not None
    script = tmp_path / match["name"]
    script.write_text(body, encoding="utf-8")
    done = subprocess.run(
        _launcher(match["cmd"], script),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [ln for ln in done.stderr.splitlines() if "rror" in ln or "terminate" in ln]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + done.stderr[-2000:]


def test_readme_names_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text
