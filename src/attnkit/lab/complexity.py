r"""Experiment ``complexity``: time and memory against sequence length N.

Series (batch 1, H heads, key width D, value width M, float32, forward pass):

- softmax attention through torch's fused SDPA kernel, non-causal and causal (D = M:
  torch's CPU flash kernel needs equal widths and otherwise falls back to its plain
  math path, which holds the N x N weights);
- the quadratic kernel reference (:func:`attnkit.kernel_attention`) with
  sim = (q.k + 1)^2, non-causal;
- linearized attention (:func:`attnkit.linear_attention`), non-causal
  and causal (chunked), with every registered feature map;
- causal decay attention with a scalar gate per head and token (simple GLA / Mamba-2,
  :func:`attnkit.gated_linear_attention`) and the gated delta rule (Gated DeltaNet,
  :func:`attnkit.delta_rule_attention` with q, k L2-normalised), both the chunked fast
  path: S_t = a_t S_{t-1} + k_t v_t^T, resp. S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} +
  beta_t k_t v_t^T, in chunks of C = 64 tokens (Yang et al. 2024).

Theory (Katharopoulos et al. 2020; Dao et al. 2022): softmax costs O(N^2 (D + M))
time; the plain math holds the N x N scores (memory O(N^2)), a fused kernel tiles them
and recomputes them in its backward pass (O(N)); linear attention costs O(N D' M) time
and O(N D') memory, O(N (D + M)) when phi is recomputed in the backward pass. So, as
N grows, linear attention overtakes softmax at a crossover N* that grows with the
feature width D'. The gated ops keep a D x M state per head and, within a chunk, C x C
blocks: O(N C (D + M) + N D M) time and O(N (D + M)) memory held for backward, so
their time grows like N and their training memory per token stays flat.

What is compared with what:

- work: the matmul FLOPs each real call performs, counted by FlopCounterMode
  (:func:`attnkit.cost.count_flops`) at every N; their log-log slope against the cost
  model's. Deterministic, so the band is tight: a linear attention that did quadratic
  work anywhere would fail it even where timings are too noisy to tell;
- growth exponents: the log-log slope of the measured times over the largest N,
  next to the slope of the cost model's exact FLOPs (``attnkit.cost.flops``) or held
  bytes (``attnkit.cost.memory``) over the same N, with the feature width D' of each map.
  The band (:data:`SLOPE_TOL`) is narrower than half the distance between O(N) and
  O(N^2), so no slope can pass as both;
- crossover: the N where the measured linear and softmax curves cross (interpolated in
  log-log; extrapolated from the fitted power laws when outside the range), next to
  the N where the cost model's FLOPs cross.

Memory is what a training step holds between its forward and backward passes: the
storages autograd saves (:func:`attnkit.lab.measure.saved_tensor_bytes`), next to the
cost model's memory held for backward. It is exact and allocator-independent: the
profiler's allocation records, used before, miss the temporaries an op allocates and
frees inside itself (the N x N weights of torch's math path), so a forward peak
measured that way could not tell O(N^2) from O(N).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from attnkit import feature_maps
from attnkit._timing import time_call
from attnkit.cost import count_flops, evaluate, fit_loglog, flops, memory
from attnkit.lab import plotting
from attnkit.lab.core import EXPERIMENTS, Context, Experiment, ExperimentResult, Table
from attnkit.lab.measure import saved_tensor_bytes
from attnkit.ops import (
    delta_rule_attention,
    gated_linear_attention,
    kernel_attention,
    linear_attention,
    sdpa,
)
from attnkit.ops.gated_chunked import DEFAULT_CHUNK
from attnkit.ops.linear import auto_chunk_size

__all__ = ["SETTINGS", "ComplexitySettings", "run"]

SEED = 99
#: A time or memory exponent passes within this of its model's: < 0.5, so a slope
#: of 1.5 (between O(N) and O(N^2)) fails both, and a linear attention that grew like
#: N^2 (or a softmax that grew like N) fails its own.
SLOPE_TOL = 0.35
#: Counted FLOPs follow the model's exponent within this (rounding of the padded
#: last chunk and of small N only).
WORK_TOL = 0.05
#: The gated ops' bytes saved for backward per token may vary by at most this factor
#: over the fit window: O(N) memory keeps it near 1 (the one D x M state per tile is
#: the only non-proportional term), O(N C) would too, but O(N^2) doubles it with N.
PER_TOKEN_TOL = 1.25


@dataclass(frozen=True)
class ComplexitySettings:
    lengths: tuple[int, ...]  # N for every series
    linear_lengths: tuple[int, ...]  # extra, larger N for linear attention only
    quadratic_lengths: tuple[int, ...]  # extra, larger N for softmax and the kernel reference
    heads: int  # H
    key_width: int  # D (queries and keys)
    value_width: int  # M
    kernel_max: int  # largest N for the O(N^2)-memory kernel reference
    repeats: int
    min_time: float  # seconds per timing point at least
    fit_from_quadratic: int  # softmax / kernel exponents are fitted over N >= this
    fit_from_linear: int  # linear-attention exponents are fitted over N >= this


SETTINGS: dict[str, ComplexitySettings] = {
    "test": ComplexitySettings(
        lengths=(32, 64, 128), linear_lengths=(256,), quadratic_lengths=(256,), heads=2,
        key_width=8, value_width=8, kernel_max=256, repeats=1, min_time=0.0,
        fit_from_quadratic=64, fit_from_linear=64,
    ),
    # D = M = 16, so softmax runs torch's fused kernel (the plain math path it falls back
    # to for D != M holds the N x N weights). Fit windows: softmax and the kernel
    # reference from N = 2048 (between 1024 and 2048 their N x N blocks leave the caches
    # and the local slope jumps far above 2 on a 2-core EPYC; beyond, they grow like
    # N^2 again, so they also run at 8192); linear attention from 1024 to 16384, where
    # a call's fixed cost (~0.1 ms) no longer bends the slope and its tiles have reached
    # their steady size.
    "quick": ComplexitySettings(
        lengths=(64, 256, 1024, 2048, 4096), linear_lengths=(8192, 16384),
        quadratic_lengths=(8192,), heads=4, key_width=16, value_width=16, kernel_max=8192,
        repeats=3, min_time=0.05, fit_from_quadratic=2048, fit_from_linear=1024,
    ),
    "full": ComplexitySettings(
        lengths=(64, 128, 256, 512, 1024, 2048, 4096, 8192), linear_lengths=(16384, 32768),
        quadratic_lengths=(16384,), heads=4, key_width=16, value_width=16, kernel_max=8192,
        repeats=7, min_time=0.5, fit_from_quadratic=2048, fit_from_linear=1024,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class _Series:
    label: str  # legend text
    family: str  # "softmax", "kernel", "linear", "gated" (decay, delta rule)
    causal: bool
    feature_map: str | None  # linear only
    cost_variant: str  # attnkit.cost variant whose exponent is the prediction

    @property
    def key(self) -> str:
        return f"{self.label} ({'causal' if self.causal else 'non-causal'})"


def _series() -> list[_Series]:
    out = [
        _Series("softmax (SDPA)", "softmax", False, None, "softmax"),
        _Series("softmax (SDPA)", "softmax", True, None, "softmax"),
        _Series("kernel (q.k+1)^2", "kernel", False, None, "kernel"),
    ]
    for name in feature_maps.available():
        out.append(_Series(name, "linear", False, name, "linear"))
        out.append(_Series(name, "linear", True, name, "linear_fast"))
    out.append(_Series("decay (scalar gate)", "gated", True, None, "gla_chunked"))
    out.append(_Series("gated delta rule", "gated", True, None, "gated_delta_chunked"))
    return out


def _inputs(
    series: _Series, s: ComplexitySettings, n: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """q, k, v [1, H, N, D or M]; for the gated ops also g [1, H, N] (log-decay < 0) and,
    for the delta rule, beta [1, H, N] in (0, 1)."""
    q = torch.randn(1, s.heads, n, s.key_width, generator=gen) / s.key_width**0.25
    k = torch.randn(1, s.heads, n, s.key_width, generator=gen) / s.key_width**0.25
    v = torch.randn(1, s.heads, n, s.value_width, generator=gen)
    if series.family != "gated":
        return [q, k, v]
    g = torch.nn.functional.logsigmoid(torch.randn(1, s.heads, n, generator=gen) + 4.0)
    if series.cost_variant == "gla_chunked":
        return [q, k, v, g]
    return [q, k, v, g, torch.sigmoid(torch.randn(1, s.heads, n, generator=gen))]


def _call(series: _Series, inputs: list[torch.Tensor], phi: Any) -> Callable[[], object]:
    q, k, v = inputs[:3]
    if series.family == "gated":
        if series.cost_variant == "gla_chunked":
            return lambda: gated_linear_attention(q, k, v, inputs[3])
        return lambda: delta_rule_attention(q, k, v, inputs[4], inputs[3], use_qk_l2norm=True)
    if series.family == "softmax":
        return lambda: sdpa(q, k, v, is_causal=series.causal)
    if series.family == "kernel":
        return lambda: kernel_attention(q, k, v, sim="polynomial", eps=1e-6)
    if not phi.positive:  # a map that can give a zero denominator needs the explicit guard
        return lambda: linear_attention(q, k, v, feature_map=phi, is_causal=series.causal, eps=1e-6)
    return lambda: linear_attention(q, k, v, feature_map=phi, is_causal=series.causal)


def _lengths(series: _Series, s: ComplexitySettings) -> tuple[int, ...]:
    if series.family == "kernel":
        return tuple(n for n in s.lengths + s.quadratic_lengths if n <= s.kernel_max)
    if series.family in ("linear", "gated"):
        return s.lengths + s.linear_lengths
    return s.lengths + s.quadratic_lengths


def _sizes(s: ComplexitySettings, n: int, dp: int, series_gated: bool = False) -> dict[str, int]:
    # The chunk the causal path picks (at least 1 so the model evaluates for softmax too).
    chunk = auto_chunk_size(n, max(dp, 1), s.value_width)
    return {
        "B": 1,
        "H": s.heads,
        "Hv": s.heads,  # the gated ops' names: state heads, queries per state head,
        "G": 1,  # key and value widths
        "D": s.key_width,
        "M": s.value_width,
        "Hk": s.heads,
        "L": n,
        "S": n,
        "E": s.key_width,
        "Ev": s.value_width,
        "Dp": dp,
        "C": DEFAULT_CHUNK if series_gated else chunk,
        "w": 4,
    }


def _model(
    series: _Series, s: ComplexitySettings, dp: int
) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """The cost model's FLOPs, matmul FLOPs and memory held for backward (symbolic)."""
    f = flops(series.cost_variant, "forward")
    fm = flops(series.cost_variant, "forward", matmul_only=True)
    if series.family == "gated":  # the fast paths recompute their chunk blocks in backward
        return f, fm, memory(series.cost_variant, "train", activations="recompute")
    if series.family == "softmax":
        # torch's fused kernel (D = M) never holds the N x N weights: the cost model's
        # softmax with them recomputed (flash-style); the plain math path keeps them.
        fused = s.key_width == s.value_width
        m = memory("softmax", "train", activations="recompute" if fused else "keep")
    else:
        m = memory(series.cost_variant, "train")
    return f, fm, m


