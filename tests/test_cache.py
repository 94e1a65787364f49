"""KVCache and LinearState: growth, views, limits, sizes (MHA vs GQA vs MQA), autograd."""

from __future__ import annotations

import pytest
import torch

from attnkit.layers.attention import MultiHeadAttention
from attnkit.layers.cache import KVCache, LinearState
from attnkit.ops.linear import LinearAttentionState


def _kv(B: int = 2, Hk: int = 3, L: int = 1, d_k: int = 4, d_v: int = 5, **kw: object):
    return torch.randn(B, Hk, L, d_k, **kw), torch.randn(B, Hk, L, d_v, **kw)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------
# KVCache: contents, views, growth
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths",
    [[1] * 20, [5, 1, 1, 7, 1, 16, 2], [33], [0, 3, 0, 1]],
    ids=["steps1x20", "mixed-chunks", "one-big", "with-empty"],
)
def test_update_returns_everything_cached_like_cat(lengths: list[int]) -> None:
    cache = KVCache(2, 3, 4, 5, capacity=4)
    ks, vs = [], []
    for n in lengths:
        k, v = _kv(L=n)
        ks.append(k)
        vs.append(v)
        k_all, v_all = cache.update(k, v)
        torch.testing.assert_close(k_all, torch.cat(ks, dim=2), rtol=0, atol=0)
        torch.testing.assert_close(v_all, torch.cat(vs, dim=2), rtol=0, atol=0)
    assert cache.seq_len == sum(lengths)


def test_update_returns_views_of_one_buffer_until_it_grows() -> None:
    cache = KVCache(1, 2, 4, 4, capacity=4)
    ptrs = []
    for _ in range(8):
        k_all, v_all = cache.update(*_kv(B=1, Hk=2, d_v=4))
        assert k_all._base is not None and v_all._base is not None  # views, not copies
        ptrs.append((k_all.untyped_storage().data_ptr(), cache.capacity))
    # Tokens 1-4 live in the capacity-4 buffer, tokens 5-8 in the capacity-8 one.
    assert [c for _, c in ptrs] == [4, 4, 4, 4, 8, 8, 8, 8]
    assert len({p for p, _ in ptrs[:4]}) == 1 and len({p for p, _ in ptrs[4:]}) == 1
    assert ptrs[0][0] != ptrs[4][0]


def test_capacity_doubles_and_prefix_is_copied_once_per_growth() -> None:
    cache = KVCache(1, 1, 2, 2, capacity=1)
    storages = set()
    with torch.no_grad():
        for _ in range(100):
            k_all, _ = cache.update(*_kv(B=1, Hk=1, d_k=2, d_v=2))
            storages.add(k_all.untyped_storage().data_ptr())
    assert cache.capacity == 128
    assert len(storages) == 8  # capacities 1, 2, 4, ..., 128: one allocation (and copy) each


def test_big_append_jumps_to_the_next_power_of_two_capacity() -> None:
    cache = KVCache(1, 1, 2, 2, capacity=4)
    cache.update(*_kv(B=1, Hk=1, L=9, d_k=2, d_v=2))
    assert cache.capacity == 16


