"""attnkit.patterns: head scores on hand-built weights (exact answers), weight capture from
every backend against the outputs and the plain formulas, HF capture, views and the CLI.

What each group would catch:
- scores: an off-by-one in an index (previous i-1, next i+1, induction j+1 / i-T+1), a
  mean over the wrong rows (row 0 of a causal head, rows without an earlier
  occurrence), unnormalised rows, padded queries counted.
- weights/capture: a captured matrix that is not the one the output used (A @ v must
  equal the layer's output), a wrong mask, scale or GQA head mapping, a wrong
  implicit-weights construction (against phi(q).phi(k)/sum written out), a Gumbel draw
  that is not replayed, a recorder that leaves the layer patched or perturbs RNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import attnkit
from attnkit import feature_maps
from attnkit.cli import app
from attnkit.layers import MultiHeadAttention, TinyLM
from attnkit.patterns import (
    AttentionMaps,
    analyze,
    argmax_weights,
    attention_entropy,
    capture,
    delimiter_score,
    first_token_score,
    implicit_weights,
    induction_score,
    induction_score_periodic,
    label_heads,
    linear_weights,
    mean_attention_distance,
    next_token_score,
    previous_token_score,
    record_attention,
    repeated_tokens,
    row_scores,
    softmax_weights,
)
from attnkit.patterns import write_page as patterns_write_page

runner = CliRunner()


def _flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(output.replace("│", " ").split())


# ---------------------------------------------------------------------------------------
# Scores on hand-built matrices
# ---------------------------------------------------------------------------------------


def _shift(L: int, offset: int) -> torch.Tensor:
    """Each row i puts all its mass on column i - offset (column 0 where that is < 0)."""
    A = torch.zeros(L, L)
    for i in range(L):
        A[i, max(i - offset, 0)] = 1.0
    return A


def _uniform_causal(L: int) -> torch.Tensor:
    return torch.ones(L, L).tril() / torch.arange(1, L + 1).unsqueeze(-1)


def test_previous_token_head_scores_one_and_nothing_else() -> None:
    A = _shift(8, 1)
    assert previous_token_score(A) == 1.0
    # Row 1's previous token *is* the first token: 1 of the 7 counted rows.
    assert first_token_score(A) == pytest.approx(1 / 7)
    assert next_token_score(A) == 0.0
    assert attention_entropy(A) == 0.0
    assert mean_attention_distance(A) == pytest.approx(7 / 8)  # row 0 looks at itself
    # A diagonal (self) head is no previous-token head: an index offset would score it 1.
    assert previous_token_score(torch.eye(8)) == 0.0
    assert previous_token_score(_shift(8, 2)) == pytest.approx(1 / 7)  # only row 1 (-> 0)


def test_next_token_head() -> None:
    L = 6
    A = torch.zeros(L, L)
    for i in range(L):
        A[i, min(i + 1, L - 1)] = 1.0
    assert next_token_score(A) == 1.0
    assert previous_token_score(A) == 0.0  # the last row looks at itself
    assert next_token_score(A.T.contiguous()) < 0.3


def test_first_token_sink_leaves_out_row_zero() -> None:
    L = 5
    A = torch.zeros(L, L)
    A[:, 0] = 1.0
    assert first_token_score(A) == 1.0
    # Half of every row on token 0, the rest on the diagonal: 1/2 (row 0 is not counted,
    # where a causal head has no choice; counting it would give (1 + 4 * 0.5) / 5 = 0.6).
    B = 0.5 * A + 0.5 * torch.eye(L)
    assert first_token_score(B) == pytest.approx(0.5)
    assert delimiter_score(A, torch.tensor([True, False, False, False, False])) == 1.0


def test_delimiter_score_counts_the_mass_on_marked_keys() -> None:
    L = 6
    marks = torch.tensor([True, False, False, True, False, True])
    A = torch.zeros(L, L)
    A[:, 3] = 0.25
    A[:, 5] = 0.5
    A[:, 1] = 0.25
    assert delimiter_score(A, marks) == pytest.approx(0.75)
    # uniform attention: the share of delimiter positions
    assert delimiter_score(torch.full((L, L), 1 / L), marks) == pytest.approx(0.5)


def test_induction_score_on_a_perfect_induction_head() -> None:
    T, start = 5, 2
    tokens = torch.tensor([40, 41] + [7, 3, 9, 1, 4] * 2)  # prefix, then T tokens twice
    L = tokens.numel()
    A = _uniform_causal(L)
    for i in range(start + T, start + 2 * T):
        A[i] = 0.0
        A[i, i - T + 1] = 1.0  # the token after the earlier occurrence
    assert induction_score(A, tokens) == 1.0
    assert induction_score_periodic(A, T, start) == 1.0
    # Attending to the earlier occurrence itself (a "duplicate-token" head) is not
    # induction: the j+1 / i-T+1 offset matters.
    D = _uniform_causal(L)
    for i in range(start + T, start + 2 * T):
        D[i] = 0.0
        D[i, i - T] = 1.0
    assert induction_score(D, tokens) == 0.0
    assert induction_score_periodic(D, T, start) == 0.0


def test_induction_score_uses_only_rows_with_an_earlier_occurrence() -> None:
    tokens = torch.tensor([5, 6, 7, 5, 8])
    A = _uniform_causal(5)
    # Only row 3 (token 5, seen at 0) counts; its target is column 1.
    assert induction_score(A, tokens) == pytest.approx(1 / 4)
    A[3] = torch.tensor([0.0, 0.7, 0.1, 0.2, 0.0])
    assert induction_score(A, tokens) == pytest.approx(0.7)
    # The latest earlier occurrence wins: in 5 6 5 9 5 the last 5 looks after position 2.
    t2 = torch.tensor([5, 6, 5, 9, 5])
    B = _uniform_causal(5)
    B[4] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    B[2] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    assert induction_score(B, t2) == 1.0
    with pytest.raises(ValueError, match="undefined"):
        induction_score(A, torch.arange(5))


@given(
    T=st.integers(1, 12),
    start=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_induction_equals_the_textbook_definition(T: int, start: int, seed: int) -> None:
    """On T distinct random tokens repeated twice both definitions agree on any weights."""
    gen = torch.Generator().manual_seed(seed)
    prefix = (torch.randperm(50, generator=gen) + 100)[:start]  # ids that never repeat
    copy = torch.randperm(60, generator=gen)[:T]
    tokens = torch.cat([prefix, copy, copy])
    L = tokens.numel()
    A = torch.rand(L, L, generator=gen).tril()
    A = A / A.sum(-1, keepdim=True)
    torch.testing.assert_close(
        induction_score(A, tokens), induction_score_periodic(A, T, start), rtol=1e-6, atol=1e-7
    )


@given(L=st.integers(2, 12), seed=st.integers(0, 2**31 - 1), causal=st.booleans())
def test_scores_are_bounded_and_ignore_row_scale(L: int, seed: int, causal: bool) -> None:
    """Shares lie in [0, 1], entropy in [0, ln L], distance in [0, L - 1]; multiplying a row
    by any non-zero number (unnormalised or signed weights) changes no score."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.rand(L, L, generator=gen, dtype=torch.float64)
    if causal:
        A = A.tril()
    A = A / A.sum(-1, keepdim=True)
    tokens = torch.randint(0, 3, (L,), generator=gen)
    tokens[-1] = tokens[0]  # at least one repeat
    marks = torch.rand(L, generator=gen) < 0.3
    scale = (torch.rand(L, 1, generator=gen, dtype=torch.float64) * 5 + 0.1) * torch.where(
        torch.rand(L, 1, generator=gen) < 0.5, -1.0, 1.0
    ).double()
    base = row_scores(A, tokens=tokens, delimiters=marks)
    scaled = row_scores(A * scale, tokens=tokens, delimiters=marks)
    for name, (value, counts) in base.items():
        torch.testing.assert_close(scaled[name][0], value)
        assert torch.equal(scaled[name][1], counts)
        v = value[counts]
        top = {"entropy": math.log(L) + 1e-9, "distance": L - 1.0}.get(name, 1.0 + 1e-12)
        assert ((v >= -1e-12) & (v <= top)).all(), (name, v)


