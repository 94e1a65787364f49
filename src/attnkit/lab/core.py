"""The lab's vocabulary: profiles, claims, figures, results and the experiment registry.

An *experiment* is a function ``run(ctx) -> ExperimentResult`` registered under a
name. It measures something the theory of attention states, and returns

- ``numbers``: every measured value, JSON-ready (they go to ``results.json``);
- ``claims``: each a statement of the theory, the value theory predicts, the value
  measured in this run, the tolerance used and the verdict (pass/fail);
- ``figures``: PNG files it wrote, each with a caption saying what theory predicts
  and what was measured (numbers formatted from the run, never typed in).

Profiles size the work: ``test`` (seconds, for the test suite), ``quick`` (the
default of ``attnkit report``: every experiment together in <= 8 minutes on 2 CPU
cores) and ``full`` (bigger sweeps). Seeds are fixed per experiment, so a rerun gives
the same verdicts.
"""

from __future__ import annotations

import contextlib
import math
import time

try:
    import resource
except ImportError:  # pragma: no cover - not Unix
    resource = None  # type: ignore[assignment]
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from attnkit._registry import Registry

__all__ = [
    "EXPERIMENTS",
    "PROFILES",
    "Claim",
    "Context",
    "Experiment",
    "ExperimentResult",
    "Figure",
    "Profile",
    "ProgressHook",
    "Table",
    "check_profile",
    "cpu_time",
    "experiment_names",
    "get_experiment",
    "jsonable",
]

Profile = Literal["test", "quick", "full"]
#: Profile names, smallest first. ``quick`` is the default of the command line.
PROFILES: tuple[str, ...] = ("test", "quick", "full")


def cpu_time() -> float:
    """CPU seconds of this process (all threads) and of its finished child processes.

    Experiments that train in worker processes (``recall``) spend their CPU time there;
    the children's share counts once they have been waited for (a pool that closed).
    """
    children = 0.0
    if resource is not None:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = usage.ru_utime + usage.ru_stime
    return time.process_time() + children


def check_profile(profile: object) -> Profile:
    """``profile`` if it names a profile; ValueError listing the known ones otherwise."""
    if profile == "test":
        return "test"
    if profile == "quick":
        return "quick"
    if profile == "full":
        return "full"
    raise ValueError(f"unknown profile {profile!r}; known: {', '.join(map(repr, PROFILES))}")


@dataclass(frozen=True)
class Claim:
    """One statement of the theory, checked by one measurement of this run.

    Attributes:
        id: stable identifier, ``"<experiment>.<name>"``.
        text: the statement, e.g. ``"Var(q.k) = d sigma^4 + 2 sigma^2 ||mu||^2"``.
        theory: what theory predicts here (formatted numbers or a formula).
        measured: what this run measured (formatted from the run).
        passed: the verdict.
        tolerance: the rule that decided the verdict, e.g. "theory inside the 99.9% CI".
        could_fail_if: a wrong implementation (or a wrong theory) this claim would catch,
            e.g. "the cache stored every query head's keys (h/g times the bytes)". A
            claim that no plausible mistake could fail is not a claim.
        value: the headline measured number, when there is one (for results.json).
    """

    id: str
    text: str
    theory: str
    measured: str
    passed: bool
    tolerance: str
    could_fail_if: str
    value: float | None = None

    @property
    def verdict(self) -> str:
        """``"pass"`` or ``"fail"``."""
        return "pass" if self.passed else "fail"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "theory": self.theory,
            "measured": self.measured,
            "verdict": self.verdict,
            "tolerance": self.tolerance,
            "could_fail_if": self.could_fail_if,
            "value": jsonable(self.value),
        }