def run(ctx: Context) -> ExperimentResult:
    s = SETTINGS[ctx.profile]
    result = ExperimentResult(
        name="complexity",
        title="Time and memory against sequence length: softmax, kernel, linear",
        profile=ctx.profile,
        seed=SEED,
        summary=(
            f"Forward pass, float32, batch 1, H = {s.heads} heads, key width D = "
            f"{s.key_width}, value width M = {s.value_width}, N = {list(s.lengths)} "
            f"(softmax and the kernel reference also at {list(s.quadratic_lengths)}, linear "
            f"attention also at {list(s.linear_lengths)}); time is the fastest of "
            f">= {s.repeats} calls (the least disturbed by other work on the machine; the "
            f"medians are in results.json), memory what autograd saves for the backward "
            f"pass (inputs included when saved). "
            f"Feature maps: {', '.join(feature_maps.available())}. Decay and gated delta "
            f"rule: causal, chunked (C = {DEFAULT_CHUNK}), random log-decays "
            f"log sigmoid(x + 4) and, for the delta rule, beta = sigmoid(x), x ~ N(0, 1)."
        ),
    )
    series = _series()
    gen = torch.Generator().manual_seed(SEED)
    todo = sum(len(_lengths(sr, s)) for sr in series)
    advance = ctx.task("complexity: time and memory vs N", todo)
    data: dict[str, dict[str, Any]] = {}
    for sr in series:
        phi = feature_maps.resolve(sr.feature_map, s.key_width) if sr.feature_map else None
        dp = phi.out_dim(s.key_width) if phi is not None else 0
        f_model, fm_model, m_model = _model(sr, s, dp)
        points = []
        for n in _lengths(sr, s):
            inputs = _inputs(sr, s, n, gen)
            call = _call(sr, inputs, phi)
            with torch.no_grad():
                counted = count_flops(call)  # also the warm-up of the timed calls
                timing = time_call(call, repeats=s.repeats, warmup=0, min_time=s.min_time)
            for t in inputs:
                t.requires_grad_(True)
            held = saved_tensor_bytes(call)  # one forward with grad
            sz = _sizes(s, n, dp, sr.family == "gated")
            points.append(
                {
                    "N": n,
                    "seconds": timing.median,
                    "seconds_min": timing.low,
                    "calls": timing.repeats,
                    "saved_bytes": held,
                    "flops_counted": counted,
                    "flops_model": evaluate(f_model, sz),
                    "matmul_flops_model": evaluate(fm_model, sz),
                    "bytes_held_model": evaluate(m_model, sz),
                }
            )
            advance(1)
        data[sr.key] = {
            "label": sr.label,
            "family": sr.family,
            "causal": sr.causal,
            "feature_map": sr.feature_map,
            "feature_width": dp or None,
            "cost_variant": sr.cost_variant,
            "points": points,
        }
    _fits(data, s)
    _crossovers(data, s)
    result.numbers.update({"settings": s.__dict__, "series": data})
    _claims(result, data, s)
    _figures(ctx, result, data, s)
    result.tables.append(_table(data))
    return result


