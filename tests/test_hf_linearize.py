"""attnkit.hf.linearize: conversion, recurrent decoding, padding, generate, save/load, errors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import (  # noqa: E402
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import attnkit.hf as ah  # noqa: E402
from attnkit.hf import maps  # noqa: E402
from attnkit.hf.linearize import LinearStateLayer  # noqa: E402
from attnkit.hf.recurrence import decayed_chunked, decayed_reference  # noqa: E402

V = 61  # vocabulary (odd on purpose)
SMALL = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,  # 6 query heads ...
    num_key_value_heads=2,  # ... sharing 2 key/value heads (GQA, 3 per group)
    max_position_embeddings=256,
    pad_token_id=0,
)


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def _model(arch: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    if arch == "mistral":
        # A window shorter than the test sequences: the teacher must honour it.
        return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=5)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()  # q/k/v biases
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=10)).eval()  # q/k norms, D=10
    if arch == "gpt2":
        # Fused c_attn, absolute positions, and the optional 1 / (layer + 1) score scale.
        cfg = GPT2Config(
            vocab_size=V,
            n_embd=48,
            n_layer=2,
            n_head=6,
            n_positions=256,
            scale_attn_by_inverse_layer_idx=True,
        )
        return GPT2LMHeadModel(cfg).eval()
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_mode_reproduces_the_original_model(arch: str) -> None:
    """The converted module's teacher path = the original attention: catches wrong RoPE,
    a forgotten q/k norm or bias, wrong GQA head grouping or a lost sliding window."""
    model = _model(arch)
    ids = torch.randint(1, V, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        ah.linearize(model, "hedgehog")
        with ah.attention_mode(model, "softmax"):
            got = model(ids, use_cache=False).logits
        lin = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (lin - ref).abs().max() > 1e-3  # the linear model really is a different model


def _decode(model, ids, splits, mask=None, pos=None):
    """Logits of ``ids`` fed through one cache in pieces of the given lengths."""
    cache = DynamicCache(config=model.config)
    out, start = [], 0
    for n in splits:
        kw = {}
        if mask is not None:
            kw["attention_mask"] = mask[:, : start + n]
            kw["position_ids"] = pos[:, start : start + n]
        out.append(
            model(
                ids[:, start : start + n], use_cache=True, **ah.cache_kwargs(model, cache), **kw
            ).logits
        )
        start += n
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "fmap,decay", [("hedgehog", False), ("t2r", True), ("elu", False), ("taylor", True)]
)
def test_recurrent_decode_equals_parallel_forward(arch: str, fmap: str, decay: bool) -> None:
    """Prefill 5, then 3 tokens at once (state carried into a chunked call), then one at a
    time: the same logits as one parallel pass (batch 3, GQA, odd length 13)."""
    model = ah.linearize(_model(arch), fmap, decay=decay, chunk_size=4)
    ids = torch.randint(1, V, (3, 13))
    with torch.no_grad():
        par = model(ids, use_cache=False).logits
        rec, cache = _decode(model, ids, [5, 3, 1, 1, 1, 1, 1])
    torch.testing.assert_close(rec, par, atol=2e-5, rtol=1e-4)
    assert all(isinstance(layer, LinearStateLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 13


def _left_padded(lengths: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    seqs = [torch.randint(1, V, (n,)) for n in lengths]
    P = max(lengths)
    # Padding holds random tokens, not a pad id whose embedding might happen to be zero.
    ids = torch.randint(1, V, (len(seqs), P))
    mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s) :] = s
        mask[i, P - len(s) :] = 1
    return seqs, ids, mask


@pytest.mark.parametrize("fmap,decay", [("hedgehog", False), ("t2r", True)])
def test_left_padding_never_enters_the_state(fmap: str, decay: bool) -> None:
    """Each row of a left-padded batch gives the logits of its sequence alone, in the
    parallel pass and in recurrent decoding; fails if padded keys reach S or z."""
    model = ah.linearize(_llama(), fmap, decay=decay, chunk_size=4)
    seqs, ids, mask = _left_padded([9, 4, 7])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    P = ids.shape[1]
    with torch.no_grad():
        par = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        rec, _ = _decode(model, ids, [6, 1, 1, 1], mask=mask, pos=pos)
        for i, s in enumerate(seqs):
            alone = model(s[None], use_cache=False).logits[0]
            torch.testing.assert_close(par[i, P - len(s) :], alone, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(rec[i, P - len(s) :], alone, atol=2e-5, rtol=1e-4)


def test_generate_left_padded_batch_equals_each_sequence_alone() -> None:
    model = ah.linearize(_llama(), "hedgehog")
    seqs, ids, mask = _left_padded([8, 3, 6])
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
        for i, s in enumerate(seqs):
            alone = model.generate(s[None], max_new_tokens=7, do_sample=False)
            assert batch[i, ids.shape[1] :].tolist() == alone[0, len(s) :].tolist()


def test_generate_greedy_equals_argmax_of_parallel_forward() -> None:
    """generate() (recurrent state) = re-running the whole prefix each step (no cache)."""
    model = ah.linearize(_llama(), "t2r", decay=True)
    ids = torch.randint(1, V, (2, 5))
    with torch.no_grad():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)
        seq = ids
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert got.tolist() == seq.tolist()


def test_generate_sampling_runs_and_is_seeded() -> None:
    model = ah.linearize(_llama(), "hedgehog")
    ids = torch.randint(1, V, (2, 4))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=8)
        torch.manual_seed(1)
        b = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=8)
    assert a.shape == (2, 9) and a.tolist() == b.tolist()


def test_decode_memory_is_constant_and_the_original_grows() -> None:
    original = _llama()
    converted = ah.linearize(_llama(), "hedgehog")
    sizes: dict[str, list[int]] = {"original": [], "converted": []}
    for name, model in (("original", original), ("converted", converted)):
        for n in (8, 32):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(torch.randint(1, V, (1, n)), use_cache=True, **ah.cache_kwargs(model, cache))
            sizes[name].append(ah.state_bytes(cache))
    # Hk * D' * (Dv + 1) fp32 per layer: 2 heads, D' = 2 * 8 (Hedgehog), Dv = 8, 2 layers.
    assert sizes["converted"] == [2 * 2 * 16 * 9 * 4] * 2
    assert sizes["original"][1] == 4 * sizes["original"][0]


def test_state_layer_refuses_keys_crop_and_a_used_kv_cache() -> None:
    model = ah.linearize(_llama(), "hedgehog")
    layer = LinearStateLayer()
    with pytest.raises(TypeError, match="recurrent state"):
        layer.update(torch.zeros(1), torch.zeros(1))
    with pytest.raises(NotImplementedError, match="crop"):
        layer.crop(-1)
    cache = DynamicCache(config=model.config)
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="already holds 3 tokens"):
        model(torch.randint(1, V, (1, 2)), use_cache=True, **ah.cache_kwargs(model, cache))


def test_beam_search_reorders_the_state() -> None:
    model = ah.linearize(_llama(), "elu")
    ids = torch.randint(1, V, (1, 4))
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=4
        )
    assert out.shape == (1, 8)


def test_a_4d_mask_is_refused_with_the_shape() -> None:
    model = ah.linearize(_llama(), "hedgehog")
    layer = ah.linearized_modules(model)[0]
    x = torch.randn(2, 3, 48)
    pe = model.model.rotary_emb(x, torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"\[B, L\] = \[2, 3\]"):
        layer(x, position_embeddings=pe, attention_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool))


# ---- errors -----------------------------------------------------------------------------


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=16,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(ValueError, match=r"model_type='opt'.*gpt2.*llama.*mistral.*qwen2.*qwen3"):
        ah.linearize(opt)
    cross = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, add_cross_attention=True))
    with pytest.raises(ValueError, match="cross-attention"):
        ah.linearize(cross)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ah.linearize(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown feature_map 'nope'.*hedgehog.*t2r.*elu"):
        ah.linearize(_llama(), "nope")
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        ah.linearize(_llama(), eps=0.0)
    with pytest.raises(ValueError, match="feature_dim applies"):
        ah.linearize(_llama(), "elu", feature_dim=4)
    model = ah.linearize(_llama())
    with pytest.raises(ValueError, match="already linearized"):
        ah.linearize(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        with ah.attention_mode(model, "fast"):
            pass
    with pytest.raises(ValueError, match="no linearized attention"):
        with ah.attention_mode(_llama(), "linear"):
            pass


# ---- save / load --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path) -> None:
    """Trained maps and decay gates survive save + load: same logits, same greedy tokens.

    The maps are perturbed first, so a loader that rebuilt them from their init would fail."""
    model = ah.linearize(_llama(), "hedgehog", decay=True, feature_dim=6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".feature_map_" in name or name.endswith("decay_logit"):
                p.add_(0.3 * torch.randn_like(p))
    ah.save_linearized(model, tmp_path / "m")
    loaded = ah.load_linearized(tmp_path / "m")
    assert ah.is_linearized(loaded)
    pairs = zip(model.state_dict().items(), loaded.state_dict().items(), strict=True)
    for (n1, p1), (n2, p2) in pairs:
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits
        )
        a = model.generate(ids[:, :4], attention_mask=torch.ones(2, 4), max_new_tokens=5)
        b = loaded.generate(ids[:, :4], attention_mask=torch.ones(2, 4), max_new_tokens=5)
    assert a.tolist() == b.tolist()


def test_load_refuses_a_plain_model(tmp_path) -> None:
    _llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a linearized model"):
        ah.load_linearized(tmp_path / "plain")
    with pytest.raises(ValueError, match="not linearized"):
        ah.save_linearized(_llama(), tmp_path / "x")


# ---- feature maps ---------------------------------------------------------------------------


def test_hedgehog_starts_as_softmax_of_x_and_minus_x_per_head() -> None:
    phi = maps.Hedgehog(heads=3, dim=5)
    x = torch.randn(2, 3, 4, 5)
    want = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
    torch.testing.assert_close(phi(x), want)
    with torch.no_grad():
        phi.weight[1].mul_(2.0)  # head 1 only
    y = phi(x)
    torch.testing.assert_close(y[:, 0], want[:, 0])
    assert not torch.allclose(y[:, 1], want[:, 1])
    assert phi.positive and phi.out_features == 10
    with pytest.raises(ValueError, match="weights for 3 heads, got x with 2 heads"):
        phi(torch.randn(1, 2, 4, 5))


def test_t2r_is_relu_of_an_affine_map_and_can_be_zero() -> None:
    phi = maps.T2R(heads=2, dim=4, feature_dim=7)
    x = torch.randn(1, 2, 3, 4)
    y = phi(x)
    torch.testing.assert_close(y[..., :4], torch.relu(x))  # identity block first
    assert y.shape == (1, 2, 3, 7) and not phi.positive
    assert (phi(-x.abs())[..., :4] == 0).all()


def test_build_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"unknown feature map .x."):
        maps.build("x", 2, 4)
    assert maps.build("favor", 2, 4, feature_dim=16).out_features == 16


# ---- the decayed recurrence ---------------------------------------------------------------


def _features(B, H, Hk, L, F, M, dtype=torch.float64):
    fq = torch.rand(B, H, L, F, dtype=dtype) + 0.05
    fk = torch.rand(B, Hk, L, F, dtype=dtype) + 0.05
    v = torch.randn(B, Hk, L, M, dtype=dtype)
    lg = -torch.rand(Hk, dtype=dtype) * 0.5
    return fq, fk, v, lg


@pytest.mark.parametrize("L", [0, 1, 7, 13])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_decayed_chunked_equals_reference_outputs_states_gradients(L: int, chunk: int) -> None:
    fq, fk, v, lg = _features(2, 6, 2, L, 5, 3)
    S0 = torch.rand(2, 2, 5, 3, dtype=torch.float64)
    z0 = torch.rand(2, 2, 5, dtype=torch.float64) + 0.1
    leaves = [t.requires_grad_() for t in (fq, fk, v, lg, S0, z0)]
    o1, (S1, z1) = decayed_chunked(fq, fk, v, lg, (S0, z0), 1e-6, chunk)
    o2, (S2, z2) = decayed_reference(fq, fk, v, lg, (S0, z0), 1e-6)
    for a, b in ((o1, o2), (S1, S2), (z1, z2)):
        torch.testing.assert_close(a, b)
    w = [torch.randn_like(t) for t in (o1, S1, z1)]
    kw = {"allow_unused": True, "materialize_grads": True}  # L = 0 leaves fq, fk, v unused

    def dot(outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum(((a * b).sum() for a, b in zip(outs, w, strict=True)), torch.zeros(()))

    g1 = torch.autograd.grad(dot((o1, S1, z1)), leaves, **kw)
    g2 = torch.autograd.grad(dot((o2, S2, z2)), leaves, **kw)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_decay_zero_is_plain_causal_linear_attention() -> None:
    """gamma = 1 (log 0) must reduce to attnkit.linear_attention on the same features."""
    import attnkit

    fq, fk, v, _ = _features(1, 4, 2, 9, 6, 5)
    o, _ = decayed_chunked(fq, fk, v, torch.zeros(2, dtype=torch.float64), chunk_size=4)
    ref = attnkit.kernel_attention(
        fq,
        fk,
        v,
        sim="linear",
        sim_kwargs={"feature_map": "identity"},
        is_causal=True,
        enable_gqa=True,
    )
    torch.testing.assert_close(o, ref)


@given(
    L=st.integers(0, 20),
    chunk=st.integers(1, 9),
    groups=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
)
def test_decayed_chunked_property(L: int, chunk: int, groups: tuple[int, int]) -> None:
    H, Hk = groups
    fq, fk, v, lg = _features(1, H, Hk, L, 3, 2)
    o1, st1 = decayed_chunked(fq, fk, v, lg, None, 1e-9, chunk)
    o2, st2 = decayed_reference(fq, fk, v, lg, None, 1e-9)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(st1[0], st2[0])


def test_decayed_gradcheck() -> None:
    fq, fk, v, lg = _features(1, 2, 1, 5, 3, 2)
    inputs = tuple(t.requires_grad_() for t in (fq, fk, v, lg))
    assert torch.autograd.gradcheck(
        lambda *a: decayed_chunked(*a, None, 1e-9, 2)[0], inputs, eps=1e-6, atol=1e-6
    )
