"""The benchmark cases: attnkit against its competitors and the machine's limits.

Each case builds its inputs once (outside the timed calls), checks once that the
competitors compute the same thing (max |difference| against attnkit, recorded as
a metric), then times them side by side (:meth:`BenchContext.compare`). Work that
belongs to an algorithm (a feature map, a layout the library needs) is inside the
timed call of every competitor alike; a competitor's native input layout is built
outside it.

Shapes follow the benchmark's targets: fp32, B = 1, H = 8, D = M = 64 unless stated
(``full`` profile; ``quick`` shrinks the lengths).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

import attnkit
from attnkit import feature_maps
from attnkit._timing import Timing
from attnkit.bench import flops as fl
from attnkit.bench.competitors import (
    Missing,
    fast_transformers_causal_product,
    fla_naive_based,
    fla_naive_chunk_linear_attn,
    performer_fast_attention,
)
from attnkit.bench.core import BenchContext, register_case
from attnkit.bench.results import CaseResult, MachinePeaks, Metric, Row, Section, Target
from attnkit.lab.measure import saved_tensor_bytes
from attnkit.layers.cache import KVCache
from attnkit.ops import linear as linear_ops

__all__ = [
    "ATTNKIT",
    "ATTNKIT_REF",
    "FLA_CHUNK",
    "crossover",
    "linear_fit",
    "saved_tensor_bytes",
]

ATTNKIT = "attnkit"
ATTNKIT_REF = "attnkit reference"
FLA_CHUNK = "fla naive chunk"
#: attnkit's fast path on half inputs (fp32 accumulation inside), forward case only.
ATTNKIT_HALF = {"attnkit bf16": torch.bfloat16, "attnkit fp16": torch.float16}
FLA_BASED = "fla Based naive (quadratic)"
SDPA = "torch SDPA"
PERFORMER = "performer-pytorch FAVOR+"
FAST_TRANSFORMERS = "fast-transformers causal_product"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _chunk_size(N: int, d_feature: int, d_value: int) -> int:
    """The chunk length attnkit's causal path picks by default (for the FLOP count)."""
    return linear_ops.auto_chunk_size(N, d_feature, d_value)


