"""attnkit.cost, measured side: counted FLOPs == model FLOPs exactly; growth exponents.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on the real
implementations (softmax: the plain sdpa_reference path for "keep", torch's CPU fused
kernel with torch's own SDPA formulas registered for "recompute"). Growth exponents are
checked on counted FLOPs, which are exact; nothing here asserts a timing.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import sympy
import torch

import attnkit
import attnkit.cost as cost
import attnkit.cost.einsum
from attnkit.cost.measure import count_flops, t_quantile
from attnkit.feature_maps import Polynomial
from attnkit.ops.linear_chunked import TilePlan, causal_linear_attention

# Awkward sizes: odd lengths, widths not powers of two, GQA ratios, L != S.
SIZES: dict[str, list[dict[str, int]]] = {
    "softmax": [
        {"B": 2, "H": 6, "Hk": 2, "L": 7, "S": 11, "E": 5, "Ev": 5},
        {"B": 1, "H": 3, "Hk": 3, "L": 1, "S": 9, "E": 12, "Ev": 12},
    ],
    "argmax": [{"B": 2, "H": 6, "Hk": 3, "L": 7, "S": 11, "E": 5, "Ev": 3}],
    "kernel": [{"B": 2, "H": 4, "Hk": 1, "L": 9, "S": 6, "E": 3, "Ev": 7}],
    "linear": [
        {"B": 2, "H": 4, "Hk": 2, "L": 9, "S": 6, "E": 3, "Ev": 7},
        {"B": 1, "H": 1, "Hk": 1, "L": 1, "S": 1, "E": 5, "Ev": 1},
    ],
    "linear_chunked": [
        {"B": 2, "H": 6, "Hk": 2, "L": 15, "S": 15, "E": 3, "Ev": 5, "C": 5},
        {"B": 1, "H": 2, "Hk": 1, "L": 8, "S": 8, "E": 4, "Ev": 3, "C": 8},
    ],
    "linear_fast": [
        {"B": 2, "H": 6, "Hk": 2, "L": 15, "S": 15, "E": 3, "Ev": 5, "C": 5},
        {"B": 3, "H": 4, "Hk": 4, "L": 16, "S": 16, "E": 2, "Ev": 7, "C": 8},
    ],
    "linear_step": [{"B": 3, "H": 6, "Hk": 2, "E": 3, "Ev": 5}],
    "mha": [
        {"b": 3, "d": 12, "h": 4, "k": 3, "v": 5, "n": 7},
        {"b": 1, "d": 6, "h": 1, "k": 6, "v": 6, "n": 0},
    ],
    "mqa": [{"b": 3, "d": 12, "h": 4, "k": 3, "v": 5, "n": 7}],
    "gqa": [{"b": 2, "d": 10, "h": 6, "g": 3, "k": 5, "v": 3, "n": 9}],
}

CASES = [
    pytest.param(variant, phase, activations, sizes, id=f"{variant}-{phase}-{activations}-{i}")
    for variant, size_list in SIZES.items()
    for phase in cost.get(variant).phases
    for activations in ("keep", "recompute")
    if activations == cost.get(variant).default_activations
    or (variant == "softmax" and phase == "train")
    for i, sizes in enumerate(size_list)
]


@pytest.mark.parametrize(("variant", "phase", "activations", "sizes"), CASES)
def test_counted_matmul_flops_equal_the_model(
    variant: str, phase: str, activations: str, sizes: dict[str, int]
) -> None:
    values = cost.resolve_sizes(variant, sizes)
    measured = cost.measure(variant, values, phase, activations=activations, timed=False)
    assert measured.runner.pinned
    model = cost.matmul_flops_at(variant, values, phase, activations=activations)
    assert measured.flops == model > 0
    if all(x >= 2 for x in values.values()):  # no summed index of size 1: the symbolic count
        symbolic = cost.flops(variant, phase, activations=activations, matmul_only=True)
        assert cost.evaluate(symbolic, values) == model


def test_a_sum_over_one_element_is_a_multiply_not_a_matmul() -> None:
    # S = 1: torch.einsum turns the state contraction (summed over s) into a mul.
    values = cost.resolve_sizes(
        "linear", {"B": 1, "H": 1, "Hk": 1, "L": 1, "S": 1, "E": 5, "Ev": 1}
    )
    symbolic = cost.evaluate(cost.flops("linear", matmul_only=True), values)
    state = 2 * values["Dp"] * values["Ev"]  # 2 · S · D' · Ev with S = 1
    assert cost.matmul_flops_at("linear", values) == symbolic - state
    assert cost.measure("linear", values, timed=False).flops == symbolic - state


def test_fused_cpu_sdpa_is_counted_by_the_registered_formula() -> None:
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    f = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: f(q, k, v)) == 2 * 2 * 16 * 16 * (8 + 8)
    # Without the formulas FlopCounterMode sees the fused op and counts nothing.
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        f(q, k, v)
    assert counter.get_total_flops() == 0


def _fast_path_flops(sizes: dict[str, int], plan: TilePlan | None, train: bool) -> int:
    """FlopCounterMode's count of the fast causal path at these sizes under a tile plan."""
    B, H, Hk, L, E, M, C = (sizes[x] for x in ("B", "H", "Hk", "L", "E", "Ev", "C"))
    phi = Polynomial(degree=2, c=1.0)
    Dp = phi.out_dim(E)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, E, generator=g, requires_grad=train)
    k = torch.randn(B, Hk, L, E, generator=g, requires_grad=train)
    v = torch.randn(B, Hk, L, M, generator=g, requires_grad=train)
    S0, z0 = torch.zeros(B, Hk, Dp, M), torch.ones(B, Hk, Dp)

    def call() -> None:
        out, _, _ = causal_linear_attention(q, k, v, phi, S0, z0, C, True, 1e-6, plan=plan)
        if train:
            out.sum().backward()

    return count_flops(call)


