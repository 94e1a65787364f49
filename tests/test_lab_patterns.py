"""The ``patterns`` lab experiment: its data, its model, its claims' ability to fail, and
(slow) that the quick profile's softmax model really grows an induction head.

What each test would catch:
- the data: a fixed period (a positional shortcut instead of induction), copies that
  differ, delimiters or masks in the wrong place;
- the claims: a verdict that passes on an untrained model (the test profile trains 6
  steps, far too few for any head to form);
- the decay / delta-rule layer: implicit weights that are not the ones its output used
  (wrong gates, a missing L2 norm, a layer that is not linear in v after all);
- the slow test: a training set-up (model, optimiser, data) or a capture path that no
  longer produces the circuit the claims describe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from attnkit.lab import Context, get_experiment
from attnkit.lab.patterns import (
    CLS,
    MASK,
    N_SPECIAL,
    SEP,
    SETTINGS,
    AttentionOnlyLM,
    GatedAttention,
    _capture,
    _chains,
    encoder_batch,
    formation_step,
    induction_batch,
    train_induction,
)
from attnkit.patterns import capture


def test_induction_batch_repeats_a_random_period() -> None:
    s = SETTINGS["quick"]
    x = induction_batch(s, 64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 2 * s.period_max + 1)
    assert (x[:, 0] == 0).all() and (x[:, 1:] > 0).all() and int(x.max()) < s.vocab
    periods = set()
    for row in x[:, 1:]:
        T = next(t for t in range(s.period_min, s.period_max + 1) if (row[t:] == row[:-t]).all())
        assert len(set(row[:T].tolist())) == T  # distinct within the period
        periods.add(T)
    assert len(periods) >= 4  # the period varies: no fixed positional offset predicts it


def test_encoder_batch_layout() -> None:
    s = SETTINGS["quick"]
    chains = _chains(s, 0)
    inputs, labels, clean = encoder_batch(s, 32, chains, torch.Generator().manual_seed(0))
    L = s.enc_length + 3
    assert inputs.shape == labels.shape == clean.shape == (32, L)
    assert (clean[:, 0] == CLS).all() and (clean[:, -1] == SEP).all()
    assert ((clean == SEP).sum(1) == 2).all()  # one [SEP] between the segments, one at the end
    content = clean >= N_SPECIAL
    assert (content.sum(1) == s.enc_length).all()
    masked = inputs == MASK
    assert (masked <= content).all() and masked.any()
    assert (labels[masked] == clean[masked]).all() and (labels[~masked] == -100).all()
    # Every content token follows its predecessor in its segment's chain.
    for b in range(32):
        sep = int((clean[b] == SEP).nonzero()[0])
        for i in range(2, L - 1):
            if i in (sep, sep + 1) or not content[b, i - 1]:
                continue
            chain = 0 if i < sep else 1
            assert int(clean[b, i]) in chains[chain, int(clean[b, i - 1]) - N_SPECIAL].tolist()


def test_formation_step() -> None:
    h = [{"step": 0, "loss": 3.0, "x": 0.1}, {"step": 10, "loss": 1.0, "x": 0.6}]
    assert formation_step(h, "loss", 1.5) == 10 and formation_step(h, "x", 0.5) == 10
    assert formation_step(h, "loss", 0.5) is None


def test_attention_only_lm_is_captured_with_any_backend() -> None:
    for kw in ({"backend": "softmax"}, {"backend": "linear", "feature_map": "taylor"}):
        model = AttentionOnlyLM(20, 16, 2, 2, 12, **kw)
        maps = capture(model, torch.randint(1, 20, (2, 12)))
        assert maps.weights.shape == (2, 2, 2, 12, 12)
        torch.testing.assert_close(maps.weights.sum(-1), torch.ones(2, 2, 2, 12))


@pytest.mark.parametrize("kind", ["decay", "delta"])
def test_gated_attention_weights_are_the_ones_its_output_used(kind: str) -> None:
    """out = W_o (A V) + b for the captured A, in float64; A is causal, and the delta
    rule's A is built from L2-normalised q, k (scaling q, k changes nothing)."""
    torch.manual_seed(0)
    layer = GatedAttention(16, 2, gated=kind).double()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    layer.record = []
    out = layer(x)
    (A,) = layer.record
    assert A.shape == (3, 2, 11, 11) and A.dtype == torch.float32
    v = layer.v_proj(x).view(3, 11, 2, 8).transpose(1, 2)
    mixed = (A.double() @ v).transpose(1, 2).reshape(3, 11, 16)
    torch.testing.assert_close(out, layer.out_proj(mixed), atol=1e-5, rtol=1e-5)
    assert torch.all(A.triu(1) == 0) and A.abs().sum() > 0
    if kind == "delta":  # q and k are normalised: scaling their projections is invisible
        layer.record = []
        with torch.no_grad():
            layer.q_proj.weight.mul_(3.0), layer.q_proj.bias.mul_(3.0)
            layer.k_proj.weight.mul_(0.5), layer.k_proj.bias.mul_(0.5)
        torch.testing.assert_close(layer(x), out, atol=1e-6, rtol=1e-5)  # eps in the norm
    with pytest.raises(ValueError, match="gated must be 'decay' or 'delta'"):
        GatedAttention(16, 2, gated="gla")


def test_attention_only_lm_is_captured_with_decay_and_delta_rule() -> None:
    tokens = torch.randint(1, 20, (2, 12))
    for kind in ("decay", "delta"):
        model = AttentionOnlyLM(20, 16, 2, 2, 12, gated=kind)
        maps = _capture(model, tokens)
        assert maps.weights.shape == (2, 2, 2, 12, 12) and maps.layers == ("layers.0", "layers.1")
        assert all(m.record is None for m in model.layers)  # the recorder is removed
    soft = AttentionOnlyLM(20, 16, 2, 2, 12, backend="softmax")
    torch.testing.assert_close(_capture(soft, tokens).weights, capture(soft, tokens).weights)


def test_claims_fail_on_an_untrained_model(tmp_path: Path) -> None:
    """Six steps train nothing: every claim about formed heads must say so."""
    result = get_experiment("patterns")(Context(profile="test", figures=tmp_path))
    verdicts = {c.id: c.passed for c in result.claims}
    for cid in (
        "patterns.induction_head",
        "patterns.previous_token_head",
        "patterns.phase_change",
        "patterns.composition",
        "patterns.in_context",
        "patterns.encoder_previous_next",
    ):
        assert verdicts[cid] is False, cid
    names = {f.name for f in result.figures}
    assert names == {
        "patterns_induction",
        "patterns_heads",
        "patterns_induction_head",
        "patterns_encoder",
    }
    assert result.numbers["train_cpu_seconds"] > 0


@pytest.mark.slow
def test_quick_profile_softmax_grows_an_induction_head() -> None:
    """The quick profile's softmax run (about 5 s of CPU): the circuit the claims describe."""
    s = dataclasses.replace(SETTINGS["quick"], eval_every=50)
    run = train_induction(s, "softmax")
    final = run["final"]
    assert run["history"][0]["induction"] < 0.1
    assert final["induction"] > 0.8 and final["induction_head"][0] == 1
    assert final["previous"] > 0.4 and final["copy2_loss"] < 0.2
    top = final["previous_head"][1]
    worst = max(run["ablations"], key=lambda a: a["copy2_loss"])
    assert worst["head"] == top