@dataclass(frozen=True)
class Figure:
    """A PNG an experiment wrote, with the explanation printed under it."""

    name: str  # file stem, unique in a report
    path: Path  # where the PNG lies
    title: str
    caption: str  # what theory predicts and what was measured

    def to_json(self, root: Path | None = None) -> dict[str, str]:
        path = self.path
        if root is not None:
            with contextlib.suppress(ValueError):
                path = self.path.relative_to(root)
        return {"name": self.name, "path": str(path), "title": self.title, "caption": self.caption}


@dataclass(frozen=True)
class Table:
    """A small table of results shown in the report (cells are formatted strings)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [list(r) for r in self.rows],
        }


@dataclass
class ExperimentResult:
    """What one experiment returns: numbers, claims, figures and notes."""

    name: str
    title: str
    profile: Profile
    seed: int
    summary: str  # one paragraph: what was run and why
    numbers: dict[str, Any] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # honest remarks (budget cuts, caveats)
    seconds: float = 0.0  # wall time, set by the runner
    cpu_seconds: float = 0.0  # CPU time of this process (all threads) and its workers

    @property
    def passed(self) -> bool:
        """True when every claim passed."""
        return all(c.passed for c in self.claims)

    def claim(
        self,
        name: str,
        text: str,
        *,
        theory: str,
        measured: str,
        passed: bool,
        tolerance: str,
        could_fail_if: str,
        value: float | None = None,
    ) -> Claim:
        """Record a claim ``<experiment>.<name>`` and return it.

        ``could_fail_if`` is required: it names what this claim would catch (see
        :class:`Claim`), and the report prints it beside the verdict.
        """
        if not could_fail_if.strip():
            raise ValueError(f"claim {self.name}.{name}: could_fail_if must say what it catches")
        c = Claim(
            f"{self.name}.{name}",
            text,
            theory,
            measured,
            bool(passed),
            tolerance,
            could_fail_if,
            value,
        )
        self.claims.append(c)
        return c

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "profile": self.profile,
            "seed": self.seed,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "summary": self.summary,
            "numbers": jsonable(self.numbers),
            "claims": [c.to_json() for c in self.claims],
            "figures": [f.to_json(root) for f in self.figures],
            "tables": [t.to_json() for t in self.tables],
            "notes": list(self.notes),
        }


class ProgressHook(Protocol):
    """Opens a progress task: ``advance = hook(description, total)``; ``advance(n)``."""

    def __call__(self, description: str, total: int) -> Callable[[int], None]: ...


def _ignore(n: int) -> None:
    return None


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return _ignore


@dataclass
class Context:
    """What an experiment is given: the profile, where to write figures, progress bars.

    ``figures`` is the directory for PNGs; ``progress(description, total)`` returns
    a function that advances that bar (a no-op without a console).
    """

    profile: Profile
    figures: Path
    progress: ProgressHook = _no_progress
    workers: int = 1  # processes an experiment may use for independent runs

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A progress bar of ``total`` units; call the result with the units done."""
        return self.progress(description, total)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its name, a title, and ``run(ctx) -> ExperimentResult``."""

    name: str
    title: str
    run: Callable[[Context], ExperimentResult]

    def __call__(self, ctx: Context) -> ExperimentResult:
        ctx.figures.mkdir(parents=True, exist_ok=True)
        t0, c0 = time.perf_counter(), cpu_time()
        result = self.run(ctx)
        # Wall time depends on what else the machine runs; CPU time (all threads of this
        # process and of its worker processes) much less so: both are reported.
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = cpu_time() - c0
        return result


#: name -> :class:`Experiment`, in the order the report runs them.
EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def experiment_names() -> list[str]:
    """Registered experiment names, in report order."""
    from attnkit.lab.experiments import ORDER  # importing it registers them

    names = EXPERIMENTS.names()
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name`` (ValueError listing the known ones)."""
    experiment_names()
    return EXPERIMENTS.get(name)


def jsonable(x: Any) -> Any:
    """``x`` with tuples as lists, non-finite floats as None and numbers as Python numbers."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):  # numpy / torch scalars
        return jsonable(x.item())
    return str(x)
