"""attnkit.lab: every experiment runs at the tiny "test" profile and returns well-formed
claims and figures; the report builder writes index.html and results.json; the CLI.

Every claim must be able to fail: for each claim whose verdict could once not fail
(it compared a formula with itself), a test here plants the wrong implementation the
claim is meant to catch and checks that the verdict turns to fail.

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
    assert r.seconds > 0 and r.cpu_seconds > 0 and isinstance(r.seed, int)
    assert r.claims, "every experiment makes claims"
    for c in r.claims:
        assert isinstance(c, Claim)
        assert c.id.startswith(f"{name}.")
        for text in (c.text, c.theory, c.measured, c.tolerance, c.could_fail_if):
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
    models = results["recall"].numbers["models"]
    assert len(rows) == len(models)
    settings = results["recall"].numbers["settings"]
    for model in models.values():  # every (variant, conv) from every seed
        assert [r["seed"] for r in model["runs"]] == list(settings["seeds"])
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
        "scaling.jacobian_closed_form",
        "complexity.work",
    ):
        assert verdicts[cid], cid


def test_a_claim_must_say_what_could_make_it_fail() -> None:
    result = ExperimentResult("x", "t", "test", 0, "s")
    with pytest.raises(ValueError, match="could_fail_if must say what it catches"):
        result.claim("c", "t", theory="a", measured="b", passed=True, tolerance="t",
                     could_fail_if=" ")  # fmt: skip


# ---- claims that can fail: plant the wrong implementation, expect "fail" ---------------


def _verdicts(result: ExperimentResult) -> dict[str, bool]:
    return {c.id: c.passed for c in result.claims}


def test_kv_cache_claim_reads_the_storage_not_the_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache that allocates twice what it holds: KVCache.nbytes (the old measurement, a
    formula) would still report 2 g (d/h) w per token; the storage does not."""
    from attnkit.lab import decode
    from attnkit.layers.cache import KVCache

    s = decode.SETTINGS["test"]
    honest = decode._kv_cache_per_token(s)
    assert all(x["measured"] == x["formula"] for x in honest.values())
    grow = KVCache._grow

    def wasteful(self: KVCache, needed: int, dtype: torch.dtype, device: torch.device) -> Any:
        k, v = grow(self, needed, dtype, device)
        self._k, self._v = torch.cat([k, k], dim=2), torch.cat([v, v], dim=2)
        return self._k, self._v

    monkeypatch.setattr(KVCache, "_grow", wasteful)
    padded = decode._kv_cache_per_token(s)
    assert all(x["measured"] == 2 * x["formula"] for x in padded.values())
    result = ExperimentResult("decode", "t", "test", 0, "s")
    decode._claims(result, s, _decode_rows(s, mqa_like_mha=False), padded, _T0)
    assert not _verdicts(result)["decode.kv_cache_per_token"]


_T0 = {"MHA": 1e-4, "GQA (g=2)": 1e-4, "MQA": 1e-4}


def _decode_rows(s: Any, *, mqa_like_mha: bool) -> list[dict[str, Any]]:
    """Synthetic decode rows timed exactly as predicted (t0 + extra bytes at 10 GB/s).

    With ``mqa_like_mha`` the MQA step really moves MHA's bytes (a wrong MQA that expands
    its shared keys and values to every head) while the prediction keeps MQA's model.
    """
    from attnkit.cost import bytes_moved, evaluate
    from attnkit.lab import decode

    def traffic(kind: str, n: int) -> int:
        return evaluate(bytes_moved(kind, "decode"), decode._sizes(s, kind, n))

    rows = []
    for label, kind in decode.VARIANTS:
        real = "mha" if mqa_like_mha and kind == "mqa" else kind
        for n in s.lengths:
            rows.append(
                {
                    "variant": label, "n": n,
                    "bytes_counted": traffic(kind, n), "bytes_model": traffic(kind, n),
                    "seconds": _T0[label] + (traffic(real, n) - traffic(real, 0)) / 1e10,
                    "seconds_predicted": _T0[label] + (traffic(kind, n) - traffic(kind, 0)) / 1e10,
                    "copy_bandwidth": 1e10,
                }
            )  # fmt: skip
    return rows


def test_mqa_speedup_claim_fails_when_mqa_moves_mhas_bytes() -> None:
    from attnkit.lab import decode

    s = decode.SETTINGS["quick"]
    kv = {v: {"measured": 1.0, "formula": 1.0, "kv_heads": 1} for v, _ in decode.VARIANTS}
    right = ExperimentResult("decode", "t", "quick", 0, "s")
    decode._claims(right, s, _decode_rows(s, mqa_like_mha=False), kv, _T0)
    assert _verdicts(right)["decode.mqa_speedup"] and _verdicts(right)["decode.ordering"]
    assert _verdicts(right)["decode.time_follows_bytes"]
    wrong = ExperimentResult("decode", "t", "quick", 0, "s")
    decode._claims(wrong, s, _decode_rows(s, mqa_like_mha=True), kv, _T0)
    verdicts = _verdicts(wrong)
    assert not verdicts["decode.mqa_speedup"] and not verdicts["decode.ordering"]


