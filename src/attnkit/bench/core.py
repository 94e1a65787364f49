"""The benchmark's machinery: profiles, the case registry, interleaved timing.

Timing discipline (a shared CPU is noisy; see :mod:`attnkit._timing`):

- the competitors of one comparison are timed *interleaved*: every repeat runs
  each of them once, in an order rotated from repeat to repeat, so a burst of
  load from elsewhere hits all of them alike;
- each sample is a loop of calls lasting at least ``min_sample_s`` (calibrated
  on the last warm-up call), which steadies microsecond-scale calls;
- the reported number is the median over repeats, with min and max beside it;
  comparisons are ratios of medians taken in the same process;
- the garbage collector is paused while timing.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from attnkit._registry import Registry
from attnkit._timing import Timing
from attnkit.bench.results import CaseResult, MachinePeaks

__all__ = [
    "CASES",
    "MAX_INNER_CALLS",
    "PROFILES",
    "BenchContext",
    "Case",
    "Profile",
    "ProgressHook",
    "register_case",
    "time_interleaved",
]

#: Upper bound on the calls folded into one timing sample.
MAX_INNER_CALLS = 10_000


@dataclass(frozen=True)
class Profile:
    """Sizes and timing effort of one benchmark run (``full``, ``quick``, ``smoke``)."""

    name: str
    repeats: int  # timed samples per competitor (interleaved)
    warmup: int  # untimed calls per competitor before timing (the last one calibrates)
    min_sample_s: float  # each sample loops the call for at least this long
    point_budget_s: float  # a comparison whose calls are slow gets fewer repeats (>= 3)
    # machine peaks
    matmul_n: int  # sgemm [n, n] @ [n, n]
    copy_mib: int  # tensor copied for the bandwidth (MiB, fp32)
    # linear attention (B = 1, fp32)
    heads: int  # H
    dim: int  # D = M
    fwd_n: int  # N of linear-causal-fwd (and fast-transformers)
    train_n: int  # N of linear-causal-train
    saved_ns: tuple[int, ...]  # N sweep of saved-for-backward bytes
    taylor_dim: int  # D of the Taylor map (D' = 1 + D + D(D+1)/2)
    taylor_dv: int  # value width M of taylor-vs-sdpa
    taylor_ns: tuple[int, ...]  # N sweep of taylor-vs-sdpa
    based_max_n: int  # fla's quadratic Based reference only up to this N
    performer_n: int
    performer_features: int  # m random features
    # decoding
    decode_b: int
    decode_d: int
    decode_h: int
    decode_n: int  # cached tokens
    decode_kv_heads: tuple[int, ...]  # Hk per variant: MHA (= h), GQA, MQA (= 1)
    # softmax wrapper overhead: (B, H, N, E, causal)
    sdpa_shapes: tuple[tuple[int, int, int, int, bool], ...]
    sdpa_repeats: int  # more samples: the target is a 5% difference


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        repeats=7,
        warmup=2,
        min_sample_s=0.05,
        point_budget_s=40.0,
        matmul_n=2048,
        copy_mib=256,
        heads=8,
        dim=64,
        fwd_n=4096,
        train_n=16384,
        saved_ns=(1024, 2048, 4096, 8192, 16384),
        taylor_dim=16,
        taylor_dv=64,
        taylor_ns=(512, 1024, 2048, 4096, 8192, 16384),
        based_max_n=4096,
        performer_n=4096,
        performer_features=256,
        decode_b=8,
        decode_d=1024,
        decode_h=16,
        decode_n=8192,
        decode_kv_heads=(16, 4, 1),
        sdpa_shapes=(
            (1, 1, 16, 16, False),
            (1, 8, 128, 64, True),
            (2, 8, 512, 64, False),
            (1, 8, 2048, 64, True),
        ),
        sdpa_repeats=15,
    ),
    "quick": Profile(
        name="quick",
        repeats=3,
        warmup=1,
        min_sample_s=0.02,
        point_budget_s=3.0,
        matmul_n=2048,
        copy_mib=256,
        heads=8,
        dim=64,
        fwd_n=1024,
        train_n=2048,
        saved_ns=(256, 512, 1024, 2048),
        taylor_dim=16,
        taylor_dv=64,
        taylor_ns=(512, 1024, 2048),
        based_max_n=2048,
        performer_n=1024,
        performer_features=256,
        decode_b=8,
        decode_d=1024,
        decode_h=16,
        decode_n=1024,
        decode_kv_heads=(16, 4, 1),
        sdpa_shapes=((1, 1, 16, 16, False), (1, 8, 128, 64, True), (1, 8, 1024, 64, True)),
        sdpa_repeats=7,
    ),
    # Tiny sizes for the tests: checks the plumbing end to end; the numbers mean nothing.
    "smoke": Profile(
        name="smoke",
        repeats=1,
        warmup=1,
        min_sample_s=0.0,
        point_budget_s=1.0,
        matmul_n=64,
        copy_mib=1,
        heads=2,
        dim=8,
        fwd_n=128,
        train_n=128,
        saved_ns=(64, 128),
        taylor_dim=4,
        taylor_dv=8,
        taylor_ns=(64, 128),
        based_max_n=128,
        performer_n=64,
        performer_features=16,
        decode_b=2,
        decode_d=32,
        decode_h=4,
        decode_n=16,
        decode_kv_heads=(4, 2, 1),
        sdpa_shapes=((1, 1, 8, 8, False), (1, 2, 16, 8, True)),
        sdpa_repeats=1,
    ),
}


class ProgressHook(Protocol):
    """Where the timing loop reports progress (a rich progress bar, or nothing)."""

    def grow(self, steps: int) -> None:
        """``steps`` more samples are about to be taken."""

    def advance(self) -> None:
        """One sample was taken."""


class _NoProgress:
    def grow(self, steps: int) -> None:
        pass

    def advance(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    budget_s: float | None = None,
    device: torch.device | None = None,
    progress: ProgressHook | None = None,
) -> dict[str, Timing]:
    """Median seconds per call of each ``fns`` entry, the entries timed interleaved.

    ``warmup`` (at least 1) untimed rounds run first; the last one's duration sets
    how many calls each sample loops over (enough to last ``min_sample_s``). With
    ``budget_s``, a comparison whose rounds would take longer than that gets fewer
    repeats, but never fewer than ``min(3, repeats)``, and a single warm-up round
    when one round already takes more than an eighth of the budget.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = device if device is not None else torch.device("cpu")
    hook: ProgressHook = progress if progress is not None else _NoProgress()
    names = list(fns)
    last: dict[str, float] = {}
    gc.collect()
    for _ in range(max(1, warmup)):
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            _sync(dev)
            last[name] = time.perf_counter() - t0
        if budget_s is not None and sum(last.values()) > budget_s / 8:
            break  # calls this slow are warm after one round
    inner = {
        name: min(MAX_INNER_CALLS, max(1, math.ceil(min_sample_s / max(last[name], 1e-9))))
        for name in names
    }
    if budget_s is not None:
        round_s = sum(inner[name] * last[name] for name in names)
        affordable = math.floor(budget_s / max(round_s, 1e-9))
        repeats = min(repeats, max(min(3, repeats), affordable))
    hook.grow(repeats * len(names))
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn, calls = fns[name], inner[name]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(dev)
                samples[name].append((time.perf_counter() - t0) / calls)
                hook.advance()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(median=statistics.median(s), low=min(s), high=max(s), repeats=len(s))
        for name, s in samples.items()
    }


