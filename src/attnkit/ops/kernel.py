"""Kernelized attention, equation (4), for any similarity function.

STUB: to be written (owner: kernel/linear helper).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

Similarity = Callable[[Tensor, Tensor], Tensor]


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sim: str | Similarity = "softmax",
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    eps: float | None = None,
    sim_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    raise NotImplementedError