def _elu1(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b x; returns (a, b, max |y - fit| / y)."""
    n = len(xs)
    if n < 2:
        raise ValueError(f"linear_fit needs at least 2 points, got {n}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    dev = max(abs(y - (a + b * x)) / abs(y) for x, y in zip(xs, ys, strict=True) if y)
    return a, b, dev


def crossover(ns: Sequence[int], speedups: Sequence[float]) -> tuple[int | None, float | None]:
    """Where a speed-up (> 1 = faster) crosses 1 for good along increasing N.

    Returns (the smallest swept N from which every larger swept N has speed-up
    >= 1, the crossing N interpolated linearly in log N / log speed-up between the
    two swept points around it). (None, None) when the last point is still
    slower; (N_min, None) when already faster at the smallest N.
    """
    first: int | None = None
    for i in range(len(ns) - 1, -1, -1):
        if speedups[i] < 1.0:
            break
        first = ns[i]
    if first is None:
        return None, None
    i = list(ns).index(first)
    if i == 0:
        return first, None
    n0, n1, s0, s1 = ns[i - 1], ns[i], speedups[i - 1], speedups[i]
    if s1 == s0 or s0 <= 0 or s1 <= 0:
        return first, float(n1)
    t = (0.0 - math.log(s0)) / (math.log(s1) - math.log(s0))
    return first, math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))


def _row(
    sec: Section,
    label: str,
    timings: dict[str, Timing],
    params: dict[str, Metric] | None = None,
    *,
    flops: float | None = None,
    nbytes: float | None = None,
    metrics: dict[str, Metric] | None = None,
    computed_flops: float | None = None,
) -> Row:
    return sec.add(
        Row(
            label,
            dict(params or {}),
            timing=timings[label],
            flops=flops,
            nbytes=nbytes,
            metrics=dict(metrics or {}),
            computed_flops=computed_flops,
        )
    )


#: Rows that run attnkit's fast causal path, whose executed FLOPs the cost model knows.
_FAST_ROWS = ("attnkit", "attnkit bf16", "attnkit fp16")


def _skip(sec: Section, label: str, reason: str, params: dict[str, Metric] | None = None) -> Row:
    return sec.add(Row(label, dict(params or {}), skipped=reason))


def _speedup(sec: Section, label: str, **params: Metric) -> float | None:
    row = sec.find(label, **params)
    return row.speedup if row is not None else None


def _attnkit_causal(
    q: Tensor, k: Tensor, v: Tensor, feature_map: str | feature_maps.FeatureMap, impl: str
) -> Tensor:
    """attnkit.linear_attention(is_causal=True); impl "fast" (default) or "reference"."""
    o, _ = attnkit.linear_attention(
        q, k, v, feature_map=feature_map, is_causal=True, implementation=impl
    )
    return o


# --------------------------------------------------------------------------------------
# machine: the peaks every other result is a fraction of
# --------------------------------------------------------------------------------------


@register_case("machine", "Machine peaks: fp32 matmul and copy bandwidth")
def machine(ctx: BenchContext) -> CaseResult:
    """Median fp32 sgemm FLOP/s ([n, n] @ [n, n]) and copy bandwidth (read + write)."""
    p = ctx.profile
    n = p.matmul_n
    numel = p.copy_mib * 2**20 // 4
    res = CaseResult(
        "machine",
        "Machine peaks",
        config={
            "matmul": f"[{n}, {n}] @ [{n}, {n}] fp32",
            "copy": f"{p.copy_mib} MiB fp32, read + write counted",
            "threads": torch.get_num_threads(),
        },
    )
    a, b = ctx.randn(n, n), ctx.randn(n, n)
    c = torch.empty(n, n, device=ctx.device)
    src = ctx.randn(numel)
    dst = torch.empty_like(src)
    fns: dict[str, Callable[[], Tensor]] = {
        "fp32 matmul": partial(torch.mm, a, b, out=c),
        "tensor copy": partial(dst.copy_, src),
    }
    t = ctx.compare(fns, budget=False)
    sec = res.section("measured peaks")
    mm_flops, cp_bytes = fl.matmul_flops(n, n, n), fl.copy_bytes(numel, 4)
    _row(sec, "fp32 matmul", t, {"size": f"{n}^3"}, flops=mm_flops)
    _row(sec, "tensor copy", t, {"size": f"{p.copy_mib} MiB"}, nbytes=cp_bytes)
    ctx.peaks = MachinePeaks(mm_flops / t["fp32 matmul"].median, cp_bytes / t["tensor copy"].median)
    res.summary = {
        "matmul_gflops": ctx.peaks.matmul_flops_per_s / 1e9,
        "copy_gbps": ctx.peaks.copy_bytes_per_s / 1e9,
    }
    res.notes.append(
        "Fractions of peak elsewhere are of these two numbers, at the same thread count."
    )
    return res


# --------------------------------------------------------------------------------------
# linear-causal-fwd
# --------------------------------------------------------------------------------------


def _fla_elu(fla: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """fla's naive chunk reference with elu + 1 applied inside, [B, T, H, D] in and out."""
    return fla(_elu1(q), _elu1(k), v, scale=1.0, normalize=True)


def _causal_impls(
    fla: Callable[..., Tensor] | Missing,
) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The causal elu competitors: label -> f(q, k, v) in that competitor's own layout."""
    impls: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        ATTNKIT: partial(_attnkit_elu, impl="fast"),
        ATTNKIT_REF: partial(_attnkit_elu, impl="reference"),
    }
    if not isinstance(fla, Missing):
        impls[FLA_CHUNK] = partial(_fla_elu, fla)
    return impls