@dataclass
class BenchContext:
    """What a case gets: the profile, the device, the machine's peaks, a timer."""

    profile: Profile
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    peaks: MachinePeaks | None = None
    progress: ProgressHook = field(default_factory=_NoProgress)
    repeats: int | None = None  # overrides profile.repeats when set
    seed: int = 0

    def randn(self, *shape: int, requires_grad: bool = False) -> Tensor:
        """Standard normal fp32 tensor on the benchmark's device."""
        x = torch.randn(*shape, device=self.device)
        return x.requires_grad_(requires_grad)

    def compare(
        self,
        fns: Mapping[str, Callable[[], object]],
        *,
        repeats: int | None = None,
        budget: bool = True,
    ) -> dict[str, Timing]:
        """Time ``fns`` side by side (see :func:`time_interleaved`) with the profile's effort."""
        p = self.profile
        n = repeats if repeats is not None else (self.repeats or p.repeats)
        return time_interleaved(
            fns,
            repeats=n,
            warmup=p.warmup,
            min_sample_s=p.min_sample_s,
            budget_s=p.point_budget_s if budget else None,
            device=self.device,
            progress=self.progress,
        )

    def sync(self) -> None:
        _sync(self.device)


@dataclass(frozen=True)
class Case:
    """A named benchmark: ``run(ctx)`` measures and returns a :class:`CaseResult`."""

    name: str
    title: str
    run: Callable[[BenchContext], CaseResult]
    competitors: tuple[str, ...] = ()  # optional pip packages it compares against


#: name -> :class:`Case`; ``attnkit bench --op NAME`` selects from here.
CASES: Registry[Case] = Registry("benchmark case")


def register_case(
    name: str, title: str, competitors: tuple[str, ...] = ()
) -> Callable[[Callable[[BenchContext], CaseResult]], Callable[[BenchContext], CaseResult]]:
    """Decorator: register ``run(ctx) -> CaseResult`` as the case ``name``."""

    def add(
        run: Callable[[BenchContext], CaseResult],
    ) -> Callable[[BenchContext], CaseResult]:
        CASES.register(name)(Case(name, title, run, competitors))
        return run

    return add
