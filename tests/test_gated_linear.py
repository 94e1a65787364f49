"""Decay ("gated linear") attention: fast chunked path vs the recurrence vs the parallel form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit.ops.decay.reference import chunked_decay, recurrent_decay
from gated_inputs import assert_same, make_inputs, outputs_and_grads

SHAPES = [
    (1, 1, 1, 1, 0, 4, 3),
    (2, 2, 2, 2, 1, 5, 3),
    (1, 3, 3, 3, 37, 7, 6),
    (2, 2, 2, 4, 19, 6, 5),
    (1, 6, 2, 2, 21, 4, 3),
    (1, 2, 1, 4, 20, 3, 4),
]
GATES = ["scalar", "channel"]


def sid(s: tuple[int, ...]) -> str:
    B, Hq, Hk, Hv, L, D, M = s
    return f"B{B}-Hq{Hq}-Hk{Hk}-Hv{Hv}-L{L}-D{D}-M{M}"


def fast(chunk: int | None = 8):
    def fn(q, k, v, g, beta, S0):
        return attnkit.gated_linear_attention(
            q,
            k,
            v,
            g,
            initial_state=S0,
            output_final_state=True,
            chunk_size=chunk,
            enable_gqa=True,
        )

    return fn


def ref(q, k, v, g, beta, S0):
    return attnkit.gated_linear_attention_reference(
        q, k, v, g, initial_state=S0, output_final_state=True, enable_gqa=True
    )


def parallel_form(q, k, v, g, scale):
    """o = [(Q K^T) * Gamma] V with Gamma_ij = exp(G_i - G_j) (i >= j): the quadratic form
    of RetNet / GLA, independent of any recurrence (one head, no initial state)."""
    G = g.cumsum(dim=-2 if g.dim() == 4 else -1)
    if g.dim() == 4:  # per channel: sum_d q_id k_jd exp(G_id - G_jd)
        diff = G[..., :, None, :] - G[..., None, :, :]
        mask = torch.ones(diff.shape[-3:-1], dtype=torch.bool).tril()[..., None]
        w = diff.masked_fill(~mask, float("-inf")).exp()
        A = torch.einsum("bhid,bhjd,bhijd->bhij", q, k, w)
    else:
        diff = G[..., :, None] - G[..., None, :]
        mask = torch.ones(diff.shape[-2:], dtype=torch.bool).tril()
        A = (q @ k.transpose(-1, -2)) * diff.masked_fill(~mask, float("-inf")).exp()
    return scale * A @ v


@pytest.mark.parametrize("gate", GATES)
def test_reference_equals_the_parallel_form(gate: str) -> None:
    q, k, v, g, _, _ = make_inputs(2, 3, 3, 3, 33, 5, 4, gate=gate, g_min=-2.0)
    o, _ = attnkit.gated_linear_attention_reference(q, k, v, g)
    torch.testing.assert_close(o, parallel_form(q, k, v, g, 5**-0.5), atol=1e-12, rtol=1e-12)


def test_zero_gate_is_unnormalised_causal_linear_attention() -> None:
    # An independent implementation: attnkit's causal linear attention, identity map.
    q, k, v, g, _, _ = make_inputs(1, 2, 2, 2, 40, 8, 4, gate="scalar")
    assert g is not None
    o, _ = attnkit.gated_linear_attention(q, k, v, torch.zeros_like(g), scale=1.0)
    o_lin, _ = attnkit.linear_attention(
        q, k, v, feature_map="identity", is_causal=True, normalize=False
    )
    torch.testing.assert_close(o, o_lin, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=sid)
def test_step_loop_equals_reference(shape: tuple[int, ...], gate: str) -> None:
    inp = make_inputs(*shape, gate=gate)
    q, k, v, g, _, S0 = inp
    assert g is not None
    o_ref, S_ref = ref(*inp)
    S, outs = S0, []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        o, S = attnkit.gated_linear_attention_step(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], state=S, enable_gqa=True
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), o_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S, S_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gate", GATES)
def test_chunked_reference_equals_recurrence(gate: str) -> None:
    q, k, v, g, _, S0 = make_inputs(2, 2, 2, 2, 29, 5, 4, gate=gate)
    assert g is not None
    o1, S1 = recurrent_decay(q.unsqueeze(2), k, v, g, S0)
    o2, S2 = chunked_decay(q.unsqueeze(2), k, v, g, S0, 8)
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S2, S1, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("split", [0, 1, 8, 13, 31])
@pytest.mark.parametrize("gate", GATES)
def test_split_with_state_equals_one_call(split: int, gate: str) -> None:
    q, k, v, g, beta, S0 = make_inputs(1, 2, 2, 4, 31, 6, 5, gate=gate)
    assert g is not None
    o, S = fast()(q, k, v, g, beta, S0)
    a, b = slice(0, split), slice(split, None)
    o1, S1 = fast()(q[:, :, a], k[:, :, a], v[:, :, a], g[:, :, a], None, S0)
    o2, S2 = fast()(q[:, :, b], k[:, :, b], v[:, :, b], g[:, :, b], None, S1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S2, S, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk", [8, None])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_fast_equals_reference(shape: tuple[int, ...], gate: str, chunk: int | None) -> None:
    inp = make_inputs(*shape, gate=gate)
    assert_same(
        outputs_and_grads(fast(chunk), inp),
        outputs_and_grads(ref, inp),
        atol=1e-10,
        rtol=1e-10,
        skip=("beta",),
    )


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_float64(gate: str) -> None:
    q, k, v, g, _, S0 = make_inputs(1, 2, 1, 2, 7, 3, 2, gate=gate)

    def fn(q, k, v, g, S0):
        return attnkit.gated_linear_attention(
            q, k, v, g, initial_state=S0, output_final_state=True, chunk_size=3, enable_gqa=True
        )

    args = [t.requires_grad_(True) for t in (q, k, v, g, S0)]  # type: ignore[union-attr]
    assert torch.autograd.gradcheck(fn, args, atol=1e-8, rtol=1e-6)


@given(
    L=st.integers(1, 40),
    chunk=st.sampled_from([1, 4, 7, 16, 64]),
    gate=st.sampled_from(GATES),
    g_min=st.sampled_from([-1e-3, -1.0, -5.0, -20.0]),
    D=st.integers(1, 9),
    M=st.integers(1, 5),
)
def test_fast_equals_reference_property(
    L: int, chunk: int, gate: str, g_min: float, D: int, M: int
) -> None:
    inp = make_inputs(1, 1, 1, 2, L, D, M, gate=gate, g_min=g_min)
    assert_same(
        outputs_and_grads(fast(chunk), inp),
        outputs_and_grads(ref, inp),
        atol=1e-9,
        rtol=1e-9,
        skip=("beta",),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_in_input_dtype_state_in_fp32(dtype: torch.dtype) -> None:
    q, k, v, g, _, _ = make_inputs(1, 2, 2, 2, 9, 4, 3, dtype=dtype)
    assert g is not None
    o, S = attnkit.gated_linear_attention(q, k, v, g, output_final_state=True)
    assert o.dtype == dtype and S is not None and S.dtype == torch.float32
    o, S = attnkit.gated_linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], g[:, :, :1])
    assert o.dtype == dtype and S.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_at_65536_tokens_are_finite_and_close_to_fp32(dtype: torch.dtype) -> None:
    inp = make_inputs(1, 1, 1, 2, 65536, 16, 8, gate="channel", g_min=-0.05, dtype=dtype)
    o, S = fast(None)(*inp)
    up = inp._replace(q=inp.q.float(), k=inp.k.float(), v=inp.v.float())
    o32, S32 = fast(None)(*up)
    assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(S, S32, atol=1e-5, rtol=1e-5)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(o.float(), o32, atol=tol, rtol=tol)


@pytest.mark.parametrize("gate", GATES)
def test_inplace_step_updates_the_given_state(gate: str) -> None:
    q, k, v, g, _, S0 = make_inputs(2, 4, 2, 2, 1, 5, 3, gate=gate, dtype=torch.float32)
    assert g is not None
    o, S_new = attnkit.gated_linear_attention_step(q, k, v, g, state=S0, enable_gqa=True)
    state = S0.clone()
    o2, S2 = attnkit.gated_linear_attention_step(
        q, k, v, g, state=state, enable_gqa=True, inplace=True
    )
    assert S2 is state
    torch.testing.assert_close(o2, o, atol=0, rtol=0)
    torch.testing.assert_close(S2, S_new, atol=0, rtol=0)


def test_runs_of_zero_gates_keep_their_gradients() -> None:
    # g = 0 exactly puts G_i - G_j = 0 below the diagonal of the scalar decay masks,
    # which are clamped at 0 under autograd here: the clamp must pass the gradient there
    inp = make_inputs(1, 2, 2, 2, 29, 5, 4, gate="scalar")
    assert inp.g is not None
    g = inp.g.detach().clone()
    g[:, :, 3:20] = 0.0
    inp = inp._replace(g=g)
    assert_same(
        outputs_and_grads(fast(8), inp), outputs_and_grads(ref, inp), atol=1e-10, rtol=1e-10
    )
