"""kernel_attention (equation (4) of attnkit.ops.kernel): the O(L S) reference for any similarity.

Pinned against torch's SDPA (softmax), explicit formulas (polynomial, gaussian,
taylor) and linear_attention's feature maps; forward and all gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.ops.kernel import LogSimilarity, get_similarity, kernel_attention, similarities
from helpers import make_qkv, shape_id, ulp_distance

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-10} if dtype == F64 else {"rtol": 2e-5, "atol": 2e-6}


def grads(fn, q, k, v, cot):
    """Output of fn(q, k, v) and the gradients of <output, cot> wrt q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    gq, gk, gv = torch.autograd.grad((out * cot).sum(), (q, k, v))
    return out.detach(), gq, gk, gv


def assert_same_with_grads(fn_a, fn_b, q, k, v, **tolerances):
    out = fn_a(q, k, v)
    cot = torch.randn_like(out)
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), grads(fn_a, q, k, v, cot), grads(fn_b, q, k, v, cot), strict=True
    ):
        torch.testing.assert_close(a, b, **tolerances, msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [
    # (B, H, Hk, L, S, E, Ev)
    (1, 1, 1, 1, 1, 6, 4),
    (2, 4, 2, 13, 13, 12, 5),
    (1, 3, 1, 7, 37, 6, 6),
    (2, 2, 2, 37, 9, 8, 3),
]


SHAPE_IDS = [shape_id(s) for s in SHAPES]


# ----------------------------------------------------------------------------- registry


def test_similarities_lists_registered_names() -> None:
    names = similarities()
    assert {"softmax", "polynomial", "linear", "gaussian"} <= set(names)
    for name in names:
        assert callable(get_similarity(name))


def test_similarity_kwargs_are_checked() -> None:
    with pytest.raises(TypeError, match=r"similarity 'softmax'.*unexpected keyword"):
        get_similarity("softmax", degree=2)
    with pytest.raises(ValueError, match="degree must be an int >= 1, got 0"):
        get_similarity("polynomial", degree=0)


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_softmax_equals_torch_sdpa(shape, is_causal, dtype) -> None:
    H, Hk = shape[1], shape[2]
    q, k, v = make_qkv(*shape, dtype=dtype)

    def ref(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=H != Hk)

    def ours(q, k, v):
        return kernel_attention(q, k, v, sim="softmax", is_causal=is_causal, enable_gqa=True)

    assert_same_with_grads(ours, ref, q, k, v, **tol(dtype))


MASKS = {
    "bool-LS": lambda B, H, L, S: torch.rand(L, S) > 0.3,
    "bool-B1LS": lambda B, H, L, S: torch.rand(B, 1, L, S) > 0.3,
    "float-BHLS": lambda B, H, L, S: torch.randn(B, H, L, S),
    "float-neginf-1LS": lambda B, H, L, S: torch.where(
        torch.rand(1, L, S) > 0.3, torch.randn(1, L, S), float("-inf")
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_softmax_masks_equal_torch_sdpa(mask_kind, dtype) -> None:
    B, H, Hk, L, S, E, Ev = 2, 4, 2, 11, 13, 6, 5
    q, k, v = make_qkv(B, H, Hk, L, S, E, Ev, dtype=dtype)
    mask = MASKS[mask_kind](B, H, L, S)
    mask[..., 0] = True if mask.dtype == torch.bool else 0.0  # no fully masked row
    if mask.is_floating_point():
        mask = mask.to(dtype)

    def ref(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def ours(q, k, v):
        return kernel_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    assert_same_with_grads(ours, ref, q, k, v, **tol(dtype))


@pytest.mark.parametrize("LS", [(5, 9), (9, 5), (1, 7)], ids=["L5-S9", "L9-S5", "L1-S7"])
def test_causal_lower_right_equals_explicit_mask(LS) -> None:
    L, S = LS
    q, k, v = make_qkv(1, 2, 1, L, S, 6, 3, dtype=F64)
    keep = torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L)
    empty = ~keep.any(-1)  # L > S: the first L - S queries see no key at all
    out = kernel_attention(
        q,
        k,
        v,
        is_causal=True,
        causal_alignment="lower_right",
        enable_gqa=True,
    )
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    torch.testing.assert_close(out, ref, **tol(F64))
    if empty.any():
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))


def test_causal_and_mask_combine() -> None:
    q, k, v = make_qkv(2, 2, 2, 8, 8, 4, 3, dtype=F64)
    mask = torch.rand(2, 1, 8, 8) > 0.4
    mask[..., 0] = True
    keep = mask & torch.ones(8, 8, dtype=torch.bool).tril()
    out = kernel_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(
        out, kernel_attention(q, k, v, attn_mask=keep, enable_gqa=True), **tol(F64)
    )


def test_float_neginf_mask_equals_bool_mask() -> None:
    q, k, v = make_qkv(1, 2, 2, 6, 7, 4, 3, dtype=F64)
    keep = torch.rand(6, 7) > 0.4
    keep[:, 0] = True
    additive = torch.zeros(6, 7, dtype=F64).masked_fill(~keep, float("-inf"))
    for sim in ("softmax", "polynomial", "linear"):
        a = kernel_attention(q.abs(), k.abs(), v, sim=sim, attn_mask=keep, enable_gqa=True)
        b = kernel_attention(q.abs(), k.abs(), v, sim=sim, attn_mask=additive, enable_gqa=True)
        torch.testing.assert_close(a, b, **tol(F64))


def test_float_mask_multiplies_similarity_by_exp() -> None:
    q, k, v = make_qkv(1, 1, 1, 5, 6, 4, 3, dtype=F64, positive=True)
    mask = torch.randn(5, 6, dtype=F64)
    out = kernel_attention(q, k, v, sim="polynomial", attn_mask=mask, enable_gqa=True)
    w = (q @ k.transpose(-2, -1) + 1) ** 2 * mask.exp()
    torch.testing.assert_close(out, (w @ v) / w.sum(-1, keepdim=True), **tol(F64))


def test_softmax_is_stable_for_large_scores() -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, 4)
    q = q * 300.0  # exp(q.k / sqrt(E)) overflows fp32 without the row-max shift
    out = kernel_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_softmax_scale_option() -> None:
    q, k, v = make_qkv(1, 2, 2, 5, 6, 4, 3, dtype=F64)
    out = kernel_attention(q, k, v, sim_kwargs={"scale": 0.3}, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref, **tol(F64))


