"""Feature maps: widths, dtypes, exact kernel identities, FAVOR+ statistics, gradients."""

from __future__ import annotations

import copy
import itertools
import math
import pickle
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from attnkit import feature_maps
from attnkit.feature_maps import (
    Favor,
    FeatureMap,
    Polynomial,
    PowerSeries,
    Taylor,
    _children,
    _gaussian_projection,
)
from helpers import ulp_distance

ALL_MAPS = feature_maps.available()
POSITIVE_MAPS = [n for n in ALL_MAPS if feature_maps.get(n).positive]
WIDTHS = (1, 3, 7, 16, 60)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
F64 = torch.float64


def _randn(*shape: int, seed: int, dtype: torch.dtype = F64, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)


def _build(name: str, d: int) -> FeatureMap:
    """The map ``name`` ready for inputs of width d (favor: the seed-0 projection)."""
    return feature_maps.resolve(name, d)


def _sim(phi: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """phi(q) . phi(k) along the last axis."""
    out: Tensor = (phi(q) * phi(k)).sum(-1)
    return out


# --------------------------------------------------------------------------------------
# Registry and the contract every map honours
# --------------------------------------------------------------------------------------


def test_registry_has_the_documented_maps() -> None:
    assert {"identity", "elu", "relu", "polynomial", "taylor", "favor"} <= set(ALL_MAPS)
    assert set(POSITIVE_MAPS) == {"elu", "taylor", "favor"}


@pytest.mark.parametrize("name", ALL_MAPS)
def test_get_builds_an_nn_module(name: str) -> None:
    phi = feature_maps.get(name)
    assert isinstance(phi, nn.Module)
    assert isinstance(phi, FeatureMap)
    assert phi.name == name
    assert type(feature_maps.resolve(name)) is type(phi)
    assert feature_maps.resolve(phi) is phi


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("d", WIDTHS, ids=lambda d: f"D{d}")
def test_width_matches_out_dim_with_leading_dims(name: str, d: int) -> None:
    phi = _build(name, d)
    x = _randn(2, 3, 5, d, seed=d, dtype=torch.float32)
    y = phi(x)
    assert y.shape == (2, 3, 5, phi.out_dim(d))
    assert torch.isfinite(y).all()
    # Leading dims are batch dims: mapping a flattened copy gives the same rows.
    torch.testing.assert_close(phi(x.reshape(-1, d)).reshape(y.shape), y)


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(name: str, dtype: torch.dtype) -> None:
    phi = _build(name, 6)
    x64 = _randn(4, 7, 6, seed=1, scale=0.5)
    ref = phi(x64)
    y = phi(x64.to(dtype))
    assert y.dtype == dtype
    assert y.shape == ref.shape
    # Against the float64 features of the same (rounded) input: half dtypes within one
    # unit in the last place of a single rounding (products formed in the input dtype
    # and rounded at every step miss that by several units), wider ones to their rounding.
    exact = phi(x64.to(dtype).to(F64))
    if dtype in (torch.float16, torch.bfloat16):
        assert ulp_distance(y, exact.to(dtype)).max() <= 1
    else:
        tol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(y.to(F64), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", POSITIVE_MAPS)
def test_positive_maps_have_positive_similarity(name: str) -> None:
    phi = _build(name, 16)
    q = _randn(512, 16, seed=2, scale=0.5)
    k = _randn(512, 16, seed=3, scale=0.5)
    assert (_sim(phi, q, k) > 0).all()
    assert (phi(q) >= 0).all() or name == "taylor"  # taylor's features may be negative


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown feature map 'nope'") as info:
        feature_maps.get("nope")
    for name in ALL_MAPS:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ALL_MAPS)
def test_bad_kwargs_name_the_map(name: str) -> None:
    with pytest.raises(TypeError, match=f"feature map '{name}'"):
        feature_maps.get(name, no_such_option=1)


def test_resolve_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="feature_map must be"):
        feature_maps.resolve(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL_MAPS)