# Tile plans that cut 6 key/value heads of 32 tokens every way: one tile, one chunk per
# tile, several heads per tile (where a shifted bmm over the flattened batch straddles
# heads), uneven head groups, and backward tiles unlike the forward's.
PLANS = [
    None,
    TilePlan(fwd_tokens=4, fwd_heads=1, bwd_tokens=4, bwd_heads=1),
    TilePlan(fwd_tokens=32, fwd_heads=6, bwd_tokens=32, bwd_heads=6),
    TilePlan(fwd_tokens=8, fwd_heads=4, bwd_tokens=12, bwd_heads=5),
    TilePlan(fwd_tokens=4, fwd_heads=3, bwd_tokens=16, bwd_heads=2),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "auto" if p is None else str(p))
@pytest.mark.parametrize("phase", ["forward", "train"])
def test_fast_causal_path_is_pinned_at_every_tile_plan(plan: TilePlan | None, phase: str) -> None:
    """One product per chunk, however the work is tiled (before, a tile of h heads ran
    h - 1 extra products that straddled two heads and were overwritten)."""
    sizes = {"B": 2, "H": 6, "Hk": 3, "L": 32, "S": 32, "E": 3, "Ev": 5, "C": 4}
    values = cost.resolve_sizes("linear_fast", sizes)
    model = cost.matmul_flops_at("linear_fast", values, phase)
    assert _fast_path_flops(sizes, plan, train=phase == "train") == model
    assert cost.measure("linear_fast", values, phase, timed=False).runner.pinned


def test_fast_causal_path_counts_its_padded_last_chunk() -> None:
    """L not divisible by C: every tile pads to whole chunks, so the count is the model's
    at L rounded up to a multiple of C."""
    sizes = {"B": 1, "H": 2, "Hk": 1, "L": 13, "S": 13, "E": 3, "Ev": 4, "C": 4}
    padded = cost.resolve_sizes("linear_fast", {**sizes, "L": 16, "S": 16})
    for phase in ("forward", "train"):
        model = cost.matmul_flops_at("linear_fast", padded, phase)
        assert _fast_path_flops(sizes, None, train=phase == "train") == model


