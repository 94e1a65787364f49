"""Linearized attention with explicit feature maps, equation (6).

STUB: to be written (owner: kernel/linear helper).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from attnkit.feature_maps import FeatureMap


class LinearAttentionState(NamedTuple):
    """Recurrent state of linear attention: S [B, Hk, D', Ev] and z [B, Hk, D'] (fp32)."""

    S: Tensor
    z: Tensor


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: str | FeatureMap = "elu",
    is_causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    initial_state: LinearAttentionState | tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, LinearAttentionState | None]:
    raise NotImplementedError


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: LinearAttentionState | tuple[Tensor, Tensor] | None,
    feature_map: str | FeatureMap = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, LinearAttentionState]:
    raise NotImplementedError
