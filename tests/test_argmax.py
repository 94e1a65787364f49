"""argmax_attention: the worked example, ties, masks, gradients and every relaxation."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from attnkit.ops.argmax import ARGMAX_MODES, argmax_attention, modes
from attnkit.ops.softmax import sdpa_reference

# The worked example (4 keys, 3 channels), one batch and one head: [1, 1, S, E].
KEYS = torch.tensor([[1.0, 2, 0], [0, 3, 4], [5, 0, 0], [0, 0, 1]])[None, None]
VALUES = torch.tensor([[2.0, 0, 1], [1, 4, 3], [0, -1, 4], [1, 0, -1]])[None, None]
QUERY = torch.tensor([[1.0, 1, 2]])[None, None]


def shape_id(B: int, H: int, Hk: int, L: int, S: int, E: int) -> str:
    return f"B{B}-H{H}-Hk{Hk}-L{L}-S{S}-E{E}"


SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 7, 13, 24),
    (2, 6, 3, 13, 7, 60),
    (1, 8, 1, 1, 13, 24),
]


def make_qkv(
    B: int,
    H: int,
    Hk: int,
    L: int,
    S: int,
    E: int,
    Ev: int = 5,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(B, H, L, E, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(B, Hk, S, E, dtype=dtype).requires_grad_(requires_grad)
    v = torch.randn(B, Hk, S, Ev, dtype=dtype).requires_grad_(requires_grad)
    return q, k, v


def brute_force_hard(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, align: str
) -> Tensor:
    """Loop over every query, keep the first strictly best attendable key."""
    B, H, L, _ = q.shape
    Hk, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hk
    allowed = torch.ones(B, H, L, S, dtype=torch.bool)
    if attn_mask is not None:
        allowed &= attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    offset = S - L if align == "lower_right" else 0
    out = torch.zeros(B, H, L, Ev, dtype=v.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                best, best_score = None, float("-inf")
                for j in range(S):
                    score = float(q[b, h, i] @ k[b, h // G, j])
                    causal_ok = not is_causal or j <= i + offset
                    if allowed[b, h, i, j] and causal_ok and (best is None or score > best_score):
                        best, best_score = j, score
                if best is not None:
                    out[b, h, i] = v[b, h // G, best]
    return out


# --- forward ------------------------------------------------------------------------


def test_modes_are_listed() -> None:
    assert ARGMAX_MODES == modes()
    assert set(ARGMAX_MODES) == {"hard", "straight_through", "gumbel", "gumbel_hard", "softmax"}


@pytest.mark.parametrize("scale", [None, 1.0, 0.01, 100.0], ids=lambda s: f"scale{s}")
def test_worked_example(scale: float | None) -> None:
    assert (QUERY @ KEYS.transpose(-1, -2)).flatten().tolist() == [3, 11, 5, 2]
    expected = torch.tensor([1.0, 4, 3])
    for mode in ("hard", "straight_through"):
        out = argmax_attention(QUERY, KEYS, VALUES, mode=mode, scale=scale)
        assert torch.equal(out.flatten(), expected)
    # a sharp softmax lands on the same value; a soft one does not
    sharp = argmax_attention(QUERY, KEYS, VALUES, mode="softmax", tau=0.01, scale=1.0)
    torch.testing.assert_close(sharp.flatten(), expected)
    soft = argmax_attention(QUERY, KEYS, VALUES, mode="softmax", tau=10.0, scale=1.0)
    assert not torch.allclose(soft.flatten(), expected, atol=0.1)


def test_ties_go_to_the_lowest_index() -> None:
    k = torch.tensor([[0.0, 1], [1, 0], [1, 0], [0.5, 0]])[None, None]
    v = torch.arange(4.0)[None, None, :, None]
    q = torch.tensor([[1.0, 0], [0, 1], [1, 1]])[
        None, None
    ]  # scores (0,1,1,.5) (1,0,0,0) (1,1,1,.5)
    out = argmax_attention(q, k, v)
    assert out.flatten().tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("mode", ARGMAX_MODES)
def test_masked_best_key_is_never_chosen(mode: str, mask_kind: str) -> None:
    allow = torch.tensor([[True, False, True, True]])  # [L, S]: forbid key 1 (score 11)
    mask = allow if mask_kind == "bool" else torch.zeros(1, 4).masked_fill(~allow, float("-inf"))
    gen = torch.Generator().manual_seed(0)
    tau = 0.01 if mode in ("softmax", "gumbel") else 1.0
    out = argmax_attention(
        QUERY, KEYS, VALUES, attn_mask=mask, mode=mode, tau=tau, generator=gen, scale=1.0
    )
    if mode in ("hard", "straight_through", "softmax"):  # next best is key 2 (score 5)
        torch.testing.assert_close(out.flatten(), torch.tensor([0.0, -1, 4]))
    # with or without noise, the masked key's value (1, 4, 3) gets zero weight: the
    # output is a convex combination of the other rows, whose 2nd coordinate is <= 0
    assert out.flatten()[1] <= 0


@pytest.mark.parametrize("mode", ARGMAX_MODES)
def test_fully_masked_rows_output_zero_with_finite_grads(mode: str) -> None:
    q, k, v = make_qkv(1, 2, 2, 4, 6, 8, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    gen = torch.Generator().manual_seed(0)
    out = argmax_attention(q, k, v, attn_mask=mask, mode=mode, generator=gen)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("align", ["upper_left", "lower_right"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(*s))
def test_hard_matches_brute_force_with_gqa_causal_and_mask(
    shape: tuple[int, ...], align: Any
) -> None:
    B, H, Hk, L, S, E = shape
    q, k, v = make_qkv(B, H, Hk, L, S, E, dtype=torch.float64)
    mask = torch.rand(B, 1, 1, S) > 0.3
    for kw in (
        dict(attn_mask=None, is_causal=False),
        dict(attn_mask=None, is_causal=True),
        dict(attn_mask=mask, is_causal=True),
    ):
        out = argmax_attention(q, k, v, enable_gqa=True, causal_alignment=align, **kw)
        expected = brute_force_hard(q, k, v, kw["attn_mask"], bool(kw["is_causal"]), align)
        assert torch.equal(out, expected), kw


def test_hard_gqa_equals_mha_with_repeated_kv() -> None:
    q, k, v = make_qkv(2, 6, 2, 7, 13, 24)
    out = argmax_attention(q, k, v, enable_gqa=True, is_causal=True)
    k3, v3 = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    assert torch.equal(out, argmax_attention(q, k3, v3, is_causal=True))


@pytest.mark.parametrize("align", ["upper_left", "lower_right"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_softmax_mode_is_sdpa_with_scale_over_tau(tau: float, align: Any) -> None:
    q, k, v = make_qkv(2, 4, 2, 7, 13, 24)
    mask = torch.randn(2, 1, 7, 13)
    kw: dict[str, Any] = dict(
        attn_mask=mask, is_causal=True, enable_gqa=True, causal_alignment=align
    )
    out = argmax_attention(q, k, v, mode="softmax", tau=tau, **kw)
    # a float mask is part of the scores, so tau divides it too
    kw["attn_mask"] = mask / tau
    expected = sdpa_reference(q, k, v, scale=24**-0.5 / tau, **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_softmax_mode_tends_to_hard_as_tau_goes_to_zero() -> None:
    q, k, v = make_qkv(2, 4, 2, 7, 13, 24, dtype=torch.float64)
    hard = argmax_attention(q, k, v, enable_gqa=True)
    errors = [
        (argmax_attention(q, k, v, enable_gqa=True, mode="softmax", tau=tau) - hard).abs().amax()
        for tau in (1.0, 0.1, 0.01, 1e-3, 1e-4)
    ]
    assert all(b <= a for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("mode", ["gumbel", "gumbel_hard"])
def test_gumbel_is_reproducible_with_a_seeded_generator(mode: str) -> None:
    q, k, v = make_qkv(2, 4, 2, 7, 13, 24)

    def run(seed: int) -> Tensor:
        return argmax_attention(
            q, k, v, mode=mode, enable_gqa=True, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_gumbel_hard_outputs_exact_rows_of_v_and_is_the_sharp_limit_of_gumbel() -> None:
    q, k, v = make_qkv(2, 4, 2, 7, 13, 24)
    out = argmax_attention(
        q, k, v, mode="gumbel_hard", enable_gqa=True, generator=torch.Generator().manual_seed(3)
    )
    # every output row [b, h, i] equals some row v[b, h // 2, j] exactly
    v_per_head = v.repeat_interleave(2, dim=1)  # [B, H, S, Ev]
    hits = (out[:, :, :, None, :] == v_per_head[:, :, None, :, :]).all(-1)  # [B, H, L, S]
    assert hits.any(-1).all()
    # the noise often overturns the noiseless choice, but not always
    hard = argmax_attention(q, k, v, enable_gqa=True)
    assert not torch.equal(out, hard)
    # same noise (same seed), soft and sharp: gumbel -> gumbel_hard
    sharp = argmax_attention(
        q,
        k,
        v,
        mode="gumbel",
        tau=1e-4,
        enable_gqa=True,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(sharp, out, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_hard_returns_exact_rows(dtype: torch.dtype) -> None:
    """Half inputs select the key of the largest *exact* score and return its value row.

    The expected rows come from an independent float64 argmax of the same half values
    (not from the op's own cast). The second part separates scores that only a wider
    dtype resolves: 1024 + 0.25 rounds to 1024 in fp16 (spacing 1) and bf16 (spacing 8),
    so scores formed in the input dtype tie and pick key 0 instead of key 1.
    """
    q, k, v = make_qkv(1, 2, 2, 5, 9, 24)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    out = argmax_attention(qh, kh, vh)
    assert out.dtype == dtype
    scores = qh.double() @ kh.double().transpose(-2, -1)  # [1, 2, 5, 9], one head each
    index = scores.argmax(-1, keepdim=True).expand(-1, -1, -1, vh.shape[-1])
    assert torch.equal(out, torch.gather(vh, 2, index))

    q2 = torch.tensor([[[[1.0, 1.0]]]], dtype=dtype)
    k2 = torch.tensor([[[[1024.0, 0.0], [1024.0, 0.25]]]], dtype=dtype)
    v2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=dtype)
    assert torch.equal(argmax_attention(q2, k2, v2), v2[:, :, 1:])


# --- gradients ----------------------------------------------------------------------


def test_hard_grads_q_k_are_zero_tensors_and_v_only_on_selected_rows() -> None:
    q, k, v = make_qkv(2, 4, 2, 7, 13, 24, requires_grad=True)
    out = argmax_attention(q, k, v, enable_gqa=True, is_causal=True)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert torch.equal(q.grad, torch.zeros_like(q))
    assert torch.equal(k.grad, torch.zeros_like(k))

    # grad_v = onehotᵀ grad_out, summed over the query heads that share a kv head
    scores = torch.einsum("bhle,bhse->bhls", q, k.repeat_interleave(2, dim=1)).detach()
    scores = scores.masked_fill(~torch.ones(7, 13, dtype=torch.bool).tril(), float("-inf"))
    onehot = torch.nn.functional.one_hot(scores.argmax(-1), 13).to(grad_out.dtype)
    expected = torch.einsum("bhls,bhlv->bhsv", onehot, grad_out).unflatten(1, (2, 2)).sum(2)
    torch.testing.assert_close(v.grad, expected)
    selected = onehot.unflatten(1, (2, 2)).sum((2, 3)) > 0  # [B, Hk, S]
    assert torch.equal(v.grad.abs().sum(-1) > 0, selected)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_straight_through_forward_is_hard_backward_is_softmax(tau: float) -> None:
    kw: dict[str, Any] = dict(enable_gqa=True, is_causal=True, causal_alignment="lower_right")

    def grads(mode: str) -> tuple[Tensor, tuple[Tensor, ...]]:
        torch.manual_seed(7)
        q, k, v = make_qkv(2, 4, 2, 5, 9, 24, requires_grad=True)
        out = argmax_attention(q, k, v, mode=mode, tau=tau, **kw)
        out.backward(torch.ones_like(out))
        return out.detach(), tuple(t.grad for t in (q, k, v))  # type: ignore[misc]

    st_out, (st_dq, st_dk, st_dv) = grads("straight_through")
    hard_out, (_, _, hard_dv) = grads("hard")
    _, (soft_dq, soft_dk, _) = grads("softmax")
    assert torch.equal(st_out, hard_out)
    torch.testing.assert_close(st_dq, soft_dq)
    torch.testing.assert_close(st_dk, soft_dk)
    torch.testing.assert_close(st_dv, hard_dv)
    assert st_dq.abs().sum() > 0


def test_gumbel_hard_backward_is_gumbel_softmax_backward() -> None:
    def grads(mode: str) -> tuple[Tensor, ...]:
        torch.manual_seed(7)
        q, k, v = make_qkv(2, 4, 2, 5, 9, 24, requires_grad=True)
        gen = torch.Generator().manual_seed(11)
        out = argmax_attention(q, k, v, mode=mode, tau=0.7, enable_gqa=True, generator=gen)
        out.backward(torch.ones_like(out))
        return tuple(t.grad for t in (q, k))  # type: ignore[misc]

    torch.testing.assert_close(grads("gumbel_hard"), grads("gumbel"))


@pytest.mark.parametrize(
    "mode, wrt",
    [
        ("hard", "qkv"),  # piecewise constant: numeric and analytic dq, dk are both 0
        ("straight_through", "v"),  # dq, dk are a surrogate, not the true derivative
        ("gumbel_hard", "v"),
        ("softmax", "qkv"),
        ("gumbel", "qkv"),
    ],
)
def test_gradcheck_float64(mode: str, wrt: str) -> None:
    q, k, v = make_qkv(1, 4, 2, 3, 5, 6, Ev=4, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    inputs = {"q": q, "k": k, "v": v}

    def fn(*args: Tensor) -> Tensor:
        given = {**inputs, **dict(zip(wrt, args, strict=True))}
        gen = torch.Generator().manual_seed(5)  # re-seeded: the same noise every call
        return argmax_attention(
            **given, attn_mask=mask, mode=mode, tau=0.8, generator=gen, enable_gqa=True
        )

    args = tuple(inputs[name].clone().requires_grad_() for name in wrt)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


# --- bad input ----------------------------------------------------------------------


def _bad_cases() -> list[Any]:
    q, k, v = torch.zeros(2, 4, 3, 8), torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 6)
    ok: dict[str, Any] = dict(q=q, k=k, v=v, enable_gqa=True)
    return [
        pytest.param(
            {**ok, "mode": "argmin"},
            ValueError,
            r"unknown argmax mode 'argmin'; known: 'hard', 'straight_through'",
            id="mode",
        ),
        pytest.param(
            {**ok, "mode": None}, TypeError, r"argmax mode name must be a str", id="mode-none"
        ),
        pytest.param({**ok, "tau": 0.0}, ValueError, r"tau must be .*> 0, got 0.0", id="tau-zero"),
        pytest.param({**ok, "tau": -1.0}, ValueError, r"tau must be", id="tau-negative"),
        pytest.param({**ok, "tau": float("nan")}, ValueError, r"tau must be", id="tau-nan"),
        pytest.param({**ok, "tau": "1"}, TypeError, r"tau must be a float", id="tau-str"),
        pytest.param(
            {**ok, "scale": -1.0},
            ValueError,
            r"scale must be a finite number > 0, got -1.0: a negative scale turns the argmax "
            "into an argmin",
            id="scale-negative",
        ),
        pytest.param({**ok, "scale": 0.0}, ValueError, r"scale must be .*> 0", id="scale-0"),
        pytest.param({**ok, "scale": math.nan}, ValueError, r"scale must be", id="scale-nan"),
        pytest.param({**ok, "scale": "2"}, TypeError, r"scale must be a float", id="scale-str"),
        pytest.param({**ok, "generator": 0}, TypeError, r"generator must be", id="generator"),
        pytest.param(
            {**ok, "q": torch.zeros(4, 3, 8)}, ValueError, r"q must have 4 dims", id="q-rank"
        ),
        pytest.param(
            {**ok, "k": torch.zeros(2, 3, 5, 8), "v": torch.zeros(2, 3, 5, 6)},
            ValueError,
            r"H=4.*Hk=3",
            id="gqa-ratio",
        ),
        pytest.param({**ok, "enable_gqa": False}, ValueError, r"enable_gqa", id="gqa-off"),
        pytest.param(
            {**ok, "attn_mask": torch.ones(3, 4, dtype=torch.bool)},
            ValueError,
            r"attn_mask of shape \(3, 4\)",
            id="mask-shape",
        ),
        pytest.param(
            {**ok, "v": torch.zeros(2, 2, 5, 6, dtype=torch.int64)},
            TypeError,
            r"v must have a floating dtype",
            id="v-int",
        ),
        pytest.param(
            {**ok, "k": torch.zeros(2, 2, 5, 8, dtype=torch.float16)},
            TypeError,
            r"share one dtype.*k=torch.float16",
            id="mixed",
        ),
        pytest.param(
            {**ok, "causal_alignment": "lower-right"},
            ValueError,
            r"causal_alignment 'lower-right'",
            id="alignment",
        ),
    ]


@pytest.mark.parametrize("kwargs, error, match", _bad_cases())
def test_bad_input_raises_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        argmax_attention(**kwargs)


@pytest.mark.parametrize("mode", ARGMAX_MODES)
def test_nan_scores_give_nan_rows_only(mode: str) -> None:
    """NaN in one query row: that row is NaN in every mode (argmax would report some
    index for it and return a finite value row); the other rows are unchanged."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, 4)
    q[0, 1, 3, 0] = math.nan
    g = torch.Generator().manual_seed(0)
    out = argmax_attention(q, k, v, mode=mode, generator=g)
    clean = q.clone()
    clean[0, 1, 3] = 0.0
    ref = argmax_attention(clean, k, v, mode=mode, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out[0, 1, 3]).all()
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 1, 3] = False
    torch.testing.assert_close(out[keep], ref[keep])
