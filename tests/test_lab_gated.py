"""The lab's decay / delta-rule additions: the recall variants DeltaNet and Gated DeltaNet,
their claim, recall training in worker processes, and the complexity series of the gated
ops with their claims.

What each test would catch:
- a DeltaState whose storage differs from S [H, d_k, d_v] + the conv window (a spare copy
  of the state, a state kept per token), or a variant wired to the wrong mixer;
- a delta-rule claim that passes when DeltaNet is no better than linear attention (the
  claim compares medians over seeds against a margin, so a planted equal run fails);
- worker processes that train something else than a serial run (other seeds, other data,
  results in the wrong order);
- a gated op that keeps per-token states for backward (memory per token far above the
  cost model's) or does quadratic work (time exponent 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attnkit.lab import Context, ExperimentResult
from attnkit.layers.cache import DeltaState


def _verdicts(result: ExperimentResult) -> dict[str, bool]:
    return {c.id: c.passed for c in result.claims}


# ---- recall ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["DeltaNet", "Gated DeltaNet"])
@pytest.mark.parametrize("conv", [True, False])
def test_delta_variants_hold_the_state_their_formula_says(variant: str, conv: bool) -> None:
    from attnkit.lab import recall
    from attnkit.layers.delta import GatedDeltaNet

    s = recall.SETTINGS["test"]
    v = recall.VARIANTS.get(variant)
    assert v.fixed_state and v.cache_type is DeltaState
    model = recall._model(s, variant, conv)
    mixers = [b.attn for b in model.blocks]
    assert all(isinstance(m, GatedDeltaNet) for m in mixers)
    assert [m.gate for m in mixers] == [variant == "Gated DeltaNet"] * s.n_layers
    assert all((m.conv is not None) == conv for m in mixers)
    head = s.d_model // s.n_heads
    want = 4 * s.n_layers * (s.n_heads * head * head + (3 * s.d_model * 2 if conv else 0))
    assert recall._state_formula(s, variant, conv, s.seq_len) == want
    assert recall._state_bytes(model, s, s.seq_len) == want
    assert recall._state_bytes(model, s, s.seq_len // 2) == want


def _fake_runs(delta: float, elu: float) -> dict[str, dict[str, Any]]:
    """Aggregated runs of every test-profile model; DeltaNet and linear elu (with conv)
    reach the given accuracy at the most pairs in two seeds of three."""
    from attnkit.lab import recall

    s = recall.SETTINGS["test"]
    runs = {}
    for variant, conv in recall._models(s):
        top = {"DeltaNet": delta, "linear elu": elu}.get(variant, 0.3) if conv else 0.2
        seeds = []
        for i, a in enumerate((top, 0.05, top)):
            formula = recall._state_formula(s, variant, conv, s.seq_len)
            half = recall._state_formula(s, variant, conv, s.seq_len // 2)
            seeds.append({
                "variant": variant, "conv": conv, "seed": i, "parameters": 1,
                "train_seconds": 1.0, "train_cpu_seconds": 1.0,
                "history": [{"step": 1, "loss": 1.0}],
                "eval": {"2": {"accuracy": 1.0, "loss": 1.0}, "4": {"accuracy": a, "loss": 1.0}},
                "state_bytes": formula, "state_bytes_half": half,
                "state_bytes_formula": formula, "state_bytes_half_formula": half,
            })  # fmt: skip
        runs[recall._label(variant, conv)] = recall._aggregate(s, seeds)
    return runs


@pytest.mark.parametrize(
    ("delta", "elu", "passes"),
    [(0.9, 0.5, True), (0.5, 0.5, False), (0.6, 0.5, False), (0.4, 0.5, False)],
)
def test_delta_claim_needs_the_margin(delta: float, elu: float, passes: bool) -> None:
    """The claim passes only when DeltaNet's median beats elu's by the stated margin:
    a delta rule that degenerated into plain linear attention (equal accuracy) fails."""
    from attnkit.lab import recall

    s = recall.SETTINGS["test"]
    result = ExperimentResult("recall", "t", "test", 0, "s")
    recall._claims(result, s, _fake_runs(delta, elu))
    verdicts = _verdicts(result)
    assert verdicts["recall.delta_beats_linear"] is passes
    assert verdicts["recall.state_size"] and verdicts["recall.state_constant"]
    claim = next(c for c in result.claims if c.id == "recall.delta_beats_linear")
    assert claim.value == pytest.approx(delta - elu)


def test_workers_train_what_a_serial_run_trains() -> None:
    """Two spawned worker processes give the serial run's numbers, in job order."""
    import dataclasses

    from attnkit.lab import recall

    s = dataclasses.replace(recall.SETTINGS["test"], steps=2, eval_examples=16)
    jobs = [("linear elu", True, 5), ("DeltaNet", False, 6), ("softmax", True, 7)]
    ticks: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = recall.train_all(s, jobs, 1)
    finally:
        torch.set_num_threads(threads)
    parallel = recall.train_all(s, jobs, 2, ticks.append)
    assert sum(ticks) == s.steps * len(jobs)
    assert [(r["variant"], r["conv"], r["seed"]) for r in parallel] == jobs
    for a, b in zip(serial, parallel, strict=True):
        assert a["eval"] == b["eval"] and a["history"] == b["history"]