def test_in_place_baddbmm_is_counted() -> None:
    """torch 2.13's FlopCounterMode counts 0 for baddbmm_; count_flops adds its formula."""
    out, a, b = torch.zeros(3, 4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    assert count_flops(lambda: out.baddbmm_(a, b)) == 2 * 3 * 4 * 5 * 6
    assert count_flops(lambda: torch.baddbmm(out, a, b)) == 2 * 3 * 4 * 5 * 6


def test_useful_flops_count_what_the_causal_mask_keeps() -> None:
    """The declared triangle matches the entries the fast path's own mask keeps."""
    from attnkit.ops import linear_chunked

    G, C = 3, 4
    kept = int(linear_chunked._tril_(torch.ones(1, G * C, C), G, C).sum())
    sizes = {"B": 1, "H": G, "Hk": 1, "L": C, "S": C, "E": 2, "Ev": 5, "C": C}
    values = cost.resolve_sizes("linear_fast", sizes)
    scores = cost.evaluate(cost.einsum.useful_flops(linear_chunked.CHUNK_SCORES), values)
    assert scores == 2 * kept * values["Dp"]
    intra = cost.evaluate(cost.einsum.useful_flops(linear_chunked.CHUNK_INTRA), values)
    assert intra == 2 * kept * values["Ev"]  # and only the Ev value columns, not the ones
    states = cost.evaluate(cost.einsum.useful_flops(linear_chunked.CHUNK_STATES), values)
    full = cost.evaluate(cost.einsum.contraction_flops(linear_chunked.CHUNK_STATES), values)
    assert states * (values["Ev"] + 1) == full * values["Ev"]


def test_useful_train_flops_leave_out_recomputation() -> None:
    fwd = cost.flops("linear_fast", "forward", matmul_only=True, useful=True)
    train = cost.flops("linear_fast", "train", matmul_only=True, useful=True)
    assert sympy.expand(train - 3 * fwd) == 0
    computed = cost.flops("linear_fast", "train", matmul_only=True)
    assert sympy.expand(computed - train) != 0


def test_runners_reject_sizes_the_model_cannot_count() -> None:
    sizes = cost.resolve_sizes("linear_chunked", {"L": 10, "S": 10, "C": 4})
    with pytest.raises(ValueError, match="chunk length C: 4 must divide 10"):
        cost.measure("linear_chunked", sizes, timed=False)
    with pytest.raises(ValueError, match="no 'recompute' implementation of 'linear'"):
        cost.runner("linear", "recompute")
    with pytest.raises(ValueError, match="needs E == Ev"):
        cost.measure(
            "softmax", cost.resolve_sizes("softmax", {"E": 4, "Ev": 6}), activations="recompute"
        )


# ---- fitting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "df", "t"),
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 5, 2.5706),
        (0.995, 30, 2.7500),
        (0.025, 10, -2.2281),
    ],
)
def test_t_quantile_matches_tables(p: float, df: int, t: float) -> None:
    assert t_quantile(p, df) == pytest.approx(t, abs=1e-3)


def test_fit_loglog_recovers_a_power_law() -> None:
    sizes = [2, 4, 8, 16, 32]
    fit = cost.fit_loglog(sizes, [3.0 * x**2.5 for x in sizes])
    assert fit.slope == pytest.approx(2.5) and math.exp(fit.intercept) == pytest.approx(3.0)
    assert fit.high - fit.low < 1e-9 and 2.5 in fit
    noisy = cost.fit_loglog(sizes, [x * (1.1 if i % 2 else 0.9) for i, x in enumerate(sizes)])
    assert noisy.low < 1.0 < noisy.high and "95%" in str(noisy)


def test_fit_loglog_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        cost.fit_loglog([1, 2], [1, 2])
    with pytest.raises(ValueError, match="> 0"):
        cost.fit_loglog([1, 2, 3], [1, 0, 2])
    with pytest.raises(ValueError, match="equal lengths"):
        cost.fit_loglog([1, 2, 3], [1, 2])


