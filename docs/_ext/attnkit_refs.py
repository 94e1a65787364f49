"""Sphinx extension: every cross-reference to attnkit written in a docs page must resolve.

Sphinx stays quiet about a ``{func}`` / ``{class}`` / ``{meth}`` reference it cannot
resolve unless the whole build is nitpicky, and then it also flags every reference in
every docstring. This extension warns (so ``-W`` fails the build) for the unresolved
references to attnkit's Python objects whose source is a page under ``docs/``, and
leaves the docstrings' to autodoc (they render as plain text). Other packages' names
(torch, transformers) have no inventory offline: the build fetches nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sphinx.util import logging

if TYPE_CHECKING:
    from docutils.nodes import Element, TextElement
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment

logger = logging.getLogger(__name__)


def _from_a_page(app: Sphinx, node: Element) -> bool:
    """True when the reference was written in a docs page, not in a docstring."""
    source = node.source or ""
    if not source or "docstring of" in source:
        return False
    try:
        Path(source).resolve().relative_to(Path(app.srcdir).resolve())
    except ValueError:
        return False
    return True


def check(app: Sphinx, env: BuildEnvironment, node: Element, contnode: TextElement) -> None:
    target = str(node.get("reftarget", ""))
    domain = node.get("refdomain")
    if domain == "py" and target.split(".")[0] == "attnkit" and _from_a_page(app, node):
        logger.warning(
            "unresolved %s:%s reference %r in a docs page",
            node.get("refdomain"),
            node.get("reftype"),
            target,
            location=node,
            type="attnkit",
            subtype="ref",
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