def test_entropy_and_distance_of_uniform_causal_attention() -> None:
    L = 7
    A = _uniform_causal(L)
    want_h = sum(math.log(i + 1) for i in range(L)) / L
    want_d = sum(i / 2 for i in range(L)) / L  # mean of 0..i is i/2
    assert attention_entropy(A) == pytest.approx(want_h)
    assert mean_attention_distance(A) == pytest.approx(want_d)


def test_rows_are_normalised_by_their_absolute_sum() -> None:
    """Unnormalised or signed rows (decay, delta rule) are scored as |A| / sum |A|."""
    A = _shift(6, 1) * 3.0
    A[3, 0] = -3.0  # a signed entry: row 3 is half previous, half first
    scores = row_scores(A)
    value, counts = scores["previous"]
    assert counts.tolist() == [False, True, True, True, True, True]
    assert value[3] == pytest.approx(0.5)
    assert previous_token_score(A) == pytest.approx((4 + 0.5) / 5)


def test_zero_rows_and_padding_count_nowhere() -> None:
    A = _shift(5, 1)
    A[2] = 0.0  # a query with no attendable key
    assert previous_token_score(A) == pytest.approx(1.0)  # 3 rows, all previous
    valid = torch.tensor([True, True, True, False, True])
    _, counts = row_scores(A, valid_queries=valid)["previous"]
    assert counts.tolist() == [False, True, False, False, True]


