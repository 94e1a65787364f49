"""attnkit.decoding: the einsum decoding steps against each other, full attention and the layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from einops import rearrange
from torch import Tensor

import attnkit
from attnkit import decoding
from attnkit.decoding import gqa_step, mha_step, mqa_step

F64 = torch.float64


def _weights(d: int, h: int, g: int, k: int, v: int, dtype: torch.dtype = F64) -> dict[str, Tensor]:
    """GQA-layout weights: W_q [h, d, k], W_k [g, d, k], W_v [g, d, v], W_o [h, v, d]."""
    return {
        "W_q": torch.randn(h, d, k, dtype=dtype) / math.sqrt(d),
        "W_k": torch.randn(g, d, k, dtype=dtype) / math.sqrt(d),
        "W_v": torch.randn(g, d, v, dtype=dtype) / math.sqrt(d),
        "W_o": torch.randn(h, v, d, dtype=dtype) / math.sqrt(h * v),
    }


def _cache(
    b: int, g: int, n: int, k: int, v: int, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor]:
    return torch.randn(b, g, n, k, dtype=dtype), torch.randn(b, g, n, v, dtype=dtype)


# ---- the three variants agree where they coincide ----------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize(("b", "d", "h", "k", "v"), [(2, 12, 4, 5, 3), (1, 7, 1, 7, 7)])
def test_mqa_equals_gqa_with_one_group(n: int, b: int, d: int, h: int, k: int, v: int) -> None:
    w = _weights(d, h, 1, k, v)
    K, V = _cache(b, 1, n, k, v)
    x = torch.randn(b, d, dtype=F64)
    y_g, K_g, V_g = gqa_step(x, K, V, **w, n_groups=1)
    y_m, K_m, V_m = mqa_step(x, K[:, 0], V[:, 0], w["W_q"], w["W_k"][0], w["W_v"][0], w["W_o"])
    torch.testing.assert_close(y_m, y_g)
    torch.testing.assert_close(K_m, K_g[:, 0])
    torch.testing.assert_close(V_m, V_g[:, 0])
    assert K_m.shape == (b, n + 1, k) and V_m.shape == (b, n + 1, v)


@pytest.mark.parametrize("n", [0, 1, 9])
@pytest.mark.parametrize(("b", "d", "h", "k", "v"), [(3, 12, 6, 2, 5), (1, 5, 1, 3, 4)])
def test_gqa_with_h_groups_equals_mha(n: int, b: int, d: int, h: int, k: int, v: int) -> None:
    w = _weights(d, h, h, k, v)
    K, V = _cache(b, h, n, k, v)
    x = torch.randn(b, d, dtype=F64)
    y_g, K_g, V_g = gqa_step(x, K, V, **w, n_groups=h)
    y_m, K_m, V_m = mha_step(x, K, V, **w)
    torch.testing.assert_close(y_m, y_g)
    torch.testing.assert_close(K_m, K_g)
    torch.testing.assert_close(V_m, V_g)
    assert K_m.shape == (b, h, n + 1, k) and V_m.shape == (b, h, n + 1, v)


def test_empty_cache_attends_only_to_the_new_token() -> None:
    # With n = 0 the softmax has one key: weight 1, so y = sum_h v_h W_o[h].
    b, d, h, g, k, v = 2, 8, 4, 2, 3, 5
    w = _weights(d, h, g, k, v)
    x = torch.randn(b, d, dtype=F64)
    y, K, V = gqa_step(x, *_cache(b, g, 0, k, v), **w, n_groups=g)
    new_v = torch.einsum("bd,gdv->bgv", x, w["W_v"])  # [b, g, v]
    per_head = new_v.repeat_interleave(h // g, dim=1)  # [b, h, v], head i in group i // (h/g)
    torch.testing.assert_close(y, torch.einsum("bhv,hvd->bd", per_head, w["W_o"]))
    assert K.shape == (b, g, 1, k) and V.shape == (b, g, 1, v)


# ---- a loop of steps is causal attention over the projected sequence ----------------------


def _full_causal(x: Tensor, w: dict[str, Tensor], g: int) -> Tensor:
    """Causal softmax attention of the whole sequence x [b, T, d], via attnkit.sdpa."""
    q = torch.einsum("btd,hdk->bhtk", x, w["W_q"])  # [b, h, T, k]
    k = torch.einsum("btd,gdk->bgtk", x, w["W_k"])  # [b, g, T, k]
    v = torch.einsum("btd,gdv->bgtv", x, w["W_v"])  # [b, g, T, v]
    o = attnkit.sdpa(q, k, v, is_causal=True, enable_gqa=True)  # [b, h, T, v]
    # torch's own SDPA as a second opinion on the same projections
    o_torch = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(o, o_torch)
    return torch.einsum("bhtv,hvd->btd", o, w["W_o"])  # [b, T, d]


Stepper = Callable[[Tensor, Tensor, Tensor, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]


def _stepper(kind: str, g: int) -> Stepper:
    """The step function of ``kind`` on GQA-layout weights and a GQA-layout cache."""

    def mha(x: Tensor, K: Tensor, V: Tensor, w: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return mha_step(x, K, V, **w)

    def mqa(x: Tensor, K: Tensor, V: Tensor, w: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        y, K1, V1 = mqa_step(x, K[:, 0], V[:, 0], w["W_q"], w["W_k"][0], w["W_v"][0], w["W_o"])
        return y, K1[:, None], V1[:, None]

    def gqa(x: Tensor, K: Tensor, V: Tensor, w: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return gqa_step(x, K, V, **w, n_groups=g)

    return {"mha": mha, "mqa": mqa, "gqa": gqa}[kind]


@pytest.mark.parametrize(
    ("kind", "h", "g"),
    [("mha", 4, 4), ("mqa", 4, 1), ("gqa", 6, 2), ("gqa", 6, 3), ("gqa", 5, 5)],
    ids=lambda p: str(p),
)
def test_steps_equal_full_causal_attention(kind: str, h: int, g: int) -> None:
    b, T, d, k, v = 2, 11, 10, 3, 5
    w = _weights(d, h, g, k, v)
    x = torch.randn(b, T, d, dtype=F64)
    step = _stepper(kind, g)
    K, V = _cache(b, g, 0, k, v)
    ys = []
    for t in range(T):
        y, K, V = step(x[:, t], K, V, w)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, dim=1), _full_causal(x, w, g))
    assert K.shape == (b, g, T, k)


# ---- against the nn.Module ----------------------------------------------------------------


def _module_weights(mha: Any) -> tuple[dict[str, Tensor], int, int]:
    """nn.Linear weights [out, in] of a MultiHeadAttention -> einsum layout; (weights, g, k)."""
    h, g = mha.n_heads, mha.n_kv_heads
    k = mha.q_proj.out_features // h
    w = {
        "W_q": rearrange(mha.q_proj.weight, "(h k) d -> h d k", h=h),
        "W_k": rearrange(mha.k_proj.weight, "(g k) d -> g d k", g=g),
        "W_v": rearrange(mha.v_proj.weight, "(g v) d -> g d v", g=g),
        "W_o": rearrange(mha.out_proj.weight, "d (h v) -> h v d", h=h),
    }
    return {n: t.detach() for n, t in w.items()}, g, k


@pytest.mark.parametrize(
    ("h", "n_kv"), [(4, 4), (4, 2), (4, 1), (3, 3)], ids=["mha", "gqa", "mqa", "h3"]
)
def test_steps_agree_with_multihead_attention_decode(h: int, n_kv: int) -> None:
    from attnkit.layers.attention import MultiHeadAttention

    b, d, T, prefill = 2, 12, 9, 4
    mha = MultiHeadAttention(d, h, n_kv_heads=n_kv, bias=False, is_causal=True).to(F64).eval()
    w, g, k = _module_weights(mha)
    x = torch.randn(b, T, d, dtype=F64)

    cache = mha.new_cache(b, dtype=F64)
    with torch.no_grad():
        outs = [mha(x[:, :prefill], cache=cache)]
        outs += [mha(x[:, t : t + 1], cache=cache) for t in range(prefill, T)]
        full = mha(x)
    y_module = torch.cat(outs, dim=1)  # [b, T, d]

    kind = "mha" if g == h else "mqa" if g == 1 else "gqa"
    step = _stepper(kind, g)
    K, V = _cache(b, g, 0, k, w["W_v"].shape[-1])
    ys = []
    for t in range(T):
        y, K, V = step(x[:, t], K, V, w)
        ys.append(y)
    y_steps = torch.stack(ys, dim=1)
    torch.testing.assert_close(y_steps, y_module)
    torch.testing.assert_close(y_steps, full)
    assert cache.seq_len == T


# ---- bad input ----------------------------------------------------------------------------


def _good(
    b: int = 2, d: int = 8, h: int = 4, g: int = 2, k: int = 3, v: int = 5, n: int = 3
) -> dict[str, Any]:
    K, V = _cache(b, g, n, k, v)
    return {"x": torch.randn(b, d, dtype=F64), "prev_K": K, "prev_V": V, **_weights(d, h, g, k, v)}


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        (
            "W_k",
            torch.zeros(2, 8, 4, dtype=F64),
            r"W_k must be \[g, d, k\] = \[g=2, d=8, k=3\], got shape \(2, 8, 4\)",
        ),
        (
            "W_k",
            torch.zeros(3, 8, 3, dtype=F64),
            r"W_k must be \[g, d, k\] = \[g=2, d=8, k=3\], got shape \(3, 8, 3\)",
        ),
        (
            "W_q",
            torch.zeros(4, 9, 3, dtype=F64),
            r"W_q must be \[h, d, k\] = \[h, d=8, k\], got shape \(4, 9, 3\)",
        ),
        ("W_v", torch.zeros(2, 7, 5, dtype=F64), r"W_v must be \[g, d, v\] = \[g=2, d=8, v\]"),
        (
            "W_o",
            torch.zeros(4, 4, 8, dtype=F64),
            r"W_o must be \[h, v, d\] = \[h=4, v=5, d=8\], got shape \(4, 4, 8\)",
        ),
        (
            "x",
            torch.zeros(2, 1, 8, dtype=F64),
            r"x must be \[b, d\] = \[b, d\], got shape \(2, 1, 8\)",
        ),
        (
            "prev_K",
            torch.zeros(3, 2, 3, 3, dtype=F64),
            r"prev_K must be \[b, g, n, k\] = \[b=2, g=2, n, k=3\]",
        ),
        (
            "prev_V",
            torch.zeros(2, 2, 4, 5, dtype=F64),
            r"prev_V must be \[b, g, n, v\] = \[b=2, g=2, n=3, v=5\], got shape \(2, 2, 4, 5\)",
        ),
    ],
    ids=lambda p: p if isinstance(p, str) and len(p) < 10 else "",
)
def test_gqa_bad_shapes_name_the_tensor(name: str, bad: Tensor, message: str) -> None:
    args = _good()
    args[name] = bad
    with pytest.raises(ValueError, match=message):
        gqa_step(**args, n_groups=2)


def test_mha_and_mqa_bad_shapes() -> None:
    a = _good(g=4)
    with pytest.raises(ValueError, match=r"W_k must be \[h, d, k\] = \[h=4, d=8, k=3\]"):
        mha_step(a["x"], a["prev_K"], a["prev_V"], a["W_q"], a["W_k"][:2], a["W_v"], a["W_o"])
    with pytest.raises(ValueError, match=r"prev_K must be \[b, h, n, k\] = \[b=2, h=4, n, k=3\]"):
        mha_step(a["x"], a["prev_K"][:, :1], a["prev_V"], a["W_q"], a["W_k"], a["W_v"], a["W_o"])
    m = _good(g=1)
    K, V = m["prev_K"][:, 0], m["prev_V"][:, 0]
    with pytest.raises(
        ValueError, match=r"W_k must be \[d, k\] = \[d=8, k=3\], got shape \(1, 8, 3\)"
    ):
        mqa_step(m["x"], K, V, m["W_q"], m["W_k"], m["W_v"][0], m["W_o"])
    with pytest.raises(ValueError, match=r"prev_K must be \[b, n, k\]"):
        mqa_step(m["x"], m["prev_K"], V, m["W_q"], m["W_k"][0], m["W_v"][0], m["W_o"])


def test_bad_groups_and_dtypes() -> None:
    a = _good(h=4, g=2)
    with pytest.raises(ValueError, match=r"n_groups must be >= 1 and divide the query heads h=4"):
        gqa_step(**a, n_groups=3)
    with pytest.raises(ValueError, match=r"n_groups"):
        gqa_step(**a, n_groups=0)
    with pytest.raises(TypeError, match=r"n_groups must be an int"):
        gqa_step(**a, n_groups=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must share one dtype"):
        gqa_step(**{**a, "x": a["x"].float()}, n_groups=2)
    with pytest.raises(TypeError, match=r"W_o must be a torch.Tensor"):
        gqa_step(**{**a, "W_o": a["W_o"].tolist()}, n_groups=2)
    with pytest.raises(TypeError, match=r"x must have a floating dtype"):
        gqa_step(**{**a, "x": a["x"].long()}, n_groups=2)


# ---- specs and precision ------------------------------------------------------------------


@pytest.fixture
def recorded_specs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    specs: list[str] = []
    real = torch.einsum

    def spy(spec: str, *operands: Tensor) -> Tensor:
        specs.append(spec)
        return real(spec, *operands)

    monkeypatch.setattr(decoding.torch, "einsum", spy)
    yield specs


def test_each_step_runs_exactly_its_exported_einsums(recorded_specs: list[str]) -> None:
    a = _good(g=4)
    mha_step(a["x"], a["prev_K"], a["prev_V"], a["W_q"], a["W_k"], a["W_v"], a["W_o"])
    assert recorded_specs == list(decoding.MHA_EINSUMS.values())
    recorded_specs.clear()
    m = _good(g=1)
    mqa_step(
        m["x"], m["prev_K"][:, 0], m["prev_V"][:, 0], m["W_q"], m["W_k"][0], m["W_v"][0], m["W_o"]
    )
    assert recorded_specs == list(decoding.MQA_EINSUMS.values())
    recorded_specs.clear()
    gqa_step(**_good(g=2), n_groups=2)
    assert recorded_specs == list(decoding.GQA_EINSUMS.values())


def test_bfloat16_matches_float64() -> None:
    a = _good(b=3, d=16, h=4, g=2, k=4, v=4, n=50)
    y64, _, _ = gqa_step(**a, n_groups=2)
    a16 = {n: t.to(torch.bfloat16) for n, t in a.items()}
    y16, K16, _ = gqa_step(**a16, n_groups=2)
    assert y16.dtype == torch.bfloat16 and K16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), y64, atol=3e-2, rtol=3e-2)
