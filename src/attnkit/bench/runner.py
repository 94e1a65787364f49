"""Run benchmark cases in one process and collect a :class:`~attnkit.bench.results.Report`."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
import traceback
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

import attnkit
import attnkit.bench.cases  # registers the cases
import attnkit.bench.cases_gated
from attnkit.bench.core import CASES, PROFILES, BenchContext, Profile
from attnkit.bench.results import CaseResult, MachinePeaks, Report

__all__ = ["COMPETITOR_PACKAGES", "case_names", "cpu_model", "environment", "run_bench"]

#: Optional packages whose versions the report records.
COMPETITOR_PACKAGES = (
    "flash-linear-attention",
    "fla-core",
    "triton",
    "performer-pytorch",
    "pytorch-fast-transformers",
)

#: Where the FLOP counts come from (see attnkit.bench.flops).
FLOPS_SOURCE = (
    "attnkit.bench.flops (hand-derived per case; to be replaced by attnkit.cost when it lands)"
)


def case_names() -> list[str]:
    """Every registered case, in registry (= run) order."""
    return CASES.names()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, profile: Profile) -> dict[str, Any]:
    """Everything a reader needs to reproduce or discount the numbers."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "attnkit": attnkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": name,
        "dtype": "float32",
        "profile": profile.name,
        "repeats": profile.repeats,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flops_source": FLOPS_SOURCE,
        "competitors": {pkg: _version(pkg) for pkg in COMPETITOR_PACKAGES},
    }


class _RichHook:
    """Adapts a rich progress task to :class:`~attnkit.bench.core.ProgressHook`."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.total = 0

    def start(self, description: str) -> None:
        """A new case: a fresh bar whose total grows as its comparisons start."""
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.total = 0
        self.task = self.progress.add_task(description, total=None)

    def grow(self, steps: int) -> None:
        self.total += steps
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, total=self.total)

    def advance(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) for the block, restored afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resolve(ops: Sequence[str] | None) -> list[str]:
    known = case_names()
    if not ops:
        return known
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise ValueError(
            f"unknown benchmark case(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    # The machine peaks come first: every fraction of peak is relative to them.
    return [name for name in known if name == "machine" or name in ops]


def _remeasure_peaks(ctx: BenchContext, report: Report) -> None:
    """Measure the peaks again after the other cases; keep the higher of the two medians.

    Load from elsewhere on a shared machine can depress one measurement; a peak is
    what the machine can do, so the better of two (start, end) is the reference.
    Both are kept in the machine case's tables and summary.
    """
    first = ctx.peaks
    machine = report.case("machine")
    if first is None or machine is None:
        return
    try:
        again = CASES.get("machine").run(ctx)
    except Exception as err:  # keep the first measurement
        machine.notes.append(f"re-measuring the peaks failed: {type(err).__name__}: {err}")
        ctx.peaks = first
        return
    second = ctx.peaks if ctx.peaks is not None else first  # the machine case sets it
    ctx.peaks = MachinePeaks(
        max(first.matmul_flops_per_s, second.matmul_flops_per_s),
        max(first.copy_bytes_per_s, second.copy_bytes_per_s),
    )
    for sec in again.sections:
        sec.title += " (again, after the other cases)"
        machine.sections.append(sec)
    machine.summary = {
        "matmul_gflops": ctx.peaks.matmul_flops_per_s / 1e9,
        "copy_gbps": ctx.peaks.copy_bytes_per_s / 1e9,
        "matmul_gflops_start": first.matmul_flops_per_s / 1e9,
        "matmul_gflops_end": second.matmul_flops_per_s / 1e9,
        "copy_gbps_start": first.copy_bytes_per_s / 1e9,
        "copy_gbps_end": second.copy_bytes_per_s / 1e9,
    }
    machine.notes[:] = [
        "Measured before and after the other cases; every fraction of peak is of the "
        "higher of the two medians (at the same thread count)."
    ]


def run_bench(
    ops: Sequence[str] | None = None,
    *,
    profile: str | Profile = "quick",
    threads: int | None = None,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    command: str | None = None,
) -> Report:
    """Run the chosen cases (all by default) side by side in this process.

    The ``machine`` case always runs first, since fractions of peak need it, and
    again at the end (the higher of the two is the peak; see
    :func:`_remeasure_peaks`). A case that raises is recorded with its error and
    the others still run; missing competitors are skipped rows, never errors.
    """
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if isinstance(profile, str) and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = _resolve(ops)
    dev = torch.device(device)
    console = console if console is not None else Console()
    with _threads(threads):
        report = Report(meta=environment(dev, prof))
        report.meta["command"] = command or "attnkit bench"
        if repeats is not None:
            report.meta["repeats"] = repeats
        progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            if show_progress
            else None
        )
        hook = _RichHook(progress)
        ctx = BenchContext(prof, dev, progress=hook, repeats=repeats)
        with progress if progress is not None else contextlib.nullcontext():
            overall = progress.add_task("cases", total=len(names)) if progress else None
            for name in names:
                case = CASES.get(name)
                hook.start(f"{name}")
                torch.manual_seed(ctx.seed)
                t0 = time.perf_counter()
                try:
                    result = case.run(ctx)
                    if result.refresh is not None:  # fractions of the peaks known so far
                        result.refresh(ctx.peaks)
                except Exception as err:  # one failing case must not lose the others
                    result = CaseResult(name, case.title, error=f"{type(err).__name__}: {err}")
                    result.notes.append(traceback.format_exc(limit=3))
                result.seconds = time.perf_counter() - t0
                report.cases.append(result)
                if progress is not None and overall is not None:
                    progress.advance(overall)
            if len(names) > 1 and ctx.peaks is not None:
                hook.start("machine (again)")
                _remeasure_peaks(ctx, report)
                for case_result in report.cases:  # again, of the final peaks
                    if case_result.refresh is not None:
                        case_result.refresh(ctx.peaks)
        report.peaks = ctx.peaks
        report.meta["seconds"] = sum(c.seconds for c in report.cases)
    return report
