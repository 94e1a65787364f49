"""Decay ("gated linear") attention: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

- :mod:`attnkit.ops.decay.attention`: the public functions (sequence, step, reference);
- :mod:`attnkit.ops.decay.reference`: the recurrence and the chunked form, plainly.
"""

from attnkit.ops.decay.attention import (
    gated_linear_attention,
    gated_linear_attention_reference,
    gated_linear_attention_step,
)

__all__ = [
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gated_linear_attention_step",
]
