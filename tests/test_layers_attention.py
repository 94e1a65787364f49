"""MultiHeadAttention: MHA/GQA/MQA, d_v != d_k, every backend, masks, torch parity, decoding."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attnkit import feature_maps
from attnkit.layers.attention import MultiHeadAttention, backends
from attnkit.layers.cache import KVCache, LinearState

D_MODEL, N_HEADS = 32, 4

#: id -> constructor keywords; every backend, several kernels and feature maps.
BACKEND_CASES: dict[str, dict[str, Any]] = {
    "softmax": {"backend": "softmax"},
    "argmax-hard": {"backend": "argmax", "backend_options": {"mode": "hard"}},
    "kernel-polynomial": {
        "backend": "kernel",
        "backend_options": {"sim": "polynomial", "sim_kwargs": {"degree": 2, "c": 1.0}},
    },
    "kernel-softmax": {"backend": "kernel", "backend_options": {"sim": "softmax"}},
    "linear-elu": {"backend": "linear", "feature_map": "elu"},
    "linear-taylor": {"backend": "linear", "feature_map": "taylor"},
    "linear-polynomial": {"backend": "linear", "feature_map": "polynomial"},
    "linear-favor": {
        "backend": "linear",
        "feature_map": ("favor", {"num_features": 64, "seed": 0}),
    },
}
KV_HEADS = {"MHA": None, "GQA2": 2, "MQA": 1}


def _build(case: str, n_kv_heads: int | None = None, **kw: Any) -> MultiHeadAttention:
    opts = dict(BACKEND_CASES[case])
    if isinstance(opts.get("feature_map"), tuple):
        name, fm_kwargs = opts["feature_map"]
        opts["feature_map"] = feature_maps.get(name, dim=D_MODEL // N_HEADS, **fm_kwargs)
    return MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads, **opts, **kw)


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "n_kv"), list(KV_HEADS.items()), ids=list(KV_HEADS))
def test_projection_widths(kind: str, n_kv: int | None) -> None:
    mha = MultiHeadAttention(64, 8, n_kv_heads=n_kv)
    hk = 8 if n_kv is None else n_kv
    assert (mha.n_heads, mha.n_kv_heads, mha.d_k, mha.d_v) == (8, hk, 8, 8)
    assert mha.q_proj.weight.shape == (64, 64)
    assert mha.k_proj.weight.shape == (hk * 8, 64)
    assert mha.v_proj.weight.shape == (hk * 8, 64)
    assert mha.out_proj.weight.shape == (64, 64)
    assert mha.backend == "softmax" and mha.is_causal is False


def _loop_reference(
    mha: MultiHeadAttention, x: Tensor, context: Tensor | None = None, keep: Tensor | None = None
) -> Tensor:
    """Plain per-head loop, slicing each projection by its own head width (d_k or d_v)."""
    src = x if context is None else context
    H, Hk, dk, dv = mha.n_heads, mha.n_kv_heads, mha.d_k, mha.d_v
    q, k, v = mha.q_proj(x), mha.k_proj(src), mha.v_proj(src)
    heads = []
    for h in range(H):
        g = h // (H // Hk)  # the key/value head that query head h shares
        qh = q[..., h * dk : (h + 1) * dk]
        kh = k[..., g * dk : (g + 1) * dk]
        vh = v[..., g * dv : (g + 1) * dv]
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(dk)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        heads.append(scores.softmax(-1) @ vh)
    return mha.out_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize(("kind", "n_kv"), list(KV_HEADS.items()), ids=list(KV_HEADS))
def test_value_heads_twice_as_wide_as_key_heads(kind: str, n_kv: int | None) -> None:
    """d_v = 2 d_model / h: W_v maps d_model -> 2 d_model, so W_o must map 2 d_model -> d_model."""
    d_model, h = 16, 4
    mha = MultiHeadAttention(d_model, h, n_kv_heads=n_kv, d_v=2 * d_model // h)
    assert (mha.d_k, mha.d_v) == (4, 8)
    if n_kv is None:
        assert mha.v_proj.weight.shape == (2 * d_model, d_model)
    assert mha.out_proj.weight.shape == (d_model, 2 * d_model)
    x, ctx = torch.randn(2, 5, d_model), torch.randn(2, 7, d_model)
    torch.testing.assert_close(mha(x), _loop_reference(mha, x))
    torch.testing.assert_close(mha(x, ctx), _loop_reference(mha, x, ctx))
    causal = MultiHeadAttention(d_model, h, n_kv_heads=n_kv, d_k=3, d_v=10, is_causal=True)
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(causal(x), _loop_reference(causal, x, keep=keep))


def test_gqa_equals_mha_with_repeated_key_value_weights() -> None:
    gqa = MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=2, d_v=6)
    mha = MultiHeadAttention(D_MODEL, N_HEADS, d_v=6)
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            width = src.weight.shape[0] // 2
            # Query head h uses key/value head h // 2: repeat each kv head twice.
            rows = torch.arange(N_HEADS).div(2, rounding_mode="floor")
            idx = (rows[:, None] * width + torch.arange(width)).reshape(-1)
            dst.weight.copy_(src.weight[idx])
            dst.bias.copy_(src.bias[idx])
    x = torch.randn(2, 6, D_MODEL)
    torch.testing.assert_close(gqa(x), mha(x))


# --------------------------------------------------------------------------------------
# Parity with torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------


def _torch_twin(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(mha.d_model, mha.n_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    return ref.eval()


MASK_CASES = [
    "none",
    "bool",
    "float",
    "bool-3d",
    "float-4d",
    "padding",
    "bool+padding",
    "float+padding",
    "causal",
    "causal+padding",
    "causal+bool",
]


@pytest.mark.parametrize("masks", MASK_CASES)
@pytest.mark.parametrize("attention", ["self", "cross"])
def test_matches_torch_multihead_attention(attention: str, masks: str) -> None:
    B, L, H = 3, 5, N_HEADS
    S = L if attention == "self" else 7
    mha = MultiHeadAttention(D_MODEL, H, is_causal="causal" in masks).eval()
    ref = _torch_twin(mha)
    x = torch.randn(B, L, D_MODEL)
    ctx = None if attention == "self" else torch.randn(B, S, D_MODEL)

    ours: dict[str, Tensor] = {}
    theirs: dict[str, Tensor] = {}
    keep = torch.rand(L, S) > 0.3
    keep[:, 0] = True  # every query keeps key 0: no fully masked rows (torch gives NaN)
    if masks.startswith("bool") or masks == "causal+bool":
        ours["attn_mask"], theirs["attn_mask"] = keep, ~keep  # torch: True = masked
    if masks == "bool-3d":
        keep3 = torch.rand(B, L, S) > 0.3
        keep3[..., 0] = True
        ours["attn_mask"] = keep3
        theirs["attn_mask"] = ~keep3.repeat_interleave(H, dim=0)  # torch: [B*H, L, S]
    if masks.startswith("float"):
        add = torch.randn(L, S).masked_fill(~keep, float("-inf"))
        ours["attn_mask"] = theirs["attn_mask"] = add
    if masks == "float-4d":
        add4 = torch.randn(B, H, L, S)
        ours["attn_mask"], theirs["attn_mask"] = add4, add4.reshape(B * H, L, S)
    if masks.startswith("causal"):
        causal = torch.ones(L, S, dtype=torch.bool).tril()  # upper-left, like torch
        prev = theirs.get("attn_mask")
        theirs["attn_mask"] = ~causal if prev is None else prev | ~causal
    if "padding" in masks:
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, -2:] = True
        pad[2, 3:] = True
        ours["key_padding_mask"] = theirs["key_padding_mask"] = pad
        if masks.startswith("float"):  # torch wants both masks of one type
            theirs["key_padding_mask"] = torch.zeros(B, S).masked_fill(pad, float("-inf"))

    src = x if ctx is None else ctx
    with torch.no_grad():
        want, _ = ref(x, src, src, need_weights=False, **theirs)
        got = mha(x, ctx, **ours)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Every backend: shapes, gradients, incremental decoding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backward_gives_finite_gradients_to_every_projection(case: str) -> None:
    mha = _build(case, n_kv_heads=2, d_v=12, is_causal=True)
    x = torch.randn(2, 6, D_MODEL, requires_grad=True)
    out = mha(x)
    assert out.shape == (2, 6, D_MODEL)
    out.square().sum().backward()
    for name, p in mha.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # v and the output projection always get a nonzero gradient; argmax's q, k do not.
    assert mha.v_proj.weight.grad.abs().sum() > 0  # type: ignore[union-attr]
    if case != "argmax-hard":
        assert mha.q_proj.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


#: id -> lengths of the successive calls (first = prefill) over a T = 9 sequence.
SCHEDULES = {
    "prefill1-steps": [1] * 9,
    "prefill5-steps": [5, 1, 1, 1, 1],
    "prefill2-chunk3-steps-chunk2": [2, 3, 1, 1, 2],
    "prefill-all": [9],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES.values()), ids=list(SCHEDULES))
@pytest.mark.parametrize(("kind", "n_kv"), list(KV_HEADS.items()), ids=list(KV_HEADS))
@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_prefill_then_decode_equals_full_causal_forward(
    case: str, kind: str, n_kv: int | None, schedule: list[int]
) -> None:
    # (q.k + 1)^2 gets close to 0 for some queries, where num / den is ill-conditioned
    # and the recurrent step and the chunked form round differently (errors ~1e-4 in
    # fp32): that case checks the algebra in float64.
    dtype = torch.float64 if case == "linear-polynomial" else torch.float32
    mha = _build(case, n_kv_heads=n_kv, d_v=12, is_causal=True).eval().to(dtype)
    B, T = 2, sum(schedule)
    x = torch.randn(B, T, D_MODEL, dtype=dtype)
    cache = mha.new_cache(B, max_len=T)
    assert isinstance(cache, LinearState if case.startswith("linear") else KVCache)
    with torch.no_grad():
        full = mha(x)
        parts, start = [], 0
        for n in schedule:
            parts.append(mha(x[:, start : start + n], cache=cache))
            start += n
    assert cache.seq_len == T
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_non_causal_cache_lets_new_queries_see_every_key(case: str) -> None:
    """Without is_causal the last chunk attends all T keys, like the full forward's rows."""
    mha = _build(case, n_kv_heads=2).eval()
    x = torch.randn(2, 8, D_MODEL)
    cache = mha.new_cache(2)
    with torch.no_grad():
        mha(x[:, :5], cache=cache)
        last = mha(x[:, 5:], cache=cache)
        full = mha(x)
    torch.testing.assert_close(last, full[:, 5:], atol=2e-5, rtol=1e-4)


