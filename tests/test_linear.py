"""linear_attention and linear_attention_step (equation (6) of attnkit.ops.linear).

Every form is pinned to the quadratic reference kernel_attention(sim="linear") and to
each other (chunked == recurrent, split + state == one call): outputs, final states
and all gradients, for every registered feature map, on awkward shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit import feature_maps
from attnkit.ops.kernel import kernel_attention
from attnkit.ops.linear import (
    MAX_AUTO_CHUNK,
    MIN_AUTO_CHUNK,
    LinearAttentionState,
    auto_chunk_size,
    linear_attention,
    linear_attention_step,
)
from helpers import make_qkv, shape_id, ulp_distance

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]
MAPS = feature_maps.available()


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-10} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}


def make_map(name: str, E: int) -> feature_maps.FeatureMap:
    """A small-width-friendly instance of every registered map (fixed seeds)."""
    if name == "favor":
        return feature_maps.get("favor", num_features=32, dim=E, seed=0)
    if name == "polynomial":
        return feature_maps.get("polynomial", degree=2, c=1.0)
    return feature_maps.get(name)


def inputs_for(phi, shape, dtype):
    return make_qkv(*shape, dtype=dtype, positive=not phi.positive)


def fresh(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def run_with_grads(fn, tensors, cotangents):
    """Outputs of fn(*tensors) (a flat list) and grads of sum <output, cotangent>."""
    xs = fresh(*tensors)
    outs = fn(*xs)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
    gs = torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs], list(gs)


def assert_close_scaled(a, b, what, rtol, atol):
    """assert_close with atol relative to the largest entry of ``b``.

    Sums of many terms (unnormalised outputs, gradients through exp features) have
    rounding errors proportional to their largest magnitude, not to each entry.
    """
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_all_close(fn_a, fn_b, tensors, rtol, atol):
    """fn_a and fn_b agree on every output and on the gradients wrt every input."""
    outs = fn_a(*tensors)
    cots = [torch.randn_like(o) for o in outs]
    outs_a, grads_a = run_with_grads(fn_a, tensors, cots)
    outs_b, grads_b = run_with_grads(fn_b, tensors, cots)
    for i, (a, b) in enumerate(zip(outs_a, outs_b, strict=True)):
        assert_close_scaled(a, b, f"output {i}", rtol, atol)
    for i, (a, b) in enumerate(zip(grads_a, grads_b, strict=True)):
        assert_close_scaled(a, b, f"grad wrt input {i}", rtol, atol)


SHAPES = [
    # (B, H, Hk, L, S, E, Ev); causal tests use S = L
    (1, 1, 1, 1, 1, 6, 4),
    (2, 4, 2, 13, 13, 6, 5),
    (1, 3, 1, 37, 20, 12, 6),
    (2, 2, 2, 16, 7, 4, 3),
]


SHAPE_IDS = [shape_id(s) for s in SHAPES]


# ----------------------------------------------------------------- linear == kernel_attention


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", MAPS)
def test_linear_equals_kernel_reference(name, shape, is_causal, dtype, normalize) -> None:
    B, H, Hk, L, _S, E, Ev = shape
    if is_causal:
        shape = (B, H, Hk, L, L, E, Ev)
    phi = make_map(name, E)
    q, k, v = inputs_for(phi, shape, dtype)

    def fast(q, k, v):
        o, _ = linear_attention(
            q, k, v, phi, is_causal=is_causal, normalize=normalize, chunk_size=4, enable_gqa=True
        )
        return [o]

    def ref(q, k, v):
        return [
            kernel_attention(
                q,
                k,
                v,
                sim="linear",
                sim_kwargs={"feature_map": phi},
                is_causal=is_causal,
                normalize=normalize,
                enable_gqa=True,
            )
        ]

    assert_all_close(fast, ref, (q, k, v), **tol(dtype))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_polynomial_map_equals_polynomial_kernel(dtype, is_causal) -> None:
    """Quadratic map: phi(q).phi(k) = (q.k + 1)^2, width 1 + D + D(D+1)/2."""
    phi = feature_maps.get("polynomial", degree=2, c=1.0)
    assert phi.out_dim(6) == 1 + 6 + 6 * 7 // 2
    q, k, v = make_qkv(2, 4, 2, 11, 11, 6, 5, dtype=dtype, positive=True)

    def fast(q, k, v):
        return [
            linear_attention(q, k, v, phi, is_causal=is_causal, chunk_size=3, enable_gqa=True)[0]
        ]

    def ref(q, k, v):
        kw = {"degree": 2, "c": 1.0}
        return [
            kernel_attention(
                q, k, v, sim="polynomial", sim_kwargs=kw, is_causal=is_causal, enable_gqa=True
            )
        ]

    assert_all_close(fast, ref, (q, k, v), **tol(dtype))


def test_default_feature_map_is_elu_and_state_matches_sums() -> None:
    q, k, v = make_qkv(2, 2, 1, 9, 9, 4, 3, dtype=F64)
    o, state = linear_attention(q, k, v, output_final_state=True, enable_gqa=True)
    ref = kernel_attention(q, k, v, sim="linear", enable_gqa=True)  # default feature map: elu + 1
    torch.testing.assert_close(o, ref, **tol(F64))
    assert isinstance(state, LinearAttentionState)
    fk = torch.nn.functional.elu(k) + 1
    torch.testing.assert_close(state.S, fk.transpose(-2, -1) @ v, **tol(F64))
    torch.testing.assert_close(state.z, fk.sum(-2), **tol(F64))
    _, causal_state = linear_attention(
        q, k, v, is_causal=True, output_final_state=True, enable_gqa=True
    )
    torch.testing.assert_close(causal_state.S, state.S, **tol(F64))
    assert linear_attention(q, k, v, enable_gqa=True)[1] is None


def test_eps_is_clamp_not_shift() -> None:
    """With relu and a zero denominator the output is 0 (num 0 / eps), else exact."""
    q, k, v = make_qkv(1, 1, 1, 4, 5, 3, 2, dtype=F64, positive=True)
    q[0, 0, 2] = -1.0  # relu(q_2) = 0: numerator and denominator vanish
    o, _ = linear_attention(q, k, v, "relu", eps=1e-3, enable_gqa=True)
    ref = kernel_attention(
        q, k, v, sim="linear", sim_kwargs={"feature_map": "relu"}, eps=1e-3, enable_gqa=True
    )
    torch.testing.assert_close(o, ref, **tol(F64))
    assert torch.equal(o[0, 0, 2], torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="1 of 4 rows"):
        kernel_attention(q, k, v, sim="linear", sim_kwargs={"feature_map": "relu"}, enable_gqa=True)


# ------------------------------------------------------------------ chunked == recurrent


def step_loop(q, k, v, phi, state=None, normalize=True):
    outs = []
    for t in range(q.shape[2]):
        o, state = linear_attention_step(
            q[:, :, t : t + 1],
            k[:, :, t : t + 1],
            v[:, :, t : t + 1],
            state,
            phi,
            normalize,
            enable_gqa=True,
        )
        outs.append(o)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 13, 64, None], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("name", MAPS)
def test_chunked_causal_equals_step_loop(name, chunk_size, with_state) -> None:
    B, H, Hk, L, E, Ev = 2, 4, 2, 13, 6, 5
    phi = make_map(name, E)
    q, k, v = inputs_for(phi, (B, H, Hk, L, L, E, Ev), F64)
    Dp = phi.out_dim(E)
    S0 = torch.rand(B, Hk, Dp, Ev, dtype=F64)
    z0 = torch.rand(B, Hk, Dp, dtype=F64) + 1.0
    tensors = (q, k, v, S0, z0) if with_state else (q, k, v)

    def chunked(q, k, v, *state):
        o, st = linear_attention(
            q,
            k,
            v,
            phi,
            is_causal=True,
            chunk_size=chunk_size,
            initial_state=tuple(state) if state else None,
            output_final_state=True,
            enable_gqa=True,
        )
        return [o, st.S, st.z]

    def recurrent(q, k, v, *state):
        o, st = step_loop(q, k, v, phi, LinearAttentionState(*state) if state else None)
        return [o, st.S, st.z]

    assert_all_close(chunked, recurrent, tensors, **tol(F64))


def test_unnormalised_step_loop_equals_chunked() -> None:
    q, k, v = make_qkv(1, 2, 1, 10, 10, 4, 3, dtype=F64)
    o, st = linear_attention(
        q,
        k,
        v,
        "identity",
        is_causal=True,
        normalize=False,
        chunk_size=4,
        output_final_state=True,
        enable_gqa=True,
    )
    o2, st2 = step_loop(q, k, v, "identity", normalize=False)
    torch.testing.assert_close(o, o2, **tol(F64))
    torch.testing.assert_close(st.z, st2.z, **tol(F64))


def test_auto_chunk_size_rule() -> None:
    # C* = 2 D' (M+1) / (D' + M + 1); the largest power of two <= C*, in [32, 128], <= L.
    assert auto_chunk_size(4096, 64, 64) == 64  # elu at D = M = 64: C* = 64.5
    assert auto_chunk_size(4096, 153, 64) == 64  # Taylor at D = 16: C* = 91.2
    assert auto_chunk_size(4096, 256, 64) == 64  # FAVOR+ with 256 features: C* = 103.7
    assert auto_chunk_size(4096, 4, 3) == MIN_AUTO_CHUNK  # C* = 4 -> clamped up
    assert auto_chunk_size(4096, 4096, 4096) == MAX_AUTO_CHUNK
    assert auto_chunk_size(10, 64, 64) == 10 and auto_chunk_size(0, 64, 64) == 1
    q, k, v = make_qkv(1, 1, 1, 150, 150, 4, 3, dtype=F64)
    o, _ = linear_attention(q, k, v, is_causal=True, enable_gqa=True)  # C = 32, 150 = 4 * 32 + 22
    torch.testing.assert_close(
        o, kernel_attention(q, k, v, sim="linear", is_causal=True, enable_gqa=True)
    )


# ------------------------------------------------------------------ split + state == one call


def split_vs_whole(q, k, v, phi, t, is_causal, chunk_size, dtype):
    """Pin `one call` to `first part, then the rest with initial_state`."""

    def whole(q, k, v):
        o, st = linear_attention(
            q,
            k,
            v,
            phi,
            is_causal=is_causal,
            chunk_size=chunk_size,
            output_final_state=True,
            enable_gqa=True,
        )
        return [o, st.S, st.z]

    def split(q, k, v):
        # Causal: split all of q, k, v at token t. Non-causal: split only the keys and
        # values (prefill the state), every query sees all of them in the second call.
        q1, q2 = (q[:, :, :t], q[:, :, t:]) if is_causal else (q, q)
        o1, st1 = linear_attention(
            q1,
            k[:, :, :t],
            v[:, :, :t],
            phi,
            is_causal=is_causal,
            chunk_size=chunk_size,
            output_final_state=True,
            enable_gqa=True,
        )
        o2, st2 = linear_attention(
            q2,
            k[:, :, t:],
            v[:, :, t:],
            phi,
            is_causal=is_causal,
            chunk_size=chunk_size,
            initial_state=st1,
            output_final_state=True,
            enable_gqa=True,
        )
        o = torch.cat([o1, o2], dim=2) if is_causal else o2
        return [o, st2.S, st2.z]

    assert_all_close(whole, split, (q, k, v), **tol(dtype))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", MAPS)
def test_split_with_state_equals_one_call(name, is_causal) -> None:
    B, H, Hk, L, E, Ev = 2, 4, 2, 17, 6, 5
    phi = make_map(name, E)
    q, k, v = inputs_for(phi, (B, H, Hk, L, L, E, Ev), F64)
    for t in (0, 1, 8, 16, 17):
        split_vs_whole(q, k, v, phi, t, is_causal, 5, F64)


@given(
    L=st.integers(0, 24),
    frac=st.floats(0.0, 1.0),
    chunk_size=st.one_of(st.none(), st.integers(1, 9)),
    is_causal=st.booleans(),
    group=st.sampled_from([1, 3]),
)
def test_split_property(L, frac, chunk_size, is_causal, group) -> None:
    t = round(frac * L)
    q, k, v = make_qkv(1, group, 1, L, L, 3, 2, dtype=F64)
    split_vs_whole(q, k, v, "elu", t, is_causal, chunk_size, F64)


# ------------------------------------------------------------------ step


def test_step_attends_to_itself_and_starts_from_zero() -> None:
    q, k, v = make_qkv(2, 2, 1, 1, 1, 4, 3, dtype=F64)
    o, st = linear_attention_step(q, k, v, None, enable_gqa=True)
    # One token, one key: the normalised output is exactly that key's value.
    torch.testing.assert_close(o, v.expand(2, 2, 1, 3), **tol(F64))
    fk = torch.nn.functional.elu(k[:, :, 0]) + 1
    torch.testing.assert_close(st.z, fk, **tol(F64))
    assert st.S.shape == (2, 1, 4, 3)


def test_step_accepts_plain_tuple_state() -> None:
    q, k, v = make_qkv(1, 2, 2, 1, 1, 4, 3)
    S0, z0 = torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4) + 1
    a, sa = linear_attention_step(q, k, v, (S0, z0), enable_gqa=True)
    b, sb = linear_attention_step(q, k, v, LinearAttentionState(S0, z0), enable_gqa=True)
    assert torch.equal(a, b) and torch.equal(sa.S, sb.S)


# ------------------------------------------------------------------ dtypes


@pytest.mark.slow
def test_bf16_long_causal_accumulates_in_fp32() -> None:
    """N = 65536: S, z grow ~N; bf16 sums (8-bit mantissa) would stall near 256."""
    N, E = 65536, 16
    q, k, v = make_qkv(1, 1, 1, N, N, E, E, dtype=torch.bfloat16)
    v = v + 1.0  # a nonzero mean, so outputs stay O(1) and errors are visible
    o, st = linear_attention(q, k, v, is_causal=True, output_final_state=True, enable_gqa=True)
    assert o.dtype == torch.bfloat16 and st.S.dtype == torch.float32
    assert torch.isfinite(o).all()
    ref, ref_st = linear_attention(
        q.double(), k.double(), v.double(), is_causal=True, output_final_state=True, enable_gqa=True
    )
    # Only the final rounding to bf16 remains (unit roundoff 2^-8 = 0.0039 relative);
    # accumulating S, z in bf16 instead gives ~1.7e-2 here.
    torch.testing.assert_close(o.double(), ref, rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(st.S.double(), ref_st.S, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st.z.double(), ref_st.z, rtol=1e-4, atol=1e-3)
    assert ref_st.z.min() > 1e4  # the sums really are large


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_fp16_short(is_causal) -> None:
    """fp16 inputs: the fp32 computation on the same values, rounded once (<= 1 ulp).

    An implementation forming the features or sums in fp16 misses by several units.
    """
    q, k, v = make_qkv(2, 4, 2, 257, 257, 12, 8, dtype=torch.float16)
    o, st = linear_attention(q, k, v, is_causal=is_causal, output_final_state=True, enable_gqa=True)
    assert o.dtype == torch.float16 and st.z.dtype == torch.float32
    ref, _ = linear_attention(q.float(), k.float(), v.float(), is_causal=is_causal, enable_gqa=True)
    assert ulp_distance(o, ref.half()).max() <= 1
    o1, st1 = linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, enable_gqa=True)
    assert o1.dtype == torch.float16 and st1.S.dtype == torch.float32


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradcheck_linear_attention(is_causal) -> None:
    q, k, v = make_qkv(1, 2, 1, 5, 5, 3, 2, dtype=F64)
    S0 = torch.rand(1, 1, 3, 2, dtype=F64)
    z0 = torch.rand(1, 1, 3, dtype=F64) + 1
    args = [t.requires_grad_(True) for t in (q, k, v, S0, z0)]

    def fn(q, k, v, S0, z0):
        o, st = linear_attention(
            q,
            k,
            v,
            is_causal=is_causal,
            chunk_size=2,
            initial_state=(S0, z0),
            output_final_state=True,
            enable_gqa=True,
        )
        return o, st.S, st.z

    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_linear_attention_polynomial() -> None:
    q, k, v = make_qkv(1, 2, 2, 4, 4, 3, 2, dtype=F64, positive=True)
    args = [t.requires_grad_(True) for t in (q, k, v)]

    def fn(q, k, v):
        return linear_attention(
            q, k, v, "polynomial", is_causal=True, chunk_size=3, enable_gqa=True
        )[0]

    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_step() -> None:
    q, k, v = make_qkv(1, 2, 1, 1, 1, 3, 2, dtype=F64)
    S0 = torch.rand(1, 1, 3, 2, dtype=F64)
    z0 = torch.rand(1, 1, 3, dtype=F64) + 1
    args = [t.requires_grad_(True) for t in (q, k, v, S0, z0)]

    def fn(q, k, v, S0, z0):
        o, st = linear_attention_step(q, k, v, (S0, z0), enable_gqa=True)
        return o, st.S, st.z

    assert torch.autograd.gradcheck(fn, args)


# ------------------------------------------------------------------ bad input


def _bad_cases():
    q, k, v = make_qkv(2, 4, 2, 5, 5, 6, 3)
    S0, z0 = torch.zeros(2, 2, 6, 3), torch.zeros(2, 2, 6)
    return [
        ("rank-q", (q[0], k, v), {}, ValueError, r"q must have 4 dims \[B, H, L, E\]"),
        ("batch", (q, k[:1], v[:1]), {}, ValueError, r"q has B=2, k has B=1"),
        ("width", (q, k[..., :5], v), {}, ValueError, r"q has E=6, k has E=5"),
        ("heads-kv", (q, k, v[:, :1]), {}, ValueError, r"k has 2, v has 1"),
        ("gqa-ratio", (q[:, :3], k, v), {}, ValueError, r"H=3, k/v have Hk=2"),
        ("int-dtype", (q, k, v.int()), {}, TypeError, r"v must have a floating dtype"),
        (
            "unknown-map",
            (q, k, v),
            {"feature_map": "nope"},
            ValueError,
            r"unknown feature map 'nope'; known: 'identity'",
        ),
        ("map-type", (q, k, v), {"feature_map": 3}, TypeError, r"feature_map must be"),
        ("chunk-0", (q, k, v), {"chunk_size": 0}, ValueError, r"chunk_size must be.*got 0"),
        ("chunk-float", (q, k, v), {"chunk_size": 2.0}, ValueError, r"positive int, got 2.0"),
        ("chunk-bool", (q, k, v), {"chunk_size": True}, ValueError, r"positive int, got True"),
        ("eps", (q, k, v), {"eps": -1.0}, ValueError, r"eps must be None or a finite float > 0"),
        ("eps-0", (q, k, v), {"eps": 0.0}, ValueError, r"eps must be None or a finite float > 0"),
        ("eps-inf", (q, k, v), {"eps": float("inf")}, ValueError, r"finite float > 0, got inf"),
        (
            "causal-L!=S",
            (q, k[:, :, :4], v[:, :, :4]),
            {"is_causal": True},
            ValueError,
            r"causal linear attention needs as many queries as keys: q has L=5, k has S=4",
        ),
        (
            "state-S-shape",
            (q, k, v),
            {"initial_state": (S0[..., :2], z0)},
            ValueError,
            r"initial_state.S must have shape \[B, Hk, D', Ev\] = \[2, 2, 6, 3\].*"
            r"got \(2, 2, 6, 2\)",
        ),
        (
            "state-z-shape",
            (q, k, v),
            {"initial_state": (S0, z0[:1])},
            ValueError,
            r"initial_state.z must have shape \[B, Hk, D'\] = \[2, 2, 6\].*got \(1, 2, 6\)",
        ),
        (
            "state-width",
            (q, k, v),
            {"feature_map": "polynomial", "initial_state": (S0, z0)},
            ValueError,
            r"= \[2, 2, 28, 3\] \(D' = Polynomial.out_dim\(E=6\) = 28\)",
        ),
        (
            "state-type",
            (q, k, v),
            {"initial_state": S0},
            TypeError,
            r"initial_state must be a LinearAttentionState or a tuple \(S, z\), got Tensor",
        ),
        (
            "state-len",
            (q, k, v),
            {"initial_state": (S0, z0, z0)},
            TypeError,
            r"tuple \(S, z\), got tuple of length 3",
        ),
        (
            "state-int",
            (q, k, v),
            {"initial_state": (S0.long(), z0)},
            TypeError,
            r"initial_state.S must have a floating dtype",
        ),
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [case[1:] for case in _bad_cases()],
    ids=[case[0] for case in _bad_cases()],
)
def test_bad_input(args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        linear_attention(*args, **kwargs, enable_gqa=True)


def test_step_bad_input() -> None:
    q, k, v = make_qkv(2, 4, 2, 1, 1, 6, 3)
    with pytest.raises(ValueError, match=r"takes one token.*L=3 and k length S=1"):
        linear_attention_step(q.expand(2, 4, 3, 6), k, v, None, enable_gqa=True)
    with pytest.raises(ValueError, match=r"state.S must have shape \[B, Hk, D', Ev\]"):
        linear_attention_step(
            q, k, v, (torch.zeros(2, 2, 6, 4), torch.zeros(2, 2, 6)), enable_gqa=True
        )
    with pytest.raises(ValueError, match=r"H=4, k/v have Hk=3"):
        linear_attention_step(
            q, torch.randn(2, 3, 1, 6), torch.randn(2, 3, 1, 3), None, enable_gqa=True
        )
    with pytest.raises(ValueError, match="unknown feature map 'nope'"):
        linear_attention_step(q, k, v, None, "nope", enable_gqa=True)


# ------------------------------------------------------------------ denominators: one policy

FORMS = ["full", "causal-fast", "causal-reference", "step"]


def _run_form(form, q, k, v, phi, **kw):
    """One form of linear attention on q, k, v (step: the last token with the rest as state)."""
    if form == "step":
        _, state = linear_attention(
            q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], phi, output_final_state=True, **kw
        )
        o, _ = linear_attention_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state, phi, **kw)
        return o
    impl = "reference" if form == "causal-reference" else "fast"
    causal = form != "full"
    o, _ = linear_attention(q, k, v, phi, is_causal=causal, implementation=impl, **kw)
    return o


@pytest.mark.parametrize("form", FORMS)
def test_signed_denominator_raises_in_every_form(form) -> None:
    """identity map on random q, k: half the denominators are < 0.

    The old clamp to eps returned num / 1e-6 (outputs ~1e8) here without a word.
    """
    q, k, v = make_qkv(1, 2, 2, 33, 33, 8, 4)
    with pytest.raises(ValueError, match=r"\d+ of \d+ rows have a denominator <= 0.*eps=") as info:
        _run_form(form, q, k, v, "identity", enable_gqa=True)
    assert "Identity is not a positive feature map" in str(info.value)
    # eps is the explicit guard: it clamps instead (and changes those rows).
    o = _run_form(form, q, k, v, "identity", eps=1e-6, enable_gqa=True)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("form", FORMS)
def test_positive_map_underflow_raises_instead_of_zero_rows(form) -> None:
    """elu + 1 of inputs below -17 is exactly 0 in float32: a 0 / 0 row is reported."""
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, 3)
    q, k = -40.0 - q.abs(), -40.0 - k.abs()
    with pytest.raises(ValueError, match=r"rows have a denominator that underflowed to 0"):
        _run_form(form, q, k, v, "elu", enable_gqa=True)


@pytest.mark.parametrize("form", FORMS)
def test_positive_maps_pass_the_check_and_equal_the_reference(form) -> None:
    """Typical inputs pass the check with every positive map and equal the reference."""
    for name in ("elu", "taylor", "favor"):
        phi = make_map(name, 6)
        q, k, v = make_qkv(2, 4, 2, 9, 9, 6, 5, dtype=F64)
        o = _run_form(form, q, k, v, phi, enable_gqa=True)
        ref = kernel_attention(
            q, k, v, sim="linear", sim_kwargs={"feature_map": phi}, is_causal=form != "full",
            enable_gqa=True,
        )  # fmt: skip
        want = ref[:, :, -1:] if form == "step" else ref
        torch.testing.assert_close(o, want, **tol(F64))


def test_guard_clamps_and_the_fast_backward_masks_where_it_clamped() -> None:
    """relu with rows of zero weight: fast == reference on outputs and every gradient."""
    phi = feature_maps.get("relu")
    q, k, v = make_qkv(1, 2, 1, 23, 23, 5, 3, dtype=F64)
    q[:, :, ::3] = -q[:, :, ::3].abs()  # every third query has no positive coordinate
    zero_rows = (torch.relu(q) @ torch.relu(k).sum(-2, keepdim=True).transpose(-2, -1)) == 0
    assert zero_rows.sum() >= 7

    def run(impl):
        def fn(q, k, v):
            o, st = linear_attention(
                q, k, v, phi, is_causal=True, eps=1e-3, chunk_size=4, implementation=impl,
                output_final_state=True, enable_gqa=True,
            )  # fmt: skip
            return [o, st.S, st.z]

        return fn

    assert_all_close(run("fast"), run("reference"), (q, k, v), **tol(F64))


def test_non_causal_without_keys_outputs_zero_like_sdpa() -> None:
    q, k, v = make_qkv(1, 2, 2, 3, 0, 4, 5)
    o, _ = linear_attention(q, k, v)
    assert torch.equal(o, torch.zeros(1, 2, 3, 5))
    torch.testing.assert_close(o, kernel_attention(q, k, v))
    # With a state the queries do attend (to what the state holds).
    state = LinearAttentionState(torch.rand(1, 2, 4, 5), torch.rand(1, 2, 4) + 1)
    o2, _ = linear_attention(q, k, v, initial_state=state)
    assert (o2 != 0).all()


# ------------------------------------------------------------------ grouped-query: opt-in


def test_grouped_query_heads_need_enable_gqa_as_in_sdpa() -> None:
    q, k, v = make_qkv(1, 4, 2, 5, 5, 3, 2)
    calls = {
        "linear_attention": lambda **kw: linear_attention(q, k, v, **kw),
        "causal": lambda **kw: linear_attention(q, k, v, is_causal=True, **kw),
        "step": lambda **kw: linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None,
                                                   **kw),
        "kernel_attention": lambda **kw: kernel_attention(q, k, v, **kw),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"q has 4 heads but k/v have 2; pass enable_gqa=True"):
            call()
        out = call(enable_gqa=True)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape[1] == 4, name
        with pytest.raises(TypeError, match="enable_gqa must be a bool"):
            call(enable_gqa=1)


# ------------------------------------------------------------------ a map whose out_dim lies


class _LyingWidth(feature_maps.FeatureMap):
    """phi(x) = [x, x] but out_dim says D: a custom map with the wrong out_dim."""

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=-1).exp()


@pytest.mark.parametrize("form", FORMS)
def test_wrong_out_dim_is_reported_before_any_matmul(form) -> None:
    q, k, v = make_qkv(1, 2, 2, 7, 7, 3, 2)
    match = r"_LyingWidth must map [qk] of shape .* with D' = out_dim\(E=3\) = 3; got .*6\)"
    with pytest.raises(ValueError, match=match):
        _run_form(form, q, k, v, _LyingWidth(), enable_gqa=True)


# ------------------------------------------------------------------ states are never rounded down


def test_a_wider_state_is_rejected_not_rounded_down() -> None:
    q, k, v = make_qkv(1, 2, 2, 4, 4, 3, 2)
    S64, z64 = torch.rand(1, 2, 3, 2, dtype=F64), torch.rand(1, 2, 3, dtype=F64) + 1
    match = r"initial_state.S has dtype torch.float64, wider than the accumulation dtype"
    with pytest.raises(TypeError, match=match):
        linear_attention(q, k, v, initial_state=(S64, z64), is_causal=True)
    with pytest.raises(TypeError, match=r"state.S has dtype torch.float64"):
        linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], (S64, z64))
    # A narrower state is upcast without loss; the fp64 state with fp64 inputs is fine.
    _, st = linear_attention_step(
        q[:, :, :1], k[:, :, :1], v[:, :, :1], (S64.bfloat16(), z64.bfloat16())
    )
    assert st.S.dtype == torch.float32
    _, st64 = linear_attention_step(
        q[:, :, :1].double(), k[:, :, :1].double(), v[:, :, :1].double(), (S64, z64)
    )
    assert st64.S.dtype == F64


# ------------------------------------------------------------------ FAVOR+ in linear attention


def _favor_log_space_reference(q, k, v, phi, is_causal):
    """exp-kernel weights a_ij = sum_r exp(lq_ir + lk_jr) normalised in log space (float64).

    lq, lk are the unbiased FAVOR+ logits; logsumexp never underflows, so this is the
    exact ratio the stabilised float32 path must reproduce.
    """
    w = phi.projection.double()
    s = phi.scale(q.shape[-1])

    def logits(x):
        xs = x.double() * s
        return xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)

    la = torch.logsumexp(logits(q)[..., :, None, :] + logits(k)[..., None, :, :], dim=-1)
    if is_causal:
        L = q.shape[-2]
        la = la.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(la, dim=-1) @ v.double()


def _favor_inputs(std, N=96, D=64):
    g = torch.Generator().manual_seed(0)
    q, k = (std * torch.randn(1, 1, N, D, generator=g) for _ in range(2))
    return q, k, torch.randn(1, 1, N, 8, generator=g)


def test_favor_large_inputs_give_no_zero_rows() -> None:
    """std-2 inputs at D = 64, m = 256, scale 1: every query logit is below -87 (float32).

    Without the query stabiliser 98% of the output rows were exactly 0; now every row
    matches the float64 log-space reference.
    """
    phi = feature_maps.get("favor", num_features=256, dim=64, input_scale=1.0, seed=0)
    q, k, v = _favor_inputs(2.0)
    o, _ = linear_attention(q, k, v, phi)
    assert (o.abs().amax(-1) > 0).all()
    ref = _favor_log_space_reference(q, k, v, phi, False)
    torch.testing.assert_close(o.double(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("std", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_favor_default_scale_matches_the_log_space_reference(is_causal, std) -> None:
    """With Performer's scale D^-1/4 (the default) inputs up to std 4 are exact to fp32."""
    phi = feature_maps.get("favor", num_features=256, dim=64, seed=0)
    q, k, v = _favor_inputs(std)
    o, _ = linear_attention(q, k, v, phi, is_causal=is_causal)
    ref = _favor_log_space_reference(q, k, v, phi, is_causal)
    torch.testing.assert_close(o.double(), ref, rtol=1e-3, atol=1e-4)