def _table(data: dict[str, dict[str, Any]]) -> Table:
    rows = []
    for key, d in data.items():
        fit, cross = d.get("fit"), d.get("crossover")
        last = d["points"][-1]
        rows.append(
            (
                key,
                "" if not d["feature_width"] else str(d["feature_width"]),
                "" if fit is None else f"{fit['time_slope']:.2f} ({fit['time_slope_model']:.2f})",
                ""
                if fit is None or fit["memory_slope"] is None
                else f"{fit['memory_slope']:.2f} ({fit['memory_slope_model']:.2f})",
                f"{last['seconds_min'] * 1e3:.2f} ms at N = {last['N']}",
                ""
                if cross is None
                else f"{'<= ' if cross['how'] == 'below range' else ''}{_fmt_n(cross['N'])}"
                f" ({cross['N_flops_model']:,.0f})",
            )
        )
    return Table(
        title="Fitted exponents and crossovers (cost model in parentheses)",
        columns=(
            "series",
            "D'",
            "time exponent",
            "memory exponent",
            "largest N timed",
            "crossover N* vs softmax",
        ),
        rows=tuple(rows),
    )


def _fits(data: dict[str, dict[str, Any]], s: ComplexitySettings) -> None:
    for d in data.values():
        start = s.fit_from_linear if d["family"] in ("linear", "gated") else s.fit_from_quadratic
        pts = [p for p in d["points"] if p["N"] >= start]
        if len(pts) < 3:
            d["fit"] = None
            continue
        ns = [float(p["N"]) for p in pts]
        t = fit_loglog(ns, [p["seconds_min"] for p in pts])
        tm = fit_loglog(ns, [float(p["flops_model"]) for p in pts])
        mem_ok = all(p["saved_bytes"] > 0 for p in pts)
        m = fit_loglog(ns, [float(p["saved_bytes"]) for p in pts]) if mem_ok else None
        mm = fit_loglog(ns, [float(p["bytes_held_model"]) for p in pts])
        work = fit_loglog(ns, [float(p["flops_counted"]) for p in pts])
        work_model = fit_loglog(ns, [float(p["matmul_flops_model"]) for p in pts])
        d["fit"] = {
            "N": ns,
            "work_slope": work.slope,
            "work_slope_model": work_model.slope,
            "time_slope": t.slope,
            "time_ci": [t.low, t.high],
            "time_slope_model": tm.slope,
            "memory_slope": None if m is None else m.slope,
            "memory_slope_model": mm.slope,
        }


