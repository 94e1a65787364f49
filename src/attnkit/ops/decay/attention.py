"""Decay ("gated linear") attention: the public functions.

``gated_linear_attention`` runs a whole sequence (the chunked fast path of
:mod:`attnkit.ops.gated_chunked`), ``gated_linear_attention_step`` one token from a
state (decoding), ``gated_linear_attention_reference`` the plain recurrence that both
are tested against. The math is in :mod:`attnkit.ops.decay.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops import gated_chunked
from attnkit.ops.decay.reference import recurrent_decay
from attnkit.ops.gated_common import (
    GatedDims,
    acc_dtype,
    check_bool,
    check_chunk_size,
    check_gated_inputs,
    check_scale,
    check_state,
    expand_keys,
    merge_output_heads,
    queries_per_state,
)
from attnkit.ops.gated_step import step

__all__ = [
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "gated_linear_attention_step",
]


def _front(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None,
    state: Tensor | None,
    output_final_state: bool,
    enable_gqa: bool,
    state_name: str = "initial_state",
) -> tuple[GatedDims, Tensor, float]:
    """Validate; return the sizes, the initial state (acc dtype) and the scale."""
    check_bool("output_final_state", output_final_state)
    dims = check_gated_inputs(q, k, v, g, None, enable_gqa=enable_gqa, need_g=True, need_beta=False)
    s = check_scale(scale, dims.D)
    acc = acc_dtype(q.dtype)
    if state is None:
        S0 = torch.zeros(dims.B, dims.Hv, dims.D, dims.M, dtype=acc, device=q.device)
    else:
        S0 = check_state(state_name, state, dims, q.device, acc)
    return dims, S0, s


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""Causal linear attention with a decaying state; returns ``(o, final_state)``.

    ::

        S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T      S_0 = initial_state (zeros if None)
        o_t = S_t^T (scale q_t)

    g [B, Hv, L] is one log-decay per head and token: RetNet (a constant per head),
    Lightning Attention / MiniMax (constant slopes), Mamba-2 and simple GLA
    (data-dependent); g [B, Hv, L, D] one per key channel: GLA (Yang et al. 2023).
    g = 0 everywhere is plain (unnormalised) causal linear attention.

    Runs the chunked fast path (intra-chunk masked matmuls with cumulated log-decays,
    the state carried chunk to chunk through cache-sized tiles, a backward pass that
    recomputes; training memory O(L (D + M)) per head). Every decay factor it forms is
    exp of a number <= 0, so no gate strength can overflow it.

    Args:
        scale: the queries' scale; None means 1/sqrt(D) (fla's and HF's convention).
        initial_state: [B, Hv, D, M], e.g. the final state of the previous segment;
            cast to the accumulation dtype (gradients flow back to it).
        output_final_state: also return the state after the last token.
        chunk_size: chunk length C of the fast path (None: 64). Any positive int gives
            the same result up to rounding.
        enable_gqa: allow different head counts (see the shape legend).

    Raises ValueError/TypeError naming the argument for wrong shapes, head counts or
    dtypes, and for g > 0 (a growing state) or non-finite g.

    Shape legend (PyTorch's SDPA layout; :mod:`attnkit.ops.gated_common` has the head
    layouts)::

        q [B, Hq, L, D]     B batch, L length, D key width
        k [B, Hk, L, D]     Hk key heads; each serves Hv / Hk consecutive state heads
        v [B, Hv, L, M]     Hv value heads = state heads, M value width
        g [B, Hv, L]        log-space decay per head and token (<= 0), or
          [B, Hv, L, D]     per key channel (GLA)
        state [B, Hv, D, M] fp32 (fp64 for fp64 inputs), whatever q's dtype
        o [B, Ho, L, M]     q's dtype; Ho = max(Hq, Hv). Hq > Hv (SDPA's GQA): query
                            head i reads state head i // (Hq / Hv); Hq < Hv (grouped
                            value heads, Qwen3-Next): state head j reads q head j // (Hv / Hq)

    Different head counts need ``enable_gqa=True`` (as in SDPA).
    """
    dims, S0, s = _front(q, k, v, g, scale, initial_state, output_final_state, enable_gqa)
    C = check_chunk_size(chunk_size, gated_chunked.DEFAULT_CHUNK)
    o, S = gated_chunked.chunked_attention(q, k, v, g, None, S0, dims, scale=s, chunk=C)
    return o, (S if output_final_state else None)


def gated_linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence of :func:`gated_linear_attention`, token by token (plain autograd).

    Same arguments (no ``chunk_size``) and shapes; computes in the accumulation dtype,
    so float64 inputs give float64 results. For checking, not for speed.
    """
    dims, S0, s = _front(q, k, v, g, scale, initial_state, output_final_state, enable_gqa)
    q5 = queries_per_state(q.to(S0.dtype), dims) * s
    o, S = recurrent_decay(q5, expand_keys(k, dims.Hv), v, g, S0)
    return merge_output_heads(o, dims).to(q.dtype), (S if output_final_state else None)


def gated_linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    state: Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token of :func:`gated_linear_attention` from ``state``; returns ``(o, new_state)``.

    ::

        S' = Diag(exp(g)) S + k v^T,    o = S'^T (scale q)

    q [B, Hq, 1, D], k [B, Hk, 1, D], v [B, Hv, 1, M], g [B, Hv, 1] or [B, Hv, 1, D];
    state [B, Hv, D, M] (None: zeros); o [B, Ho, 1, M] in q's dtype, new_state in the
    accumulation dtype. ``state`` is not modified. A loop of steps equals
    :func:`gated_linear_attention` token by token.

    Cost per token: O(Hv D M) time and memory traffic: the state is read once and
    written once (o = q^T S' is formed as (q^T Diag(a) S) + (q . k) v, from the same
    read of S as nothing else, without reading S' again).
    """
    dims, S, s = _front(q, k, v, g, scale, state, True, enable_gqa, "state")
    if dims.L != 1:
        raise ValueError(
            f"gated_linear_attention_step takes one token (L = 1), got L={dims.L}; use "
            "gated_linear_attention for sequences"
        )
    o, S_new = step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], None, S, dims, s, False)
    return o.unsqueeze(2), S_new
