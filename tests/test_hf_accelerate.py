"""attnkit.hf.accelerate: HF's linear-attention layers on attnkit's kernels.

Random Qwen3-Next, Qwen3.5 (dense, MoE) and Kimi Linear models built offline from
small configs. Accelerated and plain models must give the same logits (prefill, fp32,
1e-4 relative), the same greedy tokens (decoding through HF's cache), the same
gradients and the same chunked-prefill continuation, with and without left padding,
batch > 1. Every check also proves the accelerated run never touched HF's dispatched
functions (they are replaced by functions that raise, as fla's Triton kernels do on a
machine without a GPU), so it cannot pass by silently running HF's own path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.kimi_linear import modeling_kimi_linear
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
from transformers.models.qwen3_next import modeling_qwen3_next

import attnkit.hf
from attnkit.hf import linear_layers as acc_module
from hf_models import batch, build

# HF's module-level kernels, the ones fla / causal-conv1d would replace.
HF_KERNELS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "chunk_kimi_delta_attention",
    "recurrent_kimi_delta_attention",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)
MODELS = {
    "qwen3_next": modeling_qwen3_next,
    "qwen3_5": modeling_qwen3_5,
    "qwen3_5_moe": modeling_qwen3_5_moe,
    "kimi_linear": modeling_kimi_linear,
}


@pytest.fixture(autouse=True)
def hf_torch_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain reference of these tests is HF's own torch fallback.

    Where flash-linear-attention or causal-conv1d is installed on a machine without a GPU
    (``pip install attnkit[bench]`` installs fla), HF's dispatcher sends the *plain* model
    to their Triton kernels, which crash ("0 active drivers"); the functions' torch bodies
    (``__wrapped__``) are what a CPU user of HF gets otherwise.
    """
    if not any(importlib.util.find_spec(pkg) for pkg in ("fla", "causal_conv1d")):
        return
    for modeling in MODELS.values():
        for fn in HF_KERNELS:
            torch_body = getattr(getattr(modeling, fn, None), "__wrapped__", None)
            if torch_body is not None:
                monkeypatch.setattr(modeling, fn, torch_body)