def test_no_conv_setting_trains_only_the_named_variants_without_conv() -> None:
    import dataclasses

    from attnkit.lab import recall

    s = dataclasses.replace(recall.SETTINGS["test"], no_conv=("softmax", "DeltaNet"))
    models = recall._models(s)
    assert [(v, c) for v, c in models if not c] == [("softmax", False), ("DeltaNet", False)]
    assert all((v, True) in models for v in s.variants)


# ---- complexity -----------------------------------------------------------------------------


def _gated_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnkit.lab import complexity

    series = [sr for sr in complexity._series() if sr.family in ("softmax", "gated")]
    monkeypatch.setattr(complexity, "_series", lambda: series)


def test_gated_series_are_measured_and_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnkit.lab import get_experiment

    _gated_only(monkeypatch)
    result = get_experiment("complexity")(Context(profile="test", figures=tmp_path))
    verdicts = _verdicts(result)
    assert verdicts["complexity.work"]  # counted FLOPs follow the cost model's exponent
    assert verdicts["complexity.gated_memory_per_token"]
    assert "complexity.gated_time" in verdicts
    series = result.numbers["series"]
    for key in ("decay (scalar gate) (causal)", "gated delta rule (causal)"):
        pts = series[key]["points"]
        assert [p["N"] for p in pts] == [32, 64, 128, 256]
        assert all(p["flops_counted"] > 0 and p["saved_bytes"] > 0 for p in pts)


def test_gated_memory_claim_fails_for_per_token_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token-by-token recurrence keeps every state S_t for backward (D M floats per
    token): flat per token, but far above the cost model's bytes per token."""
    from attnkit.lab import complexity, get_experiment
    from attnkit.ops import gated_linear_attention_reference

    _gated_only(monkeypatch)
    monkeypatch.setattr(complexity, "gated_linear_attention", gated_linear_attention_reference)
    result = get_experiment("complexity")(Context(profile="test", figures=tmp_path))
    assert not _verdicts(result)["complexity.gated_memory_per_token"]


def test_gated_time_claim_fails_for_quadratic_time() -> None:
    from attnkit.lab import complexity

    def series(slope: float) -> dict[str, Any]:
        return {
            "label": "g", "family": "gated", "causal": True, "feature_map": None,
            "feature_width": None, "cost_variant": "gla_chunked",
            "points": [{"N": n, "saved_bytes": 800 * n, "bytes_held_model": 1000 * n}
                       for n in (64, 128, 256)],
            "fit": {"N": [], "work_slope": 1.0, "work_slope_model": 1.0,
                    "time_slope": slope, "time_ci": [0, 0], "time_slope_model": 1.0,
                    "memory_slope": 1.0, "memory_slope_model": 1.0},
        }  # fmt: skip

    for slope, passes in ((1.1, True), (2.0, False)):
        result = ExperimentResult("complexity", "t", "test", 0, "s")
        complexity._claims(result, {"g": series(slope)}, complexity.SETTINGS["test"])
        verdicts = _verdicts(result)
        assert verdicts["complexity.gated_time"] is passes
        assert verdicts["complexity.gated_memory_per_token"]


def test_cpu_time_counts_finished_worker_processes() -> None:
    """An experiment that trains in worker processes reports their CPU time too (the
    old process_time() alone missed it: recall would have shown seconds, not minutes)."""
    import subprocess
    import sys
    import time

    from attnkit.lab.core import cpu_time

    c0, p0 = cpu_time(), time.process_time()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert cpu_time() - c0 >= 0.3
    assert time.process_time() - p0 < 0.3