def _cross(ns: list[float], a: list[float], b: list[float]) -> tuple[float | None, str]:
    """Where b (linear) drops below a (softmax), interpolated in log-log.

    Returns (N*, how): "measured" inside the range, "extrapolated" from power laws fitted
    to the last three points, or (None, reason).
    """
    diff = [math.log(y) - math.log(x) for x, y in zip(a, b, strict=True)]  # log(b / a)
    if diff[0] < 0:
        return ns[0], "below range"
    for i in range(1, len(ns)):
        if diff[i] < 0 <= diff[i - 1]:
            x0, x1 = math.log(ns[i - 1]), math.log(ns[i])
            t = diff[i - 1] / (diff[i - 1] - diff[i])
            return math.exp(x0 + t * (x1 - x0)), "measured"
    if len(ns) < 3:
        return None, "not reached"
    fa = fit_loglog(ns[-3:], a[-3:])
    fb = fit_loglog(ns[-3:], b[-3:])
    if fa.slope <= fb.slope:
        return None, "not reached, and no faster growth of softmax to extrapolate"
    return math.exp((fb.intercept - fa.intercept) / (fa.slope - fb.slope)), "extrapolated"


def _model_cross(soft: sympy.Expr, lin: sympy.Expr, s: ComplexitySettings, dp: int) -> float:
    """The N where the cost model's FLOPs of linear and softmax are equal (bisection)."""

    def gap(n: float) -> float:
        sz = _sizes(s, max(64, round(n / 64) * 64), dp)
        return math.log(evaluate(lin, sz)) - math.log(evaluate(soft, sz))

    lo, hi = 64.0, 64.0 * 2**20
    if gap(lo) < 0:
        return lo
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if gap(mid) < 0:
            hi = mid
        else:
            lo = mid
    return hi


