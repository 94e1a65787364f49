"""Hostile inputs: every op ends in a clear error or a finite answer near the float64 one.

Hypothesis draws magnitudes from 1e-4 to 1e2, dtypes fp16/bf16/fp32/fp64, lengths 0, 1
and odd, grouped heads, every registered feature map and every op. Each case must
either raise a ValueError whose message says what went wrong (a denominator <= 0 or
not finite, an output outside its dtype's range), or return finite values within a
*stated* tolerance of a float64 reference computed from the same (rounded) inputs.

The tolerance is a forward error bound, not a fudge factor. For normalised linear
attention o_i = num_i / den_i with a_ij = phi(q_i) . phi(k_j)::

    |d a_ij|  <= sum_r (e_q |phi(k)| + |phi(q)| e_k + e_q e_k) + g_D' sum_r |phi(q) phi(k)|
    |d num_i| <= sum_j |d a_ij| |v_j| + g_n sum_j |a_ij v_j|,   |d den_i| likewise
    |d o_i|   <= 2 (|d num_i| + |o_i| |d den_i|) / |den_i| + u_out |o_i|

where e_q, e_k bound each feature's own error (per map, in units of the accumulation
dtype's u = 2^-24 in fp32: exact for identity/relu; u + u |phi| for elu + 1, whose
(exp(x) - 1) + 1 cancels; (p + 1) u |phi| for degree-p products; u times the logit
size, plus the smallest subnormal, for FAVOR+'s exp), g_n = n u / (1 - n u) with n the
number of terms summed, and u_out the output dtype's unit roundoff. Rows whose
denominator is not larger than its own error bound are ill-conditioned: there either
answer (an error or a finite value) is accepted. A wrong implementation (half-precision
accumulation: u 2^-11 or 2^-8 instead of 2^-24; a dropped or extra key; a missing
stabiliser; a cast that overflows) misses these bounds by orders of magnitude.

Non-finite inputs are pinned separately (what comes out is in each op's docstring):
NaN/inf in q or k make the linear/kernel ops raise (the denominators they reach are
not finite); in sdpa and argmax they give NaN in the rows they touch only; NaN in v
reaches exactly the rows that attend to it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import attnkit
from attnkit import feature_maps
from attnkit.layers.attention import MultiHeadAttention

F64 = torch.float64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MAPS = feature_maps.available()
FORMS = ["full", "causal-fast", "causal-reference", "step"]

# A clear error says what failed; anything else (a RuntimeError from a matmul, a message
# without the reason) fails the test.
CLEAR = re.compile(
    r"rows have a denominator (<= 0|that underflowed to 0|that is not finite)"
    r"|outside the range of torch\.(float16|bfloat16)"
    r"|is infinite \(inf in the inputs"
    r"|\(normalize=False\) are not finite"
)

# Examples per test: ~30 ms each, the whole module in about 15 s on one core.
HOSTILE = settings(max_examples=80, deadline=None)


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _inputs(draw: Any, E: int, Ev: int, L: int, S: int, H: int, Hk: int, dtype: torch.dtype):
    """q, k, v of one magnitude in [1e-4, 1e2] (log-uniform), rounded to ``dtype``."""
    magnitude = 10.0 ** draw(st.floats(-4.0, 2.0))
    seed = draw(st.integers(0, 2**31 - 1))
    positive = draw(st.booleans())  # q.k > 0: signed maps then have positive denominators
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, L, E, generator=g, dtype=F64) * magnitude
    k = torch.randn(1, Hk, S, E, generator=g, dtype=F64) * magnitude
    v = torch.randn(1, Hk, S, Ev, generator=g, dtype=F64) * magnitude
    if positive:
        q, k = q.abs() + 0.05 * magnitude, k.abs() + 0.05 * magnitude
    return q.to(dtype), k.to(dtype), v.to(dtype), magnitude


# --------------------------------------------------------------------------------------
# float64 reference features (implementation scale) and per-feature error bounds
# --------------------------------------------------------------------------------------


def _features(phi: feature_maps.FeatureMap, x: Tensor, query: bool) -> tuple[Tensor, Tensor]:
    """(phi(x) in float64 in the scale the op uses, error bound of each feature / u).

    Queries of FAVOR+ use the documented query scale exp(W x' - max_r (W x')_r); every
    other feature is phi itself (elu + 1 computed without cancellation).
    """
    x = x.to(F64)
    if isinstance(phi, feature_maps.Favor):
        w = phi.projection.to(F64)  # type: ignore[union-attr]
        xs = x * phi.scale(x.shape[-1])
        wx = xs @ w.T
        size = xs.norm(dim=-1, keepdim=True) * w.norm(dim=-1) + 1.0  # |W x'| bound
        if query:
            shift = wx.amax(-1, keepdim=True)
            f = torch.exp(wx - shift)
            err = (2 * size + shift.abs() + 4) * f
        else:
            sq = 0.5 * (xs * xs).sum(-1, keepdim=True) + 0.5 * math.log(phi.num_features)
            f = torch.exp(wx - sq)
            err = (2 * size + 2 * sq + 4) * f
        return f, err
    if isinstance(phi, feature_maps.EluPlusOne):
        f = torch.where(x > 0, x + 1, torch.exp(x))
        return f, 2 + 2 * f  # absolute u from (exp(x) - 1) + 1, relative u otherwise
    f = phi(x)
    if isinstance(phi, feature_maps.PowerSeries):
        return f, (phi.degree + 3) * f.abs()
    return f, torch.zeros_like(f)  # identity, relu: exact


def _linear_reference(phi, q, k, v, causal: bool, dtype: torch.dtype, *, unbiased_q=False):
    """float64 o [B, H, L, Ev], its error bound, and the ill-conditioned rows.

    ``unbiased_q``: queries through phi itself (kernel_attention), not the query scale.
    """
    u, u_out = _u(_acc(dtype)), _u(dtype)
    tiny = torch.finfo(_acc(dtype)).smallest_normal * torch.finfo(_acc(dtype)).eps
    H, Hk = q.shape[1], k.shape[1]
    fq, eq = _features(phi, q, query=not unbiased_q)
    fk, ek = _features(phi, k, query=False)
    fk, ek, vv = (t.repeat_interleave(H // Hk, dim=1) for t in (fk, ek, v.to(F64)))
    Dp, S = fq.shape[-1], fk.shape[-2]
    a = fq @ fk.transpose(-2, -1)  # [B, H, L, S]
    abs_prod = fq.abs() @ fk.abs().transpose(-2, -1)
    da = u * (eq @ fk.abs().transpose(-2, -1) + fq.abs() @ ek.transpose(-2, -1))
    da = da + u * u * (eq @ ek.transpose(-2, -1)) + _gamma(Dp + 2, u) * abs_prod + Dp * tiny
    if causal:
        keep = torch.ones(q.shape[2], S, dtype=torch.bool).tril()
        a, da, abs_prod = (t.masked_fill(~keep, 0.0) for t in (a, da, abs_prod))
    g = _gamma(S + Dp + 4, u)
    num, den = a @ vv, a.sum(-1)
    dnum = da @ vv.abs() + g * (a.abs() @ vv.abs())
    dden = da.sum(-1) + g * a.abs().sum(-1)
    o = num / den.unsqueeze(-1)
    bound = 2 * (dnum + o.abs() * dden.unsqueeze(-1)) / den.abs().unsqueeze(-1)
    bound = bound + u_out * o.abs() + torch.finfo(dtype).smallest_normal
    ill = ~(den.abs() > 2 * dden)  # den within its own error of 0: either answer is fine
    return o, bound, ill


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def _check_answer(out: Tensor, ref: Tensor, bound: Tensor, ill: Tensor, what: str) -> None:
    """Finite everywhere; within the bound on every well-conditioned row."""
    assert torch.isfinite(out).all(), f"{what}: non-finite output from finite inputs"
    err = (out.to(F64) - ref).abs()
    bad = (err > bound) & ~ill.unsqueeze(-1)
    assert not bad.any(), (
        f"{what}: error {err[bad].max():.3g} above the bound {bound[bad].min():.3g} "
        f"({int(bad.sum())} entries)"
    )


def _run_linear(form: str, q, k, v, phi, eps=None):
    if form == "step":
        state = None
        outs = []
        for t in range(q.shape[2]):  # the whole sequence, one token at a time
            o, state = attnkit.linear_attention_step(
                q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, phi,
                eps=eps, enable_gqa=True,
            )  # fmt: skip
            outs.append(o)
        return torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    impl = "reference" if form == "causal-reference" else "fast"
    o, _ = attnkit.linear_attention(
        q, k, v, phi, is_causal=form != "full", implementation=impl, eps=eps, enable_gqa=True
    )
    return o


def _map(name: str, E: int) -> feature_maps.FeatureMap:
    if name == "favor":
        return feature_maps.get("favor", num_features=16, dim=E, seed=0)
    if name == "polynomial":
        return feature_maps.get("polynomial", degree=3, c=0.5)
    return feature_maps.get(name)


# --------------------------------------------------------------------------------------
# Linear attention: every map, every form
# --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    name=st.sampled_from(MAPS),
    form=st.sampled_from(FORMS),
    dtype=st.sampled_from(DTYPES),
    L=st.sampled_from([0, 1, 2, 3, 5, 9]),
    S=st.sampled_from([0, 1, 4, 7]),
    E=st.integers(1, 5),
    Ev=st.integers(1, 3),
    group=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
)
def test_linear_attention_clear_error_or_bounded_answer(
    data, name, form, dtype, L, S, E, Ev, group
) -> None:
    H, Hk = group
    if form != "full":
        S = L
    elif S == 0:
        S = 1  # no keys at all is pinned (output 0) in test_linear
    q, k, v, _ = _inputs(data.draw, E, Ev, L, S, H, Hk, dtype)
    phi = _map(name, E)
    what = f"{name} {form} {dtype} L={L} S={S} E={E}"
    try:
        out = _run_linear(form, q, k, v, phi)
    except ValueError as err:
        assert CLEAR.search(str(err)), f"{what}: unclear error {err}"
        return
    assert out.dtype == dtype and out.shape == (1, H, L, Ev)
    ref, bound, ill = _linear_reference(phi, q, k, v, form != "full", dtype)
    _check_answer(out, ref, bound, ill, what)


@HOSTILE
@given(
    data=st.data(),
    name=st.sampled_from(MAPS),
    dtype=st.sampled_from(DTYPES),
    L=st.sampled_from([1, 3, 6]),
    E=st.integers(1, 4),
)
def test_kernel_attention_with_a_map_clear_error_or_bounded_answer(data, name, dtype, L, E):
    """The quadratic reference, sim="linear": the same policy and the same bound."""
    q, k, v, _ = _inputs(data.draw, E, 2, L, L, 2, 1, dtype)
    phi = _map(name, E)
    try:
        out = attnkit.kernel_attention(
            q, k, v, sim="linear", sim_kwargs={"feature_map": phi}, is_causal=True,
            enable_gqa=True,
        )  # fmt: skip
    except ValueError as err:
        assert CLEAR.search(str(err)), f"{name} {dtype}: unclear error {err}"
        return
    # kernel_attention uses the unbiased phi on both sides (no query rescaling).
    ref, bound, ill = _linear_reference(phi, q, k, v, True, dtype, unbiased_q=True)
    _check_answer(out, ref, bound, ill, f"kernel {name} {dtype}")


# --------------------------------------------------------------------------------------
# Softmax-family ops: sdpa, argmax (every mode), kernel_attention(softmax)
# --------------------------------------------------------------------------------------


def _softmax_reference(q, k, v, causal: bool, scale: float, u: float, dtype: torch.dtype):
    """float64 softmax attention, its bound, rows with no key; u is the compute precision."""
    H, Hk = q.shape[1], k.shape[1]
    kk, vv = (t.to(F64).repeat_interleave(H // Hk, dim=1) for t in (k, v))
    s = scale * (q.to(F64) @ kk.transpose(-2, -1))
    ds = _gamma(q.shape[-1] + 2, u) * scale * (q.to(F64).abs() @ kk.abs().transpose(-2, -1))
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, -math.inf)
    w = torch.softmax(s, dim=-1)
    o = w @ vv
    # exp(s - m) has relative error <= 2 ds + u; the ratio doubles it; the sums add g_S.
    rel = (2 * ds.masked_fill(~torch.isfinite(s), 0).amax(-1, keepdim=True) + 2 * u) * 2
    rel = rel + _gamma(k.shape[2] + 2, u)
    bound = rel * vv.abs().amax(-2, keepdim=True).expand_as(o) * 2 + _u(dtype) * o.abs()
    return o, bound + torch.finfo(dtype).smallest_normal


@HOSTILE
@given(
    data=st.data(),
    op=st.sampled_from(["sdpa", "sdpa_reference", "kernel-softmax", "argmax-softmax"]),
    dtype=st.sampled_from(DTYPES),
    L=st.sampled_from([1, 2, 5, 9]),
    E=st.integers(1, 5),
    causal=st.booleans(),
)
def test_softmax_family_finite_and_bounded(data, op, dtype, L, E, causal) -> None:
    q, k, v, _ = _inputs(data.draw, E, 3, L, L, 2, 1, dtype)
    scale = 1 / math.sqrt(E)
    kw = {"is_causal": causal, "enable_gqa": True}
    if op == "sdpa":
        out = attnkit.sdpa(q, k, v, **kw)
        u = _u(dtype)  # torch's fused kernel may compute in the input dtype
    elif op == "sdpa_reference":
        out, u = attnkit.sdpa_reference(q, k, v, **kw), _u(_acc(dtype))
    elif op == "kernel-softmax":
        out, u = attnkit.kernel_attention(q, k, v, **kw), _u(_acc(dtype))
    else:
        out, u = attnkit.argmax_attention(q, k, v, mode="softmax", tau=1.0, **kw), _u(_acc(dtype))
    ref, bound = _softmax_reference(q, k, v, causal, scale, u, dtype)
    _check_answer(out, ref, bound, torch.zeros(ref.shape[:-1], dtype=torch.bool), op)


@HOSTILE
@given(
    data=st.data(),
    mode=st.sampled_from(attnkit.ops.argmax.ARGMAX_MODES),
    dtype=st.sampled_from(DTYPES),
    L=st.sampled_from([1, 2, 5, 9]),
    E=st.integers(1, 5),
)
def test_argmax_every_mode_finite_and_hard_picks_a_best_key(data, mode, dtype, L, E) -> None:
    """Outputs are finite convex combinations of value rows; hard modes return one exact
    row, of a key whose float64 score is the maximum up to the score's rounding error."""
    q, k, v, _ = _inputs(data.draw, E, 3, L, L, 1, 1, dtype)
    gen = torch.Generator().manual_seed(0)
    out = attnkit.argmax_attention(q, k, v, mode=mode, tau=0.5, is_causal=True, generator=gen)
    assert torch.isfinite(out).all()
    vmax = v.to(F64).abs().amax()
    assert (out.to(F64).abs() <= vmax * (1 + 4 * _u(dtype)) + 1e-300).all()
    if mode != "hard":
        return
    s = q.to(F64) @ k.to(F64).transpose(-2, -1)
    ds = _gamma(E + 2, _u(_acc(dtype))) * (q.to(F64).abs() @ k.to(F64).abs().transpose(-2, -1))
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -math.inf)
    near = s >= s.amax(-1, keepdim=True) - 2 * ds  # keys that may be the max after rounding
    rows = (out.unsqueeze(-2) == v.unsqueeze(-3)).all(-1)  # [1, 1, L, S]: output == v_j
    assert (rows & near).any(-1).all()


