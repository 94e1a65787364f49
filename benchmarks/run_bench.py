"""Thin script around ``attnkit bench`` for checkouts where the command is not installed.

    python benchmarks/run_bench.py --quick --json bench.json
    python benchmarks/run_bench.py --op linear-causal-fwd --op decode --threads 2

Same options as ``attnkit bench`` (``--help``); the harness lives in ``attnkit.bench``.
"""

from __future__ import annotations

from attnkit.bench.cli import app

if __name__ == "__main__":
    app()
