"""Wall-clock timing helpers: medians of repeated calls, never single shots.

Timings on a shared CPU are noisy; compare variants side by side in one process
and report ratios of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls (after warm-up)."""

    median: float
    low: float
    high: float
    repeats: int

    def __str__(self) -> str:
        return f"{format_seconds(self.median)} (min {format_seconds(self.low)})"


def format_seconds(seconds: float) -> str:
    """Human units: 12.3 µs, 4.56 ms, 1.23 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.0,
    device: torch.device | None = None,
) -> Timing:
    """Median seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` calls.

    With ``min_time`` > 0, keeps calling until at least that many seconds were
    spent timing (and at least ``repeats`` calls), which steadies fast ops.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats or spent < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    return Timing(
        median=statistics.median(samples), low=min(samples), high=max(samples), repeats=len(samples)
    )