def _attnkit_elu(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    return _attnkit_causal(q, k, v, "elu", impl)


def _layout(label: str, x: Tensor) -> Tensor:
    """attnkit's [B, H, T, D] -> the competitor's native layout (fla: [B, T, H, D])."""
    return x.transpose(1, 2).contiguous() if label == FLA_CHUNK else x


def _from_layout(label: str, x: Tensor) -> Tensor:
    """Inverse of :func:`_layout` (a view, for comparing outputs and gradients)."""
    return x.transpose(1, 2) if label == FLA_CHUNK else x


@register_case(
    "linear-causal-fwd",
    "Causal elu linear attention, forward",
    competitors=("flash-linear-attention",),
)
def linear_causal_fwd(ctx: BenchContext) -> CaseResult:
    """attnkit (fast and reference) vs fla's naive chunk reference, elu + 1 inside each call."""
    p = ctx.profile
    B, H, D, N = 1, p.heads, p.dim, p.fwd_n
    C = _chunk_size(N, D, D)
    res = CaseResult(
        "linear-causal-fwd",
        "Causal elu linear attention, forward",
        config={"B": B, "H": H, "D": D, "M": D, "N": N, "dtype": "float32", "chunk": C},
    )
    res.notes.append(
        "FLOPs: useful ones (the cost model's linear_fast: numerator columns, causal "
        "triangles) for every row; '% peak (computed)' adds what attnkit's fast path "
        "executes besides (the masked upper halves and the ones column of the denominator)."
    )
    res.notes.append(
        "elu(x) + 1 is applied to q and k inside every timed call (attnkit applies its "
        "feature map itself); fla gets its native [B, T, H, D] layout, built outside the "
        "timed call, with scale=1.0 and normalize=True."
    )
    fla = fla_naive_chunk_linear_attn()
    impls = _causal_impls(fla)
    q, k, v = (ctx.randn(B, H, N, D) for _ in range(3))
    fns: dict[str, Callable[[], Tensor]] = {
        label: partial(impl, _layout(label, q), _layout(label, k), _layout(label, v))
        for label, impl in impls.items()
    }
    for label, dtype in ATTNKIT_HALF.items():
        fns[label] = partial(impls[ATTNKIT], q.to(dtype), k.to(dtype), v.to(dtype))
    baseline = ATTNKIT_REF if isinstance(fla, Missing) else FLA_CHUNK
    sec = res.section(f"forward, N={N}", baseline=baseline)
    with torch.no_grad():
        ref = fns[ATTNKIT]()
        err = {label: _max_abs_diff(_from_layout(label, fn()), ref) for label, fn in fns.items()}
        t = ctx.compare(fns)
    work = fl.causal_linear_flops(N, D, D, C, heads=B * H)
    executed = fl.causal_linear_computed_flops(N, D, D, C, heads=B * H)
    for label in fns:
        _row(
            sec,
            label,
            t,
            {"N": N},
            flops=work,
            metrics={"max_abs_err": err[label]},
            computed_flops=executed if label in _FAST_ROWS else None,
        )
    if isinstance(fla, Missing):
        _skip(sec, FLA_CHUNK, fla.reason, {"N": N})
    sec.compare()
    fast = sec.find(ATTNKIT)
    vs_fla = _speedup(sec, ATTNKIT) if FLA_CHUNK in fns else None
    half = {label: _ratio(t, label, ATTNKIT) for label in ATTNKIT_HALF}

    def finish(peaks: MachinePeaks | None) -> None:
        frac = fast.frac_matmul(peaks) if fast is not None else None
        res.summary = {
            "speedup_vs_fla": vs_fla,
            "speedup_vs_attnkit_reference": _ratio(t, ATTNKIT_REF, ATTNKIT),
            "frac_matmul_peak": frac,
            **{f"{label} / fp32 time": r for label, r in half.items()},
        }
        res.summary["frac_matmul_peak_computed"] = (
            fast.frac_matmul_computed(peaks) if fast is not None else None
        )
        res.targets = [
            Target(f"attnkit speed-up over fla naive chunk, N={N}", vs_fla, 3.0, ">=", "x"),
            Target(
                "attnkit fraction of measured matmul peak (useful FLOPs)", frac, 0.40, ">=", "%"
            ),
            *(Target(f"{label} time / fp32 time", r, 2.0, "<=", "x") for label, r in half.items()),
        ]

    res.refresh = finish  # the runner calls it (again once the peaks are re-measured)
    return res


def _ratio(t: dict[str, Timing], num: str, den: str) -> float | None:
    """time(num) / time(den) from one comparison's medians."""
    if num not in t or den not in t or t[den].median <= 0:
        return None
    return t[num].median / t[den].median


# --------------------------------------------------------------------------------------
# linear-causal-train
# --------------------------------------------------------------------------------------


def _train_step(
    impl: Callable[[Tensor, Tensor, Tensor], Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad_out: Tensor,
) -> None:
    """One training call: forward, then backward of ``grad_out`` into the leaves q, k, v."""
    q.grad = k.grad = v.grad = None
    torch.autograd.backward(impl(q, k, v), grad_out)


def _leaves(label: str, *xs: Tensor) -> list[Tensor]:
    """Copies of ``xs`` in the competitor's layout, as leaves that require grad."""
    return [_layout(label, x).detach().clone().requires_grad_(True) for x in xs]


@register_case(
    "linear-causal-train",
    "Causal elu linear attention, forward + backward",
    competitors=("flash-linear-attention",),
)
def linear_causal_train(ctx: BenchContext) -> CaseResult:
    """Forward + backward vs autograd through fla's naive chunk; saved-for-backward bytes vs N."""
    p = ctx.profile
    B, H, D, N = 1, p.heads, p.dim, p.train_n
    C = _chunk_size(N, D, D)
    res = CaseResult(
        "linear-causal-train",
        "Causal elu linear attention, forward + backward",
        config={"B": B, "H": H, "D": D, "M": D, "N": N, "dtype": "float32", "chunk": C},
    )
    res.notes.append(
        "One call = forward, then backward of a fixed random output gradient into q, k, v "
        "(elu + 1 inside the call). Useful FLOPs = 3 x the forward's; '% peak (computed)' "
        "counts what the fast path executes, its recomputed chunk states and scores included."
    )
    res.notes.append(
        "Memory: bytes of the distinct storages saved for backward "
        "(torch.autograd.graph.saved_tensors_hooks; inputs included when saved), since "
        "torch's CPU allocations are invisible to tracemalloc."
    )
    fla = fla_naive_chunk_linear_attn()
    impls = _causal_impls(fla)
    q0, k0, v0, g0 = (ctx.randn(B, H, N, D) for _ in range(4))  # attnkit's layout
    fns: dict[str, Callable[[], None]] = {}
    dq: dict[str, Tensor] = {}
    saved: dict[str, int] = {}
    for label, impl in impls.items():
        q, k, v = _leaves(label, q0, k0, v0)
        fns[label] = partial(_train_step, impl, q, k, v, _layout(label, g0))
        fns[label]()  # one call, to compare the gradients below
        if q.grad is not None:
            dq[label] = _from_layout(label, q.grad)
        saved[label] = saved_tensor_bytes(partial(impl, q, k, v))
    peak: dict[str, int] = {}
    if ctx.device.type == "cuda":
        for label, fn in fns.items():
            torch.cuda.synchronize(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            fn()
            torch.cuda.synchronize(ctx.device)
            peak[label] = torch.cuda.max_memory_allocated(ctx.device)
    sec = res.section(
        f"forward + backward, N={N}",
        baseline=ATTNKIT_REF if isinstance(fla, Missing) else FLA_CHUNK,
    )
    t = ctx.compare(fns)
    work = fl.causal_linear_train_flops(N, D, D, C, heads=B * H)
    executed = fl.causal_linear_computed_flops(N, D, D, C, heads=B * H, train=True)
    for label in fns:
        metrics: dict[str, Metric] = {"saved_bytes": saved[label]}
        if label in dq and ATTNKIT in dq:
            metrics["max_abs_err_dq"] = _max_abs_diff(dq[label], dq[ATTNKIT])
        if label in peak:
            metrics["peak_bytes"] = peak[label]
        _row(
            sec,
            label,
            t,
            {"N": N},
            flops=work,
            metrics=metrics,
            computed_flops=executed if label in _FAST_ROWS else None,
        )
    if isinstance(fla, Missing):
        _skip(sec, FLA_CHUNK, fla.reason, {"N": N})
    sec.compare()
    del fns, dq

    # Saved-for-backward bytes against N: the slope is the per-token training memory.
    sweep = res.section("saved-for-backward bytes vs N (one forward with grad, untimed)")
    fits: dict[str, tuple[float, float, float]] = {}
    for label, impl in impls.items():
        ys: list[float] = []
        for n in p.saved_ns:
            xs = _leaves(label, *(ctx.randn(B, H, n, D) for _ in range(3)))
            nbytes = saved_tensor_bytes(partial(impl, *xs))
            ys.append(float(nbytes))
            sweep.add(
                Row(label, {"N": n}, metrics={"saved_bytes": nbytes, "bytes_per_token": nbytes / n})
            )
        if len(ys) >= 2:
            fits[label] = linear_fit([float(n) for n in p.saved_ns], ys)
    if isinstance(fla, Missing):
        _skip(sweep, FLA_CHUNK, fla.reason, {"N": "-"})
    for label, (a, slope, dev) in fits.items():
        sweep.notes.append(
            f"{label}: {slope:,.0f} bytes/token ({slope / (B * H):,.0f} per head), "
            f"intercept {a:,.0f} B, max deviation from the line {100 * dev:.2f}%"
        )

    vs_fla = _speedup(sec, ATTNKIT) if FLA_CHUNK in impls else None
    dev_attn = fits[ATTNKIT][2] if ATTNKIT in fits else None
    res.summary = {
        "speedup_vs_fla": vs_fla,
        "saved_bytes_at_n_attnkit": saved.get(ATTNKIT),
        "saved_bytes_at_n_fla": saved.get(FLA_CHUNK),
        "saved_bytes_per_token_attnkit": fits[ATTNKIT][1] if ATTNKIT in fits else None,
        "saved_bytes_per_token_attnkit_reference": (
            fits[ATTNKIT_REF][1] if ATTNKIT_REF in fits else None
        ),
        "saved_bytes_per_token_fla": fits[FLA_CHUNK][1] if FLA_CHUNK in fits else None,
        "saved_linear_max_deviation_attnkit": dev_attn,
    }
    res.targets = [
        Target(f"attnkit fwd+bwd speed-up over fla naive chunk, N={N}", vs_fla, 3.0, ">=", "x"),
        Target(
            "attnkit saved bytes linear in N (max deviation from the fitted line)",
            dev_attn,
            0.05,
            "<=",
            "%",
        ),
    ]
    return res


# --------------------------------------------------------------------------------------
# taylor-vs-sdpa
# --------------------------------------------------------------------------------------


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@register_case(
    "taylor-vs-sdpa",
    "Taylor (Based) causal linear attention vs softmax SDPA",
    competitors=("flash-linear-attention",),
)
def taylor_vs_sdpa(ctx: BenchContext) -> CaseResult:
    """Taylor-map linear attention (D=16 -> D'=153, d_v=64) vs causal SDPA, sweeping N."""
    p = ctx.profile
    B, H, E, M = 1, p.heads, p.taylor_dim, p.taylor_dv
    taylor = feature_maps.get("taylor")
    Dp = taylor.out_dim(E)
    C = _chunk_size(max(p.taylor_ns), Dp, M)  # at the longest N (shorter N may cap it)
    res = CaseResult(
        "taylor-vs-sdpa",
        "Taylor causal linear attention vs softmax SDPA",
        config={
            "B": B,
            "H": H,
            "D (q, k)": E,
            "D'": Dp,
            "M (v)": M,
            "dtype": "float32",
            "chunk": C,
            "N": ", ".join(str(n) for n in p.taylor_ns),
        },
    )
    res.notes.append(
        f"Shapes: q, k [B, H, N, {E}], v [B, H, N, {M}] for all competitors (SDPA allows "
        "Ev != E); SDPA is torch.nn.functional.scaled_dot_product_attention(is_causal=True)."
    )
    based = fla_naive_based()
    sec = res.section("causal forward vs N", baseline=SDPA)
    if not isinstance(based, Missing):
        sec.notes.append(
            f"{FLA_BASED} materialises the [N, N] scores: run for N <= {p.based_max_n} only."
        )
    err: float | None = None
    for N in p.taylor_ns:
        q, k = ctx.randn(B, H, N, E), ctx.randn(B, H, N, E)
        v = ctx.randn(B, H, N, M)
        fns: dict[str, Callable[[], Tensor]] = {
            ATTNKIT: partial(_attnkit_causal, q, k, v, taylor, "fast"),
            SDPA: partial(_causal_sdpa, q, k, v),
        }
        if not isinstance(based, Missing) and N <= p.based_max_n:
            fns[FLA_BASED] = partial(based, q, k, v, use_norm=True)
        with torch.no_grad():
            if err is None and FLA_BASED in fns:
                err = _max_abs_diff(fns[FLA_BASED](), fns[ATTNKIT]())
            t = ctx.compare(fns)
        C_N = _chunk_size(N, Dp, M)
        _row(
            sec,
            ATTNKIT,
            t,
            {"N": N},
            flops=fl.causal_linear_flops(N, Dp, M, C_N, heads=B * H),
            computed_flops=fl.causal_linear_computed_flops(N, Dp, M, C_N, heads=B * H),
        )
        quad = fl.sdpa_flops(N, E, M, causal=True, heads=B * H)
        _row(sec, SDPA, t, {"N": N}, flops=quad)
        if FLA_BASED in fns:
            _row(sec, FLA_BASED, t, {"N": N}, flops=quad)
    if isinstance(based, Missing):
        _skip(sec, FLA_BASED, based.reason, {"N": "-"})
    sec.compare()
    ns = list(p.taylor_ns)
    speedups = [_speedup(sec, ATTNKIT, N=n) or 0.0 for n in ns]
    first, interp = crossover(ns, speedups)
    at_16k = _speedup(sec, ATTNKIT, N=16384) if 16384 in ns else None
    if err is not None:
        res.notes.append(
            f"attnkit taylor vs {FLA_BASED} (the same kernel 1 + s + s^2/2): max |diff| "
            f"{err:.2e} at N={ns[0]}."
        )
    res.summary = {
        "crossover_first_swept_n": first,
        "crossover_interpolated_n": interp,
        "largest_n": ns[-1] if ns else None,
        "speedup_at_largest_n": speedups[-1] if speedups else None,
        "speedup_at_16384": at_16k,
        "max_abs_err_vs_based": err,
    }
    res.targets = [
        Target("smallest swept N from which Taylor-16 beats SDPA", first, 2048.0, "<=", ""),
        Target("Taylor-16 speed-up over SDPA at N=16384", at_16k, 5.0, ">=", "x"),
    ]
    return res


# --------------------------------------------------------------------------------------
# performer
# --------------------------------------------------------------------------------------


@register_case(
    "performer",
    "FAVOR+ causal linear attention vs performer-pytorch",
    competitors=("performer-pytorch",),
)
def performer(ctx: BenchContext) -> CaseResult:
    """attnkit's favor map (m random features) vs performer-pytorch FastAttention, causal."""
    p = ctx.profile
    B, H, D, N, m = 1, p.heads, p.dim, p.performer_n, p.performer_features
    C = _chunk_size(N, m, D)
    res = CaseResult(
        "performer",
        "FAVOR+ causal linear attention vs performer-pytorch",
        config={"B": B, "H": H, "D": D, "M": D, "N": N, "features m": m, "dtype": "float32"},
    )
    res.notes.append(
        "attnkit: linear_attention(feature_map=favor(num_features=m, dim=D, "
        "input_scale=D^-1/4), is_causal=True); performer: FastAttention(dim_heads=D, "
        "nb_features=m, causal=True). Different random projections, so outputs are not "
        "compared; both compute m-feature positive random features and causal prefix sums."
    )
    favor = feature_maps.get("favor", num_features=m, dim=D, input_scale=D**-0.25).to(ctx.device)
    q, k, v = (ctx.randn(B, H, N, D) for _ in range(3))
    fns: dict[str, Callable[[], Tensor]] = {
        ATTNKIT: partial(_attnkit_causal, q, k, v, favor, "fast")
    }
    cls = performer_fast_attention()
    sec = res.section(f"causal forward, N={N}", baseline=PERFORMER)
    if not isinstance(cls, Missing):
        with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints its CUDA fallback
            fast_attn = cls(dim_heads=D, nb_features=m, causal=True).to(ctx.device)
        path = getattr(getattr(fast_attn, "causal_linear_fn", None), "__name__", "?")
        sec.notes.append(f"performer-pytorch causal path: {path}")
        if said.getvalue().strip():
            sec.notes.append(f"performer-pytorch says: {said.getvalue().strip()}")
        fns[PERFORMER] = partial(fast_attn, q, k, v)
    with torch.no_grad():
        t = ctx.compare(fns)
    features = fl.favor_feature_flops(N, D, m, heads=B * H)
    work = fl.causal_linear_flops(N, m, D, C, heads=B * H) + features
    executed = fl.causal_linear_computed_flops(N, m, D, C, heads=B * H) + features
    for label in fns:
        _row(
            sec,
            label,
            t,
            {"N": N},
            flops=work,
            computed_flops=executed if label == ATTNKIT else None,
        )
    if isinstance(cls, Missing):
        _skip(sec, PERFORMER, cls.reason, {"N": N})
    sec.compare()
    res.summary = {"speedup_vs_performer": _speedup(sec, ATTNKIT)}
    return res


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------


def _decode_label(h: int, hk: int) -> str:
    if hk == h:
        return f"MHA (Hk={hk})"
    if hk == 1:
        return "MQA (Hk=1)"
    return f"GQA (Hk={hk})"


def _decode_step(mha: attnkit.MultiHeadAttention, x: Tensor, cache: KVCache, n: int) -> None:
    """One decoding step of the layer, then forget the appended token (crop back to n)."""
    mha(x, cache=cache)
    cache.crop(n)


def _decode_core(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attnkit.sdpa(q, k, v, enable_gqa=True)


@register_case("decode", "Decoding step: MHA vs GQA vs MQA with a KV cache")
def decode(ctx: BenchContext) -> CaseResult:
    """One decoding step over n cached tokens; memory-bound, so reported in GB/s."""
    p = ctx.profile
    b, d, h, n = p.decode_b, p.decode_d, p.decode_h, p.decode_n
    dk = d // h
    res = CaseResult(
        "decode",
        "Decoding step: MHA vs GQA vs MQA",
        config={"b": b, "d": d, "h": h, "d_k = d_v": dk, "n cached": n, "dtype": "float32"},
    )
    res.notes.append(
        "Bytes streamed per step: the K + V cache (KVCache.nbytes) plus, for the layer step, "
        "the q/k/v/o weights (bias=False). The fraction of copy bandwidth compares a "
        "read-only stream with a read + write copy."
    )
    layer_fns: dict[str, Callable[[], object]] = {}
    core_fns: dict[str, Callable[[], object]] = {}
    layer_bytes: dict[str, int] = {}
    core_bytes: dict[str, int] = {}
    with torch.no_grad():
        for hk in p.decode_kv_heads:
            label = _decode_label(h, hk)
            mha = attnkit.MultiHeadAttention(d, h, n_kv_heads=hk, bias=False, is_causal=True)
            mha = mha.to(ctx.device).eval()
            # Capacity n + 1: the timed step appends one token and is cropped back to n,
            # so the buffers never grow (no copy inside the timing).
            cache = KVCache(b, hk, dk, dk, capacity=n + 1, max_len=n + 1, device=ctx.device)
            K, V = cache.update(ctx.randn(b, hk, n, dk), ctx.randn(b, hk, n, dk))
            layer_fns[label] = partial(_decode_step, mha, ctx.randn(b, 1, d), cache, n)
            core_fns[label] = partial(_decode_core, ctx.randn(b, h, 1, dk), K, V)
            weights = sum(w.nbytes for w in mha.parameters())
            layer_bytes[label] = fl.kv_cache_bytes(b, hk, n + 1, dk, dk, 4) + weights
            core_bytes[label] = K.nbytes + V.nbytes
        t_layer = ctx.compare(layer_fns)
        t_core = ctx.compare(core_fns)
    mha_label = _decode_label(h, h)
    baseline = mha_label if mha_label in layer_fns else None
    layer = res.section(
        "layer step: MultiHeadAttention(x [b, 1, d], cache=KVCache) under no_grad",
        baseline=baseline,
        ratio="time",
    )
    core = res.section(
        "attention core: attnkit.sdpa(q [b, h, 1, dk], cached K, V, enable_gqa=True)",
        baseline=baseline,
        ratio="time",
    )
    for label in layer_fns:
        _row(layer, label, t_layer, nbytes=layer_bytes[label])
        _row(core, label, t_core, nbytes=core_bytes[label])
    layer.compare()
    core.compare()
    mqa, core_mqa = layer.find("MQA (Hk=1)"), core.find("MQA (Hk=1)")
    ratio = mqa.time_ratio if mqa is not None else None

    def finish(peaks: MachinePeaks | None) -> None:
        frac = mqa.frac_copy(peaks) if mqa is not None else None
        res.summary = {
            "mqa_frac_copy_bandwidth": frac,
            "mqa_over_mha_time": ratio,
            "core_mqa_frac_copy_bandwidth": core_mqa.frac_copy(peaks) if core_mqa else None,
            "core_mqa_over_mha_time": core_mqa.time_ratio if core_mqa else None,
        }
        res.targets = [
            Target(f"MQA step, n={n}: fraction of measured copy bandwidth", frac, 0.60, ">=", "%"),
            Target("MQA step time / MHA step time", ratio, 0.25, "<=", "x"),
        ]

    res.refresh = finish  # the runner calls it (again once the peaks are re-measured)
    return res


# --------------------------------------------------------------------------------------
# sdpa-overhead
# --------------------------------------------------------------------------------------


BARE_WRAPPER = "Python wrapper, no checks"


def _bare_sdpa_wrapper(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """A wrapper that checks nothing: the overhead floor of a Python-level API."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@register_case("sdpa-overhead", "attnkit.sdpa vs torch SDPA: wrapper overhead")
def sdpa_overhead(ctx: BenchContext) -> CaseResult:
    """attnkit.sdpa against calling torch's scaled_dot_product_attention directly."""
    p = ctx.profile
    res = CaseResult(
        "sdpa-overhead",
        "attnkit.sdpa vs torch SDPA (wrapper overhead)",
        config={"dtype": "float32", "layout": "q, k, v [B, H, N, E], Ev = E"},
    )
    sec = res.section("time ratio attnkit.sdpa / torch SDPA", baseline=SDPA, ratio="time")
    label = "attnkit.sdpa"
    for B, H, N, E, causal in p.sdpa_shapes:
        q, k, v = (ctx.randn(B, H, N, E) for _ in range(3))
        fns: dict[str, Callable[[], Tensor]] = {
            label: partial(attnkit.sdpa, q, k, v, is_causal=causal),
            SDPA: partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
            BARE_WRAPPER: partial(_bare_sdpa_wrapper, q, k, v, causal),
        }
        with torch.no_grad():
            t = ctx.compare(fns, repeats=max(p.sdpa_repeats, ctx.repeats or 0))
        params: dict[str, Metric] = {"B": B, "H": H, "N": N, "E": E, "causal": str(causal)}
        work = fl.sdpa_flops(N, E, E, causal=causal, heads=B * H)
        for name in fns:
            _row(sec, name, t, params, flops=work)
    sec.compare()
    res.notes.append(
        f"'{BARE_WRAPPER}' is a Python function that only calls torch's SDPA: the floor "
        "of any Python-level wrapper. What attnkit.sdpa costs above it is its argument "
        "checks (shapes, dtypes, devices, masks; errors that name the argument)."
    )
    ratios = [r.time_ratio for r in sec.rows if r.label == label and r.time_ratio is not None]
    res.summary = {"worst_time_ratio": max(ratios) if ratios else None}
    res.targets = [
        Target(
            f"attnkit.sdpa / torch SDPA time, B={r.params['B']} H={r.params['H']} "
            f"N={r.params['N']} E={r.params['E']} causal={r.params['causal']}",
            r.time_ratio,
            1.05,
            "<=",
            "x",
        )
        for r in sec.rows
        if r.label == label
    ]
    return res


# --------------------------------------------------------------------------------------
# fast-transformers
# --------------------------------------------------------------------------------------


@register_case(
    "fast-transformers",
    "pytorch-fast-transformers causal_product vs attnkit",
    competitors=("pytorch-fast-transformers",),
)
def fast_transformers(ctx: BenchContext) -> CaseResult:
    """The EPFL causal-product kernel (with elu + 1 and normalisation) vs attnkit, forward."""
    p = ctx.profile
    B, H, D, N = 1, p.heads, p.dim, p.fwd_n
    C = _chunk_size(N, D, D)
    res = CaseResult(
        "fast-transformers",
        "pytorch-fast-transformers causal_product vs attnkit",
        config={"B": B, "H": H, "D": D, "M": D, "N": N, "dtype": "float32"},
    )
    sec = res.section(f"causal elu forward, N={N}", baseline=FAST_TRANSFORMERS)
    cdp = fast_transformers_causal_product()
    if isinstance(cdp, Missing):
        _skip(sec, FAST_TRANSFORMERS, cdp.reason, {"N": N})
        return res
    cdp_fn = cdp
    q, k, v = (ctx.randn(B, H, N, D) for _ in range(3))

    def run_ft() -> Tensor:
        fq, fk = _elu1(q), _elu1(k)
        num: Tensor = cdp_fn(fq, fk, v)  # sum_{j <= i} (fq_i . fk_j) v_j
        den = torch.einsum("bhnd,bhnd->bhn", fq, fk.cumsum(dim=2))
        return num / den.unsqueeze(-1)

    fns: dict[str, Callable[[], Tensor]] = {
        ATTNKIT: partial(_attnkit_elu, q, k, v, impl="fast"),
        FAST_TRANSFORMERS: run_ft,
    }
    with torch.no_grad():
        err = _max_abs_diff(run_ft(), fns[ATTNKIT]())
        t = ctx.compare(fns)
    work = fl.causal_linear_flops(N, D, D, C, heads=B * H)
    executed = fl.causal_linear_computed_flops(N, D, D, C, heads=B * H)
    _row(
        sec,
        ATTNKIT,
        t,
        {"N": N},
        flops=work,
        metrics={"max_abs_err": 0.0},
        computed_flops=executed,
    )
    _row(sec, FAST_TRANSFORMERS, t, {"N": N}, flops=work, metrics={"max_abs_err": err})
    sec.compare()
    res.summary = {"speedup_vs_fast_transformers": _speedup(sec, ATTNKIT)}
    return res