def test_softmax_equals_attnkit_sdpa() -> None:
    q, k, v = make_qkv(2, 4, 2, 9, 11, 6, 5, dtype=F64)
    mask = torch.rand(2, 1, 9, 11) > 0.3
    mask[..., 0] = True
    ref = attnkit.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)

    def ours(q, k, v):
        return kernel_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)

    def theirs(q, k, v):
        return attnkit.sdpa(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)

    torch.testing.assert_close(
        kernel_attention(q, k, v, attn_mask=mask, enable_gqa=True), ref, **tol(F64)
    )
    assert_same_with_grads(ours, theirs, q, k, v, **tol(F64))
    lr = kernel_attention(q, k, v, is_causal=True, causal_alignment="lower_right", enable_gqa=True)
    ref = attnkit.sdpa(q, k, v, is_causal=True, enable_gqa=True, causal_alignment="lower_right")
    torch.testing.assert_close(lr, ref, **tol(F64))


# ----------------------------------------------------------------------------- other sims


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "degree_c", [(2, 1.0), (3, 0.5), (1, 2.0)], ids=["p2-c1", "p3-c.5", "p1-c2"]
)
def test_polynomial_sim_equals_formula(degree_c, dtype) -> None:
    degree, c = degree_c
    q, k, v = make_qkv(2, 2, 1, 7, 9, 5, 3, dtype=dtype, positive=True)
    kh = k.expand(2, 2, 9, 5)
    w = (q @ kh.transpose(-2, -1) + c) ** degree
    ref = (w @ v.expand(2, 2, 9, 3)) / w.sum(-1, keepdim=True)
    out = kernel_attention(
        q, k, v, sim="polynomial", sim_kwargs={"degree": degree, "c": c}, enable_gqa=True
    )
    torch.testing.assert_close(out, ref, **tol(dtype))