def test_masks_while_decoding_match_the_full_forward() -> None:
    """Left-padded batch: key_padding_mask and attn_mask cover the cached keys too."""
    mha = MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=2, is_causal=True).eval()
    B, T = 2, 7
    x = torch.randn(B, T, D_MODEL)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, :2] = True  # sequence 1 is left-padded by two tokens
    keep = torch.rand(T, T) > 0.2
    keep.fill_diagonal_(True)
    with torch.no_grad():
        full = mha(x, attn_mask=keep, key_padding_mask=pad)
        cache = mha.new_cache(B)
        parts = [mha(x[:, :4], attn_mask=keep[:4, :4], key_padding_mask=pad[:, :4], cache=cache)]
        for t in range(4, T):
            parts.append(
                mha(
                    x[:, t : t + 1],
                    attn_mask=keep[t : t + 1, : t + 1],
                    key_padding_mask=pad[:, : t + 1],
                    cache=cache,
                )
            )
    # Padded queries 0 and 1 of sequence 1 may attend no key: both paths give them 0.
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["softmax", "linear-elu"])
def test_gradients_through_the_cache_equal_the_full_forward(case: str) -> None:
    mha = _build(case, n_kv_heads=2, is_causal=True)
    x = torch.randn(2, 6, D_MODEL)
    w = torch.randn(2, 6, D_MODEL)
    (mha(x) * w).sum().backward()
    want = {n: p.grad.clone() for n, p in mha.named_parameters()}  # type: ignore[union-attr]
    mha.zero_grad()
    cache = mha.new_cache(2)
    out = torch.cat(
        [mha(x[:, :3], cache=cache)] + [mha(x[:, t : t + 1], cache=cache) for t in (3, 4, 5)], 1
    )
    (out * w).sum().backward()
    for n, p in mha.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_failed_call_leaves_the_cache_unchanged() -> None:
    def sim(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # Positive for the first 3 keys, negative weights once a 4th is cached.
        return torch.exp(q @ k.transpose(-2, -1) / 4) * (1.0 if k.shape[-2] <= 3 else -1.0)

    mha = MultiHeadAttention(D_MODEL, N_HEADS, backend="kernel", backend_options={"sim": sim})
    cache = mha.new_cache(1)
    x = torch.randn(1, 3, D_MODEL)
    with torch.no_grad():
        mha(x, cache=cache)
        with pytest.raises(ValueError, match=r"denominator <= 0"):
            mha(x[:, :1], cache=cache)
    assert cache.seq_len == 3


@pytest.mark.parametrize("backend", ["softmax", "argmax", "kernel"])
def test_fully_masked_query_outputs_zero_in_every_quadratic_backend(backend: str) -> None:
    """A query with no key to attend gets 0 from the kernel backend too, as from softmax."""
    mha = MultiHeadAttention(D_MODEL, N_HEADS, backend=backend, bias=False)
    x = torch.randn(2, 5, D_MODEL)
    keep = torch.ones(2, 5, 5, dtype=torch.bool)
    keep[0, 3] = False  # batch 0, query 3: every key masked
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True  # batch 1: every key padded
    out = mha(x, attn_mask=keep, key_padding_mask=pad)
    torch.testing.assert_close(out[0, 3], torch.zeros(D_MODEL))  # no bias: W_o 0 = 0
    torch.testing.assert_close(out[1], torch.zeros(5, D_MODEL))
    assert torch.isfinite(out).all()


def test_dropout_acts_in_training_only() -> None:
    mha = MultiHeadAttention(D_MODEL, N_HEADS, dropout=0.5)
    x = torch.randn(2, 6, D_MODEL)
    plain = MultiHeadAttention(D_MODEL, N_HEADS)
    plain.load_state_dict(mha.state_dict())
    assert not torch.allclose(mha.train()(x), plain(x))
    torch.testing.assert_close(mha.eval()(x), plain(x))


def test_new_cache_follows_parameters_dtype() -> None:
    mha = MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=1).double()
    cache = mha.new_cache(2, max_len=4)
    assert isinstance(cache, KVCache)
    assert (cache.dtype, cache.max_len, cache.n_kv_heads) == (torch.float64, 4, 1)
    assert mha.new_cache(2, dtype=torch.float32).dtype == torch.float32  # type: ignore[union-attr]