def _crossovers(data: dict[str, dict[str, Any]], s: ComplexitySettings) -> None:
    soft_flops = flops("softmax", "forward")
    for causal in (False, True):
        soft = data[f"softmax (SDPA) ({'causal' if causal else 'non-causal'})"]
        for d in data.values():
            if d["family"] != "linear" or d["causal"] != causal:
                continue
            soft_at = {p["N"]: p["seconds_min"] for p in soft["points"]}
            common = [p for p in d["points"] if p["N"] in soft_at]  # the N both were timed at
            ns = [float(p["N"]) for p in common]
            n_star, how = _cross(
                ns, [soft_at[p["N"]] for p in common], [p["seconds_min"] for p in common]
            )
            lin_flops = flops(d["cost_variant"], "forward")
            if causal:  # causal softmax does about half the work
                model = _model_cross(soft_flops / 2, lin_flops, s, d["feature_width"])
            else:
                model = _model_cross(soft_flops, lin_flops, s, d["feature_width"])
            d["crossover"] = {"N": n_star, "how": how, "N_flops_model": model}


def _window(s: ComplexitySettings) -> str:
    return (
        f"N >= {s.fit_from_quadratic} (softmax, kernel) and N >= {s.fit_from_linear} "
        "(linear, decay, delta rule)"
    )


def _slope_text(slope: float | None) -> str:
    return "n/a" if slope is None else f"{slope:.2f}"


def _fmt_n(n: float | None) -> str:
    return "none" if n is None else f"{n:,.0f}"


