"""Measurement: run the real implementations, count their FLOPs, fit growth exponents.

- :func:`count_flops` counts matmul FLOPs with ``torch.utils.flop_counter.FlopCounterMode``.
  That counter has no formula for torch's CPU fused SDPA kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) nor for the
  in-place ``baddbmm_`` (the fast causal path accumulates with it): it would count 0.
  We register torch's own SDPA formulas for those two ops and the out-of-place
  baddbmm's for the in-place one (:data:`CPU_SDPA_FORMULAS`, :data:`EXTRA_FORMULAS`),
  so every product that runs is counted.
- :func:`runner` builds the real call of a variant at concrete sizes. With
  ``activations="keep"`` it runs the implementation the model describes (pinned:
  model matmul FLOPs == counted FLOPs, exactly); softmax's ``"recompute"`` runs the
  fused kernel (flash-style backward: scores recomputed; also pinned); ``linear_fast``
  runs the recomputing Function of :mod:`attnkit.ops.linear_chunked`, whose bmm
  products are declared contractions too (pinned, at every tile plan).
- :func:`fit_exponent` times a call over a geometric range of one size and fits the
  log-log slope with a Student-t confidence band; :func:`fit_loglog` fits any
  measured quantity (e.g. ``KVCache.nbytes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from attnkit import decoding
from attnkit._timing import Timing, time_call
from attnkit.cost import model
from attnkit.feature_maps import Polynomial
from attnkit.ops.argmax import argmax_attention
from attnkit.ops.decay.attention import gated_linear_attention_step
from attnkit.ops.decay.reference import chunked_decay
from attnkit.ops.delta.attention import delta_rule_step
from attnkit.ops.delta.reference import chunked_delta
from attnkit.ops.kernel import kernel_attention
from attnkit.ops.linear import linear_attention, linear_attention_step
from attnkit.ops.softmax import sdpa, sdpa_reference

__all__ = [
    "CPU_SDPA_FORMULAS",
    "EXTRA_FORMULAS",
    "ExponentFit",
    "Measurement",
    "Runner",
    "count_flops",
    "fit_exponent",
    "fit_loglog",
    "measure",
    "runner",
    "t_quantile",
]

_aten = torch.ops.aten


def _sdpa_cpu_flop(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    # torch's own formula, untyped upstream.
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))  # type: ignore[no-untyped-call]


def _sdpa_cpu_backward_flop(
    grad_out_shape: Sequence[int],
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    flops = sdpa_backward_flop_count(  # type: ignore[no-untyped-call]
        grad_out_shape, query_shape, key_shape, value_shape
    )
    return int(flops)


def _baddbmm_inplace_flop(
    self_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    # out += a @ b over a batch: 2 b m n k, as torch counts the out-of-place baddbmm.
    batch, m, k = a_shape
    return 2 * batch * m * k * int(b_shape[-1])


#: FLOP formulas for torch's CPU fused SDPA ops, which FlopCounterMode does not know.
CPU_SDPA_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}
#: Every formula :func:`count_flops` adds to FlopCounterMode's: the CPU SDPA ops and the
#: in-place baddbmm_ (torch 2.13 counts 0 for it).
EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    **CPU_SDPA_FORMULAS,
    _aten.baddbmm_: _baddbmm_inplace_flop,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul FLOPs of one call of ``fn``, as FlopCounterMode counts them (+ EXTRA_FORMULAS)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- runners: the real implementation of each variant at concrete sizes ------------------
Build = Callable[[Mapping[str, int], str, torch.dtype], Callable[[], object]]


@dataclass(frozen=True)
class Runner:
    """How to run a variant's real implementation.

    ``pinned``: the model's matmul FLOPs equal this implementation's counted FLOPs.
    """

    description: str
    pinned: bool
    build: Build


def _divides(a: int, b: int, what: str) -> None:
    if a <= 0 or b % a:
        raise ValueError(f"{what}: {a} must divide {b}")


def _train(outputs: Callable[[], Tensor], leaves: Sequence[Tensor]) -> Callable[[], object]:
    """Forward, then backward of the sum of the output: one training step's attention."""

    def step() -> object:
        for t in leaves:
            t.grad = None
        out = outputs()
        torch.autograd.backward(out.sum())
        return out

    return step


