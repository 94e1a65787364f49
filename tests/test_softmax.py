"""sdpa (torch's fused kernel) vs sdpa_reference (plain math) vs torch itself.

Forward and gradients on awkward shapes: L = 1, odd lengths, E not a power of 2,
L < S and L > S, GQA/MQA ratios, bool/float/broadcast masks, both causal alignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from attnkit.ops.softmax import (
    CausalAlignment,
    causal_mask,
    combine_masks,
    sdpa,
    sdpa_reference,
)


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    Hk: int
    L: int
    S: int
    E: int
    Ev: int

    @property
    def id(self) -> str:
        ev = "" if self.Ev == self.E else f"-Ev{self.Ev}"
        return f"B{self.B}-H{self.H}-Hk{self.Hk}-L{self.L}-S{self.S}-E{self.E}{ev}"


SHAPES = [
    Shape(1, 1, 1, 1, 1, 8, 8),  # smallest possible
    Shape(2, 4, 2, 7, 13, 24, 24),  # GQA 2:1, L < S, odd lengths
    Shape(2, 6, 3, 13, 7, 60, 60),  # GQA 2:1 with 3 kv heads, L > S
    Shape(1, 8, 1, 1, 13, 24, 24),  # MQA, single decoding query
    Shape(2, 4, 4, 13, 13, 60, 24),  # MHA, L == S, Ev != E
    Shape(3, 2, 2, 7, 1, 24, 5),  # a single key
    Shape(2, 6, 2, 1, 9, 24, 24),  # GQA 3:1 decoding step: head-shared masks fold into rows
]


def make_qkv(
    s: Shape, dtype: torch.dtype = torch.float32, requires_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(s.B, s.H, s.L, s.E, dtype=dtype)
    k = torch.randn(s.B, s.Hk, s.S, s.E, dtype=dtype)
    v = torch.randn(s.B, s.Hk, s.S, s.Ev, dtype=dtype)
    return (
        q.requires_grad_(requires_grad),
        k.requires_grad_(requires_grad),
        v.requires_grad_(requires_grad),
    )


def make_mask(kind: str, s: Shape, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """A mask of the named kind; bool masks keep key 0 so most rows stay attendable."""
    if kind == "none":
        return None
    if kind == "bool-LS":
        m = torch.rand(s.L, s.S) > 0.4
        m[:, 0] = True
        return m
    if kind == "bool-B11S":
        m = torch.rand(s.B, 1, 1, s.S) > 0.4
        m[..., 0] = True
        return m
    if kind == "float-LS":
        return torch.randn(s.L, s.S, dtype=dtype)
    if kind == "float-BHLS":
        m = torch.randn(s.B, s.H, s.L, s.S, dtype=dtype)
        return m.masked_fill(torch.rand(m.shape) > 0.7, float("-inf"))
    raise ValueError(kind)


# (mask kind, is_causal, causal_alignment)
MASK_CASES = [
    ("none", False, "upper_left"),
    ("bool-LS", False, "upper_left"),
    ("bool-B11S", False, "upper_left"),
    ("float-LS", False, "upper_left"),
    ("float-BHLS", False, "upper_left"),
    ("none", True, "upper_left"),
    ("none", True, "lower_right"),
    ("bool-B11S", True, "upper_left"),
    ("bool-LS", True, "lower_right"),
    ("float-BHLS", True, "lower_right"),
    ("float-LS", True, "upper_left"),
]


def mask_case_id(case: tuple[str, bool, str]) -> str:
    kind, causal, align = case
    return f"{kind}-causal-{align}" if causal else kind


def torch_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    alignment: str,
) -> Tensor | None:
    """torch's own answer where torch can express the case (all but lower-right L > S)."""
    gqa = q.shape[1] != k.shape[1]
    if not is_causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    L, S = q.shape[2], k.shape[2]
    if mask is not None:  # torch refuses is_causal with attn_mask: combine them here
        causal = torch.ones(L, S, dtype=torch.bool).tril(S - L if alignment == "lower_right" else 0)
        if mask.dtype == torch.bool:
            combined = mask & causal
        else:
            combined = torch.where(causal, mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=combined, enable_gqa=gqa)
    if alignment == "upper_left" or L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if L < S:  # torch warns (NaNs on GPU kernels) when L > S
        bias = causal_lower_right(L, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
    return None


@pytest.mark.parametrize("case", MASK_CASES, ids=mask_case_id)
@pytest.mark.parametrize("s", SHAPES, ids=lambda s: s.id)
def test_sdpa_matches_reference_and_torch_forward_and_grads(
    s: Shape, case: tuple[str, bool, str]
) -> None:
    kind, is_causal, align = case
    q, k, v = make_qkv(s, requires_grad=True)
    mask = make_mask(kind, s)
    kw: dict[str, Any] = dict(
        attn_mask=mask, is_causal=is_causal, enable_gqa=True, causal_alignment=align
    )

    out = sdpa(q, k, v, **kw)
    ref = sdpa_reference(q, k, v, **kw)
    assert out.shape == (s.B, s.H, s.L, s.Ev)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    expected = torch_sdpa(q, k, v, mask, is_causal, align)
    if expected is not None:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    # a failure names the item: [0] = dq, [1] = dk, [2] = dv
    torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"]
)
@pytest.mark.parametrize("case", MASK_CASES, ids=mask_case_id)
@pytest.mark.parametrize("s", SHAPES[1:4], ids=lambda s: s.id)
def test_half_precision_forward_close_to_fp32_reference(
    s: Shape, case: tuple[str, bool, str], dtype: torch.dtype, tol: float
) -> None:
    kind, is_causal, align = case
    q, k, v = make_qkv(s)
    mask = make_mask(kind, s)
    kw: dict[str, Any] = dict(is_causal=is_causal, enable_gqa=True, causal_alignment=align)
    ref = sdpa_reference(q, k, v, attn_mask=mask, **kw)
    half_mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    for fn in (sdpa, sdpa_reference):
        out = fn(qh, kh, vh, attn_mask=half_mask, **kw)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_float32_mask_accepted_with_half_inputs() -> None:
    s = SHAPES[1]
    q, k, v = make_qkv(s, dtype=torch.float16)
    mask = make_mask("float-LS", s)
    out = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = sdpa_reference(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_default_scale_is_inverse_sqrt_width_and_explicit_scale_is_used() -> None:
    s = SHAPES[1]
    q, k, v = make_qkv(s)
    default = sdpa(q, k, v, enable_gqa=True)
    explicit = sdpa(q, k, v, scale=s.E**-0.5, enable_gqa=True)
    torch.testing.assert_close(default, explicit)
    for scale in (0.3, 2.0):
        torch.testing.assert_close(
            sdpa(q, k, v, scale=scale, enable_gqa=True),
            sdpa_reference(q, k, v, scale=scale, enable_gqa=True),
            atol=1e-5,
            rtol=1e-5,
        )


def test_dropout_is_passed_to_torch() -> None:
    q, k, v = make_qkv(SHAPES[4])
    torch.manual_seed(1)
    a = sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, sdpa(q, k, v))


