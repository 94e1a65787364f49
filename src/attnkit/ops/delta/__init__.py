"""The delta rule (DeltaNet, Gated DeltaNet, KDA): S_t = S' + beta_t k_t (v_t - S'^T k_t)^T.

- :mod:`attnkit.ops.delta.attention`: the public functions (sequence, step, reference);
- :mod:`attnkit.ops.delta.reference`: the recurrence and the chunked UT/WY form, plainly.
"""

from attnkit.ops.delta.attention import (
    delta_rule_attention,
    delta_rule_reference,
    delta_rule_step,
)

__all__ = ["delta_rule_attention", "delta_rule_reference", "delta_rule_step"]