def _work_exponent(make: Callable[[int], Callable[[], object]], sizes: list[int]) -> float:
    """Log-log slope of the matmul FLOPs the real calls perform (deterministic)."""
    return cost.fit_loglog(sizes, [count_flops(make(n)) for n in sizes]).slope


def test_softmax_work_grows_like_n_squared() -> None:
    # The plain math path: its bmm's are what FlopCounterMode counts. A slope of 1.5
    # (or anything but 2) fails: no timing noise to hide behind.
    def make(n: int) -> Callable[[], object]:
        q, k, v = (torch.randn(1, 1, n, 32) for _ in range(3))
        return lambda: attnkit.sdpa_reference(q, k, v)

    assert _work_exponent(make, [256, 512, 1024, 2048]) == pytest.approx(2.0, abs=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_linear_work_grows_like_n(causal: bool) -> None:
    def make(n: int) -> Callable[[], object]:
        q, k, v = (torch.randn(1, 1, n, 32) for _ in range(3))
        return lambda: attnkit.linear_attention(
            q, k, v, feature_map="elu", is_causal=causal, chunk_size=64
        )

    assert _work_exponent(make, [512, 1024, 2048, 4096]) == pytest.approx(1.0, abs=1e-9)


def test_fit_exponent_fits_the_medians_it_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """fit_exponent's arithmetic on given times (no real timing: a test must not time)."""
    from attnkit._timing import Timing

    measure_module = importlib.import_module("attnkit.cost.measure")  # the package shadows it

    def fake_time_call(fn: Callable[[], object], **kwargs: object) -> Timing:
        n = float(fn())  # type: ignore[arg-type]
        t = 1e-9 * n**1.5
        return Timing(t, t, t, 1)

    monkeypatch.setattr(measure_module, "time_call", fake_time_call)
    fit = cost.fit_exponent(lambda n: lambda: n, [256, 512, 1024, 2048])
    assert fit.slope == pytest.approx(1.5) and fit.high - fit.low < 1e-9


@torch.no_grad()
def _cache_bytes(
    n_kv_heads: int, lengths: list[int], h: int = 8, d: int = 64, b: int = 2
) -> list[int]:
    """Decode token by token through MultiHeadAttention; KVCache.nbytes at each length."""
    mha = attnkit.MultiHeadAttention(d_model=d, n_heads=h, n_kv_heads=n_kv_heads, is_causal=True)
    cache = mha.new_cache(batch=b)
    out = []
    for _ in range(max(lengths)):
        mha(torch.randn(b, 1, d), cache=cache)
        if cache.seq_len in lengths:
            out.append(cache.nbytes)
    return out


def test_decode_cache_bytes_grow_like_n_and_mqa_is_one_over_h() -> None:
    h, d, b = 8, 64, 2
    lengths = [8, 16, 32, 64]
    mha, mqa = _cache_bytes(h, lengths), _cache_bytes(1, lengths)
    for measured in (mha, mqa):
        fit = cost.fit_loglog(lengths, measured)
        assert 1.0 in fit and fit.slope == pytest.approx(1.0)
    slope_mha = (mha[-1] - mha[0]) / (lengths[-1] - lengths[0])
    slope_mqa = (mqa[-1] - mqa[0]) / (lengths[-1] - lengths[0])
    assert slope_mqa / slope_mha == pytest.approx(1 / h)
    # ... and the model's cache tensors hold exactly what KVCache.nbytes reports.
    for variant, measured in (("mha", mha), ("mqa", mqa)):
        sizes = cost.get(variant).sizes()
        held = cost.SYMBOLS["w"] * (sizes["prev_K"] + sizes["prev_V"])
        values = {"b": b, "h": h, "k": d // h, "v": d // h, "w": 4}
        assert [cost.evaluate(held, {**values, "n": n}) for n in lengths] == measured