# --- causal alignment ---------------------------------------------------------------


def test_causal_mask_pictures() -> None:
    upper = causal_mask(2, 4, "upper_left")
    lower = causal_mask(2, 4, "lower_right")
    assert upper.tolist() == [[True, False, False, False], [True, True, False, False]]
    assert lower.tolist() == [[True, True, True, False], [True, True, True, True]]
    # L > S lower-right: the first L - S queries may attend nothing.
    assert causal_mask(4, 2, "lower_right").tolist() == [
        [False, False],
        [False, False],
        [True, False],
        [True, True],
    ]


@pytest.mark.parametrize("chunk", [1, 3], ids=["one-step", "three-steps"])
@pytest.mark.parametrize("fn", [sdpa, sdpa_reference], ids=["sdpa", "reference"])
def test_prefill_then_decode_equals_full_causal_with_lower_right(chunk: int, fn: Any) -> None:
    T = 11
    s = Shape(2, 4, 2, T, T, 24, 24)
    q, k, v = make_qkv(s)
    full = fn(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, T, Ev]
    # The last `chunk` tokens are the new queries; keys/values hold the whole sequence.
    step = fn(
        q[:, :, -chunk:], k, v, is_causal=True, enable_gqa=True, causal_alignment="lower_right"
    )
    torch.testing.assert_close(step, full[:, :, -chunk:], atol=1e-6, rtol=1e-6)
    if chunk > 1:  # upper-left would let the first new query see only the first keys
        wrong = fn(q[:, :, -chunk:], k, v, is_causal=True, enable_gqa=True)
        assert not torch.allclose(wrong, full[:, :, -chunk:], atol=1e-3)


