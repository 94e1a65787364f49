"""attnkit: the attention family, executable and checked.

Public layout everywhere (PyTorch's SDPA layout)::

    q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]
"""

from attnkit import data, decoding, distributed, feature_maps
from attnkit.layers import (
    Block,
    DeltaState,
    GatedDeltaNet,
    KVCache,
    LinearState,
    MultiHeadAttention,
    TinyLM,
    TinyLMConfig,
)
from attnkit.ops import (
    LinearAttentionState,
    argmax_attention,
    delta_rule_attention,
    delta_rule_reference,
    delta_rule_step,
    gated_linear_attention,
    gated_linear_attention_reference,
    gated_linear_attention_step,
    kernel_attention,
    linear_attention,
    linear_attention_step,
    sdpa,
    sdpa_reference,
)

__version__ = "0.1.0"

__all__ = [
    "Block",
    "DeltaState",
    "GatedDeltaNet",
    "KVCache",
    "LinearAttentionState",
    "LinearState",
    "MultiHeadAttention",
    "TinyLM",
    "TinyLMConfig",
    "__version__",
    "argmax_attention",
    "data",
    "decoding",
    "delta_rule_attention",
    "delta_rule_reference",
    "delta_rule_step",
    "distributed",
    "feature_maps",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gated_linear_attention_step",
    "kernel_attention",
    "linear_attention",
    "linear_attention_step",
    "sdpa",
    "sdpa_reference",
]
