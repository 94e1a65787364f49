"""The benchmark harness: CLI, JSON layout, skipped competitors, FLOP/byte counts.

No assertion here depends on a measured time: timings on a shared machine are
noise for a test. The quick profile runs through the CLI for two cheap cases;
every case runs once at the tiny ``smoke`` sizes.
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

import attnkit
from attnkit._timing import Timing
from attnkit.bench import case_names, run_bench, to_markdown
from attnkit.bench import flops as fl
from attnkit.bench.cases import crossover, linear_fit, saved_tensor_bytes
from attnkit.bench.cli import app, register
from attnkit.bench.competitors import FAST_TRANSFORMERS_BUILD_NOTE, Missing, import_optional
from attnkit.bench.core import time_interleaved
from attnkit.bench.results import Row, Section, Target
from attnkit.cost import count_flops

runner = CliRunner()

#: Modules whose absence the tests simulate (None in sys.modules makes import fail).
COMPETITOR_MODULES = (
    "fla",
    "fla.ops.linear_attn.naive",
    "fla.ops.based.naive",
    "performer_pytorch",
    "fast_transformers",
    "fast_transformers.causal_product",
)


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _hide_competitors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in COMPETITOR_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


# ------------------------------------------------------------------ FLOP / byte helpers


def test_flop_helpers_small_config() -> None:
    # Useful: 4 N D' M + N (C + 1) (D' + M), N=128, D'=M=64, C=64, per head
    useful = 4 * 128 * 64 * 64 + 128 * 65 * (64 + 64)
    assert fl.causal_linear_flops(128, 64, 64, 64) == useful == 3_162_112
    assert fl.causal_linear_flops(128, 64, 64, 64, heads=8) == 8 * useful
    assert fl.causal_linear_train_flops(128, 64, 64, 64, heads=8) == 3 * 8 * useful
    # Computed: 4 N D' (M+1) + 2 N C (D' + M + 1): ones column, whole [C, C] blocks
    computed = 4 * 128 * 64 * 65 + 2 * 128 * 64 * (64 + 65)
    assert fl.causal_linear_computed_flops(128, 64, 64, 64) == computed == 4_243_456
    # Taylor D=16: D' = 153
    assert fl.causal_linear_flops(64, 153, 64, 64) == 4 * 64 * 153 * 64 + 64 * 65 * 217
    assert fl.matmul_flops(2, 3, 4) == 48
    assert fl.copy_bytes(10, 4) == 80
    # causal softmax, N=4: query i sees i+1 keys -> 10 pairs x 2 x (E + Ev)
    assert fl.sdpa_flops(4, 2, 3, causal=True) == 2 * 10 * 5 == 100
    assert fl.sdpa_flops(4, 2, 3, causal=False) == 2 * 16 * 5
    assert fl.sdpa_flops(4, 2, 3, causal=True, heads=3) == 300
    assert fl.favor_feature_flops(10, 4, 8) == 2 * (2 * 10 * 8 * 4)


@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
def test_computed_flops_are_what_the_fast_path_runs(train: bool) -> None:
    """The 'computed' column is FlopCounterMode's count of the real elu fast path."""
    B, H, N, D, C = 1, 2, 96, 8, 32
    q, k, v = (torch.randn(B, H, N, D, requires_grad=train) for _ in range(3))

    def call() -> None:
        o, _ = attnkit.linear_attention(q, k, v, "elu", is_causal=True, chunk_size=C)
        if train:
            o.sum().backward()

    counted = count_flops(call)
    assert fl.causal_linear_computed_flops(N, D, D, C, heads=B * H, train=train) == counted
    useful = (fl.causal_linear_train_flops if train else fl.causal_linear_flops)(
        N, D, D, C, heads=B * H
    )
    assert useful < counted  # masked halves, ones column (and recomputation) left out


def test_rows_show_useful_and_computed_fractions() -> None:
    from attnkit.bench.render import section_table
    from attnkit.bench.results import MachinePeaks

    sec = Section("s")
    sec.add(Row("fast", {}, timing=Timing(1.0, 1.0, 1.0, 1), flops=3e9, computed_flops=4e9))
    sec.add(Row("other", {}, timing=Timing(2.0, 2.0, 2.0, 1), flops=3e9))
    headers, cells = section_table(sec, MachinePeaks(1e10, 1e10))
    assert "% matmul peak (useful)" in headers and "% peak (computed)" in headers
    i, j = headers.index("% matmul peak (useful)"), headers.index("% peak (computed)")
    assert (cells[0][i], cells[0][j]) == ("30.0%", "40.0%")
    assert (cells[1][i], cells[1][j]) == ("15.0%", "")  # computed unknown for a competitor


