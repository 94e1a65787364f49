"""attnkit.lab: every experiment runs at the tiny "test" profile and returns well-formed
claims and figures; the report builder writes index.html and results.json; the CLI.

Nothing here asserts a timing. The "test" profile keeps each experiment to seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from attnkit.lab import Context, ExperimentResult, experiment_names, get_experiment
from attnkit.lab.cli import app, register
from attnkit.lab.core import Claim, Figure, check_profile, jsonable
from attnkit.lab.measure import ByteCounter, count_bytes, fit_offset_rate, peak_allocated
from attnkit.lab.report import FORMAT, LabRun, environment, run_experiments, write_report

PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def _run(name: str, tmp_path: Path) -> ExperimentResult:
    return get_experiment(name)(Context(profile="test", figures=tmp_path / "figures"))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExperimentResult]:
    """Every experiment once at the test profile (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("lab")
    return {name: _run(name, root / name) for name in experiment_names()}


def test_registry_order_and_lookup() -> None:
    assert experiment_names() == [
        "scaling",
        "argmax",
        "decode",
        "complexity",
        "recall",
        "patterns",
        "linearize",
    ]
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        get_experiment("nope")
    assert check_profile("quick") == "quick"
    with pytest.raises(ValueError, match="unknown profile"):
        check_profile("huge")


@pytest.mark.parametrize(
    "name", ["scaling", "argmax", "decode", "complexity", "recall", "patterns", "linearize"]
)
def test_experiment_is_well_formed(name: str, results: dict[str, ExperimentResult]) -> None:
    r = results[name]
    assert r.name == name and r.profile == "test" and r.title and r.summary
    assert r.seconds > 0 and isinstance(r.seed, int)
    assert r.claims, "every experiment makes claims"
    for c in r.claims:
        assert isinstance(c, Claim)
        assert c.id.startswith(f"{name}.")
        for text in (c.text, c.theory, c.measured, c.tolerance):
            assert isinstance(text, str) and text.strip()
        assert isinstance(c.passed, bool) and c.verdict in ("pass", "fail")
    assert len({c.id for c in r.claims}) == len(r.claims)
    assert r.figures, "every experiment draws"
    for f in r.figures:
        assert isinstance(f, Figure)
        assert f.path.read_bytes()[:8] == PNG
        assert f.title and len(f.caption) > 40
    for t in r.tables:
        assert t.title and t.rows and all(len(row) == len(t.columns) for row in t.rows)
    # Numbers are plain JSON (no NaN or inf after jsonable).
    json.dumps(jsonable(r.numbers), allow_nan=False)
    json.dumps(r.to_json(), allow_nan=False)


def test_recall_and_complexity_tabulate_where_each_lands(
    results: dict[str, ExperimentResult],
) -> None:
    rows = results["recall"].tables[0].rows
    assert len(rows) == len(results["recall"].numbers["runs"])
    assert results["complexity"].tables[0].rows


def test_scaling_claims_pass_at_the_test_profile(results: dict[str, ExperimentResult]) -> None:
    failed = [c.id for c in results["scaling"].claims if not c.passed]
    assert not failed, failed


def test_exact_claims_pass_at_the_test_profile(results: dict[str, ExperimentResult]) -> None:
    """Claims that depend on neither training nor timing hold at any size."""
    verdicts = {c.id: c.passed for r in results.values() for c in r.claims}
    for cid in (
        "argmax.worked_example",
        "argmax.hard_zero_qk_grad",
        "argmax.hard_selected_v_only",
        "argmax.relaxations_pass_gradient",
        "argmax.hard_routing_frozen",
        "argmax.hard_cannot_route",
        "decode.kv_cache_per_token",
        "recall.state_size",
        "recall.state_constant",
        "linearize.decode_equals_parallel",
        "linearize.state_is_constant",
    ):
        assert verdicts[cid], cid


def test_rerun_gives_the_same_numbers(tmp_path: Path, results: dict[str, ExperimentResult]) -> None:
    again = _run("scaling", tmp_path)
    assert [c.verdict for c in again.claims] == [c.verdict for c in results["scaling"].claims]
    assert again.numbers["moments"] == results["scaling"].numbers["moments"]


def test_report_builder_writes_html_and_json(
    tmp_path: Path, results: dict[str, ExperimentResult]
) -> None:
    run = LabRun(profile="test", started="2026-01-01T00:00:00+00:00", environment=environment())
    run.results = [results["scaling"], results["argmax"]]
    run.seconds = 1.5
    index, res = write_report(run, tmp_path / "out")
    doc = json.loads(res.read_text())
    assert {
        "format",
        "command",
        "profile",
        "started",
        "seconds",
        "environment",
        "seeds",
        "durations",
        "claims",
        "experiments",
    } <= set(doc)
    assert doc["format"] == FORMAT and doc["profile"] == "test"
    assert {"torch", "cpu", "torch_threads", "cpu_count", "attnkit", "python"} <= set(
        doc["environment"]
    )
    assert doc["seeds"] == {"scaling": results["scaling"].seed, "argmax": results["argmax"].seed}
    n_claims = len(results["scaling"].claims) + len(results["argmax"].claims)
    assert doc["claims"]["total"] == n_claims
    assert doc["claims"]["passed"] + doc["claims"]["failed"] == n_claims
    assert set(doc["experiments"]) == {"scaling", "argmax"}
    exp = doc["experiments"]["scaling"]
    assert {"numbers", "claims", "figures", "tables", "seed", "seconds", "notes", "summary"} <= set(
        exp
    )
    assert {"theory", "measured", "verdict", "tolerance"} <= set(exp["claims"][0])
    html = index.read_text()
    assert html.count("data:image/png;base64,") == len(results["scaling"].figures) + len(
        results["argmax"].figures
    )
    assert "Closing note" in html and "Wall time of this test run" in html
    for c in run.claims:
        assert c.id in html


def test_run_experiments_checks_names_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiments(["scaling", "nope"], "test", tmp_path)
    assert not (tmp_path / "figures").exists()


def test_cli_lab_one_experiment(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    result = runner.invoke(
        app, ["lab", "scaling", "--profile", "test", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "claims pass" in result.output
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["experiments"]) == ["scaling"]
    assert doc["claims"]["failed"] == 0
    assert doc["command"] == f"attnkit lab scaling --profile test --out {out}"
    assert (out / "index.html").exists() and (out / "figures" / "scaling_moments.png").exists()


def test_cli_rejects_unknown_names_and_profiles(tmp_path: Path) -> None:
    result = runner.invoke(app, ["lab", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown experiment" in result.output
    result = runner.invoke(app, ["report", "--profile", "huge", "--out", str(tmp_path)])
    assert result.exit_code == 2


@pytest.mark.slow
def test_cli_report_all_experiments(tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["report", "--profile", "test", "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["experiments"]) == experiment_names()
    assert set(doc["durations"]) == set(experiment_names())
    # --strict turns failing claims into exit status 1 (the test profile trains 4 steps,
    # so the recall claims cannot pass there).
    assert doc["claims"]["failed"] > 0
    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == 1


def test_register_adds_both_commands() -> None:
    parent = typer.Typer()

    @parent.command()
    def other() -> None:
        """Another command."""

    register(parent)
    result = runner.invoke(parent, ["--help"])
    assert result.exit_code == 0
    assert "report" in result.output and "lab" in result.output


# ---- measurement helpers ---------------------------------------------------------------------


def test_jsonable() -> None:
    got = jsonable({"a": (1, 2.5, math.nan), "b": torch.tensor(3.0), 4: [math.inf, None, True]})
    assert got == {"a": [1, 2.5, None], "b": 3.0, "4": [None, None, True]}


def test_byte_counter_counts_a_matmul_and_skips_views() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    counter = count_bytes(lambda: (a @ b).t().unsqueeze(0))  # views move nothing
    assert isinstance(counter, ByteCounter)
    assert counter.read == (8 * 16 + 16 * 4) * 4
    assert counter.written == 8 * 4 * 4
    assert counter.total == counter.read + counter.written


def test_peak_allocated_sees_a_temporary() -> None:
    def make() -> Any:
        x = torch.ones(256, 1024)  # 1 MiB, freed before the end
        return float(x.sum())

    assert peak_allocated(make) >= 256 * 1024 * 4


def test_fit_offset_rate_recovers_the_line() -> None:
    xs = [1e6, 4e6, 1.6e7, 6.4e7]
    t0, rate = fit_offset_rate(xs, [2e-4 + x / 2e10 for x in xs])
    assert t0 == pytest.approx(2e-4, rel=1e-9) and rate == pytest.approx(2e10, rel=1e-9)
    t0, rate = fit_offset_rate(xs, [x / 1e10 for x in xs])
    assert t0 == pytest.approx(0.0, abs=1e-12) and rate == pytest.approx(1e10, rel=1e-9)
    with pytest.raises(ValueError):
        fit_offset_rate([1.0], [1.0])