def test_favor_key_underflow_is_an_error_not_a_zero_row() -> None:
    """Keys keep the unbiased form (their scale must be the same in every call that extends
    a state), so at scale 1 and std 2 the first causal rows, which see few keys, can
    underflow: that is reported, never returned as a zero row."""
    phi = feature_maps.get("favor", num_features=256, dim=64, input_scale=1.0, seed=0)
    q, k, v = _favor_inputs(2.0)
    with pytest.raises(ValueError, match=r"rows have a denominator that underflowed to 0"):
        linear_attention(q, k, v, phi, is_causal=True)


def test_favor_by_name_is_the_seed0_map_of_the_input_width() -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 9, 6, 4)
    a, _ = linear_attention(q, k, v, "favor", is_causal=True)
    b, _ = linear_attention(q, k, v, feature_maps.get("favor", dim=6, seed=0), is_causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = kernel_attention(
        q, k, v, sim="linear", sim_kwargs={"feature_map": "favor"}, is_causal=True
    )
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ half-precision range


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_polynomial3_fp16_never_returns_inf(is_causal) -> None:
    """Degree 3, fp16 inputs of std 4: signed denominators near 0 give ratios > 65504.

    Features and sums are float32 (no overflow there); the old clamp then cast
    num / eps to fp16 and returned inf. Now: a clear error naming the rows (eps=None)
    or, with the guard, naming float16 and its range.
    """
    phi = feature_maps.get("polynomial", degree=3, c=1.0)
    q, k, v = (4 * t for t in make_qkv(1, 1, 1, 32, 32, 16, 16))
    q, k, v = q.half(), k.half(), (v / 4).half()
    with pytest.raises(ValueError, match=r"rows have a denominator <= 0"):
        linear_attention(q, k, v, phi, is_causal=is_causal)
    with pytest.raises(ValueError, match=r"outside the range of torch.float16 \(\|x\| <= 65504\)"):
        linear_attention(q, k, v, phi, is_causal=is_causal, eps=1e-6)
    # The same call in float32 is finite: only the final cast could overflow.
    o32, _ = linear_attention(q.float(), k.float(), v.float(), phi, is_causal=is_causal, eps=1e-6)
    assert torch.isfinite(o32).all() and o32.abs().max() > 65504


def test_unnormalised_overflow_raises_instead_of_inf() -> None:
    q, k, v = make_qkv(1, 1, 1, 4, 4, 3, 2)
    with pytest.raises(ValueError, match=r"numerator \(normalize=False\) are not finite"):
        linear_attention(1e14 * q, 1e14 * k, 1e14 * v, "identity", normalize=False)


# ---- the non-causal path in sequence tiles (CPU) ------------------------------------------


@pytest.mark.parametrize("name", ["taylor", "favor", "elu", "polynomial"])
def test_noncausal_tiles_equal_one_pass(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 64 tokens (a tiny budget) == the whole sequence at once (a huge budget):
    outputs, final state and every gradient; GQA, an initial state, L != S, a ragged
    last tile. A tile that dropped or repeated tokens, or a state not carried across
    tiles, changes all of them."""
    from attnkit.ops import linear_chunked

    torch.manual_seed(0)
    phi = attnkit.feature_maps.resolve(name, 8)
    q = torch.randn(2, 4, 150, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 203, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 203, 5, dtype=torch.float64, requires_grad=True)
    init = attnkit.linear_attention(
        q[:, :, :3].detach(), k[:, :, :7].detach(), v[:, :, :7].detach(),
        feature_map=phi, output_final_state=True, enable_gqa=True,
    )[1]  # fmt: skip
    runs = []
    for budget in (1, 2**40):  # tiles of 64 tokens, then one pass
        monkeypatch.setattr(linear_chunked, "CPU_TILE_BYTES", budget)
        o, st = attnkit.linear_attention(
            q, k, v, feature_map=phi, initial_state=init, output_final_state=True,
            enable_gqa=True,
        )  # fmt: skip
        grads = torch.autograd.grad((o * o).sum() + st.S.sum() + st.z.sum(), (q, k, v))
        runs.append((o, st.S, st.z, *grads))
    for tiled, whole in zip(*runs, strict=True):
        torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-12)


def test_noncausal_tiles_check_every_denominator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The denominator check counts the non-positive rows of all tiles, not of one."""
    from attnkit.ops import linear_chunked

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 300, 4), torch.randn(1, 1, 300, 4), torch.randn(1, 1, 300, 4)
    messages = []
    for budget in (1, 2**40):
        monkeypatch.setattr(linear_chunked, "CPU_TILE_BYTES", budget)
        with pytest.raises(ValueError, match="denominator") as err:
            attnkit.linear_attention(q, k, v, feature_map="identity")
        messages.append(str(err.value))
    assert messages[0] == messages[1]
