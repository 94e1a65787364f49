#!/usr/bin/env bash
# The whole test suite: sets up .venv if needed, lints and type-checks src/, runs pytest.
# Extra arguments are passed to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
echo "[attnkit] ruff" >&2
ruff check .
ruff format --check .
echo "[attnkit] mypy" >&2
mypy
echo "[attnkit] pytest" >&2
exec python -m pytest -n 2 "$@"