def test_gaussian_sim_equals_formula() -> None:
    q, k, v = make_qkv(1, 2, 2, 6, 8, 4, 3, dtype=F64)
    d2 = ((q.unsqueeze(-2) - k.unsqueeze(-3)) ** 2).sum(-1)
    w = torch.exp(-0.5 * d2 / math.sqrt(4))
    out = kernel_attention(q, k, v, sim="gaussian", enable_gqa=True)
    torch.testing.assert_close(out, (w @ v) / w.sum(-1, keepdim=True), **tol(F64))
    # It is softmax attention with per-key logit bias -||k||^2 / (2 sqrt(E)).
    bias = (-0.5 * (k * k).sum(-1) / 2.0).unsqueeze(-2)
    torch.testing.assert_close(
        out, kernel_attention(q, k, v, attn_mask=bias, enable_gqa=True), **tol(F64)
    )


def test_taylor_map_equals_its_kernel() -> None:
    q, k, v = make_qkv(2, 2, 1, 7, 9, 6, 3, dtype=F64)

    def taylor(q, k):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return 1 + s + s * s / 2

    out = kernel_attention(
        q, k, v, sim="linear", sim_kwargs={"feature_map": "taylor"}, enable_gqa=True
    )
    torch.testing.assert_close(
        out, kernel_attention(q, k, v, sim=taylor, enable_gqa=True), **tol(F64)
    )


def test_callable_sim_sees_expanded_heads_and_equals_registered() -> None:
    q, k, v = make_qkv(2, 6, 2, 5, 7, 4, 3, dtype=F64)
    seen = []

    def sim(q, k):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return torch.exp(q @ k.transpose(-2, -1) / 2.0)

    out = kernel_attention(q, k, v, sim=sim, enable_gqa=True)
    assert seen == [((2, 6, 5, 4), (2, 6, 7, 4))]
    torch.testing.assert_close(out, kernel_attention(q, k, v, enable_gqa=True), **tol(F64))
    log = LogSimilarity(lambda q, k: q @ k.transpose(-2, -1) / 2.0)
    torch.testing.assert_close(kernel_attention(q, k, v, sim=log, enable_gqa=True), out, **tol(F64))


def test_normalize_false_returns_numerator() -> None:
    q, k, v = make_qkv(1, 2, 1, 6, 8, 4, 3, dtype=F64, positive=True)
    w = (q @ k.transpose(-2, -1) + 1) ** 2
    num = kernel_attention(
        q, k, v, sim="polynomial", normalize=False, is_causal=True, enable_gqa=True
    )
    w = w.masked_fill(~torch.ones(6, 8, dtype=torch.bool).tril(), 0)
    torch.testing.assert_close(num, w @ v, **tol(F64))
    s = torch.exp(q @ k.transpose(-2, -1) / 2.0)
    torch.testing.assert_close(
        kernel_attention(q, k, v, normalize=False, enable_gqa=True), s @ v, **tol(F64)
    )


# ----------------------------------------------------------------------------- denominators


def _zero_denominator_inputs():
    # E = 2, one key k = (-1, 0): q.k = -1, -0.5, -2, 0 -> (q.k + 1)^2 = 0, 0.25, 1, 1.
    q = torch.tensor([[1.0, 0.0], [0.5, 0.0], [2.0, 0.0], [0.0, 1.0]]).view(1, 1, 4, 2)
    k = torch.tensor([[-1.0, 0.0]]).view(1, 1, 1, 2)
    v = torch.tensor([[3.0, -1.0, 2.0]]).view(1, 1, 1, 3)
    return q, k, v