def test_update_never_calls_torch_cat(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cat(*args: object, **kwargs: object) -> None:
        raise AssertionError("KVCache.update must not call torch.cat")

    cache = KVCache(2, 3, 4, 5, capacity=2)
    monkeypatch.setattr(torch, "cat", no_cat)
    for _ in range(10):
        cache.update(*_kv())
    assert cache.seq_len == 10


def test_reset_and_crop_keep_the_buffers() -> None:
    cache = KVCache(2, 3, 4, 5)
    k, v = _kv(L=6)
    cache.update(k, v)
    cache.crop(4)
    assert cache.seq_len == 4
    k2, v2 = _kv(L=1)
    k_all, _ = cache.update(k2, v2)
    torch.testing.assert_close(k_all, torch.cat([k[:, :, :4], k2], dim=2), rtol=0, atol=0)
    capacity = cache.capacity
    cache.reset()
    assert (cache.seq_len, cache.nbytes, cache.capacity) == (0, 0, capacity)
    k_all, _ = cache.update(k2, v2)
    torch.testing.assert_close(k_all, k2, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"crop to length=3: only 1 tokens"):
        cache.crop(3)


# --------------------------------------------------------------------------------------
# KVCache: limits and bad input
# --------------------------------------------------------------------------------------


def test_max_len_caps_capacity_and_rejects_decoding_past_it() -> None:
    cache = KVCache(2, 3, 4, 5, capacity=16, max_len=10)
    assert cache.capacity == 10
    cache.update(*_kv(L=7))
    cache.update(*_kv(L=3))
    assert (cache.seq_len, cache.capacity) == (10, 10)
    with pytest.raises(ValueError, match=r"need length 11, but max_len=10"):
        cache.update(*_kv(L=1))
    assert cache.seq_len == 10  # unchanged


def test_growth_never_exceeds_max_len() -> None:
    cache = KVCache(1, 1, 2, 2, capacity=4, max_len=6)
    for _ in range(6):
        cache.update(*_kv(B=1, Hk=1, d_k=2, d_v=2))
    assert cache.capacity == 6


@pytest.mark.parametrize(
    ("k_shape", "v_shape", "match"),
    [
        ((3, 3, 1, 4), (3, 3, 1, 5), r"built for batch=2, k has batch=3"),
        ((2, 1, 1, 4), (2, 1, 1, 5), r"k must have shape \[B, Hk, L, d_k\] = \[2, 3, 1, 4\]"),
        ((2, 3, 1, 6), (2, 3, 1, 5), r"k must have shape .* got \[2, 3, 1, 6\]"),
        ((2, 3, 1, 4), (2, 3, 1, 4), r"v must have shape \[B, Hk, L, d_v\] = \[2, 3, 1, 5\]"),
        ((2, 3, 2, 4), (2, 3, 1, 5), r"v must have shape .* = \[2, 3, 2, 5\]"),
        ((2, 3, 4), (2, 3, 1, 5), r"k must have 4 dims"),
    ],
    ids=["batch", "heads", "d_k", "d_v", "length", "rank"],
)
def test_update_rejects_mismatched_shapes(
    k_shape: tuple[int, ...], v_shape: tuple[int, ...], match: str
) -> None:
    cache = KVCache(2, 3, 4, 5)
    with pytest.raises(ValueError, match=match):
        cache.update(torch.randn(k_shape), torch.randn(v_shape))
    assert cache.seq_len == 0


def test_dtype_and_device_follow_the_first_update() -> None:
    cache = KVCache(2, 3, 4, 5, dtype=torch.float32)
    assert cache.dtype == torch.float32 and cache.device == torch.device("cpu")
    k_all, _ = cache.update(*_kv(dtype=torch.float64))
    assert cache.dtype == k_all.dtype == torch.float64
    assert cache.nbytes == 2 * 3 * 1 * (4 + 5) * 8
    with pytest.raises(TypeError, match=r"holds torch.float64 .* dtype torch.float32"):
        cache.update(*_kv())
    with pytest.raises(TypeError, match=r"k and v must share one dtype"):
        KVCache(2, 3, 4, 5).update(_kv()[0], _kv(dtype=torch.float64)[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch": 0}, ValueError, r"batch must be >= 1, got 0"),
        ({"capacity": 0}, ValueError, r"capacity must be >= 1"),
        ({"max_len": 0}, ValueError, r"max_len must be >= 1"),
        ({"d_k": 2.0}, TypeError, r"d_k must be an int"),
        ({"dtype": torch.int64}, TypeError, r"floating torch.dtype"),
    ],
    ids=["batch0", "capacity0", "max_len0", "float-width", "int-dtype"],
)
def test_constructor_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"batch": 2, "n_kv_heads": 3, "d_k": 4, "d_v": 5, **kwargs}
    with pytest.raises(error, match=match):
        KVCache(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Sizes: MQA stores 1/h of MHA
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_v", [None, 16], ids=["dv=dk", "dv=2dk"])
def test_nbytes_mha_vs_gqa_vs_mqa(d_v: int | None) -> None:
    B, d_model, h, n = 3, 64, 8, 11
    sizes = {}
    for name, n_kv in [("MHA", None), ("GQA2", 2), ("MQA", 1)]:
        mha = MultiHeadAttention(d_model, h, n_kv_heads=n_kv, d_v=d_v, is_causal=True)
        cache = mha.new_cache(B)
        assert isinstance(cache, KVCache)
        with torch.no_grad():
            mha(torch.randn(B, n - 1, d_model), cache=cache)
            mha(torch.randn(B, 1, d_model), cache=cache)
        hk = h if n_kv is None else n_kv
        assert cache.nbytes == B * hk * n * (mha.d_k + mha.d_v) * 4
        sizes[name] = cache.nbytes
    assert sizes["MHA"] == 4 * sizes["GQA2"] == 8 * sizes["MQA"]  # h / g and h


def test_nbytes_at_scale_on_the_meta_device() -> None:
    """B=8, d_model=1024, h=16 (d_k = d_v = 64), n=8192 tokens, fp32, nothing allocated."""
    B, h, d, n = 8, 16, 64, 8192
    sizes = {}
    for name, hk in [("MHA", h), ("GQA2", 2), ("MQA", 1)]:
        cache = KVCache(B, hk, d, d, device="meta")
        k = torch.empty(B, hk, 1024, d, device="meta")
        for _ in range(n // 1024):
            cache.update(k, k)
        assert (cache.seq_len, cache.capacity) == (n, n)
        sizes[name] = cache.nbytes
    assert sizes == {"MHA": 512 * 2**20, "GQA2": 64 * 2**20, "MQA": 32 * 2**20}


# --------------------------------------------------------------------------------------
# Autograd through the cache
# --------------------------------------------------------------------------------------


def test_backward_through_several_updates_matches_cat() -> None:
    ks = [torch.randn(1, 2, n, 3, requires_grad=True) for n in (4, 1, 1, 2)]
    vs = [torch.randn(1, 2, n, 3, requires_grad=True) for n in (4, 1, 1, 2)]
    w = torch.randn(1, 2, 8, 3)

    cache = KVCache(1, 2, 3, 3, capacity=2)
    loss = torch.zeros(())
    for k, v in zip(ks, vs, strict=True):
        k_all, v_all = cache.update(k, v)
        n = k_all.shape[2]
        loss = loss + (k_all * w[:, :, :n]).sum() + (v_all**2).sum()
    loss.backward()
    got = [t.grad.clone() for t in ks + vs]  # type: ignore[union-attr]

    for t in ks + vs:
        t.grad = None
    loss = torch.zeros(())
    for i in range(len(ks)):
        k_all, v_all = torch.cat(ks[: i + 1], dim=2), torch.cat(vs[: i + 1], dim=2)
        n = k_all.shape[2]
        loss = loss + (k_all * w[:, :, :n]).sum() + (v_all**2).sum()
    loss.backward()
    for g, t in zip(got, ks + vs, strict=True):
        torch.testing.assert_close(g, t.grad)


# --------------------------------------------------------------------------------------
# LinearState
# --------------------------------------------------------------------------------------


def test_linear_state_has_constant_size_whatever_the_length() -> None:
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, backend="linear", is_causal=True)
    state = mha.new_cache(2)
    assert isinstance(state, LinearState)
    assert (state.seq_len, state.nbytes, state.state) == (0, 0, None)
    with torch.no_grad():
        mha(torch.randn(2, 9, 32), cache=state)
        mha(torch.randn(2, 1, 32), cache=state)
        after_10 = state.nbytes
        mha(torch.randn(2, 989, 32), cache=state)
        mha(torch.randn(2, 1, 32), cache=state)
    assert state.seq_len == 1000
    assert state.nbytes == after_10 == 2 * 2 * 8 * (8 + 1) * 4  # S [2,2,8,8] + z [2,2,8], fp32
    state.reset()
    assert (state.seq_len, state.nbytes, state.state) == (0, 0, None)


def test_linear_state_checks_max_len_batch_and_shapes() -> None:
    state = LinearState(2, 3, max_len=5)
    S, z = torch.zeros(2, 3, 7, 4), torch.zeros(2, 3, 7)
    state.advance(LinearAttentionState(S, z), 5)
    with pytest.raises(ValueError, match=r"need length 6, but max_len=5"):
        state.advance((S, z), 1)
    with pytest.raises(ValueError, match=r"built for batch=2, S has batch=1"):
        LinearState(2).advance((S[:1], z[:1]), 1)
    with pytest.raises(ValueError, match=r"n_kv_heads=3"):
        LinearState(2, 3).advance((S[:, :1], z[:, :1]), 1)
    with pytest.raises(ValueError, match=r"z must have shape \[B, Hk, D'\] = \[2, 3, 7\]"):
        LinearState().advance((S, z[..., :6]), 1)
    assert state.seq_len == 5


def test_linear_state_keeps_the_accumulation_dtype_of_its_inputs() -> None:
    """dtype=float64 means float64 states; a float32 one is refused, not silently kept."""
    S32, z32 = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3)
    state = LinearState(1, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"holds the state of torch.float64 inputs, kept in"):
        state.advance((S32, z32), 1)
    state.advance((S32.double(), z32.double()), 1)
    half = LinearState(1, 2, dtype=torch.bfloat16)  # bf16 inputs accumulate in fp32
    half.advance((S32, z32), 1)
    with pytest.raises(TypeError, match=r"got S of dtype torch.bfloat16"):
        half.advance((S32.bfloat16(), z32.bfloat16()), 1)
    LinearState(1, 2).advance((S32.double(), z32.double()), 1)  # no dtype: not checked
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype"):
        LinearState(dtype=torch.int32)


def test_linear_layer_decoding_into_a_float64_cache_of_a_float32_model_raises() -> None:
    mha = MultiHeadAttention(8, 2, backend="linear", is_causal=True)
    cache = mha.new_cache(1, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"kept in torch\.float64; got S of dtype torch\.float32"):
        mha(torch.randn(1, 1, 8), cache=cache)
