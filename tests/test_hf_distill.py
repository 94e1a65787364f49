"""attnkit.hf.distill: attention transfer lowers its loss, fine-tune, resumable checkpoints."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

import attnkit.hf as ah

distill_mod = importlib.import_module("attnkit.hf.distill")  # the module, not the function
from attnkit.hf.distill import DistillConfig, lm_loss, transfer_loss  # noqa: E402

V = 61


def _model(fmap: str = "hedgehog", decay: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Larger than HF's 0.02, so the random teacher's attention is far from uniform and
        # its outputs are not ~0: there is something to mimic.
        initializer_range=0.1,
    )
    return ah.linearize(LlamaForCausalLM(cfg).eval(), fmap, decay=decay)


def _stream(n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, V, (n,), generator=g)


def _frozen_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".feature_map_" not in n and not n.endswith("decay_logit")
    }


@pytest.mark.parametrize(
    "fmap,loss,decay",
    [("hedgehog", "mse", False), ("t2r", "mse", True), ("hedgehog", "xent", False)],
)
def test_attention_transfer_lowers_its_loss_and_trains_only_the_maps(
    fmap: str, loss: str, decay: bool
) -> None:
    """On held-out windows the transfer loss falls to <= 0.7x its start (fixed seed);
    every non-map weight is bit-identical afterwards (stage 1 trains the maps only)."""
    model = _model(fmap, decay)
    held_out = _stream()[:192].reshape(6, 32) % V
    before = transfer_loss(model, held_out, loss)
    frozen = _frozen_state(model)
    cfg = DistillConfig(steps=40, lr=2e-2, loss=loss, batch_size=4, seq_len=32)
    log = ah.distill(model, _stream(), cfg, progress=False)
    after = transfer_loss(model, held_out, loss)
    assert len(log["transfer_loss"]) == 40 and log["finetune_loss"] == []
    assert after <= 0.7 * before, (before, after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not model.training


def test_finetune_full_lowers_next_token_loss() -> None:
    model = _model("hedgehog")
    ids = _stream()[:256].reshape(8, 32)
    before = lm_loss(model, ids)
    cfg = DistillConfig(steps=0, finetune_steps=15, finetune_lr=3e-3, batch_size=8, seq_len=32)
    log = ah.distill(model, ids.reshape(-1), cfg, progress=False)
    assert len(log["finetune_loss"]) == 15
    assert lm_loss(model, ids) < before - 0.05


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    """Kill stage 1 after 7 of 10 steps (checkpoints every 3), resume: the maps equal an
    uninterrupted run's exactly; fails if batches, optimizer state or steps drift."""
    cfg = DistillConfig(
        steps=10,
        finetune_steps=4,
        finetune_lr=1e-3,
        batch_size=2,
        seq_len=16,
        checkpoint_every=3,
    )
    whole = _model()
    ah.distill(whole, _stream(), cfg, out=tmp_path / "a", progress=False)

    part = _model()
    real = distill_mod._transfer_step
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "_transfer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        ah.distill(part, _stream(), cfg, out=tmp_path / "b", progress=False)
    monkeypatch.setattr(distill_mod, "_transfer_step", real)
    saved = torch.load(tmp_path / "b" / "distill.pt", weights_only=True)
    assert (saved["stage"], saved["step"]) == (1, 6)

    fresh = _model()  # a new process: nothing but the checkpoint carries the progress
    log = ah.distill(fresh, _stream(), cfg, out=tmp_path / "b", resume=True, progress=False)
    for (n, p), q in zip(whole.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
    ref = json.loads((tmp_path / "a" / "distill.json").read_text())
    assert log["transfer_loss"] == ref["transfer_loss"]
    assert log["finetune_loss"] == ref["finetune_loss"]


def test_resume_refuses_a_changed_config(tmp_path) -> None:
    cfg = DistillConfig(steps=2, batch_size=2, seq_len=16)
    ah.distill(_model(), _stream(), cfg, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="steps: checkpoint 2, now 3"):
        ah.distill(
            _model(),
            _stream(),
            DistillConfig(steps=3, batch_size=2, seq_len=16),
            out=tmp_path,
            resume=True,
            progress=False,
        )


def test_bad_inputs_are_named() -> None:
    model = _model()
    with pytest.raises(ValueError, match="T >= seq_len = 128, got T = 10"):
        ah.distill(model, torch.arange(10), progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        ah.distill(model, torch.rand(500), progress=False)
    with pytest.raises(ValueError, match="loss must be 'mse' or 'xent'"):
        DistillConfig(loss="kl")
    with pytest.raises(ValueError, match="finetune must be 'full' or 'lora'"):
        DistillConfig(finetune="half")
    with pytest.raises(ValueError, match="lr must be a float > 0"):
        DistillConfig(lr=0.0)
    plain = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    with pytest.raises(ValueError, match="linearize first"):
        ah.distill(plain, _stream(), progress=False)


def test_lora_finetune_merges_back_into_a_plain_model() -> None:
    pytest.importorskip("peft")  # optional: finetune="lora" needs peft, attnkit does not
    model = _model("hedgehog")
    ids = _stream()[:256].reshape(8, 32)
    before = lm_loss(model, ids)
    cfg = DistillConfig(
        steps=2, finetune_steps=10, finetune="lora", finetune_lr=1e-2, batch_size=8, seq_len=32
    )
    ah.distill(model, ids.reshape(-1), cfg, progress=False)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # merged
    assert lm_loss(model, ids) < before


# ---- the command line ---------------------------------------------------------------------


def test_cli_linearize_distills_saves_and_resumes(tmp_path) -> None:
    from typer.testing import CliRunner

    from attnkit.cli import app

    torch.manual_seed(0)
    src = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.1,
        )
    )
    src.save_pretrained(tmp_path / "src")
    torch.save(_stream(600), tmp_path / "tokens.pt")
    args = [
        "linearize",
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--tokens",
        str(tmp_path / "tokens.pt"),
        "--steps",
        "6",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--decay",
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "attention transfer: loss" in res.output
    model = ah.load_linearized(tmp_path / "out")
    assert ah.is_linearized(model) and model.config.attnkit_linearize["decay"] is True
    log = json.loads((tmp_path / "out" / "distill" / "distill.json").read_text())
    assert len(log["transfer_loss"]) == 6
    again = CliRunner().invoke(app, [*args, "--resume"])  # nothing left to do
    assert again.exit_code == 0, again.output
    log = json.loads((tmp_path / "out" / "distill" / "distill.json").read_text())
    assert len(log["transfer_loss"]) == 6  # the finished run was not repeated


def test_cli_linearize_names_unsupported_models(tmp_path) -> None:
    from transformers import OPTConfig, OPTForCausalLM
    from typer.testing import CliRunner

    from attnkit.cli import app

    cfg = OPTConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=16,
        word_embed_proj_dim=16,
    )
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    res = CliRunner().invoke(app, ["linearize", str(tmp_path / "opt"), str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "model_type='opt'" in res.output and "llama" in res.output