def test_argmax_gradient_claims_catch_a_surrogate_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, "zero gradient" was checked against a backward that returns zeros by
    construction; now against finite differences of the hard output."""
    from attnkit.lab import argmax as lab_argmax
    from attnkit.ops import argmax as ops_argmax

    honest = ExperimentResult("argmax", "t", "test", 0, "s")
    lab_argmax._gradients(honest)
    assert all(_verdicts(honest).values())

    def surrogate(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 0.5  # a made-up, non-zero gradient for the scores

    monkeypatch.setattr(ops_argmax._HardSelect, "backward", staticmethod(surrogate))
    wrong = ExperimentResult("argmax", "t", "test", 0, "s")
    lab_argmax._gradients(wrong)
    assert not _verdicts(wrong)["argmax.hard_zero_qk_grad"]


def test_argmax_gradient_claims_catch_a_soft_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnkit.lab import argmax as lab_argmax
    from attnkit.ops import argmax as ops_argmax

    def soft(scores: torch.Tensor, tau: float, generator: Any) -> torch.Tensor:
        return ops_argmax.masked_softmax(scores / 0.05).detach()  # sharp, but not one-hot

    monkeypatch.setitem(ops_argmax._MODES._items, "hard", soft)
    wrong = ExperimentResult("argmax", "t", "test", 0, "s")
    lab_argmax._gradients(wrong)
    verdicts = _verdicts(wrong)
    assert not verdicts["argmax.hard_zero_qk_grad"]  # the output moves under a small step
    assert not verdicts["argmax.hard_selected_v_only"]  # every value row gets gradient


def test_jacobian_claim_catches_a_wrong_closed_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnkit.lab import scaling

    s = scaling.ScalingSettings((4,), 100, (2, 64), 40, 16)
    ctx = Context(profile="test", figures=tmp_path)
    honest = ExperimentResult("scaling", "t", "test", 0, "s")
    scaling._saturation(ctx, s, honest)
    assert _verdicts(honest)["scaling.jacobian_closed_form"]

    def diagonal_only(p: torch.Tensor) -> torch.Tensor:  # ||diag(p) - p p^T|| without p p^T
        return (p - p * p).norm(dim=-1)

    monkeypatch.setattr(scaling, "jacobian_norm", diagonal_only)
    wrong = ExperimentResult("scaling", "t", "test", 0, "s")
    scaling._saturation(ctx, s, wrong)
    assert not _verdicts(wrong)["scaling.jacobian_closed_form"]


def _series(family: str, causal: bool, time_slope: float, work_slope: float) -> dict[str, Any]:
    model = 2.0 if family != "linear" else 1.0
    return {
        "label": family, "family": family, "causal": causal, "feature_map": None,
        "feature_width": None, "cost_variant": family, "points": [],
        "fit": {
            "N": [], "work_slope": work_slope, "work_slope_model": model,
            "time_slope": time_slope, "time_ci": [0, 0], "time_slope_model": model,
            "memory_slope": model, "memory_slope_model": model,
        },
        "crossover": {"N": 512.0, "how": "measured", "N_flops_model": 512.0},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("linear_slope", "softmax_slope", "passes"),
    [(1.0, 2.0, (True, True)), (1.5, 1.5, (False, False)), (1.3, 1.7, (True, True))],
)
def test_time_exponent_bands_cannot_accept_both_classes(
    linear_slope: float, softmax_slope: float, passes: tuple[bool, bool]
) -> None:
    """A slope of 1.5 passes neither O(N) nor O(N^2) (the old band of 0.5 took it as
    both); inside the band each class still passes."""
    from attnkit.lab import complexity

    data = {
        "softmax": _series("softmax", False, softmax_slope, 2.0),
        "linear": _series("linear", False, linear_slope, 1.0),
    }
    result = ExperimentResult("complexity", "t", "quick", 0, "s")
    complexity._claims(result, data, complexity.SETTINGS["quick"])
    verdicts = _verdicts(result)
    assert (verdicts["complexity.linear_time"], verdicts["complexity.quadratic_time"]) == passes
    assert verdicts["complexity.work"]


def test_work_claim_fails_for_quadratic_work_in_linear_attention() -> None:
    from attnkit.lab import complexity

    data = {"linear": _series("linear", True, 1.0, 2.0)}  # counted FLOPs grow like N^2
    result = ExperimentResult("complexity", "t", "quick", 0, "s")
    complexity._claims(result, data, complexity.SETTINGS["quick"])
    assert not _verdicts(result)["complexity.work"]


def test_memory_claim_sees_the_n_by_n_weights_of_a_plain_softmax(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernel holds O(N); torch's plain math path keeps the N x N weights. The
    old measurement (profiler allocation records) missed in-op temporaries and read
    O(N) for both; saved-for-backward bytes do not."""
    from attnkit.lab import complexity
    from attnkit.ops import sdpa_reference

    monkeypatch.setattr(complexity, "sdpa", sdpa_reference)
    result = get_experiment("complexity")(Context(profile="test", figures=tmp_path))
    assert not _verdicts(result)["complexity.memory"]
    soft = result.numbers["series"]["softmax (SDPA) (non-causal)"]["fit"]
    assert soft["memory_slope"] > 1.8 and soft["memory_slope_model"] == pytest.approx(1.0)