def _claims(
    result: ExperimentResult, data: dict[str, dict[str, Any]], s: ComplexitySettings
) -> None:
    fitted = {k: d for k, d in data.items() if d.get("fit")}
    if not fitted:
        return
    # Which class does the growth belong to, O(N) or O(N^2)? A slope passes within
    # SLOPE_TOL of its model's, and SLOPE_TOL < 0.5: no slope can pass for both classes
    # (memory hierarchy and allocation effects bend real curves; the model counts
    # neither, hence not a tighter band).
    tol = SLOPE_TOL
    work = {k: d["fit"]["work_slope"] - d["fit"]["work_slope_model"] for k, d in fitted.items()}
    result.claim(
        "work",
        "The work each implementation does grows as the cost model derives: O(N^2) for "
        "softmax and the kernel reference, O(N) for linear attention with every map",
        theory=", ".join(f"{k}: {fitted[k]['fit']['work_slope_model']:.2f}" for k in fitted)
        + " (log-log slope of the model's matmul FLOPs)",
        measured=", ".join(f"{k}: {fitted[k]['fit']['work_slope']:.2f}" for k in fitted)
        + " (FlopCounterMode on the real calls; the fused SDPA op is counted by torch's "
        "formula for it)",
        passed=all(abs(x) <= WORK_TOL for x in work.values()),
        tolerance=f"|counted - model| <= {WORK_TOL} for each, fitted over {_window(s)}",
        could_fail_if="an implementation did work the model does not predict: a causal "
        "linear attention run as one chunk as long as the sequence, or one that forms the "
        "N x N scores (slope 2 instead of 1), or a feature map whose width grew with N",
        value=max(abs(x) for x in work.values()),
    )

    def slope_claim(name: str, text: str, keys: list[str], could_fail_if: str) -> None:
        if not keys:
            return
        devs = {
            k: fitted[k]["fit"]["time_slope"] - fitted[k]["fit"]["time_slope_model"] for k in keys
        }
        result.claim(
            name,
            text,
            theory=", ".join(f"{k}: {fitted[k]['fit']['time_slope_model']:.2f}" for k in keys)
            + " (log-log slope of the cost model's FLOPs over the same N)",
            measured=", ".join(f"{k}: {fitted[k]['fit']['time_slope']:.2f}" for k in keys),
            passed=all(abs(x) < tol for x in devs.values()),
            tolerance=f"|measured - model| < {tol} for each (a slope of 1.5 fails both "
            f"O(N) and O(N^2)), fitted over {_window(s)}",
            could_fail_if=could_fail_if,
            value=max(abs(x) for x in devs.values()),
        )

    quad = [k for k, d in fitted.items() if d["family"] in ("softmax", "kernel")]
    slope_claim(
        "quadratic_time",
        "Softmax and the kernel reference take time O(N^2)",
        quad,
        "softmax skipped work it should do (e.g. a kernel that attended to a fixed window: "
        "slope 1), or its time were dominated by something other than the N x N products",
    )
    lin = [k for k, d in fitted.items() if d["family"] == "linear"]
    slope_claim(
        "linear_time",
        "Linear attention takes time O(N) for every feature map",
        lin,
        "linear attention did quadratic work or traffic anywhere (e.g. materialised the "
        "N x N similarities, or copied its running state once per token: slope near 2)",
    )
    gated = [k for k, d in fitted.items() if d["family"] == "gated"]
    slope_claim(
        "gated_time",
        "Decay attention and the gated delta rule (chunked) take time O(N)",
        gated,
        "the chunked path did quadratic work: e.g. one chunk as long as the sequence, the "
        "L x L decay matrix exp(G_i - G_j) formed whole, or the delta rule's triangular "
        "solve run over the whole sequence (slope near 2)",
    )
    _per_token_claim(result, {k: fitted[k] for k in gated}, s)

    def mem_dev(k: str) -> float:
        f = fitted[k]["fit"]
        ms = f["memory_slope"]
        return math.inf if ms is None else ms - f["memory_slope_model"]

    mem_keys = [k for k in fitted]
    devs = {k: mem_dev(k) for k in mem_keys}
    result.claim(
        "memory",
        "Memory held for the backward pass: O(N^2) for the kernel reference (it keeps the "
        "N x N similarities), O(N) for fused softmax (it recomputes them) and for linear "
        "attention (O(N D'), or O(N (D + M)) when its backward recomputes phi)",
        theory=", ".join(f"{k}: {fitted[k]['fit']['memory_slope_model']:.2f}" for k in mem_keys)
        + " (slope of the cost model's memory held for backward)",
        measured=", ".join(
            f"{k}: {_slope_text(fitted[k]['fit']['memory_slope'])}" for k in mem_keys
        )
        + " (bytes autograd saves)",
        passed=all(abs(x) < tol for x in devs.values()),
        tolerance=f"|measured - model| < {tol} for each, fitted over {_window(s)}",
        could_fail_if="softmax ran torch's plain math path (it keeps the N x N weights: "
        "slope 2), linear attention saved an N x N or N x D' x M buffer, or the kernel "
        "reference stopped keeping the similarities it is meant to show",
        value=max(abs(x) for x in devs.values()),
    )
    # Crossovers: linear overtakes softmax as N grows.
    cross = {k: d["crossover"] for k, d in data.items() if "crossover" in d}
    result.numbers["crossovers"] = cross

    def agrees(c: dict[str, Any]) -> bool:
        if c["N"] is None:
            return False
        if c["how"] == "below range":  # measured N* <= the smallest N: an upper bound
            return bool(c["N_flops_model"] <= 4 * c["N"])
        return bool(c["N_flops_model"] / 4 <= c["N"] <= 4 * c["N_flops_model"])

    result.claim(
        "crossover",
        "Linear attention overtakes softmax beyond a crossover length N*, near where the "
        "cost model's FLOPs cross (for every feature map, causal and not)",
        theory="N* where the FLOPs are equal: "
        + ", ".join(f"{k}: {c['N_flops_model']:,.0f}" for k, c in cross.items()),
        measured=", ".join(
            f"{k}: {'<= ' if c['how'] == 'below range' else ''}{_fmt_n(c['N'])}"
            + (" (extrapolated)" if c["how"] == "extrapolated" else "")
            for k, c in cross.items()
        ),
        passed=all(agrees(c) for c in cross.values()),
        tolerance="a crossover exists (measured, or extrapolated from the fitted growth) and "
        "lies within a factor of 4 of the FLOP model's (CPU kernels differ in FLOP/s)",
        could_fail_if="a linear attention never became faster than softmax (quadratic "
        "after all), or ran at a small fraction of softmax's FLOP rate (N* far beyond "
        "the FLOP model's)",
    )