@pytest.fixture
def hf_kernels_raise(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make HF's module-level kernels of a model raise, as fla's Triton kernels do on a CPU."""

    def install(name: str) -> None:
        modeling = MODELS[name]
        for fn in HF_KERNELS:
            if hasattr(modeling, fn):

                def boom(*args: object, _fn: str = fn, **kwargs: object) -> None:
                    raise RuntimeError(f"0 active drivers ([]). There should only be one. ({_fn})")

                monkeypatch.setattr(modeling, fn, boom)

    return install


def relative_close(
    a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, floor: float = 0.0, what: str = ""
) -> None:
    """|a - b| <= rtol * max|b| (+ floor), elementwise."""
    scale = float(b.abs().max())
    torch.testing.assert_close(
        a, b, rtol=0, atol=rtol * scale + floor, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_logits_equal_plain(name: str, padded: bool, hf_kernels_raise) -> None:
    model = build(name)
    ids, mask = batch(padded)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        hf_kernels_raise(name)
        with pytest.raises(RuntimeError, match="0 active drivers"):
            model(input_ids=ids, attention_mask=mask)  # the plain model uses them
        attnkit.hf.accelerate(model)
        out = model(input_ids=ids, attention_mask=mask).logits
    relative_close(out, ref)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_equals_plain(name: str, padded: bool, hf_kernels_raise) -> None:
    model = build(name)
    ids, mask = batch(padded, T=23)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    hf_kernels_raise(name)
    with attnkit.hf.accelerated(model):
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("name", ["qwen3_next", "kimi_linear"])
def test_chunked_prefill_continuation_equals_plain(name: str) -> None:
    # A second multi-token call continues from the cached conv and recurrent states.
    model = build(name)
    ids, _ = batch(False, T=30)

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            first = model(input_ids=ids[:, :17], use_cache=True)
            second = model(input_ids=ids[:, 17:], cache=first.past_key_values)
            step = model(input_ids=second.logits[:, -1:].argmax(-1), cache=second.past_key_values)
        return [first.logits, second.logits, step.logits]

    ref = run()
    with attnkit.hf.accelerated(model):
        out = run()
    for a, b in zip(out, ref, strict=True):
        relative_close(a, b)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5", "kimi_linear"])
def test_training_gradients_equal_plain(name: str) -> None:
    model = build(name).train()
    ids, mask = batch(True, T=37)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    with attnkit.hf.accelerated(model):
        out = grads()
    assert out.keys() == ref.keys()
    linear = [n for n in ref if "linear_attn" in n or "self_attn.conv1d" in n or "A_log" in n]
    assert linear, "the linear-attention parameters receive gradients"
    # Parameters whose gradient is ~0 (an expert no token chose) are compared against
    # the largest gradient of the model instead of their own rounding noise.
    floor = 1e-6 * max(float(g.abs().max()) for g in ref.values())
    for n in ref:
        relative_close(out[n], ref[n], rtol=1e-3, floor=floor, what=n)


def test_restore_and_context_manager(hf_kernels_raise) -> None:
    model = build("qwen3_next")
    ids, _ = batch(False, T=9)
    hf_kernels_raise("qwen3_next")
    assert attnkit.hf.accelerate(model) is model
    assert attnkit.hf.accelerate(model) is model  # again: a no-op
    assert attnkit.hf.is_accelerated(model)
    with torch.no_grad():
        model(input_ids=ids)
        assert attnkit.hf.restore(model) is model
        assert not attnkit.hf.is_accelerated(model)
        with pytest.raises(RuntimeError, match="0 active drivers"):
            model(input_ids=ids)
        with pytest.raises(KeyError), attnkit.hf.accelerated(model):
            model(input_ids=ids)
            raise KeyError("leaves the block")
        assert not attnkit.hf.is_accelerated(model)


def test_device_types_leaves_other_devices_on_the_layers_own_path(hf_kernels_raise) -> None:
    model = build("qwen3_5")
    hf_kernels_raise("qwen3_5")
    attnkit.hf.accelerate(model, device_types=("cuda",))
    with torch.no_grad(), pytest.raises(RuntimeError, match="0 active drivers"):
        model(input_ids=batch(False, T=5)[0])


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5"])
def test_decoding_updates_the_cached_state_in_place(name: str) -> None:
    # Each decoded token's logits and every layer's cached recurrent state equal the plain
    # model's, and the accelerated layers write the state into the cache's own tensor
    # (its address never changes): a step that left the cached state stale would fail.
    model = build(name)
    ids, _ = batch(False, T=9)

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]]]:
        logits, ptrs = [], []
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache = out.past_key_values
            layers = [i for i, t in enumerate(cache.layers) if hasattr(t, "recurrent_states")]
            for _ in range(4):
                tok = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=tok, cache=cache, use_cache=True)
                logits.append(out.logits)
                ptrs.append([cache.get_recurrent_state(i).data_ptr() for i in layers])
            states = [cache.get_recurrent_state(i).clone() for i in layers]
        return logits, states, ptrs

    ref_logits, ref_states, _ = run()
    with attnkit.hf.accelerated(model):
        logits, states, ptrs = run()
    assert states and all(p == ptrs[0] for p in ptrs)
    for a, b in zip(logits, ref_logits, strict=True):
        relative_close(a, b, what="decoded logits")
    for a, b in zip(states, ref_states, strict=True):
        relative_close(a, b, what="cached recurrent state")


def test_delta_rule_step_is_what_decoding_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"step": 0, "conv_update": 0}
    step, update = acc_module.delta_rule_step, acc_module.causal_conv1d_update

    def counted_step(*a, **k):
        calls["step"] += 1
        return step(*a, **k)

    def counted_update(*a, **k):
        calls["conv_update"] += 1
        return update(*a, **k)

    monkeypatch.setattr(acc_module, "delta_rule_step", counted_step)
    monkeypatch.setattr(acc_module, "causal_conv1d_update", counted_update)
    model = attnkit.hf.accelerate(build("qwen3_next"))
    model.generate(batch(False, T=6)[0], max_new_tokens=4, do_sample=False, pad_token_id=0)
    # 3 decoding steps (the first new token comes from the prefill) x 3 linear layers
    assert calls == {"step": 9, "conv_update": 9}


def test_unsupported_model_error_lists_the_supported_ones() -> None:
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=11, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no layer.*Qwen3-Next.*Kimi"):
        attnkit.hf.accelerate(llama)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        attnkit.hf.accelerate("Qwen/Qwen3-Next")  # type: ignore[arg-type]
    assert set(attnkit.hf.SUPPORTED) == {
        "Qwen3-Next",
        "Qwen3.5 (dense and MoE)",
        "Kimi Linear (KDA)",
    }


# A fresh interpreter with fake `fla` and `causal_conv1d` packages importable *before*
# transformers binds its kernels: exactly what a CPU machine with flash-linear-attention
# installed sees. The plain model must crash in "Triton"; the accelerated one must not.
_FAKE_FLA = textwrap.dedent(
    """
    import json, sys, types
    import torch

    def triton_kernel(*args, **kwargs):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    for pkg, names in {
        "fla": ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
                "chunk_kda", "fused_recurrent_kda"],
        "causal_conv1d": ["causal_conv1d_fn", "causal_conv1d_update"],
    }.items():
        mod = types.ModuleType(pkg)
        for n in names:
            setattr(mod, n, triton_kernel)
        sys.modules[pkg] = mod

    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import hf_models as t
    import attnkit.hf
    from transformers.models.qwen3_next import modeling_qwen3_next as mq
    assert mq.torch_chunk_gated_delta_rule.__wrapped__ is not None
    result = {}
    for name in ("qwen3_next", "kimi_linear"):
        model = t.build(name)
        model.load_state_dict(torch.load(f"{sys.argv[2]}/{name}.pt"))
        ids, mask = t.batch(True)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            result[name + "_plain"] = "ran"
        except RuntimeError as e:
            result[name + "_plain"] = str(e)
        attnkit.hf.accelerate(model)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        torch.save(logits, f"{sys.argv[2]}/{name}_logits.pt")
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        result[name + "_tokens"] = model.generate(ids, **kw).tolist()
    print(json.dumps(result))
    """
)


@pytest.mark.slow
def test_fla_installed_on_a_cpu_machine(tmp_path: Path) -> None:
    names = ("qwen3_next", "kimi_linear")
    for name in names:
        torch.save(build(name).state_dict(), tmp_path / f"{name}.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _FAKE_FLA, str(Path(__file__).parent), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ids, mask = batch(True)
    for name in names:
        # the fake fla was picked up by HF's dispatcher: the plain model crashes in it
        assert "0 active drivers" in result[name + "_plain"]
        model = build(name)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
        relative_close(torch.load(tmp_path / f"{name}_logits.pt"), ref)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert result[name + "_tokens"] == model.generate(ids, **kw).tolist()