def _recall_run(variant: str, conv: bool, seed: int, acc: dict[int, float]) -> dict[str, Any]:
    from attnkit.lab import recall

    s = recall.SETTINGS["test"]
    formula = recall._state_formula(s, variant, conv, s.seq_len)
    half = recall._state_formula(s, variant, conv, s.seq_len // 2)
    return {
        "variant": variant, "conv": conv, "seed": seed, "parameters": 1,
        "train_seconds": 1.0, "train_cpu_seconds": 1.0,
        "history": [{"step": 1, "loss": 1.0}],
        "eval": {str(n): {"accuracy": a, "loss": 1.0} for n, a in acc.items()},
        "state_bytes": formula, "state_bytes_half": half,
        "state_bytes_formula": formula, "state_bytes_half_formula": half,
    }  # fmt: skip


def test_recall_claims_use_the_median_over_seeds() -> None:
    """One unlucky seed of three (a learning transition) does not decide a claim."""
    from attnkit.lab import recall

    s = recall.SETTINGS["test"]
    runs = {}
    for variant in s.variants:
        for conv in s.convs:
            good = {2: 1.0, 4: 1.0} if variant == "softmax" and conv else {2: 0.5, 4: 0.3}
            bad = {2: 0.2, 4: 0.1}
            seeds = [_recall_run(variant, conv, i, a)
                     for i, a in enumerate((good, bad, good))]  # fmt: skip
            runs[recall._label(variant, conv)] = recall._aggregate(s, seeds)
    soft = runs[recall._label("softmax", True)]
    assert soft["accuracy"]["4"] == {"median": 1.0, "min": 0.1, "max": 1.0, "all": [0.1, 1.0, 1.0]}
    result = ExperimentResult("recall", "t", "test", 0, "s")
    recall._claims(result, s, runs)
    verdicts = _verdicts(result)
    assert verdicts["recall.softmax_recalls"] and verdicts["recall.small_state_recalls_less"]
    assert verdicts["recall.state_size"] and verdicts["recall.state_constant"]


def test_recall_state_bytes_are_the_storage_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that keeps a spare copy of its state: the storage shows it, so the
    state_size claim fails; the cache's own nbytes (the old measurement) would not."""
    from attnkit.lab import recall
    from attnkit.layers.cache import LinearState

    s = recall.SETTINGS["test"]
    model = recall._model(s, "linear elu", True)
    want = recall._state_formula(s, "linear elu", True, s.seq_len)
    assert recall._state_bytes(model, s, s.seq_len) == want
    advance = LinearState.advance

    def hoarding(self: LinearState, state: Any, length: int) -> None:
        advance(self, state, length)
        self.history = [t.clone() for t in (self.state.S, self.state.z)]  # type: ignore[union-attr]

    monkeypatch.setattr(LinearState, "advance", hoarding)
    assert recall._state_bytes(model, s, s.seq_len) == 2 * want - 4 * 2 * 16 * 2


def test_adding_a_recall_variant_is_one_line() -> None:
    from attnkit.lab import recall

    v = recall.RecallVariant("relu", {"backend": "linear", "feature_map": "relu"})
    assert v.fixed_state and v.cache_type.__name__ == "LinearState"
    assert not recall.VARIANTS.get("softmax").fixed_state
    with pytest.raises(ValueError, match="already registered"):
        recall.add_variant("softmax", backend="softmax")


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
    assert {"theory", "measured", "verdict", "tolerance", "could_fail_if"} <= set(exp["claims"][0])
    assert {"cpu_seconds", "cpu_durations", "load_averages"} <= set(doc)
    html = index.read_text()
    assert html.count("data:image/png;base64,") == len(results["scaling"].figures) + len(
        results["argmax"].figures
    )
    assert "Closing note" in html and "Wall time of this test run" in html
    assert "could fail if" in html and "CPU time" in html
    for c in run.claims:
        assert c.id in html
        assert f"Could fail if {c.could_fail_if}" in html.replace("&#x27;", "'")


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
    assert set(doc["load_averages"]) == set(experiment_names())  # how busy the machine was
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
