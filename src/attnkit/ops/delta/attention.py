"""The delta rule (DeltaNet, Gated DeltaNet, KDA): the public functions.

``delta_rule_attention`` runs a whole sequence (the chunked UT/WY fast path of
:mod:`attnkit.ops.gated_chunked`), ``delta_rule_step`` one token from a state
(decoding), ``delta_rule_reference`` the plain recurrence both are tested against.
The math is in :mod:`attnkit.ops.delta.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops import gated_chunked
from attnkit.ops.delta.reference import recurrent_delta
from attnkit.ops.gated_common import (
    GatedDims,
    acc_dtype,
    check_bool,
    check_chunk_size,
    check_gated_inputs,
    check_scale,
    check_state,
    expand_keys,
    l2norm,
    merge_output_heads,
    queries_per_state,
)
from attnkit.ops.gated_step import step

__all__ = ["delta_rule_attention", "delta_rule_reference", "delta_rule_step"]


def _front(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    scale: float | None,
    use_qk_l2norm: bool,
    state: Tensor | None,
    output_final_state: bool,
    enable_gqa: bool,
    state_name: str = "initial_state",
) -> tuple[GatedDims, Tensor, float]:
    """Validate; return the sizes, the initial state (acc dtype) and the scale."""
    check_bool("output_final_state", output_final_state)
    check_bool("use_qk_l2norm", use_qk_l2norm)
    dims = check_gated_inputs(q, k, v, g, beta, enable_gqa=enable_gqa, need_g=False, need_beta=True)
    s = check_scale(scale, dims.D)
    acc = acc_dtype(q.dtype)
    if state is None:
        S0 = torch.zeros(dims.B, dims.Hv, dims.D, dims.M, dtype=acc, device=q.device)
    else:
        S0 = check_state(state_name, state, dims, q.device, acc)
    return dims, S0, s


def delta_rule_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""Causal attention with a delta-rule state; returns ``(o, final_state)``.

    ::

        S'  = Diag(exp(g_t)) S_{t-1}                    (g = None: S' = S_{t-1})
        S_t = S' + beta_t k_t (v_t - S'^T k_t)^T        S_0 = initial_state (zeros if None)
        o_t = S_t^T (scale q_t)

    g None is DeltaNet (Schlag et al. 2021; Yang et al. 2024), g [B, Hv, L] the gated
    delta rule (Gated DeltaNet, Yang et al. 2024; Qwen3-Next, Qwen3.5), g [B, Hv, L, D]
    Kimi Linear's KDA (the decay is applied before the delta update, as in fla's
    ``naive_recurrent_kda``). Keys should have unit norm (``use_qk_l2norm=True``
    normalises q and k as HF and fla do); then for 0 <= beta <= 2 the state cannot grow.

    Runs the chunked UT/WY fast path: per chunk of C tokens the C rank-1 updates become
    matmuls through a unit lower-triangular inverse; only the state update
    S_{c-1} -> S_c runs chunk by chunk. The backward pass recomputes (training memory
    O(L (D + M)) per head plus one state per tile). Every decay factor formed is exp of
    a number <= 0.

    Args:
        beta: [B, Hv, L], the write strength, in [0, 2] (usually sigmoid(x); some
            models use 2 sigmoid(x)).
        g: None, [B, Hv, L] or [B, Hv, L, D]: log-space decays, <= 0.
        scale: the queries' scale; None means 1/sqrt(D) (fla's and HF's convention).
        use_qk_l2norm: L2-normalise q and k over D in the accumulation dtype (fp32 for
            fp32/fp16/bf16 inputs): x * rsqrt(sum(x^2) + 1e-6), as HF's
            ``torch_chunk_gated_delta_rule(use_qk_l2norm_in_kernel=True)``.
        initial_state: [B, Hv, D, M], e.g. the final state of the previous segment;
            cast to the accumulation dtype (gradients flow back to it).
        output_final_state: also return the state after the last token.
        chunk_size: chunk length C of the fast path (None: 64). Any positive int gives
            the same result up to rounding.
        enable_gqa: allow different head counts (see the shape legend).

    Raises ValueError/TypeError naming the argument for wrong shapes, head counts or
    dtypes, g > 0 or non-finite g, and beta outside [0, 2].

    Shape legend (PyTorch's SDPA layout; :mod:`attnkit.ops.gated_common` has the head
    layouts)::

        q [B, Hq, L, D]       B batch, L length, D key width
        k [B, Hk, L, D]       Hk key heads; each serves Hv / Hk consecutive state heads
        v [B, Hv, L, M]       Hv value heads = state heads, M value width
        beta [B, Hv, L]       g [B, Hv, L] or [B, Hv, L, D]
        state [B, Hv, D, M]   fp32 (fp64 for fp64 inputs), whatever q's dtype
        o [B, Ho, L, M]       q's dtype; Ho = max(Hq, Hv). Hq < Hv (grouped value heads,
                              Qwen3-Next: Hq = Hk): state head j reads q/k head
                              j // (Hv / Hq); Hq > Hv (SDPA's GQA): query head i reads
                              state head i // (Hq / Hv)

    Different head counts need ``enable_gqa=True`` (as in SDPA).
    """
    dims, S0, s = _front(
        q, k, v, beta, g, scale, use_qk_l2norm, initial_state, output_final_state, enable_gqa
    )
    C = check_chunk_size(chunk_size, gated_chunked.DEFAULT_CHUNK)
    o, S = gated_chunked.chunked_attention(
        q, k, v, g, beta, S0, dims, scale=s, chunk=C, use_qk_l2norm=use_qk_l2norm
    )
    return o, (S if output_final_state else None)


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence of :func:`delta_rule_attention`, token by token (plain autograd).

    Same arguments (no ``chunk_size``) and shapes; computes in the accumulation dtype,
    so float64 inputs give float64 results. For checking, not for speed.
    """
    dims, S0, s = _front(
        q, k, v, beta, g, scale, use_qk_l2norm, initial_state, output_final_state, enable_gqa
    )
    qa, ka = q.to(S0.dtype), k.to(S0.dtype)
    if use_qk_l2norm:
        qa, ka = l2norm(qa), l2norm(ka)
    q5 = queries_per_state(qa, dims) * s
    o, S = recurrent_delta(q5, expand_keys(ka, dims.Hv), v, beta, g, S0)
    return merge_output_heads(o, dims).to(q.dtype), (S if output_final_state else None)


def delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    state: Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token of :func:`delta_rule_attention` from ``state``; returns ``(o, new_state)``.

    ::

        S' = Diag(exp(g)) S;  u = beta (v - S'^T k);  S_new = S' + k u^T;  o = S_new^T (scale q)

    q [B, Hq, 1, D], k [B, Hk, 1, D], v [B, Hv, 1, M], beta [B, Hv, 1], g None,
    [B, Hv, 1] or [B, Hv, 1, D]; state [B, Hv, D, M] (None: zeros); o [B, Ho, 1, M] in
    q's dtype, new_state in the accumulation dtype. ``state`` is not modified. A loop
    of steps equals :func:`delta_rule_attention` token by token.

    Cost per token O(Hv D M): the state is read once for k^T S' and q^T S' together
    (o = scale (q^T S' + (q . k) u) needs no second read) and written once (plus the
    decay's pass); see :mod:`attnkit.ops.gated_step`.
    """
    dims, S, s = _front(q, k, v, beta, g, scale, use_qk_l2norm, state, True, enable_gqa, "state")
    if dims.L != 1:
        raise ValueError(
            f"delta_rule_step takes one token (L = 1), got L={dims.L}; use "
            "delta_rule_attention for sequences"
        )
    gt = None if g is None else g[:, :, 0]
    o, S_new = step(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], gt, beta[:, :, 0], S, dims, s, use_qk_l2norm
    )
    return o.unsqueeze(2), S_new
