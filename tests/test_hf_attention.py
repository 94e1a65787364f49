"""attnkit.hf.register: attnkit ops as transformers attention implementations.

Random Llama models built offline from a config. "attnkit" must equal "sdpa" (logits
and greedy tokens, GQA, left padding, batch > 1); every registered backend must honour
HF's masks (a left-padded row gives the unpadded row's logits) and train (gradients
reach the projections).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import sdpa_mask

import attnkit.hf
from attnkit.hf.attention import attention_function

VOCAB = 61


def tiny_llama(attn: str = "sdpa", **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA 3:1
        max_position_embeddings=64,
        **overrides,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # 3 pads
    mask[1, :1] = 0  # 1 pad
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


# The backends and options registered for the tests (name -> register arguments).
BACKENDS = {
    "attnkit": ("softmax", {}),
    "attnkit-test-hard": ("argmax", {"mode": "hard"}),
    "attnkit-test-st": ("argmax", {"mode": "straight_through", "tau": 0.5}),
    "attnkit-test-gumbel": ("argmax", {"mode": "gumbel", "tau": 1.0}),
    "attnkit-test-soft-t": ("argmax", {"mode": "softmax", "tau": 0.7}),
    "attnkit-test-kernel-poly": ("kernel", {"sim": "polynomial", "sim_kwargs": {"degree": 2}}),
    "attnkit-test-kernel-exp": ("kernel", {"sim": "softmax"}),
    "attnkit-test-elu": ("linear", {"feature_map": "elu"}),
    "attnkit-test-relu": ("linear", {"feature_map": "relu", "eps": 1e-4}),
    "attnkit-test-taylor": ("linear", {"feature_map": "taylor"}),
}


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    for name, (backend, opts) in BACKENDS.items():
        assert attnkit.hf.register(name, backend, **opts) == name


def test_import_attnkit_does_not_import_transformers() -> None:
    code = (
        "import sys, attnkit, attnkit.layers, attnkit.ops, attnkit.ops.conv; "
        "sys.exit(1 if 'transformers' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_register_adds_the_function_and_its_mask_function() -> None:
    assert attnkit.hf.register() == "attnkit"
    assert "attnkit" in AttentionInterface._global_mapping
    # without a mask function HF passes attention_mask=None: padding would be lost
    assert AttentionMaskInterface._global_mapping["attnkit"] is sdpa_mask


def test_attnkit_equals_sdpa_with_gqa_and_left_padding() -> None:
    ids, mask = left_padded_batch()
    model = tiny_llama("sdpa")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("attnkit")
        out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attnkit_generate_equals_sdpa() -> None:
    ids, mask = left_padded_batch()
    model = tiny_llama("sdpa")
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    model.set_attn_implementation("attnkit")
    out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()


# Gumbel noise is drawn afresh per call (and per shape), so two calls never agree; its
# masks take the same argmax_attention path as the other argmax modes.
DETERMINISTIC = [name for name in BACKENDS if name != "attnkit-test-gumbel"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_backend_honours_left_padding(name: str) -> None:
    # The padded rows' real tokens must give the logits of the same tokens unpadded:
    # fails if the padding mask is dropped (no mask function) or misread. The linear
    # backends run the masked (quadratic) form here and the O(N) causal form alone.
    ids, mask = left_padded_batch()
    model = tiny_llama(name)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        for row, n_pad in ((0, 3), (1, 1)):
            alone = model(input_ids=ids[row : row + 1, n_pad:]).logits[0]
            torch.testing.assert_close(padded[row, n_pad:], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_runs_forward_and_backward(name: str) -> None:
    ids, mask = left_padded_batch()
    model = tiny_llama(name).train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    attn = model.model.layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        grad = getattr(attn, proj).weight.grad
        assert grad is not None and torch.isfinite(grad).all(), proj
        if name == "attnkit-test-hard" and proj in ("q_proj", "k_proj"):
            assert not grad.any(), "hard argmax is piecewise constant in q and k"
        else:
            assert grad.abs().sum() > 0, proj


def test_causal_no_future_leak_for_the_linear_backend() -> None:
    # No mask at all: the O(N) causal path. Changing the last token must not change
    # the logits before it.
    model = tiny_llama("attnkit-test-elu")
    ids = torch.randint(1, VOCAB, (2, 12))
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)
    assert not torch.equal(a[:, -1], b[:, -1])


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", ["attnkit-test-elu", "attnkit-test-st"])
def test_cached_generate_equals_uncached(name: str, padded: bool) -> None:
    # Unpadded decoding steps get no mask: one query against every cached key.
    ids, mask = left_padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    model = tiny_llama(name)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **kw).tolist() == model.generate(ids, use_cache=False, **kw).tolist()


def test_linear_backend_matches_its_kernel_form() -> None:
    # The O(N) causal path (no mask) equals the quadratic kernel form with a causal mask.
    fn = attention_function("linear", feature_map="elu")
    q, k, v = torch.randn(2, 6, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 5)
    module = torch.nn.Module()
    fast, _ = fn(module, q, k, v, None)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    masked, _ = fn(module, q, k, v, causal)
    assert fast.shape == (2, 10, 6, 5)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_bad_registrations_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"name must be a non-empty string.*'org/x'"):
        attnkit.hf.register("org/x")
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'"):
        attnkit.hf.register("x", "flash")
    with pytest.raises(ValueError, match=r"unknown options \['tau'\].*'softmax'"):
        attnkit.hf.register("x", "softmax", tau=1.0)
    with pytest.raises(ValueError, match=r"feature_map='elu' is only used by the 'linear'"):
        attnkit.hf.register("x", "argmax", feature_map="elu")
    with pytest.raises(ValueError, match=r"unknown argmax mode 'soft'"):
        attnkit.hf.register("x", "argmax", mode="soft")


def test_unsupported_call_arguments_raise() -> None:
    fn = attention_function("argmax")
    q = k = v = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"does not support 'softcap'"):
        fn(torch.nn.Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"has no attention dropout, got dropout=0.1"):
        fn(torch.nn.Module(), q, k, v, None, dropout=0.1)
