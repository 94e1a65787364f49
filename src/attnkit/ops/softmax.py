"""Softmax scaled dot-product attention: torch's fused kernel and a plain reference.

STUB: to be written (owner: ops-softmax/argmax helper).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

CausalAlignment = Literal["upper_left", "lower_right"]


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    causal_alignment: CausalAlignment = "upper_left",
) -> Tensor:
    raise NotImplementedError


def sdpa_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    causal_alignment: CausalAlignment = "upper_left",
) -> Tensor:
    raise NotImplementedError
