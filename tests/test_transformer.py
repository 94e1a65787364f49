"""attnkit.layers.transformer: Block, TinyLM, caches, generate, checkpoints, compile."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from attnkit.layers.transformer import Block, LMCache, ShortConv, TinyLM, TinyLMConfig

F64 = torch.float64
VOCAB = 29

BACKENDS = [
    pytest.param({"backend": "softmax"}, id="softmax"),
    pytest.param(
        {"backend": "argmax", "backend_options": {"mode": "straight_through"}}, id="argmax_st"
    ),
    pytest.param({"backend": "linear", "feature_map": "elu"}, id="linear_elu"),
    pytest.param({"backend": "linear", "feature_map": "taylor"}, id="linear_taylor"),
    pytest.param({"backend": "kernel", "backend_options": {"sim": "gaussian"}}, id="kernel_gauss"),
]
HEADS = [
    pytest.param(None, id="mha"),
    pytest.param(2, id="gqa"),
    pytest.param(1, id="mqa"),
]


def _lm(**kw: Any) -> TinyLM:
    """A small float64 model in eval mode (float64: greedy argmaxes never flip on rounding).

    GPT-2's N(0, 0.02) init gives nearly uniform logits, and greedy decoding from it just
    repeats the last token; N(0, 1/fan_in) weights (and a 3x sharper untied head) give
    continuations that depend on the whole context, so cached == uncached means something.
    """
    args: dict[str, Any] = {
        "vocab": VOCAB,
        "d_model": 24,
        "n_layers": 2,
        "n_heads": 4,
        "max_len": 64,
    }
    args.update(kw)
    model = TinyLM(**args).to(F64).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
        if not model.config.tie_embeddings:
            model.head.weight.mul_(3.0)
    return model


def _tokens(B: int, L: int, vocab: int = VOCAB) -> Tensor:
    return torch.randint(0, vocab, (B, L))


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("opts", BACKENDS)
def test_forward_every_backend(opts: dict[str, Any], norm: str) -> None:
    model = _lm(norm=norm, **opts).train()
    tokens = _tokens(3, 11)
    logits = model(tokens)
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == F64
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
    ).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("opts", BACKENDS)
def test_forward_is_causal(opts: dict[str, Any]) -> None:
    model = _lm(conv_kernel=3, **opts)
    tokens = _tokens(2, 10)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_embeddings_positions_and_tying() -> None:
    tied, untied = _lm(), _lm(tie_embeddings=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    nope = _lm(positions="none")
    assert nope.pos_emb is None and "pos_emb.weight" not in nope.state_dict()
    assert tied.pos_emb is not None and tied.pos_emb.weight.shape == (64, 24)
    # no MLP sublayer: attention-only blocks have fewer parameters
    assert _lm(mlp=False).blocks[0].mlp is None
    n_mlp = sum(p.numel() for p in _lm(d_ff=10).blocks[0].mlp.parameters())
    assert n_mlp == 24 * 10 + 10 + 10 * 24 + 24


# ---- block ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_block_is_the_residual_formula(norm: str) -> None:
    blk = Block(16, 4, norm=norm, mlp=True).to(F64).eval()
    x = torch.randn(2, 7, 16, dtype=F64)
    with torch.no_grad():
        A, mlp = blk.attn, blk.mlp
        ln1, ln2 = blk.ln_attn, blk.ln_mlp
        assert mlp is not None and ln2 is not None
        if norm == "post":  # x = LN(x + A(x)); x = LN(x + MLP(x))
            h = ln1(x + A(x))
            want = ln2(h + mlp(h))
        else:  # x = x + A(LN(x)); x = x + MLP(LN(x))
            h = x + A(ln1(x))
            want = h + mlp(ln2(h))
        torch.testing.assert_close(blk(x), want)
        # the attention is causal
        torch.testing.assert_close(A(x), A(x, attn_mask=torch.ones(7, 7, dtype=torch.bool).tril()))


def test_block_without_mlp_and_with_conv() -> None:
    blk = Block(12, 3, mlp=False, conv_kernel=4).to(F64).eval()
    assert blk.mlp is None and blk.conv is not None
    x = torch.randn(2, 9, 12, dtype=F64)
    with torch.no_grad():
        conv_x, _ = blk.conv(x)
        torch.testing.assert_close(blk(x), blk.ln_attn(x + blk.attn(conv_x)))


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_short_conv_is_causal_depthwise_and_chunkable(kernel: int) -> None:
    conv = ShortConv(6, kernel).to(F64)
    x = torch.randn(2, 10, 6, dtype=F64)
    with torch.no_grad():
        full, _ = conv(x)
        # y_t = b + sum_i w_i x_{t-K+1+i}, zero before the start
        padded = torch.nn.functional.pad(x, (0, 0, kernel - 1, 0))
        w = conv.conv.weight[:, 0]  # [d, K]
        want = (
            torch.stack([(padded[:, t : t + kernel] * w.T).sum(1) for t in range(10)], dim=1)
            + conv.conv.bias
        )
        torch.testing.assert_close(full, want)
        state = torch.zeros(2, 6, kernel - 1, dtype=F64)
        parts = []
        for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 10)]:
            y, state = conv(x[:, lo:hi], state)
            parts.append(y)
        torch.testing.assert_close(torch.cat(parts, 1), full)
        assert state is not None and state.shape == (2, 6, kernel - 1)


@pytest.mark.parametrize("conv", [None, 3], ids=["noconv", "conv3"])
@pytest.mark.parametrize("opts", BACKENDS)
def test_block_cache_prefill_then_decode(opts: dict[str, Any], conv: int | None) -> None:
    blk = Block(16, 4, n_kv_heads=2, conv_kernel=conv, norm="pre", **opts).to(F64).eval()
    x = torch.randn(2, 8, 16, dtype=F64)
    cache = blk.new_cache(2)
    with torch.no_grad():
        full = blk(x)
        steps = [blk(x[:, :5], cache)] + [blk(x[:, t : t + 1], cache) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


# ---- cached == uncached ---------------------------------------------------------------------


@pytest.mark.parametrize("conv", [None, 3], ids=["noconv", "conv3"])
@pytest.mark.parametrize("n_kv", HEADS)
@pytest.mark.parametrize("opts", BACKENDS)
def test_cached_logits_equal_uncached(
    opts: dict[str, Any], n_kv: int | None, conv: int | None
) -> None:
    model = _lm(n_kv_heads=n_kv, conv_kernel=conv, **opts)
    tokens = _tokens(2, 12)
    cache = model.new_cache(2)
    with torch.no_grad():
        full = model(tokens)
        chunks = [model(tokens[:, :5], cache), model(tokens[:, 5:7], cache)]
        chunks += [model(tokens[:, t : t + 1], cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(chunks, 1), full)
    assert cache.pos == cache.seq_len == 12


def _greedy_without_cache(model: TinyLM, prompt: Tensor, n: int) -> Tensor:
    """Re-run the full forward on the whole sequence for every new token."""
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out


@pytest.mark.parametrize("conv", [None, 2], ids=["noconv", "conv2"])
@pytest.mark.parametrize(
    "opts",
    [
        {"backend": "softmax"},
        {"backend": "softmax", "n_kv_heads": 1, "norm": "pre"},
        {"backend": "linear", "feature_map": "elu"},
        {"backend": "linear", "feature_map": "taylor", "n_kv_heads": 2},
        {"backend": "argmax", "backend_options": {"mode": "straight_through"}},
        {"backend": "kernel", "backend_options": {"sim": "gaussian"}},
    ],
    ids=["softmax", "softmax_mqa_pre", "linear_elu", "linear_taylor_gqa", "argmax", "kernel"],
)
def test_cached_greedy_generation_equals_uncached(opts: dict[str, Any], conv: int | None) -> None:
    model = _lm(conv_kernel=conv, tie_embeddings=False, **opts)
    prompt = _tokens(3, 5)
    cached = model.generate(prompt, 14, temperature=0)
    assert cached.shape == (3, 19) and cached.dtype == torch.long
    assert torch.equal(cached[:, :5], prompt)
    assert len(cached[:, 5:].unique()) >= 4  # a real continuation, not one repeated token
    assert torch.equal(cached, _greedy_without_cache(model, prompt, 14))
    assert torch.equal(cached, model.generate(prompt, 14, temperature=0, use_cache=False))


def test_generate_sampling() -> None:
    model = _lm().train()
    prompt = _tokens(2, 3)
    a = model.generate(
        prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1)
    )
    b = model.generate(
        prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b) and a.shape == (2, 13)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    assert model.training  # restored after generate()'s eval mode
    # top_k = 1 is greedy whatever the temperature
    assert torch.equal(
        model.generate(prompt, 6, temperature=5.0, top_k=1),
        model.generate(prompt, 6, temperature=0),
    )
    assert torch.equal(model.generate(prompt, 0), prompt)
    # top_k samples only among the k most likely: with a one-token context, check step 1
    logits = model.eval()(prompt)[:, -1]
    allowed = torch.topk(logits, 3, dim=-1).indices
    for seed in range(5):
        tok = model.generate(prompt, 1, top_k=3, generator=torch.Generator().manual_seed(seed))[
            :, -1
        ]
        assert (allowed == tok[:, None]).any(-1).all()


def test_generate_bad_arguments() -> None:
    model = _lm(max_len=16)
    prompt = _tokens(1, 6)
    with pytest.raises(ValueError, match=r"max_len=16.*6.*14 = 20"):
        model.generate(prompt, 14)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
    assert model.generate(prompt, 10).shape == (1, 16)  # exactly max_len is fine


# ---- per-token decode cost, counted (not timed) ---------------------------------------------


def _cpu_flash_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}


def _decode_step_flops(model: TinyLM, n: int) -> tuple[int, int]:
    """FLOPs of one single-token decode step after n cached tokens, and the cache bytes then."""
    cache = model.new_cache(1)
    with torch.no_grad():
        model(_tokens(1, n), cache)
        nbytes = cache.nbytes
        with FlopCounterMode(display=False, custom_mapping=_FLOP_FORMULAS) as counter:
            model(_tokens(1, 1), cache)
    return counter.get_total_flops(), nbytes


def test_decode_step_cost_grows_with_context_for_softmax_only() -> None:
    kw: dict[str, Any] = {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_len": 128}
    soft = _lm(backend="softmax", **kw)
    lin = _lm(backend="linear", feature_map="elu", **kw)
    s = [_decode_step_flops(soft, n) for n in (16, 48, 80)]
    li = [_decode_step_flops(lin, n) for n in (16, 48, 80)]

    # softmax: each cached token costs q.k (2 E flops) + w v (2 Ev flops) per head and layer
    per_token = 2 * 4 * (8 + 8) * 2  # layers * heads * (E + Ev) * 2 flops/MAC
    assert s[1][0] - s[0][0] == 32 * per_token
    assert s[2][0] - s[1][0] == 32 * per_token
    # the KV cache grows by one key and one value per head and layer: 2*4*(8+8)*8 bytes/token
    assert s[1][1] - s[0][1] == 32 * 2 * 4 * 16 * 8
    # MQA keeps one key/value head instead of 4: a quarter of the KV cache
    mqa = _lm(backend="softmax", n_kv_heads=1, **kw)
    assert 4 * _decode_step_flops(mqa, 48)[1] == s[1][1]
    # linear attention: the step's work and the state size do not depend on the context
    assert li[0][0] == li[1][0] == li[2][0] > 0
    assert li[0][1] == li[1][1] == li[2][1] > 0


# ---- bad input ------------------------------------------------------------------------------


def test_bad_tokens_and_lengths() -> None:
    model = _lm(max_len=16)
    with pytest.raises(TypeError, match=r"tokens must have an integer dtype.*float"):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError, match=r"tokens must have an integer dtype.*bool"):
        model(torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tokens must have 2 dims \[B, L\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab=29\), got id 29"):
        model(torch.tensor([[1, 29]]))
    with pytest.raises(ValueError, match=r"got id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"sequence length 17 .* exceeds max_len=16"):
        model(_tokens(1, 17))
    with pytest.raises(TypeError, match=r"tokens must be a torch\.Tensor"):
        model([[1, 2]])  # type: ignore[arg-type]
    assert model(_tokens(1, 16).int()).shape == (1, 16, VOCAB)  # int32 ids are fine

    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r"cache was made for batch 2, tokens have B=1"):
        model(_tokens(1, 3), cache)
    model(_tokens(2, 10), cache)
    with pytest.raises(
        ValueError, match=r"sequence length 17 \(= 10 cached \+ 7 new tokens\) exceeds max_len=16"
    ):
        model(_tokens(2, 7), cache)
    assert cache.pos == 10  # a rejected call leaves the cache as it was
    with pytest.raises(ValueError, match=r"max_len=40\) exceeds the model's max_len=16"):
        model.new_cache(1, max_len=40)
    small = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="exceeds max_len=4"):
        model(_tokens(1, 5), small)


def test_cache_reset_and_block_input_checks() -> None:
    model = _lm(conv_kernel=3)
    tokens = _tokens(1, 6)
    cache = model.new_cache(1)
    with torch.no_grad():
        first = model(tokens, cache)
        cache.reset()
        assert cache.pos == 0
        torch.testing.assert_close(model(tokens, cache), first)
    assert isinstance(cache, LMCache) and cache.nbytes > 0
    blk = Block(8, 2)
    with pytest.raises(ValueError, match=r"x must be \[B, L, d_model=8\]"):
        blk(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match=r"x must have 3 dims"):
        blk(torch.randn(3, 8))


def test_config() -> None:
    model = _lm(
        backend="argmax", backend_options={"mode": "straight_through", "tau": 0.5}, conv_kernel=2
    )
    cfg = model.config
    assert isinstance(cfg, TinyLMConfig) and cfg.backend_options == {
        "mode": "straight_through",
        "tau": 0.5,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3  # type: ignore[misc]
    clone = TinyLM.from_config(cfg)
    assert clone.config == cfg
    assert {k: v.shape for k, v in clone.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    with pytest.raises(ValueError, match=r"unknown norm 'mid'"):
        TinyLMConfig(vocab=3, d_model=4, n_layers=1, n_heads=1, norm="mid")
    with pytest.raises(ValueError, match=r"unknown positions 'rope'"):
        TinyLM(8, 8, 1, 2, positions="rope")
    with pytest.raises(ValueError, match=r"vocab must be >= 1"):
        TinyLM(0, 8, 1, 2)
    with pytest.raises(TypeError, match=r"feature_map must be a registered feature map name"):
        TinyLMConfig(vocab=3, d_model=4, n_layers=1, n_heads=1, feature_map=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout"):
        TinyLM(8, 8, 1, 2, dropout=1.0)


# ---- checkpoints ----------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = _lm(backend="linear", feature_map="taylor", n_kv_heads=2, conv_kernel=3, norm="pre")
    path = tmp_path / "lm.pt"
    model.save(path)
    loaded = TinyLM.load(path)
    assert loaded.config == model.config
    assert loaded.head.weight is loaded.tok_emb.weight  # tying survives the round trip
    tokens = _tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["lm.pt"]  # no temporary left behind
    # load_state_from into a fresh model of the same architecture
    fresh = TinyLM.from_config(model.config).to(F64)
    fresh.load_state_from(path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens))
    TinyLM.load(path, expected_config=dataclasses.replace(model.config, dropout=0.1))  # ok


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _lm()
    path = tmp_path / "lm.pt"

    def broken_save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert os.listdir(tmp_path) == []  # target absent, temporary removed
    monkeypatch.undo()

    model.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _lm(d_model=16).save(path)
    assert path.read_bytes() == before  # the previous checkpoint is untouched
    assert os.listdir(tmp_path) == ["lm.pt"]


def test_load_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "lm.pt"
    _lm(d_model=24, n_layers=2).save(path)
    other = _lm(d_model=16, n_layers=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"d_model: checkpoint 24, model 16; n_layers: checkpoint 2, model 3"
    ):
        other.load_state_from(path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match=r"backend: checkpoint 'softmax', model 'linear'"):
        TinyLM.load(path, expected_config=dataclasses.replace(_lm().config, backend="linear"))
    unsaveable = _lm(backend="kernel", backend_options={"sim": lambda q, k: (q @ k.mT).exp()})
    with pytest.raises(ValueError, match=r"cannot save config\['backend_options'\]\['sim'\]"):
        unsaveable.save(tmp_path / "callable.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="is not a TinyLM checkpoint"):
        TinyLM.load(junk)


# ---- torch.compile --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "opts",
    [{"backend": "softmax"}, {"backend": "linear", "feature_map": "elu"}],
    ids=["softmax", "linear_elu"],
)
def test_torch_compile_matches_eager(opts: dict[str, Any]) -> None:
    # fullgraph: the forward (input checks included) traces without a graph break
    torch._dynamo.reset()
    model = TinyLM(VOCAB, 16, 1, 2, max_len=32, conv_kernel=2, **opts).eval()
    tokens = _tokens(2, 8)
    with torch.no_grad():
        eager = model(tokens)
        compiled = torch.compile(model, fullgraph=True)(tokens)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    blk = model.blocks[0]
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        out = torch.compile(blk, fullgraph=True)(x)
    torch.testing.assert_close(out, blk(x), atol=1e-5, rtol=1e-5)


# ---- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate_forms_next_token_logits_in_fp32(use_cache: bool) -> None:
    """A bf16 model whose two logits differ by 0.125 near 100 (bf16 spacing there: 0.5).

    The head in bf16 rounds both to 100 and greedy decoding picks token 0; formed in
    float32 (as generate does) the larger one, token 1, wins. Every weight is exact in bf16.
    """
    lm = TinyLM(2, 4, 0, 1, positions="none", tie_embeddings=False, max_len=4)
    with torch.no_grad():
        lm.ln_f.weight.zero_()
        lm.ln_f.bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))  # hidden state exactly [1, 1, 0, 0]
        lm.head.weight.copy_(torch.tensor([[96.0, 4.0, 0.0, 0.0], [96.0, 4.125, 0.0, 0.0]]))
    lm = lm.to(torch.bfloat16)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(lm(prompt)[0, -1], torch.tensor([100.0, 100.0], dtype=torch.bfloat16))
    out = lm.generate(prompt, max_new_tokens=2, temperature=0.0, use_cache=use_cache)
    assert out.tolist() == [[0, 1, 1]]


def test_favor_layers_draw_their_own_projections_and_round_trip(tmp_path: Path) -> None:
    """Every layer (and every model) draws W for its d_k; a checkpoint restores them."""
    torch.manual_seed(0)
    lm = TinyLM(VOCAB, 16, 2, 2, backend="linear", feature_map="favor", max_len=16).eval()
    w = [blk.attn.feature_map.projection for blk in lm.blocks]
    assert w[0].shape == (256, 8) and not torch.equal(w[0], w[1])
    other = TinyLM(VOCAB, 16, 2, 2, backend="linear", feature_map="favor", max_len=16)
    assert not torch.equal(other.blocks[0].attn.feature_map.projection, w[0])
    for blk in lm.blocks:
        assert blk.attn.feature_map.scale(8) == 8**-0.25  # Performer's exp(q.k / sqrt(d_k))
    path = tmp_path / "favor.pt"
    lm.save(path)
    back = TinyLM.load(path).eval()
    tokens = _tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), lm(tokens), rtol=0, atol=0)


def test_conv_state_of_a_wider_dtype_is_rejected_not_rounded_down() -> None:
    blk = Block(16, 2, conv_kernel=3).eval()
    cache = blk.new_cache(1, dtype=torch.float64)  # the model is float32
    with pytest.raises(TypeError, match=r"conv state has dtype torch.float64, wider than"):
        blk(torch.randn(1, 2, 16), cache)