def test_scores_batch_over_leading_axes() -> None:
    A = torch.stack([_shift(6, 1), torch.eye(6), _uniform_causal(6)])  # [3, 6, 6]
    s = previous_token_score(A)
    assert s.shape == (3,)
    assert s[0] == 1.0 and s[1] == 0.0


def test_label_heads_by_top_score() -> None:
    scores = {
        "previous": torch.tensor([[0.9, 0.1, 0.3]]),
        "first": torch.tensor([[0.05, 0.8, 0.3]]),
        "induction": torch.tensor([[0.0, 0.0, 0.3]]),
        "entropy": torch.tensor([[9.0, 9.0, 9.0]]),  # names no behaviour
    }
    assert label_heads(scores) == [["previous-token", "first-token (sink)", "mixed"]]
    assert label_heads(scores, threshold=0.3) == [
        ["previous-token", "first-token (sink)", "induction"]
    ]
    with pytest.raises(ValueError, match="threshold"):
        label_heads(scores, threshold=1.5)
    with pytest.raises(ValueError, match="none of the labelled scores"):
        label_heads({"entropy": torch.zeros(1, 1)})


def test_score_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., L, L\]"):
        previous_token_score(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="floating"):
        previous_token_score(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must have last axis L=4"):
        induction_score(torch.eye(4), torch.arange(5))
    with pytest.raises(TypeError, match="integer"):
        induction_score(torch.eye(4), torch.zeros(4))
    with pytest.raises(TypeError, match="delimiters must be bool"):
        delimiter_score(torch.eye(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="need L >= 10"):
        induction_score_periodic(torch.eye(8), 4, 2)


# ---------------------------------------------------------------------------------------
# Weights of the ops
# ---------------------------------------------------------------------------------------

SHAPES = [  # B, H, Hk, L, E, Ev
    (1, 1, 1, 1, 3, 2),
    (2, 4, 2, 7, 5, 3),
    (1, 3, 1, 9, 6, 5),
    (2, 2, 2, 0, 4, 4),
]


def _qkv(B, H, Hk, L, E, Ev, dtype=torch.float64):
    return (
        torch.randn(B, H, L, E, dtype=dtype),
        torch.randn(B, Hk, L, E, dtype=dtype),
        torch.randn(B, Hk, L, Ev, dtype=dtype),
    )


def _apply(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o = A v with grouped heads: query head h reads value head h // (H / Hk)."""
    G = A.shape[1] // v.shape[1]
    return A.to(v.dtype) @ v.repeat_interleave(G, dim=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-Hk{}-L{}-E{}-Ev{}".format(*s))
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_weights_reproduce_sdpa(shape, causal) -> None:
    q, k, v = _qkv(*shape)
    A = softmax_weights(q, k, is_causal=causal, enable_gqa=True)
    o = attnkit.sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(_apply(A, v), o)
    torch.testing.assert_close(
        A, implicit_weights(lambda e: attnkit.sdpa(q, k, e, is_causal=causal, enable_gqa=True), k)
    )


def test_softmax_weights_follow_masks_scale_and_alignment() -> None:
    q, k, v = _qkv(2, 2, 1, 5, 4, 3)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    for kw in (
        {"attn_mask": mask},
        {"attn_mask": mask, "is_causal": True},
        {"scale": 0.3},
        {"attn_mask": torch.randn(5, 5, dtype=torch.float64)},
    ):
        A = softmax_weights(q, k, enable_gqa=True, **kw)
        torch.testing.assert_close(_apply(A, v), attnkit.sdpa(q, k, v, enable_gqa=True, **kw))
    q2 = q[:, :, -2:]
    A = softmax_weights(q2, k, is_causal=True, enable_gqa=True, causal_alignment="lower_right")
    assert A[0, 0, 0, -1] == 0.0 and A[0, 0, 1, -1] > 0.0
    # A fully masked query row is zeros, never NaN.
    none = torch.zeros(5, 5, dtype=torch.bool)
    none[:, 0] = True
    none[2] = False
    A = softmax_weights(q, k, attn_mask=none, enable_gqa=True)
    assert torch.isfinite(A).all() and A[:, :, 2].abs().sum() == 0


@pytest.mark.parametrize("mode", ["hard", "straight_through", "softmax"])
def test_argmax_weights_reproduce_argmax_attention(mode) -> None:
    q, k, v = _qkv(2, 4, 2, 6, 3, 5)
    A = argmax_weights(q, k, is_causal=True, mode=mode, tau=0.7, enable_gqa=True)
    o = attnkit.argmax_attention(q, k, v, is_causal=True, mode=mode, tau=0.7, enable_gqa=True)
    torch.testing.assert_close(_apply(A, v), o)
    if mode != "softmax":
        assert set(A.unique().tolist()) <= {0.0, 1.0} and (A.sum(-1) == 1).all()
    with pytest.raises(ValueError, match="Gumbel modes draw noise"):
        argmax_weights(q, k, mode="gumbel", enable_gqa=True)


def test_argmax_weights_worked_example() -> None:
    k = torch.tensor([[1.0, 2, 0], [0, 3, 4], [5, 0, 0], [0, 0, 1]]).view(1, 1, 4, 3)
    q = torch.tensor([1.0, 1, 2]).view(1, 1, 1, 3)
    assert argmax_weights(q, k).flatten().tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("fmap", ["elu", "taylor", "polynomial"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [1, 5, 67])
def test_implicit_linear_weights_equal_the_formula(fmap, causal, L) -> None:
    """One-hot values through the chunked linear op == phi(q).phi(k) / sum, written out.

    L = 67 crosses the default chunk boundary (odd length, not a multiple of the chunk).
    """
    B, H, E, Ev = 2, 3, 5, 4
    q, k, v = _qkv(B, H, H, L, E, Ev)
    phi = feature_maps.get(fmap)
    A = implicit_weights(
        lambda e: attnkit.linear_attention(q, k, e, feature_map=phi, is_causal=causal, eps=1e-6)[0],
        k,
    )
    ref = linear_weights(q, k, feature_map=phi, is_causal=causal, eps=1e-6)
    torch.testing.assert_close(A, ref)
    o, _ = attnkit.linear_attention(q, k, v, feature_map=phi, is_causal=causal, eps=1e-6)
    torch.testing.assert_close(_apply(ref, v), o)
    if fmap != "polynomial":  # positive maps: proper distributions over the keys
        torch.testing.assert_close(ref.sum(-1), torch.ones(B, H, L, dtype=ref.dtype))


def test_linear_weights_refuse_a_zero_denominator_without_eps() -> None:
    q = torch.zeros(1, 1, 3, 2)
    k = torch.randn(1, 1, 3, 2)
    with pytest.raises(ValueError, match="denominator"):
        linear_weights(q, -k.abs(), feature_map="relu")
    assert torch.isfinite(linear_weights(q, k, feature_map="relu", eps=1e-6)).all()


def _decay_reference(q, k, v, log_a, scale):
    """Naive decay recurrence S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t)."""
    B, H, L, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    out = []
    for t in range(L):
        S = log_a[:, :, t, None, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhdm,bhd->bhm", S, scale * q[:, :, t]))
    return torch.stack(out, dim=2)


def _delta_reference(q, k, v, beta, scale):
    """Naive delta rule S_t = (I - b k k^T) S_{t-1} + b k v^T, o_t = S_t^T (scale q_t)."""
    B, H, L, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    out = []
    for t in range(L):
        kt, b = k[:, :, t], beta[:, :, t, None, None]
        S = S - b * kt[..., None] * torch.einsum("bhd,bhdm->bhm", kt, S)[:, :, None]
        S = S + b * kt[..., None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhdm,bhd->bhm", S, scale * q[:, :, t]))
    return torch.stack(out, dim=2)


def test_implicit_weights_of_decay_and_delta_rule_recurrences() -> None:
    """The one-line plug-in for decay / delta-rule ops, on naive recurrences.

    The one-hot construction must return the closed forms of the module docstring:
    decay A[i, j] = s q_i.k_j prod_{t=j+1..i} a_t; delta A = Tril(s Q K^T) T with
    T = (I + StrictTril(Diag(b) K K^T))^{-1} Diag(b).
    """
    B, H, L, D, M = 2, 2, 9, 4, 3
    q, k, v = _qkv(B, H, H, L, D, M)
    k = torch.nn.functional.normalize(k, dim=-1)
    scale = D**-0.5
    log_a = -torch.rand(B, H, L, dtype=torch.float64)
    A = implicit_weights(lambda e: _decay_reference(q, k, e, log_a, scale), k)
    cum = log_a.cumsum(-1)
    decay = (cum[..., :, None] - cum[..., None, :]).exp().tril()
    torch.testing.assert_close(A, scale * (q @ k.transpose(-1, -2)) * decay)
    torch.testing.assert_close(_apply(A, v), _decay_reference(q, k, v, log_a, scale))

    beta = torch.rand(B, H, L, dtype=torch.float64)
    A = implicit_weights(lambda e: _delta_reference(q, k, e, beta, scale), k)
    eye = torch.eye(L, dtype=torch.float64)
    T = torch.linalg.solve(
        eye + (beta[..., :, None] * (k @ k.transpose(-1, -2))).tril(-1), torch.diag_embed(beta)
    )
    torch.testing.assert_close(A, (scale * q @ k.transpose(-1, -2)).tril() @ T)
    torch.testing.assert_close(_apply(A, v), _delta_reference(q, k, v, beta, scale))
    # Its rows are signed and unnormalised; the scores read them as |A| / sum |A|.
    assert (A < 0).any()
    assert torch.isfinite(previous_token_score(A)).all()


def test_implicit_weights_checks_the_op() -> None:
    k = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="like must be k or v"):
        implicit_weights(lambda e: e, torch.randn(4))
    with pytest.raises(ValueError, match="op\\(v\\)"):
        implicit_weights(lambda e: e[..., :2], k)


# ---------------------------------------------------------------------------------------
# Capture from attnkit models
# ---------------------------------------------------------------------------------------

BACKENDS = [
    ("softmax", {}, None),
    ("argmax", {"mode": "hard"}, None),
    ("argmax", {"mode": "straight_through", "tau": 0.5}, None),
    ("argmax", {"mode": "gumbel", "tau": 0.7}, None),
    ("kernel", {"sim": "softmax"}, None),
    ("linear", {}, "elu"),
    ("linear", {}, "taylor"),
]


def _layer(backend, options, fmap, causal=True, n_kv_heads=2):
    return MultiHeadAttention(
        d_model=12,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_k=5,
        d_v=3,
        backend=backend,
        feature_map=fmap,
        is_causal=causal,
        backend_options=options,
    ).double()


def _head_outputs(layer: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention output o [B, H, L, d_v] the layer computes (before W_o)."""
    seen = []
    h = layer.out_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        layer(x)
    finally:
        h.remove()
    B, L = x.shape[:2]
    return seen[0].view(B, L, layer.n_heads, layer.d_v).transpose(1, 2)


@pytest.mark.parametrize(
    ("backend", "options", "fmap"),
    BACKENDS,
    ids=[f"{b}-{o.get('mode', f)}" for b, o, f in BACKENDS],
)
@pytest.mark.parametrize("causal", [True, False])
def test_recorded_weights_are_the_ones_the_output_used(backend, options, fmap, causal) -> None:
    """A @ v == the layer's attention output, for every backend, GQA (4 query, 2 kv heads)."""
    layer = _layer(backend, options, fmap, causal)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.manual_seed(3)
    with record_attention(layer) as rec:
        y = layer(x)
    (r,) = rec.records
    assert r.weights.shape == (2, 4, 7, 7) and r.backend == backend
    if options.get("mode") == "gumbel":
        # The draw is replayed: the recorded weights are the ones used, and the RNG
        # continues as if nothing was recorded.
        after_recording = torch.rand(3)
        torch.manual_seed(3)
        y_plain = layer(x)
        torch.testing.assert_close(torch.rand(3), after_recording)
        torch.testing.assert_close(y, y_plain)
    v = layer.v_proj(x).view(2, 7, 2, 3).transpose(1, 2)  # [B, Hk, L, d_v]
    torch.manual_seed(3)
    o = _head_outputs(layer, x)
    torch.testing.assert_close(_apply(r.weights, v), o)
    if causal:
        assert r.weights.triu(1).abs().max() == 0  # nothing from the future


def test_explicit_and_implicit_capture_agree() -> None:
    for backend, options in (("softmax", {}), ("argmax", {"mode": "straight_through"})):
        layer = _layer(backend, options, None)
        x = torch.randn(1, 6, 12, dtype=torch.float64)
        with record_attention(layer) as a:
            layer(x)
        with record_attention(layer, method="implicit") as b:
            layer(x)
        assert a.records[0].method == "explicit" and b.records[0].method == "implicit"
        torch.testing.assert_close(a.records[0].weights, b.records[0].weights)


def test_linear_capture_matches_the_formula_in_a_model() -> None:
    layer = _layer("linear", {}, "taylor", causal=True, n_kv_heads=4)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    with record_attention(layer) as rec:
        layer(x)
    q = layer.q_proj(x).view(2, 9, 4, 5).transpose(1, 2)
    k = layer.k_proj(x).view(2, 9, 4, 5).transpose(1, 2)
    ref = linear_weights(q, k, feature_map=layer.feature_map, is_causal=True, eps=1e-6)
    torch.testing.assert_close(rec.records[0].weights, ref)


def test_recorder_restores_the_layers_and_refuses_what_it_cannot_record() -> None:
    model = TinyLM(vocab=20, d_model=16, n_layers=2, n_heads=2, max_len=16, dropout=0.1)
    before = [blk.attn._spec for blk in model.blocks]
    with pytest.raises(ValueError, match="dropout"), record_attention(model):
        model.train()
        model(torch.randint(0, 20, (1, 5)))
    assert [blk.attn._spec for blk in model.blocks] == before
    model.eval()
    with pytest.raises(ValueError, match="decoding cache"), record_attention(model):
        model(torch.randint(0, 20, (1, 5)), cache=model.new_cache(1))
    assert [blk.attn._spec for blk in model.blocks] == before
    with pytest.raises(ValueError, match=r"no attnkit\.MultiHeadAttention"):
        with record_attention(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="unknown method"):
        with record_attention(model, method="psychic"):
            pass


def test_capture_a_tinylm() -> None:
    model = TinyLM(vocab=30, d_model=16, n_layers=3, n_heads=2, max_len=32, dropout=0.1)
    model.train()
    tokens = repeated_tokens(2, 7, 30, prefix=[0])
    maps = capture(model, tokens)
    assert model.training  # restored
    assert maps.weights.shape == (3, 2, 2, 15, 15)
    assert maps.layers == ("blocks.0.attn", "blocks.1.attn", "blocks.2.attn")
    scores = maps.scores()
    assert set(scores) == {"induction", "previous", "next", "first", "entropy", "distance"}
    assert all(s.shape == (3, 2) for s in scores.values())
    assert (scores["next"] == 0).all()  # causal
    rows = maps.table()
    assert len(rows) == 6 and {"layer", "head", "label", "induction"} <= set(rows[0])
    with torch.no_grad():
        model.eval()
        logits = model(tokens)
    assert torch.isfinite(logits).all()


def test_attention_maps_scores_match_the_per_matrix_functions() -> None:
    """Aggregation over sequences weights every counted row equally, padding excluded."""
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(2, 3, 2, 6, 6, generator=gen).tril()
    w = w / w.sum(-1, keepdim=True)
    tokens = torch.randint(0, 4, (3, 6), generator=gen)
    tokens[:, 3] = tokens[:, 0]  # every sequence has a repeat
    maps = AttentionMaps(weights=w, layers=("a", "b"), tokens=tokens)
    s = maps.scores()
    torch.testing.assert_close(s["previous"], previous_token_score(w).mean(1))
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    padded = AttentionMaps(weights=w, layers=("a", "b"), valid=valid).scores()["previous"]
    full = torch.stack([w[:, 0], w[:, 2]], 1)  # sequences 0 and 2 keep all 5 rows i >= 1
    manual = (
        full.diagonal(offset=-1, dim1=-2, dim2=-1).sum((1, 3))
        + w[:, 1, :, [1, 2, 3], [0, 1, 2]].sum(-1)
    ) / (5 + 5 + 3)
    torch.testing.assert_close(padded, manual)
    with pytest.raises(ValueError, match=r"\[N, B, H, L, L\]"):
        AttentionMaps(weights=torch.zeros(2, 3, 4, 5), layers=("a", "b"))
    with pytest.raises(ValueError, match="tokens must have shape"):
        AttentionMaps(weights=w, layers=("a", "b"), tokens=tokens[:, :5])
    with pytest.raises(ValueError, match="layers must name"):
        AttentionMaps(weights=w, layers=("a",))


# ---------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path


def test_capture_hf_matches_a_manual_eager_forward(hf_llama: Path) -> None:
    from attnkit.patterns import capture_hf, load_hf

    model, tokenizer = load_hf(hf_llama)
    assert tokenizer is None
    model.set_attn_implementation("sdpa")  # capture_hf switches to eager and back
    ids = repeated_tokens(2, 6, 64, prefix=[1])
    maps = capture_hf(model, ids)
    assert model.config._attn_implementation == "sdpa"
    assert maps.weights.shape == (2, 2, 4, 13, 13)
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(2, 2, 4, 13))
    assert maps.weights.triu(1).abs().max() == 0  # causal
    # The captured layer-0 weights are softmax(q k^T / sqrt(d) + causal) of layer 0.
    model.set_attn_implementation("eager")
    seen = {}
    attn = model.model.layers[0].self_attn

    def keep(module, args, out):
        seen["w"] = out[1]

    handle = attn.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids, output_attentions=True)
    handle.remove()
    torch.testing.assert_close(maps.weights[0], seen["w"].float())
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    padded = capture_hf(model, ids, attention_mask=mask)
    assert padded.valid is not None and not padded.valid[1, :3].any()
    assert "induction" in padded.scores()


def test_capture_hf_rejects_what_it_cannot_read() -> None:
    from attnkit.patterns import capture_hf, load_hf

    with pytest.raises(TypeError, match=r"no \.config"):
        capture_hf(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_hf("/nonexistent")


# ---------------------------------------------------------------------------------------
# Inputs, views, the page and the command line
# ---------------------------------------------------------------------------------------


def test_repeated_tokens() -> None:
    x = repeated_tokens(5, 7, 20, low=3, prefix=[0, 1], generator=torch.Generator().manual_seed(1))
    assert x.shape == (5, 16)
    assert (x[:, :2] == torch.tensor([0, 1])).all()
    assert (x[:, 2:9] == x[:, 9:]).all()
    assert all(len(set(row[2:9].tolist())) == 7 for row in x)  # distinct within a copy
    assert int(x[:, 2:].min()) >= 3 and int(x.max()) < 20
    with pytest.raises(ValueError, match="distinct tokens"):
        repeated_tokens(1, 8, 10, low=3)
    with pytest.raises(ValueError, match="prefix ids"):
        repeated_tokens(1, 3, 10, prefix=[10])


def _random_maps(tokens: torch.Tensor, layers: int = 2, heads: int = 3) -> AttentionMaps:
    B, L = tokens.shape
    w = torch.rand(layers, B, heads, L, L, generator=torch.Generator().manual_seed(0)).tril()
    w = w / w.sum(-1, keepdim=True)
    w[1, :, 0] = _shift(L, 1)  # one clear previous-token head
    return AttentionMaps(weights=w, layers=("l0", "l1"), tokens=tokens, source="test maps")


def test_write_page_is_self_contained(tmp_path: Path) -> None:
    maps = _random_maps(repeated_tokens(2, 6, 30))
    index = patterns_write_page(maps, tmp_path / "page", title="t <&> t")
    html = index.read_text()
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html
    pngs = sorted(p.name for p in (tmp_path / "page").glob("*.png"))
    assert "grid.png" in pngs and "scores.png" in pngs and "head_L1_H0.png" in pngs
    assert html.count("src='data:image/png;base64,") == len(pngs)
    assert "t &lt;&amp;&gt; t" in html  # escaped
    assert "previous-token" in html
    rows = json.loads((tmp_path / "page" / "scores.json").read_text())["heads"]
    assert len(rows) == 6 and rows[3]["label"] == "previous-token"


def test_write_page_with_chosen_heads(tmp_path: Path) -> None:
    maps = _random_maps(repeated_tokens(1, 5, 30))
    patterns_write_page(maps, tmp_path, heads=[(0, 2)])
    assert [p.name for p in tmp_path.glob("head_*.png")] == ["head_L0_H2.png"]
    with pytest.raises(ValueError, match="head must be < 3"):
        patterns_write_page(maps, tmp_path, heads=[(0, 3)])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = TinyLM(vocab=40, d_model=16, n_layers=2, n_heads=2, max_len=24, backend="linear")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model.save(path)
    return path


def test_cli_on_a_tinylm_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["patterns", str(tiny_checkpoint), "--out", str(tmp_path), "--head", "1.1"]
    )
    assert result.exit_code == 0, result.output
    assert "linear attention" in result.output and "wrote" in result.output
    html = (tmp_path / "index.html").read_text()
    assert "data:image/png;base64," in html and (tmp_path / "head_L1_H1.png").exists()
    rows = json.loads((tmp_path / "scores.json").read_text())["heads"]
    assert len(rows) == 4 and "induction" in rows[0]  # default input: a repeated sequence
    # Explicit tokens (no repeat: no induction score) and the one-hot method.
    result = runner.invoke(
        app,
        ["patterns", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--tokens", "1,2 3 4",
         "--method", "implicit"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b" / "scores.json").read_text())["heads"]
    assert "induction" not in rows[0]


def test_cli_on_an_hf_directory(hf_llama: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["patterns", str(hf_llama), "--out", str(tmp_path), "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output
    rows = json.loads((tmp_path / "scores.json").read_text())["heads"]
    assert len(rows) == 8


def test_cli_on_a_bert_directory_with_a_tokenizer(tmp_path: Path) -> None:
    """Text through the model's own tokenizer; its [CLS]/[SEP] become the delimiters."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    model_dir = tmp_path / "bert"
    transformers.BertForMaskedLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["patterns", str(model_dir), "--out", str(out), "--text", "the cat sat on the mat"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "scores.json").read_text())["heads"]
    assert len(rows) == 4 and "delimiter" in rows[0] and "induction" in rows[0]
    maps = analyze(model_dir, text="the cat sat on the mat")
    assert maps.token_text is not None and maps.token_text[0][0] == "[CLS]"
    assert maps.delimiters is not None
    assert maps.delimiters[0].tolist() == [True] + [False] * 6 + [True]
    assert maps.weights.sum(-1).sub(1).abs().max() < 1e-5  # bidirectional softmax rows


def test_cli_rejects_bad_input(tiny_checkpoint: Path, tmp_path: Path) -> None:
    for args, message in (
        (["--tokens", "1 x"], "expected integers"),
        (["--tokens", "99 1"], "token ids must be in"),
        (["--head", "1"], "LAYER.HEAD"),
        (["--head", "5.0"], "layer must be < 2"),
        (["--text", "hello"], "needs a tokenizer"),
    ):
        result = runner.invoke(
            app, ["patterns", str(tiny_checkpoint), "--out", str(tmp_path), *args]
        )
        assert result.exit_code == 2, (args, result.output)
        assert message in _flat(result.output), (args, result.output)
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    result = runner.invoke(app, ["patterns", str(bogus)])
    assert result.exit_code == 2 and "neither a TinyLM checkpoint" in _flat(result.output)


def test_analyze_python_api(tiny_checkpoint: Path) -> None:
    maps = analyze(tiny_checkpoint, period=8, batch=3, seed=1)
    assert maps.weights.shape == (2, 3, 2, 16, 16)
    again = analyze(tiny_checkpoint, period=8, batch=3, seed=1)
    torch.testing.assert_close(maps.weights, again.weights)
    # The period shrinks to fit max_len = 24.
    assert analyze(tiny_checkpoint, period=100, batch=1).length == 24
