"""The fast causal linear attention Function against the plain chunked reference.

Outputs, final states and all gradients (q, k, v, initial state) must agree on
awkward shapes, every feature map, GQA ratios, chunk sizes that do and don't divide
the length, with and without normalisation; and the backward must keep O(N (D + M))
bytes per head, not O(N D').
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit import feature_maps
from attnkit.ops import linear_chunked
from attnkit.ops.linear import LinearAttentionState, _causal_chunked
from attnkit.ops.linear_chunked import TilePlan, _scan_, causal_linear_attention, plan_tiles
from helpers import ulp_distance

F64 = torch.float64


def _phi(name: str, E: int) -> feature_maps.FeatureMap:
    if name == "favor":
        return feature_maps.get("favor", num_features=16, dim=E, seed=0)
    return feature_maps.get(name)


def _reference(q, k, v, phi, S0, z0, chunk, normalize, eps):
    """The plain chunked path of attnkit.ops.linear (autograd through einsums)."""
    B, H, L, _ = q.shape
    Hk, M = k.shape[1], v.shape[-1]
    acc = S0.dtype
    fq = phi(q.to(acc)).reshape(B, Hk, H // Hk, L, -1)
    fk = phi(k.to(acc))
    state = LinearAttentionState(S0, z0)
    o, st_ = _causal_chunked(fq, fk, v.to(acc), state, chunk, normalize, eps, phi)
    return o.reshape(B, H, L, M).to(q.dtype), st_.S, st_.z


def _inputs(B, H, Hk, L, E, M, Dp, dtype=F64, positive_state=True):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(B, H, L, E, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hk, L, E, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hk, L, M, generator=g, dtype=dtype).requires_grad_()
    acc = torch.promote_types(dtype, torch.float32)
    S0 = torch.randn(B, Hk, Dp, M, generator=g, dtype=acc).requires_grad_()
    z0 = torch.rand(B, Hk, Dp, generator=g, dtype=acc)
    if positive_state:
        z0 = z0 + 4.0  # keeps denominators of signed maps away from 0
    return q, k, v, S0, z0.requires_grad_()


SHAPES = [
    # B, H, Hk, L, E, M, chunk
    (2, 4, 2, 13, 6, 5, 4),
    (1, 3, 3, 1, 4, 3, 64),
    (2, 6, 2, 37, 5, 7, 8),
    (1, 2, 1, 16, 3, 2, 16),
    (1, 4, 1, 23, 7, 6, 5),
]


def _id(shape) -> str:
    B, H, Hk, L, E, M, C = shape
    return f"B{B}-H{H}-Hk{Hk}-L{L}-E{E}-M{M}-C{C}"


def _check_against_reference(fast, ref, inputs) -> None:
    """Outputs, final states and the gradients of a random weighting of all three."""
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ref]
    loss_ref = sum((t * w).sum() for t, w in zip(ref, weights, strict=True))
    loss_fast = sum((t * w).sum() for t, w in zip(fast, weights, strict=True))
    g_ref = torch.autograd.grad(loss_ref, inputs)
    g_fast = torch.autograd.grad(loss_fast, inputs)
    for what, a, b in zip(("o", "S", "z"), fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, w=what: f"{w}: {m}")
    for what, a, b in zip(("dq", "dk", "dv", "dS0", "dz0"), g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("name", feature_maps.available())
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_fast_equals_reference_forward_state_and_grads(name, shape, normalize) -> None:
    B, H, Hk, L, E, M, C = shape
    phi = _phi(name, E)
    q, k, v, S0, z0 = _inputs(B, H, Hk, L, E, M, phi.out_dim(E))
    ref = _reference(q, k, v, phi, S0, z0, C, normalize, 1e-6)
    fast = causal_linear_attention(q, k, v, phi, S0, z0, C, normalize, 1e-6)
    _check_against_reference(fast, ref, (q, k, v, S0, z0))


#: Tile plans that cut the awkward shapes into many tiles: one chunk per tile and one
#: head at a time, tiles of a few chunks with head groups that do not divide B * Hk,
#: and different head groups in the forward and the backward pass.
PLANS = {
    "1chunk-1head": lambda C: TilePlan(C, 1, C, 1),
    "2chunks-3heads": lambda C: TilePlan(2 * C, 3, 2 * C, 3),
    "fwd3chunks-2heads-bwd2chunks-1head": lambda C: TilePlan(3 * C, 2, 2 * C, 1),
    "fwd1chunk-bwd3chunks": lambda C: TilePlan(C, 4, 3 * C, 2),
}


@pytest.mark.parametrize("name", ["elu", "taylor", "favor", "identity"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_tiled_equals_reference(name, shape, plan, normalize) -> None:
    """Tiles along heads and the sequence carry the state exactly, forward and backward."""
    B, H, Hk, L, E, M, C = shape
    phi = _phi(name, E)
    q, k, v, S0, z0 = _inputs(B, H, Hk, L, E, M, phi.out_dim(E))
    ref = _reference(q, k, v, phi, S0, z0, C, normalize, 1e-6)
    fast = causal_linear_attention(q, k, v, phi, S0, z0, C, normalize, 1e-6, plan=PLANS[plan](C))
    _check_against_reference(fast, ref, (q, k, v, S0, z0))


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_gpu_style_cumsum_scans_equal_reference(shape, monkeypatch) -> None:
    """The scans a GPU takes (one cumsum, no loop of adds), run here through the fast path."""
    monkeypatch.setattr(linear_chunked, "_scan_", partial(linear_chunked._scan_, loop=False))
    B, H, Hk, L, E, M, C = shape
    phi = _phi("taylor", E)
    q, k, v, S0, z0 = _inputs(B, H, Hk, L, E, M, phi.out_dim(E))
    ref = _reference(q, k, v, phi, S0, z0, C, True, 1e-6)
    fast = causal_linear_attention(q, k, v, phi, S0, z0, C, True, 1e-6, plan=TilePlan(C, 2, C, 1))
    _check_against_reference(fast, ref, (q, k, v, S0, z0))


@given(
    L=st.integers(1, 50),
    chunk=st.integers(1, 9),
    chunks_per_tile=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    heads=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    group=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2), (6, 3)]),
    normalize=st.booleans(),
)
def test_property_tiled_equals_reference(L, chunk, chunks_per_tile, heads, group, normalize):
    H, Hk = group
    phi = feature_maps.get("elu")
    q, k, v, S0, z0 = _inputs(2, H, Hk, L, 3, 2, 3)
    plan = TilePlan(chunk * chunks_per_tile[0], heads[0], chunk * chunks_per_tile[1], heads[1])
    ref = _reference(q, k, v, phi, S0, z0, chunk, normalize, 1e-6)
    fast = causal_linear_attention(q, k, v, phi, S0, z0, chunk, normalize, 1e-6, plan=plan)
    _check_against_reference(fast, ref, (q, k, v, S0, z0))


@given(
    BHk=st.integers(1, 64),
    G=st.integers(1, 8),
    L=st.integers(1, 70000),
    E=st.integers(1, 128),
    Dp=st.integers(1, 2048),
    C=st.sampled_from([1, 16, 32, 64, 128]),
    budget_mib=st.integers(1, 64),
)
def test_plan_tiles_fits_the_budget(BHk, G, L, E, Dp, C, budget_mib) -> None:
    M, itemsize, budget = E, 4, budget_mib * 2**20
    plan = plan_tiles(BHk, G, L, E, Dp, M, C, itemsize, budget)
    L_pad = -(-L // C) * C
    # Per-token working set of the forward and the backward (as estimated in the module).
    Mp = M + 1
    fwd = G * (E + Dp + Mp + C) + (E + Dp + Mp) + -(-Dp * Mp // C)
    for tokens, heads, per_token in (
        (plan.fwd_tokens, plan.fwd_heads, fwd),
        (plan.bwd_tokens, plan.bwd_heads, 2 * fwd),
    ):
        assert tokens % C == 0 and C <= tokens <= L_pad
        assert 1 <= heads <= BHk
        if heads > 1:
            assert heads * tokens * per_token * itemsize <= budget
    # Forward tiles: as long as the budget allows (one more chunk would not fit).
    if plan.fwd_tokens > C:  # one chunk is the floor, whatever the budget
        assert plan.fwd_tokens * fwd * itemsize <= budget
    if plan.fwd_tokens < L_pad:
        assert (plan.fwd_tokens + C) * fwd * itemsize > budget
    # Backward tiles: the same, except that they are never so short that the states
    # saved at their boundaries (D' (M + 1) floats each) outweigh q, k, v (E + M per token).
    floor = -(-Dp * Mp // (E + M) // C) * C
    assert plan.bwd_tokens >= min(L_pad, floor)
    if plan.bwd_tokens > max(C, floor):
        assert plan.bwd_tokens * 2 * fwd * itemsize <= budget
    if max(C, floor) <= plan.bwd_tokens < L_pad:
        fits = (plan.bwd_tokens + C) * 2 * fwd * itemsize <= budget
        assert not fits


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 9, 16, 17, 23, 64, 65])
@pytest.mark.parametrize("reverse", [False, True], ids=["prefix", "suffix"])
def test_scan_loop_and_cumsum_agree(n, reverse) -> None:
    """The CPU loop of adds and the cumsum a GPU takes give the same inclusive sums."""
    x = torch.randn(3, n, 4, 5, dtype=F64)
    want = x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)
    for loop in (True, False):
        got = _scan_(x.clone(), reverse=reverse, loop=loop)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plan_tiles_without_a_budget_is_one_tile() -> None:
    assert plan_tiles(16, 2, 1000, 64, 64, 64, 64, 4, None) == TilePlan(1024, 16, 1024, 16)


@pytest.mark.parametrize("budget", [None, 1, 2**20], ids=["gpu", "tiny", "1MiB"])
def test_empty_sequence_under_every_plan(budget) -> None:
    """L = 0: empty output, the initial state passed through, its gradient passed back."""
    phi = feature_maps.get("elu")
    q, k, v, S0, z0 = _inputs(2, 4, 2, 0, 3, 2, 3)
    plan = plan_tiles(4, 2, 0, 3, 3, 2, 8, 8, budget)
    o, S, z = causal_linear_attention(q, k, v, phi, S0, z0, 8, True, 1e-6, plan=plan)
    assert o.shape == (2, 4, 0, 2)
    torch.testing.assert_close(S, S0)
    torch.testing.assert_close(z, z0)
    dS0, dz0 = torch.autograd.grad(S.sum() + 2 * z.sum(), (S0, z0))
    torch.testing.assert_close(dS0, torch.ones_like(S0))
    torch.testing.assert_close(dz0, torch.full_like(z0, 2.0))


@pytest.mark.parametrize("name", ["elu", "taylor", "polynomial"])
def test_linear_attention_dispatches_to_fast_path_and_matches_kernel(name) -> None:
    """The public causal path (fast) still equals the O(N^2) kernel reference."""
    E = 5
    phi = _phi(name, E)
    q, k, v, _, _ = _inputs(2, 4, 2, 19, E, 3, phi.out_dim(E))
    o, _ = attnkit.linear_attention(
        q, k, v, feature_map=phi, is_causal=True, chunk_size=4, enable_gqa=True
    )
    ref = attnkit.kernel_attention(
        q,
        k,
        v,
        sim="linear",
        is_causal=True,
        sim_kwargs={"feature_map": phi},
        eps=1e-6,
        enable_gqa=True,
    )
    torch.testing.assert_close(o, ref, rtol=1e-9, atol=1e-9)
    g1 = torch.autograd.grad(o.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_gradcheck_float64() -> None:
    phi = feature_maps.get("elu")
    q, k, v, S0, z0 = _inputs(1, 2, 1, 9, 3, 2, 3)

    def fn(q, k, v, S0, z0):
        return causal_linear_attention(q, k, v, phi, S0, z0, 4, True, 1e-6)

    assert torch.autograd.gradcheck(fn, (q, k, v, S0, z0))


def test_only_some_inputs_need_grad() -> None:
    phi = feature_maps.get("taylor")
    q, k, v, S0, z0 = _inputs(1, 2, 2, 11, 4, 3, phi.out_dim(4))
    k = k.detach()
    S0, z0 = S0.detach(), z0.detach()
    o, _, _ = causal_linear_attention(q, k, v, phi, S0, z0, 4, True, 1e-6)
    dq, dv = torch.autograd.grad(o.sum(), (q, v))
    ref = _reference(q, k, v, phi, S0, z0, 4, True, 1e-6)[0]
    rq, rv = torch.autograd.grad(ref.sum(), (q, v))
    torch.testing.assert_close(dq, rq)
    torch.testing.assert_close(dv, rv)


@given(
    L=st.integers(1, 40),
    chunk=st.integers(1, 48),
    group=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]),
    normalize=st.booleans(),
)
def test_property_fast_equals_reference(L, chunk, group, normalize) -> None:
    H, Hk = group
    phi = feature_maps.get("elu")
    q, k, v, S0, z0 = _inputs(1, H, Hk, L, 3, 2, 3)
    ref = _reference(q, k, v, phi, S0, z0, chunk, normalize, 1e-6)
    fast = causal_linear_attention(q, k, v, phi, S0, z0, chunk, normalize, 1e-6)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    ga = torch.autograd.grad(fast[0].sum() + fast[1].sum(), (q, k, v, S0))
    gb = torch.autograd.grad(ref[0].sum() + ref[1].sum(), (q, k, v, S0))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_accumulates_in_fp32(dtype) -> None:
    """Half inputs: phi, S and z are computed in fp32 from the half values, rounded once.

    Against the fp32 run on the same (half) values the state must agree to fp32
    rounding and the output within one unit in the last place of its one rounding.
    Accumulating S, z over the 300 tokens in the input dtype (entries up to ~1e3, bf16
    spacing 4 there) misses the state by whole units and the output by many ulps.
    """
    phi = feature_maps.get("elu")
    B, H, L, E, M = 1, 2, 300, 8, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v + 3.0))  # v: nonzero mean
    zeros = torch.zeros(B, H, E, M), torch.zeros(B, H, E)
    o, S, z = causal_linear_attention(qh, kh, vh, phi, *zeros, 64, True, None)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    ref = [t.detach().float() for t in (qh, kh, vh)]
    want, S_want, z_want = causal_linear_attention(*ref, phi, *zeros, 64, True, None)
    assert S_want.abs().max() > 500  # the sums really are large
    for got, exp in ((S, S_want), (z, z_want)):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6 * float(exp.abs().max()))
    assert ulp_distance(o, want.to(dtype)).max() <= 1
    grads = torch.autograd.grad(o.float().sum(), (qh, kh, vh))
    assert all(gr.dtype == dtype and torch.isfinite(gr).all() for gr in grads)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_backward_keeps_n_times_d_plus_m_not_n_times_d_prime() -> None:
    """Saved-for-backward bytes grow like N (D + M), independent of D' (Taylor: D' >> D)."""
    phi = feature_maps.get("taylor")  # D = 8 -> D' = 45
    E, M = 8, 4
    per_token = {}
    for N in (256, 512):
        q, k, v, S0, z0 = _inputs(1, 1, 1, N, E, M, phi.out_dim(E), dtype=torch.float32)
        args = (q, k, v, phi, S0, z0, 64, True, 1e-6)
        fast = _saved_bytes(lambda args=args: causal_linear_attention(*args))
        ref = _saved_bytes(lambda args=args: _reference(*args))
        per_token[N] = (fast, ref)
    (f1, r1), (f2, r2) = per_token[256], per_token[512]
    fast_slope, ref_slope = (f2 - f1) / 256, (r2 - r1) / 256
    # q, k, v (E + E + M floats) plus the (numerator, denominator) output (M + 1 floats).
    assert fast_slope == 4 * (2 * E + M + (M + 1))
    # The reference keeps phi(q), phi(k) (2 D' floats per token) and more.
    assert ref_slope > 4 * 2 * phi.out_dim(E)


def test_tile_boundary_states_never_outweigh_q_k_v() -> None:
    """With the smallest tiles a budget can force, saved states add <= (E + M) floats/token."""
    phi = feature_maps.get("taylor")  # D = 8 -> D' = 45 >> E + M = 12
    E, M, C = 8, 4, 4
    slope = {}
    for N in (400, 800):
        q, k, v, S0, z0 = _inputs(1, 1, 1, N, E, M, phi.out_dim(E), dtype=torch.float32)
        plan = plan_tiles(1, 1, N, E, phi.out_dim(E), M, C, 4, budget=1)  # 1 byte: the floor
        assert plan.bwd_tokens < N  # many backward tiles, so many saved states
        args = (q, k, v, phi, S0, z0, C, True, 1e-6)
        slope[N] = _saved_bytes(
            lambda args=args, plan=plan: causal_linear_attention(*args, plan=plan)
        )
    per_token = (slope[800] - slope[400]) / 400
    qkv_out = 4 * (2 * E + M + (M + 1))
    assert qkv_out < per_token <= qkv_out + 4 * (E + M)


def test_public_causal_path_uses_the_fast_function_unless_asked() -> None:
    phi = feature_maps.get("taylor")
    q, k, v, _, _ = _inputs(1, 2, 2, 64, 4, 3, phi.out_dim(4), dtype=torch.float32)

    def run(impl: str) -> int:
        return _saved_bytes(
            lambda: attnkit.linear_attention(
                q, k, v, feature_map=phi, is_causal=True, implementation=impl, enable_gqa=True
            )
        )

    fast, ref = run("fast"), run("reference")
    assert fast < ref  # the reference keeps phi(q), phi(k); the fast path recomputes them
    o_fast, _ = attnkit.linear_attention(q, k, v, feature_map=phi, is_causal=True, enable_gqa=True)
    o_ref, _ = attnkit.linear_attention(
        q, k, v, feature_map=phi, is_causal=True, implementation="reference", enable_gqa=True
    )
    torch.testing.assert_close(o_fast, o_ref)
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        attnkit.linear_attention(q, k, v, is_causal=True, implementation="triton", enable_gqa=True)


def test_trainable_feature_map_takes_the_reference_path() -> None:
    """A map with parameters needs autograd through phi: the fast path would drop them."""

    class Scaled(feature_maps.FeatureMap):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7))

        def out_dim(self, d: int) -> int:
            return d

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.elu(x * self.w) + 1

    phi = Scaled()
    q, k, v, _, _ = _inputs(1, 1, 1, 10, 3, 2, 3)
    o, _ = attnkit.linear_attention(q, k, v, feature_map=phi, is_causal=True, enable_gqa=True)
    (gw,) = torch.autograd.grad(o.sum(), (phi.w,))
    assert gw.abs() > 0