# --------------------------------------------------------------------------------------
# Layers: every MultiHeadAttention backend
# --------------------------------------------------------------------------------------


BACKENDS: dict[str, dict[str, Any]] = {
    "softmax": {"backend": "softmax"},
    "argmax": {"backend": "argmax", "backend_options": {"mode": "straight_through"}},
    "kernel-polynomial": {"backend": "kernel", "backend_options": {"sim": "polynomial"}},
    "kernel-gaussian": {"backend": "kernel", "backend_options": {"sim": "gaussian"}},
    **{f"linear-{m}": {"backend": "linear", "feature_map": m} for m in MAPS},
}


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    backend=st.sampled_from(sorted(BACKENDS)),
    dtype=st.sampled_from(DTYPES),
    L=st.sampled_from([1, 2, 5]),
)
def test_multihead_backends_clear_error_or_finite(data, backend, dtype, L) -> None:
    """Module outputs (projections, then the op, then W_o): a clear error or finite
    values of the module's dtype, for every backend, dtype and magnitude."""
    magnitude = 10.0 ** data.draw(st.floats(-4.0, 2.0))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    mha = MultiHeadAttention(8, 2, n_kv_heads=1, is_causal=True, **BACKENDS[backend])
    mha = mha.to(dtype).eval()
    x = (magnitude * torch.randn(2, L, 8)).to(dtype)
    try:
        with torch.no_grad():
            out = mha(x)
    except ValueError as err:
        assert CLEAR.search(str(err)), f"{backend} {dtype}: unclear error {err}"
        return
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{backend} {dtype} {magnitude}"