def test_byte_helpers_match_the_library() -> None:
    b, hk, n, dk, dv = 2, 3, 5, 4, 6
    cache = attnkit.KVCache(b, hk, dk, dv)
    cache.update(torch.zeros(b, hk, n, dk), torch.zeros(b, hk, n, dv))
    assert fl.kv_cache_bytes(b, hk, n, dk, dv, 4) == cache.nbytes == 2 * 3 * 5 * 10 * 4
    mha = attnkit.MultiHeadAttention(32, 4, n_kv_heads=2, d_v=16, bias=False)
    weights = sum(p.nbytes for p in mha.parameters())
    assert fl.decode_weight_bytes(32, 4, 2, 8, 16, 4) == weights


def test_saved_tensor_bytes_counts_each_storage_once() -> None:
    x = torch.randn(1000, requires_grad=True)
    assert saved_tensor_bytes(lambda: (x * x).sum()) == 4000  # x saved twice, one storage
    assert saved_tensor_bytes(lambda: x.exp()) == 4000  # exp saves its result
    assert saved_tensor_bytes(lambda: x.detach() + 1) == 0


def test_linear_fit_and_crossover() -> None:
    a, b, dev = linear_fit([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert (a, b) == pytest.approx((1.0, 2.0)) and dev == pytest.approx(0.0, abs=1e-12)
    first, interp = crossover([512, 1024, 2048], [0.5, 2.0, 4.0])
    assert first == 1024 and interp == pytest.approx((512 * 1024) ** 0.5)
    assert crossover([512, 1024], [0.5, 0.9]) == (None, None)
    assert crossover([512, 1024], [1.5, 2.0]) == (512, None)
    assert crossover([512, 1024, 2048], [2.0, 0.5, 3.0])[0] == 2048  # must stay faster


# ------------------------------------------------------------------ timing and results


def test_time_interleaved_rotates_and_counts() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = time_interleaved(fns, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated
    assert set(t) == {"a", "b"} and all(x.repeats == 3 for x in t.values())
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(fns, repeats=0)


def test_section_ratios_and_targets() -> None:
    sec = Section("s", baseline="base")
    sec.add(Row("base", {"N": 1}, timing=Timing(2.0, 2.0, 2.0, 1), flops=4e9))
    sec.add(Row("fast", {"N": 1}, timing=Timing(0.5, 0.5, 0.5, 1), flops=4e9))
    sec.add(Row("gone", {"N": 1}, skipped="x not installed"))
    sec.compare()
    fast = sec.find("fast", N=1)
    assert fast is not None and fast.speedup == 4.0 and fast.time_ratio == 0.25
    assert fast.flops_per_s == 8e9
    assert Target("t", 4.0, 3.0, ">=").met is True
    assert Target("t", 1.06, 1.05, "<=").met is False
    assert Target("t", None, 1.0, "<=").met is None


# ------------------------------------------------------------------ competitors


def test_import_optional_reports_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_competitors(monkeypatch)
    missing = import_optional("fla.ops.linear_attn.naive", "flash-linear-attention")
    assert missing == Missing("flash-linear-attention not installed")
    assert isinstance(import_optional("json", "json"), types.ModuleType)


def test_missing_competitors_are_skipped_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_competitors(monkeypatch)
    ops = ["linear-causal-fwd", "taylor-vs-sdpa", "performer", "fast-transformers"]
    report = run_bench(ops, profile="smoke", console=_quiet(), show_progress=False)
    assert [c.name for c in report.cases] == ["machine", *ops]
    assert all(c.error is None for c in report.cases)
    skipped = {r.label: r.skipped for c in report.cases for r in c.rows if r.skipped}
    assert skipped["fla naive chunk"] == "flash-linear-attention not installed"
    assert skipped["fla Based naive (quadratic)"] == "flash-linear-attention not installed"
    assert skipped["performer-pytorch FAVOR+"] == "performer-pytorch not installed"
    assert skipped["fast-transformers causal_product"] == FAST_TRANSFORMERS_BUILD_NOTE
    fwd = report.case("linear-causal-fwd")
    assert fwd is not None and fwd.summary["speedup_vs_fla"] is None
    assert fwd.targets[0].met is None  # not measurable without fla: n/a, not a failure
    data = report.to_json()
    rows = [r for c in data["cases"] for s in c["sections"] for r in s["rows"]]
    assert any(r["status"] == "skipped" and r["median_s"] is None for r in rows)
    assert "skipped: flash-linear-attention not installed" in to_markdown(report)


def test_fast_transformers_path_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The case runs the EPFL kernel when it imports (a plain-torch stand-in here)."""

    def causal_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0) @ v

    pkg = types.ModuleType("fast_transformers")
    mod = types.ModuleType("fast_transformers.causal_product")
    mod.causal_dot_product = causal_dot_product  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fast_transformers", pkg)
    monkeypatch.setitem(sys.modules, "fast_transformers.causal_product", mod)
    report = run_bench(
        ["fast-transformers"], profile="smoke", console=_quiet(), show_progress=False
    )
    case = report.case("fast-transformers")
    assert case is not None and case.error is None
    row = case.sections[0].find("fast-transformers causal_product")
    assert row is not None and row.ok
    assert float(row.metrics["max_abs_err"]) < 1e-4  # same computation as attnkit


# ------------------------------------------------------------------ whole runs


def test_every_case_runs_at_smoke_sizes() -> None:
    report = run_bench(profile="smoke", console=_quiet(), show_progress=False)
    assert [c.name for c in report.cases] == case_names()
    for case in report.cases:
        assert case.error is None, (case.name, case.error, case.notes)
        assert case.sections, case.name
    assert report.peaks is not None and report.peaks.matmul_flops_per_s > 0
    json.dumps(report.to_json(), allow_nan=False)  # strict JSON: no NaN/inf
    md = to_markdown(report)
    assert "| variant |" in md and "**Targets**" in md


def test_cli_quick_profile_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    args = ["--quick", "--op", "sdpa-overhead", "--op", "linear-causal-fwd"]
    result = runner.invoke(app, [*args, "--json", str(out), "--markdown", str(md), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["schema"] == "attnkit-bench/1"
    meta = data["meta"]
    for key in ("torch", "attnkit", "cpu", "threads", "device", "profile", "date", "command"):
        assert key in meta
    assert meta["profile"] == "quick" and meta["torch"] == torch.__version__
    assert meta["command"] == "attnkit bench --op sdpa-overhead --op linear-causal-fwd --quick"
    assert data["machine"]["matmul_gflops"] > 0 and data["machine"]["copy_gbps"] > 0
    assert [c["name"] for c in data["cases"]] == ["machine", "linear-causal-fwd", "sdpa-overhead"]
    fwd = data["cases"][1]
    assert fwd["config"]["N"] == 1024 and fwd["config"]["H"] == 8 and fwd["config"]["D"] == 64
    row = fwd["sections"][0]["rows"][0]
    assert row["label"] == "attnkit" and row["status"] == "ok"
    for key in ("median_s", "min_s", "speedup", "gflops", "frac_matmul_peak", "flops"):
        assert row[key] is not None, key
    assert row["metrics"]["max_abs_err"] == 0.0
    overhead = data["cases"][2]
    assert {t["name"].split(",")[0] for t in overhead["targets"]} == {
        "attnkit.sdpa / torch SDPA time"
    }
    assert all(r["time_ratio"] is not None for r in overhead["sections"][0]["rows"])
    assert "| variant |" in md.read_text()


def test_cli_lists_and_rejects() -> None:
    listed = runner.invoke(app, ["--list"])
    assert listed.exit_code == 0
    for name in case_names():
        assert name in listed.output
    assert runner.invoke(app, ["--op", "nope"]).exit_code == 2
    assert runner.invoke(app, ["--profile", "huge"]).exit_code == 2
    assert runner.invoke(app, ["--threads", "0"]).exit_code == 2


def test_register_mounts_the_command() -> None:
    parent = typer.Typer()

    @parent.command()
    def hello() -> None:
        typer.echo("hi")

    register(parent)
    result = runner.invoke(parent, ["bench", "--list"])
    assert result.exit_code == 0 and "linear-causal-train" in result.output


def test_peaks_are_the_better_of_two_measurements() -> None:
    report = run_bench(["decode"], profile="smoke", console=_quiet(), show_progress=False)
    machine = report.case("machine")
    assert machine is not None and len(machine.sections) == 2
    s = machine.summary
    assert report.peaks is not None
    assert s["matmul_gflops"] == max(s["matmul_gflops_start"], s["matmul_gflops_end"])  # type: ignore[type-var]
    assert report.peaks.copy_bytes_per_s / 1e9 == s["copy_gbps"]


def test_fraction_of_peak_targets_use_the_final_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the peaks are re-measured, targets and summaries agree with the tables."""
    from attnkit.bench import runner
    from attnkit.bench.results import MachinePeaks

    remeasure = runner._remeasure_peaks

    def remeasure_higher(ctx, report) -> None:  # type: ignore[no-untyped-def]
        remeasure(ctx, report)  # then pretend the end measurement was much better
        p = ctx.peaks
        ctx.peaks = MachinePeaks(p.matmul_flops_per_s * 2, p.copy_bytes_per_s * 2)

    monkeypatch.setattr(runner, "_remeasure_peaks", remeasure_higher)
    report = run_bench(["decode"], profile="smoke", console=_quiet(), show_progress=False)
    decode = report.case("decode")
    assert decode is not None and report.peaks is not None
    layer = decode.sections[0]
    mqa = layer.find("MQA (Hk=1)")
    assert mqa is not None
    want = mqa.frac_copy(report.peaks)  # what the rendered table shows
    target = next(t for t in decode.targets if "fraction of measured copy bandwidth" in t.name)
    assert want is not None and target.value == want
    assert decode.summary["mqa_frac_copy_bandwidth"] == want