def test_zero_denominator_raises_with_row_count() -> None:
    q, k, v = _zero_denominator_inputs()
    with pytest.raises(ValueError, match=r"1 of 4 rows have a denominator <= 0.*eps="):
        kernel_attention(q, k, v, sim="polynomial", enable_gqa=True)
    # Two query heads and a batch of two: the count is over all B * H * L rows.
    q2 = q.expand(2, 2, 4, 2)
    with pytest.raises(ValueError, match=r"4 of 16 rows have a denominator <= 0"):
        kernel_attention(
            q2, k.expand(2, 1, 1, 2), v.expand(2, 1, 1, 3), sim="polynomial", enable_gqa=True
        )


def test_zero_denominator_with_eps_is_finite() -> None:
    q, k, v = _zero_denominator_inputs()
    out = kernel_attention(q, k, v, sim="polynomial", eps=1e-6, enable_gqa=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], torch.zeros(3))
    torch.testing.assert_close(out[0, 0, 1:], v[0, 0].expand(3, 3))


@pytest.mark.parametrize("eps", [None, 1e-6], ids=["eps-None", "eps"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("sim", ["softmax", "polynomial"])
def test_fully_masked_row_gives_zero_like_sdpa(sim, kind, eps) -> None:
    """A row with no key to attend is 0 (as attnkit.sdpa), not an error, with or without eps.

    Only rows that may attend some key are held to the denominator check.
    """
    q, k, v = make_qkv(1, 1, 1, 3, 4, 4, 2, dtype=F64, positive=True)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1] = False
    mask = keep if kind == "bool" else torch.zeros(3, 4, dtype=F64).masked_fill(~keep, -math.inf)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kernel_attention(q, k, v, sim=sim, attn_mask=mask, eps=eps)
    assert torch.equal(out[0, 0, 1], torch.zeros(2, dtype=F64))
    if sim == "softmax":
        torch.testing.assert_close(out, attnkit.sdpa(q, k, v, attn_mask=mask))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 0, 1], torch.zeros(4, dtype=F64))
    # A row that may attend keys but whose weights sum to 0 still raises without eps.
    z = torch.zeros_like(q.detach())
    with pytest.raises(ValueError, match="2 of 3 rows have a denominator <= 0"):
        kernel_attention(z, k, v, sim="polynomial", sim_kwargs={"c": 0.0}, attn_mask=mask)