def _sequence(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Build:
    def build(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
        _divides(s["Hk"], s["H"], "key/value heads Hk")
        grad = phase == "train"
        q = torch.randn(s["B"], s["H"], s["L"], s["E"], dtype=dtype, requires_grad=grad)
        k = torch.randn(s["B"], s["Hk"], s["S"], s["E"], dtype=dtype, requires_grad=grad)
        v = torch.randn(s["B"], s["Hk"], s["S"], s["Ev"], dtype=dtype, requires_grad=grad)
        if grad:
            return _train(lambda: fn(q, k, v), (q, k, v))

        def forward() -> object:
            with torch.no_grad():
                return fn(q, k, v)

        return forward

    return build


#: The quadratic map (q.k + 1)^2 can reach 0: the runners pass the denominator guard
#: explicitly (the models' "guard and divide" step), whatever the ops' default is.
_EPS = 1e-6


def _quadratic() -> Polynomial:
    return Polynomial(degree=2, c=1.0)


def _linear_causal(implementation: str) -> Build:
    def build(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
        _divides(s["C"], s["L"], "chunk length C")
        if s["L"] != s["S"]:
            raise ValueError(f"causal linear attention needs L == S, got L={s['L']}, S={s['S']}")
        phi = _quadratic()

        def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            out, _ = linear_attention(
                q,
                k,
                v,
                phi,
                is_causal=True,
                chunk_size=s["C"],
                implementation=implementation,
                enable_gqa=True,
                eps=_EPS,
            )
            return out

        return _sequence(fn)(s, phase, dtype)

    return build


def _linear_noncausal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out, _ = linear_attention(
        q, k, v, feature_map=_quadratic(), is_causal=False, eps=_EPS, enable_gqa=True
    )
    return out


def _softmax_fused(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
    if s["E"] != s["Ev"]:
        raise ValueError(
            f"torch's CPU fused SDPA kernel needs E == Ev (got {s['E']}, {s['Ev']}); "
            "otherwise it falls back to its math path"
        )
    return _sequence(lambda q, k, v: sdpa(q, k, v, enable_gqa=True))(s, phase, dtype)


def _linear_step(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
    _divides(s["Hk"], s["H"], "key/value heads Hk")
    B, H, Hk, E, Ev, Dp = s["B"], s["H"], s["Hk"], s["E"], s["Ev"], s["Dp"]
    q = torch.randn(B, H, 1, E, dtype=dtype)
    k = torch.randn(B, Hk, 1, E, dtype=dtype)
    v = torch.randn(B, Hk, 1, Ev, dtype=dtype)
    acc = torch.promote_types(dtype, torch.float32)
    state = (torch.rand(B, Hk, Dp, Ev, dtype=acc), torch.rand(B, Hk, Dp, dtype=acc) + 1.0)
    phi = _quadratic()

    def step() -> object:
        with torch.no_grad():
            return linear_attention_step(q, k, v, state, feature_map=phi, eps=_EPS, enable_gqa=True)

    return step


def _decode(kind: str) -> Build:
    def build(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
        b, d, h, k, v, n = s["b"], s["d"], s["h"], s["k"], s["v"], s["n"]
        g = {"mha": h, "mqa": 1, "gqa": s["g"]}[kind]
        _divides(g, h, "key/value heads g")
        x = torch.randn(b, d, dtype=dtype)
        W_q = torch.randn(h, d, k, dtype=dtype) / math.sqrt(d)
        W_o = torch.randn(h, v, d, dtype=dtype) / math.sqrt(h * v)
        if kind == "mqa":
            W_k, W_v = torch.randn(d, k, dtype=dtype), torch.randn(d, v, dtype=dtype)
            K, V = torch.randn(b, n, k, dtype=dtype), torch.randn(b, n, v, dtype=dtype)
        else:
            W_k, W_v = torch.randn(g, d, k, dtype=dtype), torch.randn(g, d, v, dtype=dtype)
            K, V = torch.randn(b, g, n, k, dtype=dtype), torch.randn(b, g, n, v, dtype=dtype)
        if kind == "mha":
            fn: Callable[[], object] = lambda: decoding.mha_step(x, K, V, W_q, W_k, W_v, W_o)  # noqa: E731
        elif kind == "mqa":
            fn = lambda: decoding.mqa_step(x, K, V, W_q, W_k, W_v, W_o)  # noqa: E731
        else:
            fn = lambda: decoding.gqa_step(x, K, V, W_q, W_k, W_v, W_o, n_groups=g)  # noqa: E731

        def step() -> object:
            with torch.no_grad():
                return fn()

        return step

    return build


def _gated_inputs(
    s: Mapping[str, int], dtype: torch.dtype, grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q [B, Hv, G, L, D] (scaled), unit k, v, g in [-1, 0], beta in [0, 1], S0 (zeros)."""
    B, Hv, G, L, D, M = s["B"], s["Hv"], s["G"], s["L"], s["D"], s["M"]
    acc = torch.promote_types(dtype, torch.float32)
    q = torch.randn(B, Hv, G, L, D, dtype=dtype) * D**-0.5
    k = torch.nn.functional.normalize(torch.randn(B, Hv, L, D, dtype=dtype), dim=-1)
    v = torch.randn(B, Hv, L, M, dtype=dtype)
    g, beta = -torch.rand(B, Hv, L, dtype=dtype), torch.rand(B, Hv, L, dtype=dtype)
    S0 = torch.zeros(B, Hv, D, M, dtype=acc)
    for t in (q, k, v, g, beta):
        t.requires_grad_(grad)
    return q, k, v, g, beta, S0


def _gated_chunked(delta: bool) -> Build:
    def build(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
        _divides(s["C"], s["L"], "chunk length C")
        grad = phase == "train"
        q, k, v, g, beta, S0 = _gated_inputs(s, dtype, grad)

        def fn() -> Tensor:
            if delta:
                return chunked_delta(q, k, v, beta, g, S0, s["C"])[0]
            return chunked_decay(q, k, v, g, S0, s["C"])[0]

        if grad:
            return _train(fn, (q, k, v, g, beta))

        def forward() -> object:
            with torch.no_grad():
                return fn()

        return forward

    return build


def _gated_step(delta: bool) -> Build:
    def build(s: Mapping[str, int], phase: str, dtype: torch.dtype) -> Callable[[], object]:
        B, Hv, G, D, M = s["B"], s["Hv"], s["G"], s["D"], s["M"]
        q = torch.randn(B, Hv * G, 1, D, dtype=dtype)
        k = torch.nn.functional.normalize(torch.randn(B, Hv, 1, D, dtype=dtype), dim=-1)
        v = torch.randn(B, Hv, 1, M, dtype=dtype)
        g, beta = -torch.rand(B, Hv, 1, dtype=dtype), torch.rand(B, Hv, 1, dtype=dtype)
        S = torch.randn(B, Hv, D, M, dtype=torch.promote_types(dtype, torch.float32))

        def step() -> object:
            with torch.no_grad():
                if delta:
                    return delta_rule_step(q, k, v, beta, g, state=S, enable_gqa=True)
                return gated_linear_attention_step(q, k, v, g, state=S, enable_gqa=True)

        return step

    return build


_RUNNERS: dict[tuple[str, str], Runner] = {
    ("softmax", "keep"): Runner(
        "attnkit.sdpa_reference (plain math)",
        True,
        _sequence(lambda q, k, v: sdpa_reference(q, k, v, enable_gqa=True)),
    ),
    ("softmax", "recompute"): Runner(
        "attnkit.sdpa -> torch's CPU fused kernel (flash-style backward)", True, _softmax_fused
    ),
    ("argmax", "keep"): Runner(
        'attnkit.argmax_attention(mode="hard")',
        True,
        _sequence(lambda q, k, v: argmax_attention(q, k, v, enable_gqa=True)),
    ),
    ("kernel", "keep"): Runner(
        'attnkit.kernel_attention(sim="polynomial", eps=1e-6)',
        True,
        _sequence(
            lambda q, k, v: kernel_attention(q, k, v, sim="polynomial", eps=1e-6, enable_gqa=True)
        ),
    ),
    ("linear", "keep"): Runner(
        "attnkit.linear_attention(is_causal=False), polynomial degree 2",
        True,
        _sequence(_linear_noncausal),
    ),
    ("linear_chunked", "keep"): Runner(
        'attnkit.linear_attention(is_causal=True, implementation="reference")',
        True,
        _linear_causal("reference"),
    ),
    ("linear_fast", "recompute"): Runner(
        'attnkit.linear_attention(is_causal=True, implementation="fast") (recomputing Function)',
        True,
        _linear_causal("fast"),
    ),
    ("linear_step", "keep"): Runner("attnkit.linear_attention_step", True, _linear_step),
    ("mha", "keep"): Runner("attnkit.decoding.mha_step", True, _decode("mha")),
    ("mqa", "keep"): Runner("attnkit.decoding.mqa_step", True, _decode("mqa")),
    ("gqa", "keep"): Runner("attnkit.decoding.gqa_step", True, _decode("gqa")),
    ("gla_chunked", "keep"): Runner(
        "attnkit.ops.decay.reference.chunked_decay (plain einsums)", True, _gated_chunked(False)
    ),
    ("gated_delta_chunked", "keep"): Runner(
        "attnkit.ops.delta.reference.chunked_delta (plain einsums)", True, _gated_chunked(True)
    ),
    ("gla_step", "keep"): Runner("attnkit.gated_linear_attention_step", True, _gated_step(False)),
    ("gated_delta_step", "keep"): Runner("attnkit.delta_rule_step", True, _gated_step(True)),
}


def runner(variant: str, activations: str | None = None) -> Runner:
    """The real implementation of ``variant`` under ``activations``; ValueError if none.

    ``activations=None``: the variant's own (``Variant.default_activations``).
    """
    chosen = model.get(variant).default_activations
    if activations is not None:
        chosen = activations
    phases = model.get(variant).phases
    if chosen == "recompute" and "train" not in phases:
        chosen = "keep"  # no backward pass: nothing to recompute
    try:
        return _RUNNERS[(variant, chosen)]
    except KeyError:
        raise ValueError(
            f"no {chosen!r} implementation of {variant!r} to measure; the model's "
            f"{chosen!r} figures are a documented option"
        ) from None


@dataclass(frozen=True)
class Measurement:
    """Counted matmul FLOPs and the time of one call (medians of repeats)."""

    flops: int
    time: Timing | None
    runner: Runner


def measure(
    variant: str,
    sizes: Mapping[str, int],
    phase: str | None = None,
    *,
    activations: str | None = None,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    timed: bool = True,
) -> Measurement:
    """Count the FLOPs of (and time) the real implementation of ``variant`` at ``sizes``.

    ``activations=None``: the variant's own (``Variant.default_activations``).
    """
    v = model.get(variant)
    phase = v.check_phase(phase)
    r = runner(variant, activations)
    call = r.build(sizes, phase, dtype)
    flops = count_flops(call)
    timing = time_call(call, repeats=repeats, warmup=1) if timed else None
    return Measurement(flops, timing, r)


# ---- growth exponents -----------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: int) -> float:
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (e.g. 12.706 for 0.975, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class ExponentFit:
    """A least-squares fit log y = intercept + slope · log x, with a confidence band.

    ``low``/``high`` bound the slope at ``confidence`` (Student t, n - 2 degrees of
    freedom, on the fit's residuals).
    """

    slope: float
    intercept: float
    low: float
    high: float
    confidence: float
    sizes: tuple[float, ...]
    values: tuple[float, ...]

    def __contains__(self, exponent: object) -> bool:
        return isinstance(exponent, (int, float)) and self.low <= exponent <= self.high

    def __str__(self) -> str:
        pct = f"{self.confidence * 100:g}%"
        return f"slope {self.slope:.3f} [{self.low:.3f}, {self.high:.3f}] ({pct})"


def fit_loglog(
    sizes: Sequence[float], values: Sequence[float], *, confidence: float = 0.95
) -> ExponentFit:
    """Fit the growth exponent of ``values`` in ``sizes`` (both > 0, at least 3 points)."""
    if len(sizes) != len(values):
        raise ValueError(
            f"sizes and values must have equal lengths, got {len(sizes)} and {len(values)}"
        )
    if len(sizes) < 3:
        raise ValueError(f"need at least 3 sizes for a confidence band, got {len(sizes)}")
    if min(sizes) <= 0 or min(values) <= 0:
        raise ValueError("sizes and values must be > 0 for a log-log fit")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = [math.log(x) for x in sizes]
    ys = [math.log(y) for y in values]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("sizes must not all be equal")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    sse = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    se = math.sqrt(sse / (n - 2) / sxx)
    half = t_quantile(0.5 + confidence / 2.0, n - 2) * se
    return ExponentFit(
        slope,
        intercept,
        slope - half,
        slope + half,
        confidence,
        tuple(map(float, sizes)),
        tuple(map(float, values)),
    )


def fit_exponent(
    make_call: Callable[[int], Callable[[], object]],
    sizes: Sequence[int],
    *,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    confidence: float = 0.95,
) -> ExponentFit:
    """Time ``make_call(size)()`` for each size and fit the log-log slope of the medians.

    ``make_call(size)`` builds the inputs (not timed) and returns the call to time;
    :func:`attnkit._timing.time_call` gives the median of ``repeats`` calls. Use a
    geometric range of sizes (e.g. 256, 512, 1024, 2048) large enough that the work,
    not the per-call overhead, dominates.
    """
    medians = [
        time_call(make_call(size), repeats=repeats, warmup=warmup, min_time=min_time).median
        for size in sizes
    ]
    return fit_loglog(sizes, medians, confidence=confidence)
