"""The delta rule (DeltaNet, gated delta rule, KDA): fast chunked path vs the recurrence.

The recurrence (``delta_rule_reference``) is itself checked against an independent
implementation, HF transformers' Qwen3-Next functions, in their [B, T, H, D] layout.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
from attnkit.ops import gated_chunked
from attnkit.ops.delta.reference import chunked_delta, recurrent_delta
from attnkit.ops.gated_chunked import Plan
from attnkit.ops.gated_common import check_gated_inputs
from gated_inputs import assert_same, make_inputs, outputs_and_grads

# (B, Hq, Hk, Hv, L, D, M): L = 0 and 1, odd L, L not divisible by the chunk, D not a
# power of two, grouped value heads (Qwen3-Next), grouped query heads (SDPA), mixed.
SHAPES = [
    (1, 1, 1, 1, 0, 4, 3),
    (2, 2, 2, 2, 1, 5, 3),
    (1, 3, 3, 3, 37, 7, 6),
    (2, 2, 2, 4, 19, 6, 5),
    (1, 6, 2, 2, 21, 4, 3),
    (1, 2, 1, 4, 20, 3, 4),
]
GATES = [None, "scalar", "channel"]


def sid(s: tuple[int, ...]) -> str:
    B, Hq, Hk, Hv, L, D, M = s
    return f"B{B}-Hq{Hq}-Hk{Hk}-Hv{Hv}-L{L}-D{D}-M{M}"


def fast(chunk: int | None = 8, l2: bool = False):
    def fn(q, k, v, g, beta, S0):
        return attnkit.delta_rule_attention(
            q,
            k,
            v,
            beta,
            g,
            initial_state=S0,
            output_final_state=True,
            chunk_size=chunk,
            enable_gqa=True,
            use_qk_l2norm=l2,
        )

    return fn


def ref(l2: bool = False):
    def fn(q, k, v, g, beta, S0):
        return attnkit.delta_rule_reference(
            q,
            k,
            v,
            beta,
            g,
            initial_state=S0,
            output_final_state=True,
            enable_gqa=True,
            use_qk_l2norm=l2,
        )

    return fn


# ---- the reference against HF transformers' independent implementation ---------------------


def _hf():
    m = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    # Undecorated: with fla installed the hub-kernel wrappers would call Triton kernels.
    unwrap = lambda f: getattr(f, "__wrapped__", f)  # noqa: E731
    return unwrap(m.torch_recurrent_gated_delta_rule), unwrap(m.torch_chunk_gated_delta_rule)


@pytest.mark.parametrize("which", ["recurrent", "chunk"])
@pytest.mark.parametrize("l2", [False, True], ids=["unit-keys", "l2norm"])
def test_reference_matches_hf_qwen3_next(which: str, l2: bool) -> None:
    recurrent, chunked = _hf()
    hf = recurrent if which == "recurrent" else chunked
    # grouped value heads: 2 q/k heads serve 6 value heads; L = 45 (not a multiple of 64)
    inp = make_inputs(
        2, 2, 2, 6, 45, 16, 12, gate="scalar", beta_max=1.0, dtype=torch.float32, unit_keys=not l2
    )
    q, k, v, g, beta, S0 = inp
    assert g is not None
    t = lambda x: x.transpose(1, 2)  # noqa: E731  [B, H, T, ...] <-> [B, T, H, ...]
    o_hf, S_hf = hf(
        t(q),
        t(k),
        t(v),
        t(g),
        t(beta),
        initial_state=S0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=l2,
    )
    for impl in (ref(l2), fast(None, l2)):
        o, S = impl(q, k, v, g, beta, S0)
        torch.testing.assert_close(o, t(o_hf), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(S, S_hf, atol=2e-5, rtol=2e-5)


def test_reference_matches_hf_without_gate_and_with_beta_two() -> None:
    # DeltaNet is the gated rule with g = 0; beta = 2 reflects (I - 2 k k^T).
    recurrent, _ = _hf()
    q, k, v, _, beta, S0 = make_inputs(1, 2, 2, 2, 17, 8, 8, gate=None, dtype=torch.float32)
    beta = torch.full_like(beta, 2.0)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o_hf, S_hf = recurrent(
        t(q),
        t(k),
        t(v),
        t(torch.zeros_like(beta)),
        t(beta),
        initial_state=S0,
        output_final_state=True,
    )
    o, S = ref()(q, k, v, None, beta, S0)
    torch.testing.assert_close(o, t(o_hf), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(S, S_hf, atol=2e-5, rtol=2e-5)


def test_kda_reference_decays_before_the_delta_update() -> None:
    # One token from a state: S' = Diag(a) S, u = beta (v - S'^T k), S_new = S' + k u^T.
    B, H, D, M = 1, 1, 3, 2
    S = torch.arange(1.0, 7.0, dtype=torch.float64).view(B, H, D, M)
    k = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 1, D)
    q = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 1, D)
    v = torch.tensor([10.0, 20.0], dtype=torch.float64).view(1, 1, 1, M)
    a = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    g = a.log().view(1, 1, 1, D)
    beta = torch.tensor([[[1.0]]], dtype=torch.float64)
    o, S_new = attnkit.delta_rule_reference(
        q, k, v, beta, g, scale=1.0, initial_state=S, output_final_state=True
    )
    Sp = a[:, None] * S[0, 0]  # [[0.5, 1], [0.75, 1], [5, 6]]
    expect = Sp.clone()
    expect[0] = torch.tensor([10.0, 20.0])  # beta = 1, unit key e_0: row 0 overwritten by v
    torch.testing.assert_close(S_new[0, 0], expect)
    torch.testing.assert_close(o[0, 0, 0], expect.sum(0))


# ---- steps, splits, the chunked reference --------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=sid)
def test_step_loop_equals_reference(shape: tuple[int, ...], gate: str | None) -> None:
    inp = make_inputs(*shape, gate=gate, beta_max=2.0)
    q, k, v, g, beta, S0 = inp
    o_ref, S_ref = ref(l2=True)(*inp)
    S = S0
    outs = []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        o, S = attnkit.delta_rule_step(
            q[:, :, sl],
            k[:, :, sl],
            v[:, :, sl],
            beta[:, :, sl],
            None if g is None else g[:, :, sl],
            state=S,
            use_qk_l2norm=True,
            enable_gqa=True,
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), o_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S, S_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gate", GATES)
def test_chunked_reference_equals_recurrence(gate: str | None) -> None:
    # the plain UT/WY form (what the cost model counts) against the loop
    q, k, v, g, beta, S0 = make_inputs(2, 2, 2, 2, 29, 5, 4, gate=gate, beta_max=2.0)
    q5 = q.unsqueeze(2)
    o1, S1 = recurrent_delta(q5, k, v, beta, g, S0)
    o2, S2 = chunked_delta(q5, k, v, beta, g, S0, 8)
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S2, S1, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("split", [0, 1, 7, 8, 16, 30, 31])
@pytest.mark.parametrize("gate", GATES)
def test_split_with_state_equals_one_call(split: int, gate: str | None) -> None:
    q, k, v, g, beta, S0 = make_inputs(1, 2, 2, 4, 31, 6, 5, gate=gate)
    o, S = fast()(q, k, v, g, beta, S0)
    a, b = slice(0, split), slice(split, None)
    part = lambda x, s: None if x is None else x[:, :, s]  # noqa: E731
    o1, S1 = fast()(part(q, a), part(k, a), part(v, a), part(g, a), part(beta, a), S0)
    o2, S2 = fast()(part(q, b), part(k, b), part(v, b), part(g, b), part(beta, b), S1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S2, S, atol=1e-12, rtol=1e-12)


# ---- fast path == reference: outputs, final states, every gradient ----------------------------


@pytest.mark.parametrize("chunk", [8, None])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_fast_equals_reference(shape: tuple[int, ...], gate: str | None, chunk: int | None) -> None:
    inp = make_inputs(*shape, gate=gate, beta_max=2.0)
    assert_same(
        outputs_and_grads(fast(chunk), inp), outputs_and_grads(ref(), inp), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("gate", GATES)
def test_fast_equals_reference_with_l2norm_and_raw_keys(gate: str | None) -> None:
    inp = make_inputs(2, 2, 2, 4, 23, 6, 5, gate=gate, unit_keys=False)
    assert_same(
        outputs_and_grads(fast(8, l2=True), inp),
        outputs_and_grads(ref(l2=True), inp),
        atol=1e-10,
        rtol=1e-10,
    )


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_float64(gate: str | None) -> None:
    q, k, v, g, beta, S0 = make_inputs(1, 2, 1, 2, 7, 3, 2, gate=gate, beta_max=1.5)

    def fn(q, k, v, beta, S0, *g_):
        o, S = attnkit.delta_rule_attention(
            q,
            k,
            v,
            beta,
            g_[0] if g_ else None,
            initial_state=S0,
            output_final_state=True,
            chunk_size=3,
            enable_gqa=True,
            use_qk_l2norm=True,
        )
        return o, S

    args = [t.requires_grad_(True) for t in (q, k, v, beta, S0)]
    if g is not None:
        args.append(g.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, args, atol=1e-8, rtol=1e-6)


@given(
    L=st.integers(1, 40),
    chunk=st.sampled_from([1, 4, 7, 16]),
    gate=st.sampled_from(GATES),
    g_min=st.sampled_from([-1e-3, -1.0, -5.0, -20.0]),
    beta=st.sampled_from(["0", "1", "2", "uniform"]),
    D=st.integers(1, 9),
    M=st.integers(1, 5),
)
def test_fast_equals_reference_property(
    L: int, chunk: int, gate: str | None, g_min: float, beta: str, D: int, M: int
) -> None:
    inp = make_inputs(1, 1, 1, 2, L, D, M, gate=gate, g_min=g_min, beta_max=2.0)
    if beta != "uniform":
        inp = inp._replace(beta=torch.full_like(inp.beta, float(beta)))
    assert_same(
        outputs_and_grads(fast(chunk), inp), outputs_and_grads(ref(), inp), atol=1e-9, rtol=1e-9
    )


# ---- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_in_input_dtype_state_in_fp32(dtype: torch.dtype) -> None:
    q, k, v, g, beta, _ = make_inputs(1, 2, 2, 2, 9, 4, 3, dtype=dtype)
    o, S = attnkit.delta_rule_attention(q, k, v, beta, g, output_final_state=True)
    assert o.dtype == dtype and S is not None and S.dtype == torch.float32
    o, S = attnkit.delta_rule_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], beta[:, :, :1])
    assert o.dtype == dtype and S.dtype == torch.float32


# ---- the tiled Function and its building blocks ---------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [Plan(8, 1, 8, 1), Plan(16, 2, 8, 3), Plan(24, 3, 16, 1)],
    ids=["tiny-tiles", "mixed", "long-fwd"],
)
@pytest.mark.parametrize("gate", GATES)
def test_many_tiles_equal_reference(plan: Plan, gate: str | None) -> None:
    # grouped value heads (index gathers, gradients accumulated over state heads) and
    # grouped query heads, cut into many tiles along heads and tokens
    for shape in [(2, 2, 1, 4, 37, 5, 3), (1, 6, 2, 2, 29, 4, 3)]:
        inp = make_inputs(*shape, gate=gate, beta_max=2.0)

        def tiled(q, k, v, g, beta, S0, _shape=shape):
            dims = check_gated_inputs(
                q, k, v, g, beta, enable_gqa=True, need_g=False, need_beta=True
            )
            return gated_chunked.chunked_attention(
                q, k, v, g, beta, S0, dims, scale=0.5, chunk=8, use_qk_l2norm=True, plan=plan
            )

        def reference(q, k, v, g, beta, S0):
            return attnkit.delta_rule_reference(
                q,
                k,
                v,
                beta,
                g,
                scale=0.5,
                use_qk_l2norm=True,
                initial_state=S0,
                output_final_state=True,
                enable_gqa=True,
            )

        assert_same(
            outputs_and_grads(tiled, inp),
            outputs_and_grads(reference, inp),
            atol=1e-10,
            rtol=1e-10,
        )


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("C", [64, 48, 7])
def test_channel_scores_equal_the_exact_sum_even_at_g_minus_20(C: int, strict: bool) -> None:
    # g down to -20 per token: the chunk's cumulative decay reaches ~-600, so the naive
    # factorisation (x exp(G)) (y exp(-G))^T overflows; the sub-chunked one must not.
    N, G, D = 3, 2, 5
    x = torch.randn(N, G * C, D, dtype=torch.float64)
    y = torch.randn(N, C, D, dtype=torch.float64)
    g = -20 * torch.rand(N, C, D, dtype=torch.float64)
    Gc = g.cumsum(1)
    got = gated_chunked.channel_scores(x, y, Gc, G, strict)
    diff = Gc[:, :, None, :] - Gc[:, None, :, :]  # [N, i, j, D]
    keep = torch.ones(C, C, dtype=torch.bool).tril(-1 if strict else 0)
    w = diff.masked_fill(~keep[..., None], float("-inf")).exp()
    expect = torch.einsum("ngid,njd,nijd->ngij", x.view(N, G, C, D), y, w).reshape(N, G * C, C)
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-12)
    # in fp32 the naive factorisation overflows once the cumulative decay passes ~88
    x32, y32, G32 = x.float(), y.float(), Gc.float()
    naive = (x32.view(N, G, C, D) * G32.exp()[:, None]) @ (y32 * (-G32).exp()).transpose(1, 2)[
        :, None
    ]
    if C > 5:
        assert not torch.isfinite(naive).all()  # what the safe scheme avoids
    got32 = gated_chunked.channel_scores(x32, y32, G32, G, strict)
    assert torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("C", [1, 5, 64])
def test_unit_lower_inverse(C: int) -> None:
    A = torch.randn(4, C, C, dtype=torch.float64).tril(-1) * 0.3
    T = gated_chunked.unit_lower_inverse(A)
    eye = torch.eye(C, dtype=torch.float64)
    torch.testing.assert_close(T @ (eye + A), eye.expand(4, C, C), atol=1e-10, rtol=0)
    assert torch.equal(T.triu(1), torch.zeros_like(T))


@pytest.mark.parametrize("gate", GATES)
def test_strong_decay_fp32_matches_fp64_reference(gate: str | None) -> None:
    # g down to -20 per token, fp32 inputs: finite and equal to the fp64 recurrence
    inp = make_inputs(1, 2, 2, 2, 150, 16, 8, gate=gate, g_min=-20.0, beta_max=2.0)
    o64, S64 = ref()(*inp)
    f32 = inp._replace(
        q=inp.q.float(),
        k=inp.k.float(),
        v=inp.v.float(),
        beta=inp.beta.float(),
        g=None if inp.g is None else inp.g.float(),
        S0=inp.S0.float(),
    )
    o, S = fast(None)(*f32)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o.double(), o64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), S64, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", [None, "scalar"])
def test_half_inputs_at_65536_tokens_are_finite_and_close_to_fp32(
    dtype: torch.dtype, gate: str | None
) -> None:
    # Accumulating in the half dtype over 65536 tokens would drift; the fast path computes
    # in fp32 and rounds only the output, so it matches fp32 on the same (rounded) inputs
    # to the output's rounding.
    inp = make_inputs(1, 1, 1, 2, 65536, 16, 8, gate=gate, g_min=-0.05, dtype=dtype)
    o, S = fast(None)(*inp)
    up = inp._replace(q=inp.q.float(), k=inp.k.float(), v=inp.v.float())
    o32, S32 = fast(None)(*up)
    assert o.dtype == dtype and torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(S, S32, atol=1e-5, rtol=1e-5)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of the output
    torch.testing.assert_close(o.float(), o32, atol=tol, rtol=tol)


@pytest.mark.parametrize("gate", GATES)
def test_inplace_step_updates_the_given_state(gate: str | None) -> None:
    q, k, v, g, beta, S0 = make_inputs(2, 4, 2, 2, 1, 5, 3, gate=gate, dtype=torch.float32)
    o, S_new = attnkit.delta_rule_step(q, k, v, beta, g, state=S0, enable_gqa=True)
    state = S0.clone()
    o2, S2 = attnkit.delta_rule_step(q, k, v, beta, g, state=state, enable_gqa=True, inplace=True)
    assert S2 is state
    torch.testing.assert_close(o2, o, atol=0, rtol=0)
    torch.testing.assert_close(S2, S_new, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pass state="):
        attnkit.delta_rule_step(q, k, v, beta, g, enable_gqa=True, inplace=True)
    with pytest.raises(TypeError, match=r"accumulation dtype torch\.float32, got torch\.float64"):
        attnkit.delta_rule_step(q, k, v, beta, g, state=S0.double(), enable_gqa=True, inplace=True)
    with pytest.raises(ValueError, match="requires grad"):
        attnkit.delta_rule_step(
            q, k, v, beta, g, state=S0.clone().requires_grad_(), enable_gqa=True, inplace=True
        )


@pytest.mark.parametrize("gate", [None, "channel"])
def test_training_memory_is_linear_in_length(gate: str | None) -> None:
    # Saved for backward: the inputs and one state per backward tile, O(L (D + M)) per
    # head. Keeping the per-chunk states (D M / C = 16 floats per token here), U' (M = 32)
    # or the [C, C] blocks (C = 64) would add over 10% to the inputs' bytes.
    from attnkit.bench.cases import saved_tensor_bytes

    per_token = []
    for L in (256, 1024):
        q, k, v, g, beta, _ = make_inputs(1, 2, 2, 2, L, 32, 32, gate=gate, dtype=torch.float32)
        xs = [t.requires_grad_() for t in (q, k, v, beta) if t is not None]
        gg = None if g is None else g.requires_grad_()
        nbytes = saved_tensor_bytes(
            lambda xs=xs, gg=gg: attnkit.delta_rule_attention(*xs[:3], xs[3], gg)[0]
        )
        inputs = sum(t.nbytes for t in xs) + (0 if gg is None else gg.nbytes)
        per_token.append(nbytes / L)
        assert nbytes <= 1.1 * inputs  # the inputs, plus a state per backward tile
    assert per_token[1] <= 1.05 * per_token[0]


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("gate", [None, "scalar"])
def test_hand_written_prepare_backward_equals_autograd(G: int, gate: str | None) -> None:
    # The prepare step's hand-written backward against autograd through the same step,
    # for random output gradients; beta has zeros and a gate of exactly 0 (clamp edge).
    gen = torch.Generator().manual_seed(5)
    N, C, D, M = 3, 8, 5, 4
    f64 = torch.float64
    qc = torch.randn(N, G * C, D, generator=gen, dtype=f64)
    kc = torch.nn.functional.normalize(torch.randn(N, C, D, generator=gen, dtype=f64), dim=-1)
    vc = torch.randn(N, C, M, generator=gen, dtype=f64)
    bc = torch.rand(N, C, generator=gen, dtype=f64) * 2
    bc[0, :3] = 0.0
    gc = None if gate is None else -torch.rand(N, C, generator=gen, dtype=f64) * 2
    if gc is not None:
        gc[1, 2:5] = 0.0
    inputs = [t for t in (qc, kc, vc, gc, bc) if t is not None]
    with torch.no_grad():
        prep, kept = gated_chunked.prepare_kept(qc, kc, vc, gc, bc, G, 0.7, False)
    assert kept is not None and gated_chunked.hand_backward(gc, bc)
    d = gated_chunked.Prepared(
        *(None if t is None else torch.randn(t.shape, generator=gen, dtype=f64) for t in prep)
    )
    got = gated_chunked.prepare_backward(qc, kc, vc, bc, G, 0.7, prep, kept, d)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    lq, lk, lv = leaves[:3]
    lg = None if gc is None else leaves[3]
    with torch.enable_grad():
        again = gated_chunked.prepare(lq, lk, lv, lg, leaves[-1], G, 0.7, False)
        pairs = [(t, dt) for t, dt in zip(again, d, strict=True) if t is not None]
        want = torch.autograd.grad([t for t, _ in pairs], leaves, [dt for _, dt in pairs])
    got_list = [t for t in got if t is not None]
    assert len(got_list) == len(want)
    for a, b in zip(got_list, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_runs_of_zero_gates_keep_their_gradients() -> None:
    # g = 0 exactly (no decay) puts G_i - G_j = 0 below the diagonal: the decay masks'
    # clamp at 0 must pass the gradient there (an exclusive clamp would zero it)
    inp = make_inputs(1, 2, 2, 2, 29, 5, 4, gate="scalar", beta_max=2.0)
    g = inp.g.detach().clone()
    g[:, :, 3:20] = 0.0
    inp = inp._replace(g=g.requires_grad_(inp.g.requires_grad))
    assert_same(
        outputs_and_grads(fast(8), inp), outputs_and_grads(ref(), inp), atol=1e-10, rtol=1e-10
    )
