"""Argmax ("hard") attention and its trainable relaxations.

STUB: to be written (owner: ops-softmax/argmax helper).
"""

from __future__ import annotations

from torch import Generator, Tensor


def argmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    mode: str = "hard",
    tau: float = 1.0,
    generator: Generator | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    raise NotImplementedError