def test_favor_projection_is_a_drawn_buffer_of_the_module() -> None:
    mha = _build("linear-favor")
    assert mha.state_dict()["feature_map.projection"].shape == (64, D_MODEL // N_HEADS)


def test_favor_by_name_gives_every_layer_its_own_projection_of_width_d_k() -> None:
    """Built by name, each layer draws W for its d_k from the global RNG, at construction."""
    torch.manual_seed(0)
    a = MultiHeadAttention(D_MODEL, N_HEADS, backend="linear", feature_map="favor")
    b = MultiHeadAttention(D_MODEL, N_HEADS, backend="linear", feature_map="favor")
    wa, wb = a.state_dict()["feature_map.projection"], b.state_dict()["feature_map.projection"]
    assert wa.shape == wb.shape == (256, D_MODEL // N_HEADS)
    assert not torch.equal(wa, wb)
    torch.manual_seed(0)
    a2 = MultiHeadAttention(D_MODEL, N_HEADS, backend="linear", feature_map="favor")
    assert torch.equal(a2.state_dict()["feature_map.projection"], wa)
    assert isinstance(a.feature_map, feature_maps.Favor)
    assert a.feature_map.scale(D_MODEL // N_HEADS) == (D_MODEL // N_HEADS) ** -0.25
    # An instance drawn for another width is refused at construction, not in forward.
    with pytest.raises(ValueError, match=r"input width D=8 does not match the projection width 5"):
        MultiHeadAttention(
            D_MODEL, N_HEADS, backend="linear", feature_map=feature_maps.get("favor", dim=5)
        )
    with pytest.raises(ValueError, match=r"favor map has no projection: build it with dim=8"):
        MultiHeadAttention(D_MODEL, N_HEADS, backend="linear", feature_map=feature_maps.Favor())


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_kv_heads": 3}, ValueError, r"n_heads=4, n_kv_heads=3"),
        ({"n_kv_heads": 0}, ValueError, r"n_kv_heads must be >= 1, got 0"),
        ({"n_kv_heads": 8}, ValueError, r"n_heads=4, n_kv_heads=8"),
        ({"d_model": 30}, ValueError, r"d_model=30 is not divisible by n_heads=4"),
        ({"backend": "flash"}, ValueError, r"unknown attention backend 'flash'; known: 'softmax'"),
        ({"feature_map": "elu"}, ValueError, r"only used by the 'linear' backend"),
        ({"backend_options": {"tau": 0.1}}, ValueError, r"unknown backend_options \['tau'\]"),
        (
            {"backend": "argmax", "backend_options": {"mode": "maxish"}},
            ValueError,
            r"unknown argmax mode 'maxish'",
        ),
        (
            {"backend": "kernel", "backend_options": {"sim": "cosine"}},
            ValueError,
            r"unknown similarity 'cosine'",
        ),
        (
            {"backend": "kernel", "backend_options": {"sim_kwargs": {"degree": 2}}},
            TypeError,
            r"similarity 'softmax'",
        ),
        ({"backend": "linear", "dropout": 0.1}, ValueError, r"no attention dropout"),
        ({"backend": "linear", "feature_map": "nope"}, ValueError, r"unknown feature map 'nope'"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ],
    ids=[
        "kv-heads-not-divisor",
        "kv-heads-zero",
        "kv-heads-too-many",
        "d_model-indivisible",
        "unknown-backend",
        "feature-map-non-linear",
        "unknown-option",
        "argmax-mode",
        "kernel-sim",
        "kernel-sim-kwargs",
        "linear-dropout",
        "unknown-feature-map",
        "dropout-1",
    ],
)
def test_constructor_rejects_bad_configurations(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {"d_model": D_MODEL, "n_heads": N_HEADS, **kwargs}
    with pytest.raises(error, match=match):
        MultiHeadAttention(**args)


def test_explicit_head_widths_allow_any_d_model() -> None:
    mha = MultiHeadAttention(30, 4, d_k=7)
    assert (mha.d_k, mha.d_v) == (7, 7)
    assert mha(torch.randn(1, 3, 30)).shape == (1, 3, 30)


def test_backends_are_listed() -> None:
    assert backends() == ["softmax", "argmax", "kernel", "linear"]


def _call(mha: MultiHeadAttention, **kw: Any) -> Tensor:
    kw.setdefault("x", torch.randn(2, 3, D_MODEL))
    return mha(**kw)


BAD_CALLS = {
    "x-width": (
        {"x": torch.randn(2, 3, 31)},
        ValueError,
        r"x must have last axis d_model=32, got 31",
    ),
    "x-2d": ({"x": torch.randn(3, D_MODEL)}, ValueError, r"x must have 3 dims \[B, L, d_model\]"),
    "x-int": ({"x": torch.ones(2, 3, D_MODEL, dtype=torch.long)}, TypeError, r"floating dtype"),
    "context-batch": (
        {"context": torch.randn(1, 4, D_MODEL)},
        ValueError,
        r"x has B=2, context has B=1",
    ),
    "context-width": ({"context": torch.randn(2, 4, 8)}, ValueError, r"context must have last"),
    "mask-shape": (
        {"attn_mask": torch.ones(3, 4, dtype=torch.bool)},
        ValueError,
        r"attn_mask must have shape \[L, S\] = \[3, 3\] .* axis S has size 4",
    ),
    "mask-rank": ({"attn_mask": torch.ones(3, dtype=torch.bool)}, ValueError, r"\[L, S\], \[B, L"),
    "mask-int": ({"attn_mask": torch.ones(3, 3, dtype=torch.long)}, TypeError, r"bool"),
    "padding-float": ({"key_padding_mask": torch.zeros(2, 3)}, TypeError, r"True = padding"),
    "padding-shape": (
        {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)},
        ValueError,
        r"key_padding_mask must have shape \[B, S\] = \[2, 3\], got \[2, 4\]",
    ),
}


@pytest.mark.parametrize(("kw", "error", "match"), list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_forward_rejects_bad_input(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _call(MultiHeadAttention(D_MODEL, N_HEADS), **kw)


def test_cache_errors() -> None:
    soft = MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=2, is_causal=True)
    lin = MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=2, backend="linear", is_causal=True)
    x = torch.randn(2, 3, D_MODEL)
    with pytest.raises(ValueError, match=r"built for batch=3, x has batch=2"):
        soft(x, cache=soft.new_cache(3))
    with pytest.raises(TypeError, match=r"'linear' decodes with a LinearState .* KVCache"):
        lin(x, cache=soft.new_cache(2))
    with pytest.raises(TypeError, match=r"'softmax' decodes with a KVCache .* LinearState"):
        soft(x, cache=lin.new_cache(2))
    with pytest.raises(ValueError, match=r"n_kv_heads=4, this layer n_kv_heads=2"):
        soft(x, cache=MultiHeadAttention(D_MODEL, N_HEADS).new_cache(2))
    with pytest.raises(ValueError, match=r"d_k=4, d_v=4; this layer has d_k=8, d_v=8"):
        soft(x, cache=KVCache(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"cross-attention"):
        soft(x, context=x, cache=soft.new_cache(2))
    for mha in (soft, lin):
        cache = mha.new_cache(2, max_len=4)
        mha(x, cache=cache)
        with pytest.raises(ValueError, match=r"need length 5, but max_len=4"):
            mha(x[:, :2], cache=cache)
        assert cache.seq_len == 3


@pytest.mark.parametrize("mask", ["attn_mask", "key_padding_mask"])
def test_linear_backend_rejects_masks(mask: str) -> None:
    lin = MultiHeadAttention(D_MODEL, N_HEADS, backend="linear")
    value = (
        torch.ones(3, 3, dtype=torch.bool)
        if mask == "attn_mask"
        else torch.zeros(2, 3, dtype=torch.bool)
    )
    with pytest.raises(ValueError, match=r"'linear' supports no attn_mask or key_padding_mask"):
        _call(lin, **{mask: value})