def _per_token_claim(
    result: ExperimentResult, gated: dict[str, dict[str, Any]], s: ComplexitySettings
) -> None:
    """Training memory per token of the gated ops is flat over the fit window."""
    if not gated:
        return
    window = {k: [p for p in d["points"] if p["N"] >= s.fit_from_linear] for k, d in gated.items()}
    per_token = {k: [p["saved_bytes"] / p["N"] for p in pts] for k, pts in window.items()}
    model = {k: [p["bytes_held_model"] / p["N"] for p in pts] for k, pts in window.items()}
    spread = {k: max(b) / min(b) for k, b in per_token.items() if b and min(b) > 0}
    within = all(m <= mm for k in per_token for m, mm in zip(per_token[k], model[k], strict=True))
    result.numbers["gated_saved_bytes_per_token"] = per_token
    result.claim(
        "gated_memory_per_token",
        "Training memory of decay attention and the gated delta rule is flat per token: "
        "the bytes saved for backward grow like N (the chunk blocks are recomputed)",
        theory=f"saved bytes / N the same at every N >= {s.fit_from_linear}, at most the "
        "cost model's memory held for backward per token (blocks recomputed): "
        + ", ".join(f"{k}: {max(m):,.0f} B" for k, m in model.items()),
        measured=", ".join(
            f"{k}: {min(b):,.0f} to {max(b):,.0f} B per token" for k, b in per_token.items()
        )
        + " (bytes autograd saves)",
        passed=len(spread) == len(gated)
        and all(x <= PER_TOKEN_TOL for x in spread.values())
        and within,
        tolerance=f"max / min of the bytes per token <= {PER_TOKEN_TOL} over "
        f"N = {s.fit_from_linear} .. {max(s.lengths + s.linear_lengths)}, and each <= the "
        "model's at the same N",
        could_fail_if="the forward kept what its backward should recompute: the state "
        "after every token or chunk position (D x M floats per token, several times the "
        "model's bytes per token), or an N x N decay matrix (the bytes per token double "
        "with every doubling of N)",
        value=max(spread.values()) if spread else None,
    )


