"""GatedDeltaNet / DeltaNet layers, their DeltaState cache and the TinyLM backends.

The layer is pinned to an independent implementation, HF transformers' Qwen3.5
``Qwen3_5GatedDeltaNet`` (its torch fallback), with the same weights: outputs and every
parameter's gradient. Decoding is pinned to the full forward (prefill + token steps,
multi-token continuations); the state's size is pinned to be independent of the context.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

import attnkit
from attnkit.layers import DeltaState, GatedDeltaNet, mixers

# (d_model, Hv, Hk, d_k, d_v): grouped value heads, widths not powers of two
LAYOUTS = [(24, 6, 2, 8, 5), (16, 2, 2, 8, 8), (20, 3, 1, 6, 7)]


def layout_id(s: tuple[int, ...]) -> str:
    return "d{}-Hv{}-Hk{}-dk{}-dv{}".format(*s)


def make_layer(layout: tuple[int, ...], **kw: object) -> GatedDeltaNet:
    d, Hv, Hk, dk, dv = layout
    torch.manual_seed(0)
    layer = GatedDeltaNet(d, Hv, Hk, dk, dv, **kw).eval()
    with torch.no_grad():  # a non-trivial norm weight
        layer.norm.weight.uniform_(0.5, 1.5)
    return layer


# HF's parameter name -> ours
PAIRS = {
    "in_proj_qkv.weight": "qkv_proj.weight",
    "in_proj_b.weight": "b_proj.weight",
    "in_proj_a.weight": "a_proj.weight",
    "in_proj_z.weight": "z_proj.weight",
    "conv1d.weight": "conv.weight",
    "A_log": "A_log",
    "dt_bias": "dt_bias",
    "norm.weight": "norm.weight",
    "out_proj.weight": "out_proj.weight",
}


def hf_twin(layer: GatedDeltaNet) -> Qwen3_5GatedDeltaNet:
    """HF's Qwen3.5 Gated DeltaNet layer with ``layer``'s weights."""
    cfg = Qwen3_5TextConfig(
        hidden_size=layer.d_model,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        linear_num_key_heads=layer.n_key_heads,
        linear_num_value_heads=layer.n_heads,
        linear_key_head_dim=layer.d_k,
        linear_value_head_dim=layer.d_v,
        linear_conv_kernel_dim=layer.conv_kernel,
        rms_norm_eps=1e-6,
        hidden_act="silu",
    )
    hf = Qwen3_5GatedDeltaNet(cfg, layer_idx=0)
    ours = layer.state_dict()
    hf.load_state_dict({k: ours[v].clone() for k, v in PAIRS.items()})
    return hf


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_gated_deltanet_equals_hf_qwen3_5_layer(layout: tuple[int, ...]) -> None:
    layer = make_layer(layout)
    hf = hf_twin(layer)
    x = torch.randn(2, 37, layout[0])  # 37: not a multiple of the chunk
    cot = torch.randn(2, 37, layout[0])
    out = layer(x)
    ref = hf(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (out * cot).sum().backward()
    (ref * cot).sum().backward()
    ours, theirs = dict(layer.named_parameters()), dict(hf.named_parameters())
    for hf_name, name in PAIRS.items():
        a, b = ours[name].grad, theirs[hf_name].grad
        assert a is not None and b is not None, name
        scale = float(b.abs().max())
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("conv_kernel", [4, 2, None], ids=["K4", "K2", "noconv"])
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "deltanet"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_prefill_then_decode_equals_full_forward(layout, gate, conv_kernel) -> None:
    layer = make_layer(layout, gate=gate, conv_kernel=conv_kernel, chunk_size=8)
    x = torch.randn(3, 23, layout[0])
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(3)
        parts = [layer(x[:, :5], cache)]  # prefill
        parts += [layer(x[:, t : t + 1], cache) for t in range(5, 12)]  # token steps
        parts.append(layer(x[:, 12:21], cache))  # a multi-token continuation
        parts += [layer(x[:, t : t + 1], cache) for t in range(21, 23)]
    assert cache.seq_len == 23
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_decode_leaves_the_cache_unchanged_when_it_fails() -> None:
    layer = make_layer(LAYOUTS[0])
    cache = layer.new_cache(2, max_len=4)
    with torch.no_grad():
        layer(torch.randn(2, 4, 24), cache)
        before = (cache.conv.clone(), cache.state.clone())
        with pytest.raises(ValueError, match="DeltaState is full"):
            layer(torch.randn(2, 1, 24), cache)
    assert cache.seq_len == 4
    assert torch.equal(cache.conv, before[0]) and torch.equal(cache.state, before[1])


@pytest.mark.parametrize("backend", ["gated_deltanet", "deltanet"])
def test_tinylm_state_bytes_constant_in_context_length(backend: str) -> None:
    lm = attnkit.TinyLM(
        vocab=50, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, backend=backend,
        conv_kernel=4, max_len=128,
    ).eval()  # fmt: skip
    cache = lm.new_cache(2)
    sizes = [cache.nbytes]
    with torch.no_grad():
        lm(torch.randint(0, 50, (2, 3)), cache)
        sizes.append(cache.nbytes)
        for _ in range(40):
            lm(torch.randint(0, 50, (2, 1)), cache)
        sizes.append(cache.nbytes)
    # per layer: conv window B C (K - 1) + state B Hv d_k d_v fp32, C = 2 Hk d_k + Hv d_v
    d_k = d_v = 24 // 6
    conv = 2 * (2 * 2 * d_k + 6 * d_v) * 3 * 4
    state = 2 * 6 * d_k * d_v * 4
    assert sizes == [2 * (conv + state)] * 3


@pytest.mark.parametrize("backend", ["gated_deltanet", "deltanet"])
def test_tinylm_generate_with_state_equals_without(backend: str) -> None:
    lm = attnkit.TinyLM(
        vocab=50, d_model=24, n_layers=2, n_heads=6, n_kv_heads=3, backend=backend,
        conv_kernel=3, max_len=64, backend_options={"chunk_size": 4},
    )  # fmt: skip
    prompt = torch.randint(0, 50, (2, 9))
    a = lm.generate(prompt, max_new_tokens=12, temperature=0.0)
    b = lm.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert a.tolist() == b.tolist()


def test_tinylm_trains_and_saves_with_a_delta_backend(tmp_path) -> None:
    lm = attnkit.TinyLM(vocab=30, d_model=16, n_layers=1, n_heads=2, backend="gated_deltanet")
    tokens = torch.randint(0, 30, (2, 11))
    loss = torch.nn.functional.cross_entropy(lm(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    block = lm.blocks[0]
    assert block.attn.A_log.grad is not None and block.attn.qkv_proj.weight.grad.abs().sum() > 0
    lm.save(tmp_path / "m.pt")
    again = attnkit.TinyLM.load(tmp_path / "m.pt")
    torch.testing.assert_close(again(tokens), lm(tokens))


def test_errors_name_the_argument() -> None:
    assert mixers() == ["gated_deltanet", "deltanet"]
    with pytest.raises(
        ValueError, match=r"n_key_heads must divide n_heads.*n_heads=6, n_key_heads=4"
    ):
        GatedDeltaNet(24, 6, 4)
    with pytest.raises(ValueError, match=r"unknown backend 'delta'; known: .*'gated_deltanet'"):
        attnkit.TinyLM(vocab=10, d_model=8, n_layers=1, n_heads=2, backend="delta")
    with pytest.raises(ValueError, match=r"unknown backend_options \['tau'\].*'chunk_size'"):
        attnkit.TinyLM(
            vocab=10, d_model=8, n_layers=1, n_heads=2, backend="deltanet",
            backend_options={"tau": 1.0},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"feature_map='elu' is only used by the 'linear'"):
        attnkit.TinyLM(
            vocab=10, d_model=8, n_layers=1, n_heads=2, backend="deltanet", feature_map="elu"
        )
    layer = make_layer(LAYOUTS[0])
    with pytest.raises(TypeError, match=r"decodes with a DeltaState.*got cache of type KVCache"):
        layer(torch.randn(1, 2, 24), attnkit.KVCache(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"x must have last axis d_model=24"):
        layer(torch.randn(1, 2, 25))
    with pytest.raises(ValueError, match=r"batch size mismatch.*batch=2.*x has batch=1"):
        layer(torch.randn(1, 2, 24), layer.new_cache(2))
    assert isinstance(layer.new_cache(1), DeltaState)