def test_bad_inputs_raise(name: str) -> None:
    phi = feature_maps.get(name)
    with pytest.raises(TypeError, match="floating dtype"):
        phi(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[\.\.\., D\]"):
        phi(torch.tensor(1.0))


# --------------------------------------------------------------------------------------
# Polynomial / power series: exact identities
# --------------------------------------------------------------------------------------


def _reference_power_series(x: Tensor, a: tuple[float, ...]) -> Tensor:
    """Slow, obviously-correct features: one per multiset, via itertools, same order."""
    d = x.shape[-1]
    feats = []
    for k, ak in enumerate(a):
        if ak == 0:
            continue
        for combo in itertools.combinations_with_replacement(range(d), k):
            multinomial = math.factorial(k)
            for i in set(combo):
                multinomial //= math.factorial(combo.count(i))
            f = torch.full(x.shape[:-1], math.sqrt(ak * multinomial), dtype=x.dtype)
            for i in combo:
                f = f * x[..., i]
            feats.append(f)
    return torch.stack(feats, dim=-1)


def _design_quadratic(x: Tensor) -> Tensor:
    """The map for (q.k + 1)^2: [1, sqrt2 x_i, x_i^2, sqrt2 x_i x_j (i < j)]."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, offset=1)
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype)
    return torch.cat([ones, math.sqrt(2) * x, x * x, math.sqrt(2) * x[..., i] * x[..., j]], -1)


def _tight_close(actual: Tensor, expected: Tensor, scale: Tensor) -> None:
    """|actual - expected| <= 1e-11 * scale: scale bounds the sum of |terms| being cancelled."""
    err = (actual - expected).abs()
    assert (err <= 1e-11 * scale + 1e-300).all(), (err / scale).max()


@given(
    p=st.integers(1, 4),
    c=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_polynomial_identity(p: int, c: float, d: int, seed: int) -> None:
    phi = Polynomial(degree=p, c=c)
    q = _randn(5, d, seed=seed)
    k = _randn(5, d, seed=seed + 1)
    expected = ((q * k).sum(-1) + c) ** p
    bound = (q.norm(dim=-1) * k.norm(dim=-1) + c) ** p
    _tight_close(_sim(phi, q, k), expected, bound)
    _tight_close(phi.similarity(q, k), expected, bound)
    width = math.comb(d + p, p) if c > 0 else math.comb(d + p - 1, p)
    assert phi.out_dim(d) == width == phi(q).shape[-1]


@given(
    coefs=st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0]), min_size=1, max_size=4).filter(
        lambda a: a[-1] > 0
    ),
    d=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_power_series_matches_slow_reference(coefs: list[float], d: int, seed: int) -> None:
    phi = PowerSeries(coefs)
    x = _randn(3, d, seed=seed)
    ref = _reference_power_series(x, tuple(coefs))
    assert phi.out_dim(d) == ref.shape[-1]
    torch.testing.assert_close(phi(x), ref, rtol=1e-12, atol=1e-12)


@given(d=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_quadratic_equals_design_map_up_to_permutation(d: int, seed: int) -> None:
    phi = Polynomial(degree=2, c=1.0)
    x = _randn(6, d, seed=seed)
    y = _randn(4, d, seed=seed + 1)
    ours, theirs = phi(x), _design_quadratic(x)
    assert ours.shape[-1] == theirs.shape[-1] == 1 + d + d * (d + 1) // 2
    # Same multiset of features for every vector ...
    torch.testing.assert_close(ours.sort(-1).values, theirs.sort(-1).values)
    # ... and the same Gram matrix phi(X) phi(Y)^T.
    torch.testing.assert_close(ours @ phi(y).T, theirs @ _design_quadratic(y).T)


def test_quadratic_width_design_case() -> None:
    assert Polynomial().out_dim(16) == 1 + 16 + 16 * 17 // 2 == 153
    assert Polynomial(degree=2, c=0.0).out_dim(16) == 16 * 17 // 2


def test_degree_two_gather_is_triu_indices() -> None:
    d = 7
    parent, last, run = _children(torch.arange(d), torch.ones(d, dtype=torch.long), d)
    i, j = torch.triu_indices(d, d)
    assert torch.equal(parent, i) and torch.equal(last, j)
    assert torch.equal(run, torch.where(i == j, 2, 1))


def test_plan_cache_is_plain_dict_not_state() -> None:
    phi = Polynomial(degree=3)
    x = _randn(2, 5, seed=0, dtype=torch.float32)
    phi(x)
    plan = phi._plans[(5, x.device, torch.float32)]
    phi(x)
    assert phi._plans[(5, x.device, torch.float32)] is plan  # reused, not rebuilt
    phi(x.double())
    assert len(phi._plans) == 2  # one per (D, device, dtype)
    assert dict(phi.state_dict()) == {} and list(phi.buffers()) == []
    # Copies and pickles still work (the cache is ordinary data).
    torch.testing.assert_close(copy.deepcopy(phi)(x), phi(x))
    torch.testing.assert_close(pickle.loads(pickle.dumps(phi))(x), phi(x))


def test_polynomial_degree_one_does_not_alias_input() -> None:
    x = _randn(3, 4, seed=0)
    x0 = x.clone()
    y = Polynomial(degree=1, c=0.0)(x)
    torch.testing.assert_close(y, x)
    y.mul_(2)
    torch.testing.assert_close(x, x0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"degree": 0}, ValueError, "degree must be >= 1"),
        ({"degree": 2.0}, TypeError, "degree must be an int"),
        ({"degree": True}, TypeError, "degree must be an int"),
        ({"c": -1.0}, ValueError, "imaginary"),
        ({"c": float("nan")}, ValueError, "finite"),
        ({"c": "1"}, TypeError, "c must be a real number"),
    ],
)
def test_polynomial_validation(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        feature_maps.get("polynomial", **kwargs)


@pytest.mark.parametrize(
    ("coefs", "error", "match"),
    [
        ([], ValueError, "at least one"),
        ([1.0, -1.0], ValueError, "a_1 must be finite and >= 0"),
        ([1.0, 0.0], ValueError, "top coefficient"),
        ([1.0, "2"], TypeError, "a_1 must be a real number"),
    ],
)
def test_power_series_validation(coefs: list[object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PowerSeries(coefs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Taylor (Based)
# --------------------------------------------------------------------------------------


@given(d=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_taylor_identity(d: int, seed: int) -> None:
    phi = Taylor()
    q = _randn(5, d, seed=seed, scale=1.5)
    k = _randn(5, d, seed=seed + 1, scale=1.5)
    s = (q * k).sum(-1) / math.sqrt(d)
    bound = 1 + (q.norm(dim=-1) * k.norm(dim=-1)) / math.sqrt(d)
    _tight_close(_sim(phi, q, k), 1 + s + s * s / 2, bound**2)
    assert phi.out_dim(d) == 1 + d + d * (d + 1) // 2 == phi(q).shape[-1]
    assert (_sim(phi, q, k) >= 0.5 - 1e-12).all()  # ((1 + s)^2 + 1) / 2 >= 1/2


def test_taylor_width_and_explicit_form() -> None:
    assert Taylor().out_dim(16) == 153
    d = 3
    x = _randn(d, seed=0)
    r = d**-0.25
    i, j = torch.triu_indices(d, d)
    quad = torch.where(i == j, 1 / math.sqrt(2 * d), 1 / math.sqrt(d)) * x[i] * x[j]
    expected = torch.cat([torch.ones(1, dtype=F64), r * x, quad])
    torch.testing.assert_close(Taylor()(x), expected)


# --------------------------------------------------------------------------------------
# FAVOR+ positive random features
# --------------------------------------------------------------------------------------


def _small_pairs(n: int, d: int, norm: float, seed: int) -> tuple[Tensor, Tensor]:
    q = _randn(n, d, seed=seed)
    k = _randn(n, d, seed=seed + 1)
    return norm * q / q.norm(dim=-1, keepdim=True), norm * k / k.norm(dim=-1, keepdim=True)


def _rms_rel_error(m: int, d: int, orthogonal: bool, redraws: int, seed: int) -> float:
    q, k = _small_pairs(64, d, 0.5, seed=7)
    exact = torch.exp((q * k).sum(-1))
    phi = Favor(num_features=m, dim=d, orthogonal=orthogonal, input_scale=1.0)
    gen = torch.Generator().manual_seed(seed)
    sq = []
    for _ in range(redraws):
        phi.redraw(gen)
        sq.append(((_sim(phi, q, k) - exact) / exact) ** 2)
    return float(torch.stack(sq).mean().sqrt())


@pytest.mark.parametrize("orthogonal", [True, False], ids=["ortho", "iid"])
def test_favor_is_unbiased(orthogonal: bool) -> None:
    d, redraws = 8, 400
    q, k = _small_pairs(32, d, 0.5, seed=11)
    exact = torch.exp((q * k).sum(-1))
    phi = Favor(num_features=64, dim=d, orthogonal=orthogonal, input_scale=1.0)
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros_like(exact)
    for _ in range(redraws):
        phi.redraw(gen)
        total += _sim(phi, q, k)
    # One draw has ~12% relative error here; the mean of 400 has ~0.6%.
    rel = ((total / redraws - exact) / exact).abs()
    assert rel.max() < 0.03, rel.max()


@pytest.mark.parametrize("orthogonal", [True, False], ids=["ortho", "iid"])
def test_favor_error_falls_like_inverse_sqrt_m(orthogonal: bool) -> None:
    ms = (16, 64, 256, 1024)
    errs = [_rms_rel_error(m, 16, orthogonal, redraws=30, seed=100 + m) for m in ms]
    x = torch.log(torch.tensor(ms, dtype=F64))
    y = torch.log(torch.tensor(errs, dtype=F64))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert -0.75 <= slope <= -0.3, (slope, errs)  # measured: -0.50 (ortho), -0.49 (iid)


def test_favor_orthogonal_not_worse_than_iid() -> None:
    # Theorem 2 of Choromanski et al.: orthogonal rows strictly lower the MSE; the gap is
    # small at D = 16 (measured ~10%), so only ask that it is not worse beyond noise.
    ortho = sum(_rms_rel_error(m, 16, True, redraws=30, seed=m) for m in (16, 64, 256))
    iid = sum(_rms_rel_error(m, 16, False, redraws=30, seed=m) for m in (16, 64, 256))
    assert ortho <= 1.05 * iid, (ortho, iid)


def test_favor_orthogonal_rows_are_orthogonal_gaussians() -> None:
    d, m = 6, 15
    w = _gaussian_projection(m, d, orthogonal=True, generator=torch.Generator().manual_seed(0))
    assert w.shape == (m, d)
    for start in range(0, m, d):
        block = w[start : start + d]
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)))
    # Each row is marginally N(0, I): E|w|^2 = d, E[w w^T] = I.
    big = _gaussian_projection(6000, d, orthogonal=True, generator=torch.Generator().manual_seed(1))
    cov = big.T @ big / big.shape[0]
    torch.testing.assert_close(cov, torch.eye(d, dtype=F64), atol=0.1, rtol=0)
    # |w|^2 is chi-square with d degrees of freedom (variance 2d), not a fixed length.
    sq = (big * big).sum(-1)
    assert abs(float(sq.mean()) - d) < 0.2 and abs(float(sq.var()) / (2 * d) - 1) < 0.1


def test_favor_seeded_reproducible_and_layers_differ() -> None:
    a, b = Favor(num_features=12, dim=5, seed=4), Favor(num_features=12, dim=5, seed=4)
    assert a.projection is not None and b.projection is not None
    assert torch.equal(a.projection, b.projection)
    c = Favor(num_features=12, dim=5, seed=5)
    assert not torch.equal(a.projection, c.projection)  # type: ignore[arg-type]
    # seed=None (the default) draws from the global RNG: two maps built one after the
    # other differ, and the same global seed reproduces both.
    torch.manual_seed(0)
    d, e = Favor(num_features=12, dim=5), Favor(num_features=12, dim=5)
    torch.manual_seed(0)
    d2 = Favor(num_features=12, dim=5)
    assert not torch.equal(d.projection, e.projection)  # type: ignore[arg-type]
    assert torch.equal(d.projection, d2.projection)  # type: ignore[arg-type]


def test_favor_redraw() -> None:
    phi = Favor(num_features=10, dim=4, seed=0)
    assert phi.projection is not None
    w0 = phi.projection.clone()
    phi.redraw()
    assert phi.projection is not None and not torch.equal(phi.projection, w0)
    phi.redraw(torch.Generator().manual_seed(9))
    w1 = phi.projection.clone()
    phi.redraw(torch.Generator().manual_seed(9))
    assert torch.equal(phi.projection, w1)
    assert phi.projection.shape == (10, 4) and phi.projection.dtype == torch.float32
    # The module's own stream is reproducible too.
    p, q = Favor(num_features=10, dim=4, seed=1), Favor(num_features=10, dim=4, seed=1)
    p.redraw(), q.redraw()
    assert torch.equal(p.projection, q.projection)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no projection"):
        Favor(num_features=4).redraw()


def test_favor_projection_exists_from_construction_never_drawn_in_forward() -> None:
    """The width is known at construction: no buffer appears inside forward."""
    phi = Favor(num_features=8, dim=3, seed=0)
    assert phi.state_dict()["projection"].shape == (8, 3)
    assert [n for n, _ in phi.named_buffers()] == ["projection"]
    phi.to(F64)
    assert phi.projection is not None and phi.projection.dtype == F64
    phi.to("meta")
    assert phi.projection is not None and phi.projection.device.type == "meta"
    # Without dim there is no projection; calling the map raises instead of drawing one.
    bare = Favor(num_features=8)
    assert "projection" not in bare.state_dict()
    with pytest.raises(ValueError, match=r"favor map has no projection: build it with dim=3"):
        bare(_randn(2, 3, seed=0, dtype=torch.float32))
    assert bare.projection is None
    # It adopts a saved projection (loading is construction, not a forward).
    src = Favor(num_features=8, dim=3, seed=123)
    bare.load_state_dict(src.state_dict())
    assert bare.projection is not None and src.projection is not None
    assert torch.equal(bare.projection, src.projection)
    x = _randn(2, 3, seed=0, dtype=torch.float32)
    torch.testing.assert_close(bare(x), src(x))


def test_favor_width_mismatch() -> None:
    phi = Favor(num_features=8, dim=4)
    with pytest.raises(ValueError, match=r"D=5.*width 4"):
        phi(torch.randn(2, 5))
    with pytest.raises(ValueError, match="D >= 1"):
        Favor(num_features=8, dim=2)(torch.randn(2, 0))


def test_favor_half_inputs_are_computed_in_fp32() -> None:
    phi = Favor(num_features=32, dim=8)
    x = _randn(4, 8, seed=0, dtype=torch.float16)
    y = phi(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, phi(x.float()).half(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_features": 0}, ValueError, "num_features must be >= 1"),
        ({"num_features": 2.5}, TypeError, "num_features must be an int"),
        ({"dim": 0}, ValueError, "dim must be >= 1"),
        ({"input_scale": 0.0}, ValueError, "input_scale must be finite and > 0"),
        ({"seed": 1.5}, TypeError, "seed must be an int or None"),
    ],
)
def test_favor_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        feature_maps.get("favor", **kwargs)


def test_favor_default_scale_targets_softmax_kernel() -> None:
    """Default input scale D^{-1/4}: phi(q).phi(k) estimates exp(q.k / sqrt(D)), as Performer."""
    d = 4
    x = _randn(5, d, seed=0)
    default = Favor(num_features=32, dim=d, seed=0).double()
    assert default.input_scale is None and default.scale(d) == d**-0.25
    plain = Favor(num_features=32, dim=d, input_scale=1.0, seed=0).double()
    torch.testing.assert_close(default(x), plain(x * d**-0.25))
    # With many features one draw is already close to softmax's exp(q.k / sqrt(D)); with
    # scale 1 (the old default) it estimates exp(q.k), 20-50% away for these pairs.
    big = Favor(num_features=8192, dim=d, seed=0)
    q, k = _small_pairs(64, d, 1.0, seed=5)
    expected = torch.exp((q * k).sum(-1) / math.sqrt(d))
    rms = float((((_sim(big, q, k) - expected) / expected) ** 2).mean().sqrt())
    assert rms < 0.05, rms  # per-pair std is at most sqrt((e^2 - 1) / 8192) ~ 0.028


def test_favor_query_features_are_phi_times_a_positive_row_factor() -> None:
    """query_features = c(x) phi(x), c > 0 per row, largest feature exactly 1.

    A factor that varied across features would not cancel in phi(q) S / phi(q) . z.
    """
    phi = Favor(num_features=64, dim=16, seed=0).double()
    x = _randn(50, 16, seed=1, scale=3.0)
    qf, f = phi.query_features(x), phi(x)
    ratio = qf / f
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-10, atol=0)
    assert (ratio > 0).all()
    torch.testing.assert_close(qf.amax(-1), torch.ones(50, dtype=F64), rtol=0, atol=0)
    # Far out of range for the unbiased form (every logit below -87 in float32) the
    # query features still have a largest entry of exactly 1.
    big = _randn(4, 16, seed=2, scale=8.0).float()
    phi32 = Favor(num_features=64, dim=16, input_scale=1.0, seed=0)
    assert (phi32(big) == 0).all()
    assert torch.equal(phi32.query_features(big).amax(-1), torch.ones(4))


def test_favor_half_output_out_of_range_raises() -> None:
    """Unbiased features above 65504 would be inf in float16: a clear error instead."""
    phi = Favor(num_features=16, dim=64, input_scale=1.0, seed=0)
    w = phi.projection
    assert w is not None
    x = w[:2].half()  # x = w_r: feature r is exp(|w_r|^2 / 2) / 4 ~ e^32 / 4
    with pytest.raises(ValueError, match=r"outside the range of torch.float16"):
        phi(x)
    assert torch.isfinite(phi(x / 16)).all()


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


GRAD_MAPS: dict[str, Callable[[], nn.Module]] = {
    "polynomial-p3": lambda: Polynomial(degree=3, c=0.5),
    "polynomial-p2": lambda: Polynomial(degree=2, c=1.0),
    "taylor": Taylor,
    "favor": lambda: Favor(num_features=6, dim=3).double(),
    "elu": lambda: feature_maps.get("elu"),
}


@pytest.mark.parametrize("name", list(GRAD_MAPS))
def test_gradcheck(name: str) -> None:
    phi = GRAD_MAPS[name]()
    x = _randn(2, 3, seed=0, scale=0.7).requires_grad_()
    assert torch.autograd.gradcheck(phi, (x,))
    assert torch.autograd.gradgradcheck(phi, (x,))
