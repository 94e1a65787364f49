r"""Experiment ``decode``: one decoding step of MHA, GQA and MQA against the cache length.

The einsum decoding steps of :mod:`attnkit.decoding` (one new token per sequence,
batch b, width d, h heads of width d/h, n cached tokens) all compute
O(b d^2 + b n d), but move different amounts of memory::

    MHA  O(d^2 + b d + b n d)        GQA  O(d^2 + b d + b n d g / h)
    MQA  O(d^2 + b d + b n d / h)

Decoding is memory-bound, so once the cache term b n d dominates, the time per step
should grow like n and MQA/GQA should be faster by about the ratio of bytes moved.

What is measured, per variant and n:

- time per step (median of repeats) of ``decoding.mha_step`` / ``gqa_step`` /
  ``mqa_step``, the functions :mod:`attnkit.cost` models;
- bytes moved, counted by dispatching the real call under
  :class:`attnkit.lab.measure.ByteCounter` (every aten op's inputs + outputs),
  next to ``attnkit.cost.bytes(variant, "decode")`` evaluated at the same sizes;
- the KV cache that :class:`attnkit.MultiHeadAttention` holds per token: the bytes of
  the storages its buffers actually occupy (``untyped_storage().nbytes()``, read by
  :func:`attnkit.lab.measure.held_bytes`), against 2 g (d/h) w bytes per token and
  layer (g key/value heads, w bytes per element).

The time prediction uses nothing fitted to the timings it is judged against::

    t(n) = t0 + (bytes(n) - bytes(0)) / BW(cache)

t0 is the measured time of the same step with an empty cache (n = 0); bytes(n) is
the cost model's traffic; BW(cache) is the copy bandwidth measured by copying a
buffer as large as that step's cache (keys + values) into another one, so the
working set (the old cache and torch.cat's new one) is the step's own: a cache
that fits in the last-level cache streams faster than one that does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnkit import decoding
from attnkit._timing import time_call
from attnkit.cost import bytes_moved, evaluate, fit_loglog, flops
from attnkit.lab import plotting
from attnkit.lab.core import EXPERIMENTS, Context, Experiment, ExperimentResult
from attnkit.lab.measure import count_bytes, held_bytes
from attnkit.layers import MultiHeadAttention

__all__ = ["SETTINGS", "VARIANTS", "DecodeSettings", "run"]

SEED = 7
#: (label, cost-model variant) in plot order.
VARIANTS: tuple[tuple[str, str], ...] = (("MHA", "mha"), ("GQA (g=2)", "gqa"), ("MQA", "mqa"))


@dataclass(frozen=True)
class DecodeSettings:
    batch: int  # b
    width: int  # d
    heads: int  # h (head width d / h)
    groups: int  # g for GQA
    lengths: tuple[int, ...]  # cache lengths n
    repeats: int
    min_time: float  # seconds of timing per point at least
    cache_tokens: int  # tokens decoded to measure the KV cache per token


SETTINGS: dict[str, DecodeSettings] = {
    "test": DecodeSettings(2, 64, 4, 2, (8, 32, 128), 2, 0.0, 4),
    "quick": DecodeSettings(2, 512, 8, 2, (16, 64, 256, 1024, 4096), 7, 0.2, 16),
    "full": DecodeSettings(2, 512, 8, 2, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096), 9, 0.5, 64),
}


def _sizes(s: DecodeSettings, kind: str, n: int) -> dict[str, int]:
    k = s.width // s.heads
    g = {"mha": s.heads, "gqa": s.groups, "mqa": 1}[kind]
    return {"b": s.batch, "d": s.width, "h": s.heads, "g": g, "k": k, "v": k, "n": n, "w": 4}


def _step(kind: str, sz: dict[str, int], gen: torch.Generator) -> Callable[[], object]:
    """The real decoding step at these sizes (inputs built once, outside the timing)."""
    b, d, h, g, k, n = sz["b"], sz["d"], sz["h"], sz["g"], sz["k"], sz["n"]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    x = rnd(b, d)
    W_q, W_o = rnd(h, d, k, scale=d**-0.5), rnd(h, k, d, scale=d**-0.5)
    if kind == "mqa":
        W_k, W_v = rnd(d, k, scale=d**-0.5), rnd(d, k, scale=d**-0.5)
        K, V = rnd(b, n, k), rnd(b, n, k)
        return lambda: decoding.mqa_step(x, K, V, W_q, W_k, W_v, W_o)
    W_k, W_v = rnd(g, d, k, scale=d**-0.5), rnd(g, d, k, scale=d**-0.5)
    K, V = rnd(b, g, n, k), rnd(b, g, n, k)
    if kind == "mha":
        return lambda: decoding.mha_step(x, K, V, W_q, W_k, W_v, W_o)
    return lambda: decoding.gqa_step(x, K, V, W_q, W_k, W_v, W_o, n_groups=g)


def _kv_cache_per_token(s: DecodeSettings) -> dict[str, dict[str, float]]:
    """Bytes per token and sequence that MultiHeadAttention's KVCache holds (one layer).

    Measured as the storage the cache's tensors occupy after decoding ``cache_tokens``
    tokens one by one into a cache limited to exactly that many (so no spare capacity
    is expected): :func:`held_bytes`, not ``KVCache.nbytes`` (a formula).
    """
    out: dict[str, dict[str, float]] = {}
    torch.manual_seed(SEED)
    x = torch.randn(s.batch, s.cache_tokens, s.width)
    for label, kind in VARIANTS:
        g = _sizes(s, kind, 0)["g"]
        mha = MultiHeadAttention(s.width, s.heads, n_kv_heads=g, is_causal=True)
        cache = mha.new_cache(batch=s.batch, max_len=s.cache_tokens)
        with torch.no_grad():
            for t in range(s.cache_tokens):
                mha(x[:, t : t + 1], cache=cache)
        held = held_bytes(cache)
        measured = held / (s.batch * s.cache_tokens)
        formula = 2 * g * (s.width // s.heads) * 4
        out[label] = {
            "kv_heads": g,
            "held_bytes": held,
            "measured": measured,
            "formula": float(formula),
        }
    return out


def copy_bandwidth(nbytes: int, repeats: int, min_time: float) -> float:
    """Bytes per second (read + write) of ``dst.copy_(src)`` for a buffer of ``nbytes``.

    The fastest of the repeats: the least disturbed by other work on the machine.
    """
    src = torch.randn(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), repeats=repeats, warmup=2, min_time=min_time)
    return 2 * src.numel() * 4 / t.low


def _cache_bytes(sz: dict[str, int]) -> int:
    return sz["b"] * sz["g"] * sz["n"] * (sz["k"] + sz["v"]) * sz["w"]


def run(ctx: Context) -> ExperimentResult:
    s = SETTINGS[ctx.profile]
    result = ExperimentResult(
        name="decode",
        title="Incremental decoding: MHA, GQA and MQA against the cache length",
        profile=ctx.profile,
        seed=SEED,
        summary=(
            f"One decoding step (attnkit.decoding, float32) with b = {s.batch}, d = "
            f"{s.width}, h = {s.heads} heads of width {s.width // s.heads}, GQA with g = "
            f"{s.groups} key/value heads, for cache lengths n = {list(s.lengths)}; time is "
            f"the fastest of >= {s.repeats} calls (the least disturbed by other work; the "
            f"medians are in results.json); bytes are counted op by op."
        ),
    )
    gen = torch.Generator().manual_seed(SEED)
    advance = ctx.task("decode: time and bytes per step", len(VARIANTS) * (len(s.lengths) + 1))
    rows: list[dict[str, Any]] = []
    t0: dict[str, float] = {}
    bandwidth: dict[int, float] = {}  # cache bytes -> copy bandwidth of that working set
    for label, kind in VARIANTS:
        model_bytes = bytes_moved(kind, "decode")
        model_flops = flops(kind, "decode")
        with torch.no_grad():  # the fixed cost of a step: an empty cache (n = 0)
            empty = _step(kind, _sizes(s, kind, 0), gen)
            t0[label] = time_call(empty, repeats=s.repeats, warmup=2, min_time=s.min_time).low
        bytes0 = evaluate(model_bytes, _sizes(s, kind, 0))
        advance(1)
        for n in s.lengths:
            sz = _sizes(s, kind, n)
            step = _step(kind, sz, gen)
            counted = count_bytes(step)
            with torch.no_grad():
                timing = time_call(step, repeats=s.repeats, warmup=2, min_time=s.min_time)
            cache = _cache_bytes(sz)
            if cache not in bandwidth:
                bandwidth[cache] = copy_bandwidth(cache, s.repeats, s.min_time)
            model = evaluate(model_bytes, sz)
            rows.append(
                {
                    "variant": label,
                    "cost_variant": kind,
                    "n": n,
                    "seconds": timing.low,
                    "seconds_median": timing.median,
                    "calls": timing.repeats,
                    "bytes_counted": counted.total,
                    "bytes_model": model,
                    "flops_model": evaluate(model_flops, sz),
                    "cache_bytes": cache,
                    "copy_bandwidth": bandwidth[cache],
                    "seconds_predicted": t0[label] + (model - bytes0) / bandwidth[cache],
                }
            )
            advance(1)
    kv = _kv_cache_per_token(s)
    result.numbers.update(
        {
            "settings": s.__dict__,
            "rows": rows,
            "empty_cache_seconds": t0,
            "copy_bandwidth_by_cache_bytes": {str(k): v for k, v in bandwidth.items()},
            "kv_cache_bytes_per_token": kv,
            "model_bytes": {kind: str(bytes_moved(kind, "decode")) for _, kind in VARIANTS},
        }
    )
    _claims(result, s, rows, kv, t0)
    _figure(ctx, result, s, rows, kv, t0)
    return result


def _top(rows: list[dict[str, Any]], label: str, count: int = 3) -> list[dict[str, Any]]:
    mine = [r for r in rows if r["variant"] == label]
    return mine[-count:]


#: A timing claim passes when the measurement lies within this factor of the
#: prediction. The prediction is independent of the timings (see the module
#: docstring); the factor absorbs what it leaves out (einsum's layout copies, the
#: softmax, caches that partly fit) and the noise of a shared machine, and is still
#: far narrower than what a wrong implementation costs (an MQA step that expands its
#: shared keys and values to every head moves about MHA's bytes: a speed-up near 1).
TIME_FACTOR = 2.0


def _claims(
    result: ExperimentResult,
    s: DecodeSettings,
    rows: list[dict[str, Any]],
    kv: dict[str, dict[str, float]],
    t0: dict[str, float],
) -> None:
    n_max, n_min = s.lengths[-1], s.lengths[0]
    last = {r["variant"]: r for r in rows if r["n"] == n_max}
    first = {r["variant"]: r for r in rows if r["n"] == n_min}
    # The n-dependent traffic (the cache term): bytes per cached token per step.
    per_token = {
        v: {
            key: (last[v][key] - first[v][key]) / (n_max - n_min)
            for key in ("bytes_counted", "bytes_model")
        }
        for v, _ in VARIANTS
    }
    errs = {v: x["bytes_counted"] / x["bytes_model"] - 1 for v, x in per_token.items()}
    result.numbers["bytes_per_cached_token"] = per_token
    result.claim(
        "bytes_model",
        "Bytes moved per step grow with the cache as the cost model derives "
        "(MHA's b n d term; GQA's b n d g/h; MQA's b n d/h)",
        theory=", ".join(f"{v}: {x['bytes_model']:,.0f} B" for v, x in per_token.items())
        + " per cached token per step (cost model)",
        measured=", ".join(
            f"{v}: {x['bytes_counted']:,.0f} B ({100 * errs[v]:+.1f}%)"
            for v, x in per_token.items()
        )
        + f" (aten ops counted, n = {n_min} to {n_max})",
        passed=all(abs(e) <= 0.05 for e in errs.values()),
        tolerance="within 5% for each variant",
        could_fail_if="a step copied or expanded the cache more often than the model says "
        "(e.g. MQA/GQA repeating K, V to all h heads, or a cat per head), or the cost "
        "model's cache term were wrong (say b n d for MQA instead of b n d / h)",
        value=max(abs(e) for e in errs.values()),
    )
    if len(s.lengths) >= 3:
        slopes = {}
        for v, _ in VARIANTS:
            top = _top(rows, v)
            ns = [float(r["n"]) for r in top]
            slopes[v] = {
                "time": fit_loglog(ns, [r["seconds"] for r in top]).slope,
                "bytes_model": fit_loglog(ns, [float(r["bytes_model"]) for r in top]).slope,
            }
        result.numbers["slopes"] = slopes
    ratios = [r["seconds"] / r["seconds_predicted"] for r in rows]
    worst = max(ratios, key=lambda x: max(x, 1 / x))
    bws = [r["copy_bandwidth"] / 1e9 for r in rows]
    result.claim(
        "time_follows_bytes",
        "Decoding is memory-bound: time per step = fixed cost + bytes moved / bandwidth",
        theory=(
            "t = t0 + (bytes(n) - bytes(0)) / BW with t0 measured on an empty cache ("
            + ", ".join(f"{v} {t * 1e6:.0f} µs" for v, t in t0.items())
            + f") and BW from a copy of the same cache size ({min(bws):.1f} to "
            f"{max(bws):.1f} GB/s); nothing fitted to the {len(rows)} timings"
        ),
        measured=f"measured / predicted from {min(ratios):.2f} to {max(ratios):.2f}",
        passed=all(1 / TIME_FACTOR <= x <= TIME_FACTOR for x in ratios),
        tolerance=f"every point within a factor of {TIME_FACTOR:g} of the prediction",
        could_fail_if="the step did work growing faster than its bytes (e.g. an O(n^2) "
        "recomputation of the cache), moved several times the modelled bytes, or were "
        "compute-bound at long caches",
        value=worst,
    )
    times = [last[v]["seconds"] for v, _ in VARIANTS]
    result.claim(
        "ordering",
        "At long caches MQA is fastest and MHA slowest (fewer key/value heads, fewer bytes)",
        theory="t(MHA) > t(GQA, g=2) > t(MQA) at the largest n",
        measured=", ".join(f"{v}: {last[v]['seconds'] * 1e3:.2f} ms" for v, _ in VARIANTS)
        + f" at n = {n_max}",
        passed=times[0] > times[1] > times[2],
        tolerance="strict ordering of the fastest calls",
        could_fail_if="GQA or MQA expanded their shared keys and values to all h heads "
        "(then they move as many bytes as MHA and are no faster)",
    )
    # t0 damps the speed-up below the bytes ratio, which it only reaches as n grows.
    asymptote = last["MHA"]["bytes_model"] / last["MQA"]["bytes_model"]
    want = last["MHA"]["seconds_predicted"] / last["MQA"]["seconds_predicted"]
    got = last["MHA"]["seconds"] / last["MQA"]["seconds"]
    result.claim(
        "mqa_speedup",
        "MQA's speed-up over MHA follows the bytes each step moves (plus the fixed cost)",
        theory=(
            f"(t0 + bytes / BW)(MHA) / (t0 + bytes / BW)(MQA) = {want:.2f} at n = {n_max}, "
            f"from the empty-cache times and copy bandwidths above; bytes(MHA) / "
            f"bytes(MQA) = {asymptote:.2f} is its limit for long caches"
        ),
        measured=f"t(MHA) / t(MQA) = {got:.2f}",
        passed=want / TIME_FACTOR <= got <= want * TIME_FACTOR,
        tolerance=f"within a factor of {TIME_FACTOR:g} of the predicted ratio",
        could_fail_if="MQA moved about as many bytes as MHA (keys and values expanded to "
        "all h heads: a speed-up near 1), or MHA did extra work MQA does not",
        value=got,
    )
    ok = all(x["measured"] == x["formula"] for x in kv.values())
    result.claim(
        "kv_cache_per_token",
        "KV cache per token and layer = 2 g (d/h) w bytes: h/g times smaller for GQA, "
        "h times for MQA",
        theory=", ".join(f"{v}: {x['formula']:.0f} B" for v, x in kv.items()),
        measured=", ".join(f"{v}: {x['measured']:.0f} B" for v, x in kv.items())
        + f" (storage held by MultiHeadAttention's KVCache after {s.cache_tokens} decoded "
        "tokens, per token and sequence)",
        passed=ok,
        tolerance="exact",
        could_fail_if="the cache stored keys and values for every query head (h/g times "
        "the bytes), in a wider dtype than the model's, or allocated more than the tokens "
        "it holds (spare capacity past max_len)",
    )


def _figure(
    ctx: Context,
    result: ExperimentResult,
    s: DecodeSettings,
    rows: list[dict[str, Any]],
    kv: dict[str, dict[str, float]],
    t0: dict[str, float],
) -> None:
    fig, (ax_t, ax_b, ax_kv) = plotting.new_figure(3, width=5.0, height=4.4)
    ns = [float(n) for n in s.lengths]
    dense = [float(x) for x in _dense(s.lengths)]
    for label, kind in VARIANTS:
        col = plotting.color(label)
        mine = [r for r in rows if r["variant"] == label]
        model = bytes_moved(kind, "decode")
        model_dense = [float(evaluate(model, _sizes(s, kind, int(n)))) for n in dense]
        ax_t.plot(ns, [r["seconds"] * 1e3 for r in mine], "o", color=col, label=f"{label} measured")
        ax_t.plot(
            ns,
            [r["seconds_predicted"] * 1e3 for r in mine],
            "-",
            color=col,
            alpha=0.6,
            label=f"{label} predicted: t0 + bytes / BW(copy)",
        )
        ax_b.plot(
            dense,
            [b / 1e6 for b in model_dense],
            "-",
            color=col,
            alpha=0.6,
            label=f"{label} cost model",
        )
        ax_b.plot(
            ns,
            [r["bytes_counted"] / 1e6 for r in mine],
            "o",
            color=col,
            label=f"{label} counted (aten ops)",
        )
    for ax in (ax_t, ax_b):
        ax.set_xscale("log")
        ax.set_yscale("log")
        plotting.geometric_ticks(ax, ns)
        plotting.plain_log_labels(ax)
        ax.set_xlabel("cached tokens n")
        plotting.legend(ax)
    ax_t.set_ylabel("time per decoding step (ms; log scale)")
    ax_t.set_title("Time per step (prediction: nothing fitted)")
    ax_b.set_ylabel("bytes moved per step (MB; log scale)")
    ax_b.set_title("Bytes moved per step")
    labels = list(kv)
    xs = range(len(labels))
    ax_kv.bar(
        xs,
        [kv[v]["measured"] for v in labels],
        color=[plotting.color(v) for v in labels],
        label="measured (storage held / token)",
    )
    ax_kv.hlines(
        [kv[v]["formula"] for v in labels],
        [x - 0.42 for x in xs],
        [x + 0.42 for x in xs],
        colors="black",
        lw=2.5,
        label="theory 2 g (d/h) w",
    )
    for x, v in zip(xs, labels, strict=True):
        ax_kv.annotate(
            f"{kv[v]['measured']:.0f} B\n(g = {kv[v]['kv_heads']:.0f})",
            (x, kv[v]["measured"]),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax_kv.set_xticks(list(xs), labels)
    ax_kv.set_ylim(0, 1.4 * max(kv[v]["formula"] for v in labels))
    ax_kv.set_ylabel("KV cache per token, per sequence and layer (bytes)")
    ax_kv.set_xlabel("attention variant")
    ax_kv.set_title(f"KV cache size (d = {s.width}, h = {s.heads}, fp32)")
    plotting.legend(ax_kv, loc="upper right")
    n_max = s.lengths[-1]
    last = {r["variant"]: r for r in rows if r["n"] == n_max}
    slopes = result.numbers.get("slopes", {})
    slope_text = (
        "; time slopes over the largest n: "
        + ", ".join(
            f"{v} {x['time']:.2f} (bytes {x['bytes_model']:.2f})" for v, x in slopes.items()
        )
        if slopes
        else ""
    )
    result.figures.append(
        plotting.save(
            fig,
            ctx,
            "decode",
            "Decoding step: time, bytes moved and KV cache against n",
            "Theory: all three compute O(b d^2 + b n d), but MHA moves O(d^2 + b d + b n d) "
            "bytes, GQA O(d^2 + b d + b n d g/h) and MQA O(d^2 + b d + b n d/h); decoding "
            "is memory-bound, so time follows bytes. Lines: the cost model's exact bytes "
            "(middle) and the predicted time (left): the step's time on an empty cache ("
            + ", ".join(f"{v} {t * 1e6:.0f} µs" for v, t in t0.items())
            + ") plus the extra bytes at the copy bandwidth measured for a buffer of the "
            f"cache's size (nothing fitted to these timings). Measured at n = {n_max}: "
            + ", ".join(
                f"{v} {last[v]['seconds'] * 1e3:.2f} ms and {last[v]['bytes_counted'] / 1e6:.1f} MB"
                for v, _ in VARIANTS
            )
            + f"{slope_text}. At small n the counted bytes exceed the model by einsum's "
            f"layout copies of the weights (not modelled). Right: the KV cache per token is "
            + ", ".join(f"{v} {x['measured']:.0f} B" for v, x in kv.items())
            + ", exactly 2 g (d/h) x 4 bytes.",
        )
    )


def _dense(lengths: tuple[int, ...]) -> list[int]:
    lo, hi = math.log(lengths[0]), math.log(lengths[-1])
    return sorted({round(math.exp(lo + (hi - lo) * i / 40)) for i in range(41)})


EXPERIMENTS.register("decode")(
    Experiment("decode", "Incremental decoding: MHA, GQA and MQA against the cache length", run)
)
