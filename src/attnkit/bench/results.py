"""Result records of the benchmark: rows, sections, cases, the report; JSON out.

A :class:`Report` holds one :class:`CaseResult` per case run; a case holds one or
more :class:`Section` (one table each) of :class:`Row` (one competitor at one
setting). Rows carry their timing, the FLOPs/bytes of the work they did and any
extra metrics; speed-ups against the section's baseline and fractions of the
machine's peaks are derived here, once, so the rich tables, the markdown and the
JSON all show the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from attnkit._timing import Timing

__all__ = [
    "SCHEMA",
    "CaseResult",
    "MachinePeaks",
    "Metric",
    "Report",
    "Row",
    "Section",
    "Target",
]

#: Version tag of the JSON layout written by :meth:`Report.to_json`.
SCHEMA = "attnkit-bench/1"

#: Extra per-row numbers (saved bytes, errors, ...) or short strings.
Metric = float | int | str


def _finite(x: float | None) -> float | None:
    """JSON has no NaN/inf: map them to None."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class MachinePeaks:
    """Measured limits of this machine, at the benchmark's thread count."""

    matmul_flops_per_s: float  # fp32 sgemm, median
    copy_bytes_per_s: float  # tensor copy, read + write bytes, median

    def to_json(self) -> dict[str, Any]:
        return {
            "matmul_gflops": _finite(self.matmul_flops_per_s / 1e9),
            "copy_gbps": _finite(self.copy_bytes_per_s / 1e9),
        }


@dataclass
class Row:
    """One competitor at one setting: a timing, or the reason it was skipped.

    ``params`` are the settings that vary inside a section (e.g. ``{"N": 4096}``);
    rows with equal params are compared with each other. ``flops``/``nbytes`` are
    the work of one call (see :mod:`attnkit.bench.flops`; ``flops`` counts *useful*
    FLOPs), from which the achieved rates and fractions of peak follow;
    ``computed_flops``, when known, is what the row's implementation executes
    (masked halves and helper columns included), shown beside the useful rate.
    ``metrics`` holds anything else (saved bytes, max error against attnkit, ...).
    In JSON a row's ``status`` is ``ok`` (timed), ``skipped`` (with the reason) or
    ``metrics`` (untimed, metrics only).
    """

    label: str
    params: dict[str, Metric] = field(default_factory=dict)
    timing: Timing | None = None
    skipped: str | None = None
    flops: float | None = None
    nbytes: float | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    computed_flops: float | None = None
    speedup: float | None = None  # time(baseline) / time(this row), same params
    time_ratio: float | None = None  # time(this row) / time(baseline)

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.timing is not None

    @property
    def seconds(self) -> float | None:
        return self.timing.median if self.timing is not None else None

    @property
    def flops_per_s(self) -> float | None:
        if self.flops is None or self.timing is None or self.timing.median <= 0:
            return None
        return self.flops / self.timing.median

    @property
    def bytes_per_s(self) -> float | None:
        if self.nbytes is None or self.timing is None or self.timing.median <= 0:
            return None
        return self.nbytes / self.timing.median

    def frac_matmul(self, peaks: MachinePeaks | None) -> float | None:
        """Achieved useful FLOP/s as a fraction of the measured sgemm FLOP/s."""
        rate = self.flops_per_s
        return None if rate is None or peaks is None else rate / peaks.matmul_flops_per_s

    def frac_matmul_computed(self, peaks: MachinePeaks | None) -> float | None:
        """Executed FLOP/s (``computed_flops``) as a fraction of the sgemm FLOP/s."""
        if self.computed_flops is None or self.timing is None or self.timing.median <= 0:
            return None
        if peaks is None:
            return None
        return self.computed_flops / self.timing.median / peaks.matmul_flops_per_s

    def frac_copy(self, peaks: MachinePeaks | None) -> float | None:
        """Achieved bytes/s as a fraction of the measured copy bandwidth."""
        rate = self.bytes_per_s
        return None if rate is None or peaks is None else rate / peaks.copy_bytes_per_s

    def to_json(self, peaks: MachinePeaks | None) -> dict[str, Any]:
        t = self.timing
        rate, bw = self.flops_per_s, self.bytes_per_s
        return {
            "label": self.label,
            "params": dict(self.params),
            "status": "ok" if self.ok else ("skipped" if self.skipped else "metrics"),
            "skipped": self.skipped,
            "median_s": _finite(t.median) if t else None,
            "min_s": _finite(t.low) if t else None,
            "max_s": _finite(t.high) if t else None,
            "repeats": t.repeats if t else None,
            "speedup": _finite(self.speedup),
            "time_ratio": _finite(self.time_ratio),
            "flops": self.flops,
            "computed_flops": self.computed_flops,
            "bytes": self.nbytes,
            "gflops": _finite(rate / 1e9) if rate is not None else None,
            "gbps": _finite(bw / 1e9) if bw is not None else None,
            "frac_matmul_peak": _finite(self.frac_matmul(peaks)),
            "frac_matmul_peak_computed": _finite(self.frac_matmul_computed(peaks)),
            "frac_copy_peak": _finite(self.frac_copy(peaks)),
            "metrics": {
                k: (_finite(v) if isinstance(v, float) else v) for k, v in self.metrics.items()
            },
        }