def _figures(
    ctx: Context, result: ExperimentResult, data: dict[str, dict[str, Any]], s: ComplexitySettings
) -> None:
    ns = [float(n) for n in sorted(set(s.lengths + s.linear_lengths + s.quadratic_lengths))]
    for causal in (False, True):
        tag = "causal" if causal else "non-causal"
        fig, (ax_t, ax_m) = plotting.new_figure(2, width=6.2, height=5.0)
        for i, d in enumerate(data.values()):
            if d["causal"] != causal and d["family"] != "kernel":
                continue
            if d["family"] == "kernel" and causal:
                continue
            col = plotting.color(d["label"], i)
            style = "s-" if d["family"] != "linear" else "o-"
            lw = 2.2 if d["family"] != "linear" else 1.3
            xs = [float(p["N"]) for p in d["points"]]
            dp = f", D'={d['feature_width']}" if d["feature_width"] else ""
            fit = d.get("fit")
            slope = (
                f"; slope {fit['time_slope']:.2f} (model {fit['time_slope_model']:.2f})"
                if fit
                else ""
            )
            ax_t.plot(
                xs,
                [p["seconds_min"] * 1e3 for p in d["points"]],
                style,
                color=col,
                lw=lw,
                ms=4,
                label=f"{d['label']}{dp}{slope}",
            )
            mslope = (
                f"; slope {fit['memory_slope']:.2f} (model {fit['memory_slope_model']:.2f})"
                if fit and fit["memory_slope"] is not None
                else ""
            )
            ax_m.plot(
                xs,
                [p["saved_bytes"] / 2**20 for p in d["points"]],
                style,
                color=col,
                lw=lw,
                ms=4,
                label=f"{d['label']}{dp}{mslope}",
            )
        # Reference slopes (the theory curves): N and N^2 through the softmax point at the
        # smallest N.
        soft = data[f"softmax (SDPA) ({tag})"]["points"]
        t_ref = soft[0]["seconds_min"] * 1e3
        ns_soft = [float(p["N"]) for p in soft]
        ax_t.plot(
            ns_soft, [t_ref * (n / ns[0]) ** 2 for n in ns_soft], "k--", lw=1, label="theory: ∝ N^2"
        )
        ax_t.plot(ns, [t_ref * (n / ns[0]) for n in ns], "k:", lw=1, label="theory: ∝ N")
        m_ref = max(p["saved_bytes"] for p in soft[:1]) / 2**20 or 1.0
        ax_m.plot(
            ns_soft, [m_ref * (n / ns[0]) ** 2 for n in ns_soft], "k--", lw=1, label="theory: ∝ N^2"
        )
        ax_m.plot(ns, [m_ref * (n / ns[0]) for n in ns], "k:", lw=1, label="theory: ∝ N")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.set_yscale("log")
            plotting.geometric_ticks(ax, ns)
            ax.set_xlabel("sequence length N (tokens)")
            plotting.legend(ax, loc="upper left", fontsize="x-small")
        plotting.plain_log_labels(ax_t)
        ax_t.set_ylabel("forward time, fastest of the repeats (ms; log scale)")
        ax_m.set_ylabel("memory saved for the backward pass (MiB; log scale)")
        ax_t.set_title(f"Time, {tag} (B=1, H={s.heads}, D={s.key_width}, M={s.value_width})")
        ax_m.set_title(f"Memory held for backward, {tag}")
        cross = [
            f"{d['label']} {'<= ' if d['crossover']['how'] == 'below range' else ''}"
            f"{_fmt_n(d['crossover']['N'])}"
            + (" (extrapolated)" if d["crossover"]["how"] == "extrapolated" else "")
            + f" [FLOP model {d['crossover']['N_flops_model']:,.0f}]"
            for d in data.values()
            if d["family"] == "linear" and d["causal"] == causal and "crossover" in d
        ]
        soft_fit = data[f"softmax (SDPA) ({tag})"].get("fit")
        soft_text = (
            f"softmax's time slope is {soft_fit['time_slope']:.2f} (model "
            f"{soft_fit['time_slope_model']:.2f})"
            if soft_fit
            else "too few sizes for slopes"
        )
        result.figures.append(
            plotting.save(
                fig,
                ctx,
                f"complexity_{tag.replace('-', '')}",
                f"Time and training memory against N, {tag}",
                f"Theory: softmax takes O(N^2 (D + M)) time (dashed N^2 guide), linear "
                f"attention O(N D' M) (dotted N guide); the plain quadratic math holds "
                f"O(N^2) memory, the fused SDPA kernel and linear attention O(N). "
                f"Measured: {soft_text}; the legend gives every series' fitted slope over "
                f"{_window(s)} next to the cost model's. Crossover N* where "
                f"linear becomes faster than softmax: " + "; ".join(cross) + ".",
            )
        )


EXPERIMENTS.register("complexity")(
    Experiment(
        "complexity", "Time and memory against sequence length: softmax, kernel, linear", run
    )
)
