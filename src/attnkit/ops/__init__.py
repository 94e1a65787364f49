"""Pure attention functions (no parameters), all in SDPA layout [B, H, L, E]."""

from attnkit.ops.argmax import argmax_attention
from attnkit.ops.decay import (
    gated_linear_attention,
    gated_linear_attention_reference,
    gated_linear_attention_step,
)
from attnkit.ops.delta import delta_rule_attention, delta_rule_reference, delta_rule_step
from attnkit.ops.kernel import kernel_attention
from attnkit.ops.linear import LinearAttentionState, linear_attention, linear_attention_step
from attnkit.ops.softmax import sdpa, sdpa_reference

__all__ = [
    "LinearAttentionState",
    "argmax_attention",
    "delta_rule_attention",
    "delta_rule_reference",
    "delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gated_linear_attention_step",
    "kernel_attention",
    "linear_attention",
    "linear_attention_step",
    "sdpa",
    "sdpa_reference",
]
