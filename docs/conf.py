"""Sphinx configuration of attnkit's documentation (``bash scripts/docs.sh`` builds it).

Pages are Markdown (MyST); the API reference comes from the docstrings (autodoc +
napoleon); the examples run under ``sphinx.ext.doctest``; tables that the code derives
(the benchmark results, the complexity table) are generated at build time by
``_ext/attnkit_generated.py``, never retyped; ``_ext/attnkit_refs.py`` turns an
unresolved cross-reference in a page (not in a docstring) into a warning, so ``-W``
fails on it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "attnkit"
author = "attnkit contributors"
copyright = "attnkit contributors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "attnkit_generated",
    "attnkit_refs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "attnkit"
html_static_path = ["_static"]

autodoc_default_options = {
    "members": True,
    "show-inheritance": False,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# The HF examples save and load models: no progress bars, no advice about optional kernels
# in the build's output (set before the examples import transformers).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The examples run on a loaded CPU machine: one thread keeps them quick and repeatable.
doctest_global_setup = f"""
from pathlib import Path
DOCS = Path({str(HERE)!r})  # the docs folder, for examples kept as files
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
"""
