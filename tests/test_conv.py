"""causal_conv1d / causal_conv1d_update against the F.conv1d reference.

Outputs, final states and gradients (x, weight, bias, initial state) on awkward shapes
(L = 0, 1, odd, L shorter than the kernel, tiles shorter than the kernel), in both
memory layouts, and split + state == one call. A wrong tap order, an off-by-one shift
at a tile boundary, a state read from the wrong end or a dropped bias all fail here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.ops import conv
from attnkit.ops.conv import causal_conv1d, causal_conv1d_reference, causal_conv1d_update

F64 = torch.float64

# (B, C, L, K): L = 0, 1, shorter than K - 1, odd, longer than several tiles
SHAPES = [
    (1, 3, 0, 4),
    (2, 5, 1, 4),
    (2, 5, 2, 4),
    (3, 7, 9, 4),
    (1, 6, 33, 3),
    (2, 4, 70, 5),
    (1, 5, 11, 1),
    (2, 3, 17, 2),
]


def sid(s: tuple[int, int, int, int]) -> str:
    return "B{}-C{}-L{}-K{}".format(*s)


def make_x(B: int, C: int, L: int, layout: str, dtype: torch.dtype = torch.float32):
    """[B, C, L] contiguous (channels first) or a transposed [B, L, C] (channels last)."""
    if layout == "channels_first":
        return torch.randn(B, C, L, dtype=dtype)
    return torch.randn(B, L, C, dtype=dtype).transpose(1, 2)


@pytest.fixture
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # One-row tiles (raised to K or 8 rows by the op): every tile boundary is exercised.
    monkeypatch.setattr(conv, "CPU_TILE_BYTES", 1)


@pytest.mark.parametrize("shape", SHAPES, ids=sid)
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("state_width", [None, "K-1", "K+2"])
def test_forward_matches_reference(shape, layout, activation, state_width, tiny_tiles):
    B, C, L, K = shape
    x = make_x(B, C, L, layout)
    w, b = torch.randn(C, K), torch.randn(C)
    state = None
    if state_width is not None:
        W = K - 1 if state_width == "K-1" else K + 2
        state = torch.randn(B, C, W)
    with torch.no_grad():
        y, final = causal_conv1d(x, w, b, activation, state, output_final_state=True)
    y_ref, final_ref = causal_conv1d_reference(x, w, b, activation, state, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert final is not None and final_ref is not None
    assert final.shape == (B, C, K - 1)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=0)
    if L > 1 and C > 1:
        assert y.stride() == x.stride(), "the output keeps the input's memory layout"


@pytest.mark.parametrize("shape", SHAPES[1:], ids=sid)
def test_no_bias_no_state_is_zero_padding(shape):
    B, C, L, K = shape
    x, w = make_x(B, C, L, "channels_last"), torch.randn(C, K)
    y, final = causal_conv1d(x, w)
    assert final is None
    # F.conv1d with K - 1 zeros on the left, written independently of the reference helper
    padded = torch.nn.functional.pad(x, (K - 1, 0))
    expected = torch.nn.functional.conv1d(padded, w.unsqueeze(1), groups=C)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_hand_computed_taps():
    # One channel, K = 3, weight (1, 10, 100): y_t = x_{t-2} + 10 x_{t-1} + 100 x_t.
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    w = torch.tensor([[1.0, 10.0, 100.0]])
    state = torch.tensor([[[5.0, 6.0]]])
    y, final = causal_conv1d(x, w, initial_state=state, output_final_state=True)
    assert y.tolist() == [[[5 + 60 + 100, 6 + 10 + 200, 1 + 20 + 300, 2 + 30 + 400]]]
    assert final is not None and final.tolist() == [[[3.0, 4.0]]]


@pytest.mark.parametrize("shape", SHAPES, ids=sid)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradients_match_reference(shape, activation):
    B, C, L, K = shape
    tensors = [
        make_x(B, C, L, "channels_last"),
        torch.randn(C, K),
        torch.randn(C),
        torch.randn(B, C, K),
    ]

    def run(fn):
        xs = [t.detach().clone().requires_grad_(True) for t in tensors]
        y, final = fn(xs[0], xs[1], xs[2], activation, xs[3], True)
        cot_y = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        cot_f = torch.linspace(1, 2, final.numel()).reshape(final.shape)
        loss = (y * cot_y).sum() + (final * cot_f).sum()
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
        # L = 0: the reference's empty F.conv1d call never touches weight or bias
        filled = [torch.zeros_like(t) if g is None else g for t, g in zip(xs, grads, strict=True)]
        return y.detach(), filled

    y, grads = run(causal_conv1d)
    y_ref, grads_ref = run(causal_conv1d_reference)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(["x", "weight", "bias", "state"], grads, grads_ref, strict=True):
        torch.testing.assert_close(
            g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_float64(activation):
    B, C, L, K = 2, 3, 6, 4
    x = torch.randn(B, L, C, dtype=F64).transpose(1, 2).requires_grad_(True)
    w = torch.randn(C, K, dtype=F64, requires_grad=True)
    b = torch.randn(C, dtype=F64, requires_grad=True)
    s = torch.randn(B, C, K - 1, dtype=F64, requires_grad=True)

    def f(x, w, b, s):
        y, final = causal_conv1d(x, w, b, activation, s, True)
        return y, final

    assert torch.autograd.gradcheck(f, (x, w, b, s))


@given(
    L=st.integers(0, 40),
    cut=st.integers(0, 40),
    K=st.integers(1, 5),
    C=st.integers(1, 6),
    layout=st.sampled_from(["channels_first", "channels_last"]),
)
def test_split_with_state_equals_one_call(L, cut, K, C, layout):
    cut = min(cut, L)
    x = make_x(2, C, L, layout)
    w, b = torch.randn(C, K), torch.randn(C)
    y_all, final_all = causal_conv1d(x, w, b, "silu", output_final_state=True)
    y1, s1 = causal_conv1d(x[:, :, :cut], w, b, "silu", output_final_state=True)
    y2, s2 = causal_conv1d(x[:, :, cut:], w, b, "silu", s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], dim=2), y_all, rtol=1e-5, atol=1e-6)
    assert final_all is not None and s2 is not None
    torch.testing.assert_close(s2, final_all, rtol=0, atol=0)


@pytest.mark.parametrize("L", [1, 2, 5])
@pytest.mark.parametrize("W_extra", [0, 1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_update_matches_prefill_and_rolls_state_in_place(L, W_extra, with_bias):
    B, C, K = 2, 6, 4
    W = K - 1 + W_extra
    x = make_x(B, C, L, "channels_last")
    w = torch.randn(C, K)
    b = torch.randn(C) if with_bias else None
    state = torch.randn(B, C, W)
    before = state.clone()
    address = state.data_ptr()
    y = causal_conv1d_update(x, state, w, b, "silu")
    y_ref, _ = causal_conv1d_reference(x, w, b, "silu", before)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert state.data_ptr() == address, "the state keeps its storage"
    torch.testing.assert_close(state, torch.cat([before, x], dim=2)[:, :, L:], rtol=0, atol=0)


def test_decode_token_by_token_equals_prefill():
    B, C, L, K = 2, 5, 12, 4
    x, w, b = make_x(B, C, L, "channels_last"), torch.randn(C, K), torch.randn(C)
    y_all, _ = causal_conv1d(x, w, b, "silu")
    y0, s = causal_conv1d(x[:, :, :3], w, b, "silu", output_final_state=True)
    assert s is not None
    state = torch.cat([torch.zeros(B, C, 1), s], dim=2)  # HF keeps W = K columns
    steps = [causal_conv1d_update(x[:, :, t : t + 1], state, w, b, "silu") for t in range(3, L)]
    torch.testing.assert_close(torch.cat([y0, *steps], dim=2), y_all, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    B, C, L, K = 1, 8, 50, 4
    x = make_x(B, C, L, "channels_last", dtype)
    w, b = torch.randn(C, K, dtype=dtype), torch.randn(C, dtype=dtype)
    y, _ = causal_conv1d(x, w, b, "silu")
    assert y.dtype == dtype
    y_ref, _ = causal_conv1d_reference(x.double(), w.double(), b.double(), "silu")
    # one rounding of the fp32 result to the half dtype, not K of them
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y_ref, rtol=eps, atol=eps)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(1, 4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"x must have 3 dims"):
        causal_conv1d(torch.randn(4, 5), w)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        causal_conv1d(torch.ones(1, 4, 5, dtype=torch.int64), w)
    with pytest.raises(ValueError, match=r"weight must have shape \[C, K\] = \[4, K\].*\(5, 3\)"):
        causal_conv1d(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        causal_conv1d(x, torch.randn(4, 1, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \[C\] = \[4\], got \(3,\)"):
        causal_conv1d(x, w, torch.randn(3))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, C, W\].*W >= K - 1"):
        causal_conv1d(x, w, initial_state=torch.randn(1, 4, 1))
    with pytest.raises(ValueError, match=r"conv_state must have shape \[B, C, W\] = \[1, 4, W\]"):
        causal_conv1d_update(x, torch.randn(2, 4, 3), w)
    with pytest.raises(ValueError, match=r"activation must be None or one of.*'gelu'"):
        causal_conv1d(x, w, activation="gelu")
    with pytest.raises(TypeError, match=r"output_final_state must be a bool"):
        causal_conv1d(x, w, output_final_state=1)  # type: ignore[arg-type]
