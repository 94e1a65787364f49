"""Small random HF linear-attention models for the attnkit.hf tests (built offline)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    KimiLinearConfig,
    KimiLinearForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

VOCAB = 97
LAYERS = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
GDN = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=6,  # each key head serves 3 value heads
    linear_key_head_dim=16,
    linear_value_head_dim=12,
)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    layer_types=LAYERS,
    pad_token_id=0,
)


def qwen3_next() -> torch.nn.Module:
    cfg = Qwen3NextConfig(
        **COMMON,
        **GDN,
        head_dim=12,
        intermediate_size=64,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    return Qwen3NextForCausalLM(cfg)


def qwen3_5() -> torch.nn.Module:
    return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**COMMON, **GDN, head_dim=12, intermediate_size=64))


def qwen3_5_moe() -> torch.nn.Module:
    cfg = Qwen3_5MoeTextConfig(
        **COMMON,
        **GDN,
        head_dim=12,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    return Qwen3_5MoeForCausalLM(cfg)


def kimi_linear() -> torch.nn.Module:
    cfg = KimiLinearConfig(
        **{**COMMON, "num_key_value_heads": 4},  # MLA: one latent key/value per head
        intermediate_size=64,
        moe_intermediate_size=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        linear_head_dim=12,
        linear_num_heads=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    return KimiLinearForCausalLM(cfg)


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "qwen3_next": qwen3_next,
    "qwen3_5": qwen3_5,
    "qwen3_5_moe": qwen3_5_moe,
    "kimi_linear": kimi_linear,
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    # Random init leaves A_log/dt_bias near-neutral; spread them so the decays matter.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "A_log"):
                m.A_log.uniform_(-2.0, 1.0)
            if hasattr(m, "dt_bias"):
                m.dt_bias.uniform_(-3.0, 1.0)
    return model


def batch(padded: bool, T: int = 41) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, T), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :7] = 0
        mask[1, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