def test_upper_left_differs_from_lower_right_when_L_lt_S_and_agrees_when_L_eq_S() -> None:
    q, k, v = make_qkv(Shape(1, 2, 2, 5, 9, 24, 24))
    upper = sdpa(q, k, v, is_causal=True)
    lower = sdpa(q, k, v, is_causal=True, causal_alignment="lower_right")
    assert (upper - lower).abs().amax() > 1e-2
    # upper-left row i sees keys 0..i, so it matches a truncated key set
    torch.testing.assert_close(
        upper[:, :, :1], F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    )

    q, k, v = make_qkv(Shape(1, 2, 2, 9, 9, 24, 24))
    torch.testing.assert_close(
        sdpa(q, k, v, is_causal=True),
        sdpa(q, k, v, is_causal=True, causal_alignment="lower_right"),
    )


def test_lower_right_single_query_attends_everything() -> None:
    q, k, v = make_qkv(Shape(2, 4, 4, 1, 13, 24, 24))
    torch.testing.assert_close(
        sdpa(q, k, v, is_causal=True, causal_alignment="lower_right"), sdpa(q, k, v)
    )
    assert combine_masks(None, True, 1, 13, "lower_right") is None


@pytest.mark.parametrize("align", ["upper_left", "lower_right"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_is_causal_with_mask_equals_combined_mask_in_torch(
    align: CausalAlignment, mask_kind: str
) -> None:
    s = Shape(2, 4, 4, 6, 10, 24, 24)
    q, k, v = make_qkv(s)
    causal = causal_mask(s.L, s.S, align)
    if mask_kind == "bool":
        mask = make_mask("bool-B11S", s)
        assert mask is not None
        combined = mask & causal
    else:
        mask = torch.randn(s.B, 1, s.L, s.S)
        combined = mask.masked_fill(~causal, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=combined)
    out = sdpa(q, k, v, attn_mask=mask, is_causal=True, causal_alignment=align)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("fn", [sdpa, sdpa_reference], ids=["sdpa", "reference"])
def test_fully_masked_rows_output_zero_with_zero_grads(fn: Any) -> None:
    s = Shape(1, 2, 2, 4, 6, 24, 24)
    q, k, v = make_qkv(s, requires_grad=True)
    mask = torch.ones(s.L, s.S, dtype=torch.bool)
    mask[1] = False
    out = fn(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))
    # The float-mask spelling of the same thing (-inf everywhere in row 1) agrees.
    fmask = torch.zeros(s.L, s.S).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(fn(q, k, v, attn_mask=fmask), out)
    # Lower-right with L > S: the first L - S queries attend nothing.
    q2, k2, v2 = make_qkv(Shape(1, 2, 2, 6, 4, 24, 24))
    out2 = fn(q2, k2, v2, is_causal=True, causal_alignment="lower_right")
    assert torch.equal(out2[:, :, :2], torch.zeros_like(out2[:, :, :2]))
    assert torch.isfinite(out2).all()


# --- gradcheck ----------------------------------------------------------------------


GRADCHECK_CASES = [
    dict(),
    dict(is_causal=True, causal_alignment="lower_right"),
    dict(is_causal=True, attn_mask="bool"),
    dict(attn_mask="float"),
]


@pytest.mark.parametrize(
    "kw", GRADCHECK_CASES, ids=["plain", "causal-lower", "causal-bool", "float"]
)
@pytest.mark.parametrize("fn", [sdpa, sdpa_reference], ids=["sdpa", "reference"])
def test_gradcheck_float64(fn: Any, kw: dict[str, Any]) -> None:
    s = Shape(1, 4, 2, 3, 5, 6, 4)
    q, k, v = make_qkv(s, dtype=torch.float64, requires_grad=True)
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(s.L, s.S) > 0.3
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(s.B, s.H, s.L, s.S, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fn(q, k, v, enable_gqa=True, **kw), (q, k, v), eps=1e-6, atol=1e-5
    )


# --- bad input ----------------------------------------------------------------------


def _bad_cases() -> list[Any]:
    def t(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(*shape, dtype=dtype)

    q, k, v = t(2, 4, 3, 8), t(2, 2, 5, 8), t(2, 2, 5, 6)
    ok = dict(q=q, k=k, v=v, enable_gqa=True)
    return [
        pytest.param({**ok, "q": t(4, 3, 8)}, ValueError, r"q must have 4 dims", id="q-rank"),
        pytest.param({**ok, "v": t(2, 2, 5)}, ValueError, r"v must have 4 dims", id="v-rank"),
        pytest.param({**ok, "k": t(3, 2, 5, 8)}, ValueError, r"batch size.*k has B=3", id="batch"),
        pytest.param({**ok, "v": t(2, 1, 5, 6)}, ValueError, r"k and v .* heads", id="kv-heads"),
        pytest.param({**ok, "k": t(2, 2, 5, 7)}, ValueError, r"key width E.*k has E=7", id="width"),
        pytest.param({**ok, "v": t(2, 2, 4, 6)}, ValueError, r"key length S.*v has S=4", id="len"),
        pytest.param(
            {**ok, "k": t(2, 3, 5, 8), "v": t(2, 3, 5, 6)}, ValueError, r"H=4.*Hk=3", id="gqa-ratio"
        ),
        pytest.param({**ok, "enable_gqa": False}, ValueError, r"enable_gqa", id="gqa-off"),
        pytest.param(
            {**ok, "attn_mask": t(3, 4, dtype=torch.bool)},
            ValueError,
            r"attn_mask of shape \(3, 4\).*axis S",
            id="mask-shape",
        ),
        pytest.param(
            {**ok, "attn_mask": t(2, 3, 3, 5, dtype=torch.bool)},
            ValueError,
            r"attn_mask .*axis H",
            id="mask-heads",
        ),
        pytest.param(
            {**ok, "attn_mask": t(5)}, ValueError, r"attn_mask must have 2 to 4", id="mask-rank"
        ),
        pytest.param(
            {**ok, "attn_mask": t(3, 5, dtype=torch.int64)},
            TypeError,
            r"attn_mask must be bool",
            id="mask-int",
        ),
        pytest.param(
            {**ok, "attn_mask": t(3, 5, dtype=torch.float64)},
            TypeError,
            r"attn_mask must have the query's dtype",
            id="mask-float64",
        ),
        pytest.param(
            {**ok, "q": t(2, 4, 3, 8, dtype=torch.int32)},
            TypeError,
            r"q must have a floating",
            id="q-int",
        ),
        pytest.param(
            {**ok, "v": t(2, 2, 5, 6, dtype=torch.float64)},
            TypeError,
            r"share one dtype.*v=torch.float64",
            id="mixed",
        ),
        pytest.param({**ok, "k": [[1.0]]}, TypeError, r"k must be a torch.Tensor", id="k-list"),
        pytest.param(
            {**ok, "causal_alignment": "bottom_right"},
            ValueError,
            r"causal_alignment 'bottom_right'.*'lower_right'",
            id="alignment",
        ),
    ]


@pytest.mark.parametrize("fn", [sdpa, sdpa_reference], ids=["sdpa", "reference"])
@pytest.mark.parametrize("kwargs, error, match", _bad_cases())
def test_bad_input_raises_naming_the_argument(
    fn: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fn(**kwargs)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout_raises(p: float) -> None:
    q, k, v = make_qkv(SHAPES[4])
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=p)


# --- property ------------------------------------------------------------------------


@given(
    B=st.integers(1, 2),
    Hk=st.integers(1, 3),
    G=st.sampled_from([1, 2, 3]),
    L=st.integers(1, 9),
    S=st.integers(1, 9),
    E=st.sampled_from([1, 3, 8, 24]),
    Ev=st.sampled_from([1, 5, 8]),
    is_causal=st.booleans(),
    align=st.sampled_from(["upper_left", "lower_right"]),
    mask_kind=st.sampled_from(["none", "bool-LS", "bool-B11S", "float-LS", "float-BHLS"]),
    seed=st.integers(0, 2**16),
)
def test_property_sdpa_equals_reference(
    B: int,
    Hk: int,
    G: int,
    L: int,
    S: int,
    E: int,
    Ev: int,
    is_causal: bool,
    align: str,
    mask_kind: str,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    s = Shape(B, Hk * G, Hk, L, S, E, Ev)
    q, k, v = make_qkv(s)
    kw: dict[str, Any] = dict(
        attn_mask=make_mask(mask_kind, s),
        is_causal=is_causal,
        enable_gqa=True,
        causal_alignment=align,
    )
    out = sdpa(q, k, v, **kw)
    assert out.shape == (B, Hk * G, L, Ev)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, **kw), atol=1e-5, rtol=1e-5)
