#!/usr/bin/env bash
# The documentation: sets up .venv if needed, installs the `docs` extra (Sphinx, furo,
# myst-parser) when missing, builds docs/_build/html with warnings as errors (an
# unresolved cross-reference in a docs page is one: docs/_ext/attnkit_refs.py) and runs
# every example in the docs (sphinx.ext.doctest: a wrong shown output fails the build).
# Not nitpicky (-n): references inside docstrings that do not resolve render as text.
# Extra arguments are passed to both sphinx-build runs.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
DOCS_STAMP="$VENV/.attnkit-docs-stamp"
if [ ! -f "$DOCS_STAMP" ] || [ "$(cat "$DOCS_STAMP")" != "$WANT" ]; then
  echo "[attnkit] installing the docs extra (sphinx, furo, myst-parser)" >&2
  python -m pip install --quiet -e "$ROOT[dev,docs]"
  echo "$WANT" > "$DOCS_STAMP"
fi
echo "[attnkit] sphinx html -> docs/_build/html" >&2
python -m sphinx -W --keep-going -q -b html docs docs/_build/html "$@"
echo "[attnkit] sphinx doctest (every example in the docs runs)" >&2
python -m sphinx -W --keep-going -q -b doctest docs docs/_build/doctest "$@"
echo "[attnkit] docs built: docs/_build/html/index.html" >&2