@dataclass
class Section:
    """One table of a case: rows, and the label of the baseline they are compared with.

    ``ratio`` chooses how the comparison is shown: ``"speedup"`` (time of the
    baseline / time of the row: > 1 is faster) or ``"time"`` (the inverse: e.g.
    overhead of a wrapper, <= 1.05 wanted).
    """

    title: str
    rows: list[Row] = field(default_factory=list)
    baseline: str | None = None
    ratio: Literal["speedup", "time"] = "speedup"
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def find(self, label: str, **params: Metric) -> Row | None:
        """The row with this label whose params include ``params``."""
        for row in self.rows:
            if row.label == label and all(row.params.get(k) == v for k, v in params.items()):
                return row
        return None

    def compare(self) -> None:
        """Fill each timed row's speed-up and time ratio against the baseline row."""
        if self.baseline is None:
            return
        for row in self.rows:
            base = self.find(self.baseline, **row.params)
            if base is None or base.seconds is None or row.seconds is None or row.seconds <= 0:
                continue
            row.speedup = base.seconds / row.seconds
            row.time_ratio = row.seconds / base.seconds

    def to_json(self, peaks: MachinePeaks | None) -> dict[str, Any]:
        return {
            "title": self.title,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "notes": list(self.notes),
            "rows": [row.to_json(peaks) for row in self.rows],
        }


@dataclass(frozen=True)
class Target:
    """A performance goal of a case, checked against this run: ``value <sense> goal``.

    ``value`` is None when the run could not measure it (e.g. the competitor is
    not installed); ``met`` is then None too.
    """

    name: str
    value: float | None
    goal: float
    sense: Literal[">=", "<="]
    unit: str = ""  # "x", "%", "" (how value and goal are displayed)

    @property
    def met(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        return self.value >= self.goal if self.sense == ">=" else self.value <= self.goal

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _finite(self.value),
            "goal": self.goal,
            "sense": self.sense,
            "unit": self.unit,
            "met": self.met,
        }