def test_negative_denominator_of_non_positive_map_raises() -> None:
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, 2, dtype=F64)
    q, k = q.abs(), -k.abs()  # identity map: phi(q).phi(k) = q.k < 0 for every pair
    with pytest.raises(ValueError, match=r"6 of 6 rows.*smallest -"):
        kernel_attention(
            q, k, v, sim="linear", sim_kwargs={"feature_map": "identity"}, enable_gqa=True
        )


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("sim", ["softmax", "linear", "polynomial"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_are_computed_in_fp32_and_rounded_once(dtype, sim) -> None:
    """A half call equals the float32 computation on the same (half) values, rounded once.

    Every entry is within one unit in the last place of that rounding (in practice
    equal). Computing the similarities or the sums over the S = 2048 keys in the input
    dtype instead rounds w, the numerator and the denominator each to 8 (bf16) or 11
    (fp16) bits and misses that by up to tens of units, so this fails.
    """
    q, k, v = make_qkv(1, 2, 1, 64, 2048, 8, 8)
    q, k, v = q.to(dtype), k.to(dtype), (v + 3.0).to(dtype)  # nonzero mean: |o| ~ 3
    out = kernel_attention(q, k, v, sim=sim, enable_gqa=True)
    assert out.dtype == dtype
    ref = kernel_attention(q.float(), k.float(), v.float(), sim=sim, enable_gqa=True)
    assert ulp_distance(out, ref.to(dtype)).max() <= 1


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    ("sim", "kwargs", "positive"),
    [
        ("softmax", {}, False),
        ("polynomial", {"degree": 2, "c": 1.0}, True),
        ("linear", {"feature_map": "elu"}, False),
        ("gaussian", {}, False),
    ],
    ids=["softmax", "polynomial", "linear-elu", "gaussian"],
)
def test_gradcheck(sim, kwargs, positive) -> None:
    q, k, v = make_qkv(1, 2, 1, 4, 5, 3, 2, dtype=F64, positive=positive)
    mask = torch.randn(4, 5, dtype=F64)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def fn(q, k, v):
        return kernel_attention(
            q, k, v, sim=sim, sim_kwargs=kwargs, attn_mask=mask, enable_gqa=True
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))

    def causal(q, k, v):
        return kernel_attention(
            q, k, v, sim=sim, sim_kwargs=kwargs, is_causal=True, enable_gqa=True
        )

    assert torch.autograd.gradcheck(causal, (q, k, v))


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 6, 3)
    return [
        ("rank-q", (q[0], k, v), {}, ValueError, r"q must have 4 dims \[B, H, L, E\]"),
        ("batch", (q, k[:1], v[:1]), {}, ValueError, r"q has B=2, k has B=1"),
        ("width", (q, k[..., :5], v), {}, ValueError, r"q has E=6, k has E=5"),
        ("heads-kv", (q, k, v[:, :1]), {}, ValueError, r"k has 2, v has 1"),
        ("gqa-ratio", (q[:, :3], k, v), {}, ValueError, r"H=3, k/v have Hk=2"),
        ("int-dtype", (q.long(), k, v), {}, TypeError, r"q must have a floating dtype"),
        ("mixed-dtype", (q, k.double(), v), {}, TypeError, r"must share one dtype"),
        (
            "mask-shape",
            (q, k, v),
            {"attn_mask": torch.ones(5, 6, dtype=torch.bool)},
            ValueError,
            r"attn_mask of shape \(5, 6\) does not broadcast.*axis S has size 6, expected 7",
        ),
        (
            "mask-dtype",
            (q, k, v),
            {"attn_mask": torch.ones(5, 7, dtype=torch.long)},
            TypeError,
            r"attn_mask must be bool .* got torch.int64",
        ),
        ("unknown-sim", (q, k, v), {"sim": "cosine"}, ValueError, r"unknown similarity 'cosine'"),
        ("sim-type", (q, k, v), {"sim": 3}, TypeError, r"sim must be a registered name"),
        (
            "unknown-map",
            (q, k, v),
            {"sim": "linear", "sim_kwargs": {"feature_map": "nope"}},
            ValueError,
            r"unknown feature map 'nope'",
        ),
        (
            "callable-kwargs",
            (q, k, v),
            {"sim": lambda q, k: q @ k.transpose(-2, -1), "sim_kwargs": {"scale": 1.0}},
            ValueError,
            r"sim_kwargs only configures a registered similarity",
        ),
        (
            "callable-shape",
            (q, k, v),
            {"sim": lambda q, k: (q @ k.transpose(-2, -1))[..., :1]},
            ValueError,
            r"sim\(q, k\) must return shape \[B, H, L, S\] = \[2, 4, 5, 7\], got \(2, 4, 5, 1\)",
        ),
        ("eps", (q, k, v), {"eps": 0.0}, ValueError, r"eps must be None or a float > 0, got 0.0"),
        (
            "alignment",
            (q, k, v),
            {"is_causal": True, "causal_alignment": "left"},
            ValueError,
            r"unknown causal_alignment 'left'",
        ),
        ("is_causal", (q, k, v), {"is_causal": 1}, TypeError, r"is_causal must be a bool"),
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [case[1:] for case in _bad_cases()],
    ids=[case[0] for case in _bad_cases()],
)
def test_bad_input(args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        kernel_attention(*args, **kwargs, enable_gqa=True)