# --------------------------------------------------------------------------------------
# Non-finite inputs: what comes out
# --------------------------------------------------------------------------------------


def _poison(t: Tensor, index: tuple[int, ...], value: float) -> Tensor:
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_q_or_k_raises_in_linear_and_kernel_ops(value) -> None:
    q, k, v = (torch.randn(1, 1, 5, 3) for _ in range(3))
    for qq, kk in ((_poison(q, (0, 0, 2, 1), value), k), (q, _poison(k, (0, 0, 2, 1), value))):
        with pytest.raises(ValueError, match=r"rows have a denominator that is not finite"):
            attnkit.linear_attention(qq, kk, v, is_causal=True)
        with pytest.raises(ValueError, match=r"rows have a denominator that is not finite"):
            attnkit.linear_attention(qq, kk, v)
        with pytest.raises(ValueError, match=r"denominator that is not finite"):
            attnkit.kernel_attention(qq, kk, v, sim="linear")


def test_nan_in_v_reaches_the_rows_whose_products_touch_it() -> None:
    """NaN in v_3 of 6 tokens: the chunked linear path (C = 2) poisons its chunk (rows
    2, 3) and every later row, not rows 0, 1; the quadratic ops, whose masked weights
    still multiply v_3 (0 * NaN), every row, as torch's SDPA does."""
    q, k, v = (torch.randn(1, 1, 6, 3) for _ in range(3))
    v = _poison(v, (0, 0, 3, 0), math.nan)
    chunked = [False, False, True, True, True, True]
    for impl in ("fast", "reference"):
        o, _ = attnkit.linear_attention(q, k, v, is_causal=True, chunk_size=2, implementation=impl)
        assert torch.isnan(o[0, 0]).any(-1).tolist() == chunked, impl
    for name, o in {
        "linear full": attnkit.linear_attention(q, k, v)[0],
        "kernel causal": attnkit.kernel_attention(q, k, v, sim="linear", is_causal=True),
        "sdpa causal": attnkit.sdpa(q, k, v, is_causal=True),
        "argmax causal": attnkit.argmax_attention(q, k, v, is_causal=True),
    }.items():
        assert torch.isnan(o).any(-1).all(), name


def test_nan_in_q_is_confined_to_its_row_in_the_softmax_family() -> None:
    """sdpa_reference and argmax: NaN in that row only. torch's CPU fused kernel (behind
    attnkit.sdpa) returns 0 for it instead, as for a fully masked row: documented."""
    q, k, v = (torch.randn(1, 1, 6, 3) for _ in range(3))
    q = _poison(q, (0, 0, 4, 2), math.nan)
    only_row_4 = [False, False, False, False, True, False]
    for name, o in {
        "sdpa_reference": attnkit.sdpa_reference(q, k, v, is_causal=True),
        "argmax": attnkit.argmax_attention(q, k, v, is_causal=True),
        "argmax-softmax": attnkit.argmax_attention(q, k, v, is_causal=True, mode="softmax"),
    }.items():
        assert torch.isnan(o[0, 0]).any(-1).tolist() == only_row_4, name
    o = attnkit.sdpa(q, k, v, is_causal=True)
    assert torch.equal(o[0, 0, 4], torch.zeros(3)) and torch.isfinite(o).all()