@dataclass
class CaseResult:
    """Everything one case measured: config (fixed shapes), sections, targets, notes."""

    name: str
    title: str
    config: dict[str, Metric] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    summary: dict[str, Metric | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the case, set by the runner
    error: str | None = None  # set by the runner when the case raised
    #: Computes the summary entries and targets that are fractions of peak. The runner
    #: calls it after the case and again once the final (re-measured) peaks are known,
    #: so they agree with the tables, which are rendered against the final peaks.
    refresh: Callable[[MachinePeaks | None], None] | None = field(
        default=None, repr=False, compare=False
    )

    def section(self, title: str, **kwargs: Any) -> Section:
        """Append and return a new :class:`Section`."""
        sec = Section(title, **kwargs)
        self.sections.append(sec)
        return sec

    @property
    def rows(self) -> list[Row]:
        return [row for sec in self.sections for row in sec.rows]

    def to_json(self, peaks: MachinePeaks | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "config": dict(self.config),
            "sections": [sec.to_json(peaks) for sec in self.sections],
            "targets": [t.to_json() for t in self.targets],
            "summary": {
                k: (_finite(v) if isinstance(v, float) else v) for k, v in self.summary.items()
            },
            "notes": list(self.notes),
            "seconds": _finite(self.seconds),
            "error": self.error,
        }


@dataclass
class Report:
    """A whole ``attnkit bench`` run: environment, machine peaks, one result per case."""

    meta: dict[str, Any]
    peaks: MachinePeaks | None = None
    cases: list[CaseResult] = field(default_factory=list)

    def case(self, name: str) -> CaseResult | None:
        return next((c for c in self.cases if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "meta": dict(self.meta),
            "machine": self.peaks.to_json() if self.peaks is not None else None,
            "cases": [c.to_json(self.peaks) for c in self.cases],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """The report back from :meth:`to_json`'s output, for rendering saved results.

        Derived numbers (rates, fractions of peak) are recomputed from the stored
        timings, work and peaks, so ``Report.from_json(r.to_json()).to_json()``
        equals ``r.to_json()``; the docs render ``benchmarks/results/*.json`` this way.

        Raises:
            ValueError: ``data["schema"]`` is not :data:`SCHEMA`.
        """
        if data.get("schema") != SCHEMA:
            raise ValueError(f"data['schema']: expected {SCHEMA!r}, got {data.get('schema')!r}")
        machine = data.get("machine")
        peaks = None
        if machine is not None:
            peaks = MachinePeaks(machine["matmul_gflops"] * 1e9, machine["copy_gbps"] * 1e9)
        return cls(dict(data["meta"]), peaks, [_case_from_json(c) for c in data["cases"]])


def _float(x: Any) -> float:
    """A number from JSON, None (a NaN/inf that :func:`_finite` dropped) as NaN."""
    return math.nan if x is None else float(x)


def _row_from_json(d: dict[str, Any]) -> Row:
    timing = None
    if d.get("median_s") is not None or d["status"] == "ok":
        timing = Timing(
            _float(d["median_s"]), _float(d["min_s"]), _float(d["max_s"]), int(d["repeats"])
        )
    return Row(
        label=d["label"],
        params=dict(d["params"]),
        timing=timing,
        skipped=d.get("skipped"),
        flops=d.get("flops"),
        nbytes=d.get("bytes"),
        metrics=dict(d.get("metrics", {})),
        computed_flops=d.get("computed_flops"),
        speedup=d.get("speedup"),
        time_ratio=d.get("time_ratio"),
    )


def _case_from_json(d: dict[str, Any]) -> CaseResult:
    sections = [
        Section(
            title=s["title"],
            rows=[_row_from_json(r) for r in s["rows"]],
            baseline=s.get("baseline"),
            ratio=s.get("ratio", "speedup"),
            notes=list(s.get("notes", [])),
        )
        for s in d["sections"]
    ]
    targets = [
        Target(t["name"], t["value"], t["goal"], t["sense"], t.get("unit", ""))
        for t in d.get("targets", [])
    ]
    return CaseResult(
        name=d["name"],
        title=d["title"],
        config=dict(d.get("config", {})),
        sections=sections,
        targets=targets,
        summary=dict(d.get("summary", {})),
        notes=list(d.get("notes", [])),
        seconds=_float(d.get("seconds")),
        error=d.get("error"),
    )
