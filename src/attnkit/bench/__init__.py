"""Benchmark harness: attnkit side by side with other libraries and the machine's peaks.

``attnkit bench [--op NAME ...] [--json out.json] [--quick] [--threads N]`` runs,
in one process, a registry of named cases (``attnkit bench --list``): the
machine's fp32 matmul and copy peaks, causal linear attention forward and
training against flash-linear-attention's plain-torch references, the Taylor
(Based) map against softmax SDPA, FAVOR+ against performer-pytorch, MHA/GQA/MQA
decoding steps, attnkit.sdpa's overhead over torch's, and pytorch-fast-transformers
when it is installed. Competitors that are not installed become skipped rows.

From Python::

    from attnkit.bench import run_bench, to_markdown
    report = run_bench(["linear-causal-fwd"], profile="quick")
    print(to_markdown(report))
"""

from attnkit.bench.core import CASES, PROFILES, BenchContext, Case, Profile, register_case
from attnkit.bench.render import print_report, to_markdown
from attnkit.bench.results import CaseResult, MachinePeaks, Report, Row, Section, Target
from attnkit.bench.runner import case_names, run_bench

__all__ = [
    "CASES",
    "PROFILES",
    "BenchContext",
    "Case",
    "CaseResult",
    "MachinePeaks",
    "Profile",
    "Report",
    "Row",
    "Section",
    "Target",
    "case_names",
    "print_report",
    "register_case",
    "run_bench",
    "to_markdown",
]
