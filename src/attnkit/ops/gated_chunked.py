"""Chunked decay attention and delta rule (placeholder: runs the plain chunked references)."""

from __future__ import annotations

from torch import Tensor

from attnkit.ops.decay.reference import chunked_decay
from attnkit.ops.delta.reference import chunked_delta
from attnkit.ops.gated_common import (
    GatedDims,
    expand_keys,
    l2norm,
    merge_output_heads,
    queries_per_state,
)

__all__ = ["DEFAULT_CHUNK", "chunked_attention"]

#: Chunk length C when ``chunk_size=None``.
DEFAULT_CHUNK = 64


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    S0: Tensor,
    dims: GatedDims,
    *,
    scale: float,
    chunk: int,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Validated inputs -> (o [B, Ho, L, M] in q's dtype, final state in S0's dtype)."""
    acc = S0.dtype
    qa, ka = q.to(acc), k.to(acc)
    if use_qk_l2norm:
        qa, ka = l2norm(qa), l2norm(ka)
    q5 = queries_per_state(qa, dims) * scale
    ke = expand_keys(ka, dims.Hv)
    if beta is None:
        assert g is not None
        o, S = chunked_decay(q5, ke, v, g, S0, chunk)
    else:
        o, S = chunked_delta(q5, ke, v, beta, g, S0, chunk)
    return merge_output_heads(o, dims).to(q.dtype), S
