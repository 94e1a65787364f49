r"""Attention weight matrices of the attnkit ops: explicit for softmax and argmax, implicit
for every op that is linear in the values.

An attention op maps values to outputs through a weight matrix, o_i = sum_j A[i, j] v_j.
Softmax and argmax attention form A explicitly (:func:`softmax_weights`,
:func:`argmax_weights`). Kernelized and linearized attention never do, but their output
is still linear in v for fixed q and k:

    linear attention  A[i, j] = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')
                      (j, j' <= i when causal; Katharopoulos et al. 2020)
    decay             A[i, j] = s q_i^T Diag(a_{j+1} ... a_i) k_j for j <= i, else 0
                      (RetNet, Mamba-2, GLA: S_t = Diag(a_t) S_{t-1} + k_t v_t^T)
    delta rule        A = Tril(s Q K^T) (I + StrictTril(Diag(b) K K^T))^{-1} Diag(b)
                      (DeltaNet, Schlag et al. 2021; Yang et al. 2024: the WY form of
                      S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T from S_0 = 0)

(s the query scale). The last two are unnormalised, and the delta rule's entries take
either sign. Running the op once on one-hot values, v = I_S (value j is the j-th unit
vector), returns A itself: o_i = sum_j A[i, j] e_j = A[i, :]. :func:`implicit_weights`
does exactly that for *any* such op, which is how attnkit captures the weights of the
linear backend and of any backend it does not know; :func:`linear_weights` is the
plain formula of the first line, which the tests pin it to. The cost is one run of
the op with S-wide values: O(B Hk S^2) memory for the one-hot values, fine for the
L <= a few thousand tokens one looks at.

Shape legend (PyTorch's SDPA layout)::

    q [B, H, L, E], k [B, Hk, S, E] (H % Hk == 0 with enable_gqa: query head h reads
    key/value head h // (H / Hk)); weights [B, H, L, S], row i = query i
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit._contract import contract
from attnkit._validation import check_rank, check_tensor
from attnkit.feature_maps import FeatureMap, resolve
from attnkit.ops.softmax import (
    SCORES,
    CausalAlignment,
    check_attention_inputs,
    combine_masks,
    group_heads,
    masked_softmax,
)

__all__ = [
    "EXPLICIT_ARGMAX_MODES",
    "argmax_weights",
    "implicit_weights",
    "linear_weights",
    "softmax_weights",
]

#: Argmax modes whose forward weights are a function of q and k alone (the Gumbel modes
#: draw noise, so their weights come from :func:`implicit_weights` with the same draw).
EXPLICIT_ARGMAX_MODES: tuple[str, ...] = ("hard", "straight_through", "softmax")


def implicit_weights(op: Callable[[Tensor], Tensor], like: Tensor) -> Tensor:
    """The weight matrix of an attention op that is linear in v, from one run on v = I.

    ``op(v)`` must return the op's output [B, H, L, S] for values v [B, Hk, S, S]; it
    gets v = I_S in every batch and key/value head, so its output is A. ``like`` is k
    (or v) [B, Hk, S, ...]: it gives B, Hk, S, the dtype and the device. Examples::

        implicit_weights(lambda v: linear_attention(q, k, v, "elu", is_causal=True)[0], k)
        implicit_weights(lambda v: sdpa(q, k, v, is_causal=True), k)

    Any op whose output is linear in v qualifies: softmax, argmax, kernelized, linear,
    decay and delta-rule attention (for fixed q, k and gates). An op that is not
    linear in v (e.g. a nonlinearity applied after the values are mixed) gives a
    matrix that means nothing; :func:`attnkit.patterns.record_attention` only calls it
    on attention backends.

    Shapes: like ``[B, Hk, S, *]``, op: v [B, Hk, S, S] -> [B, H, L, S]; returns [B, H, L, S].
    """
    like = check_tensor("like", like)
    if like.dim() < 3:
        raise ValueError(
            f"like must be k or v [B, Hk, S, ...] (at least 3 dims), got shape {tuple(like.shape)}"
        )
    B, Hk, S = like.shape[0], like.shape[1], like.shape[2]
    eye = torch.eye(S, dtype=like.dtype, device=like.device).expand(B, Hk, S, S)
    out = check_tensor("op(v)", op(eye))
    check_rank("op(v)", out, "B H L S")
    if out.shape[0] != B or out.shape[-1] != S or out.shape[1] % Hk != 0:
        raise ValueError(
            f"op(v) for one-hot values v [B={B}, Hk={Hk}, S={S}, S={S}] must return "
            f"[B, H, L, S] with H a multiple of Hk, got {tuple(out.shape)}"
        )
    return out


def _scores(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    causal_alignment: CausalAlignment,
) -> tuple[Tensor, int, int, int, int]:
    """scale q k^T + mask in float32 (fp64 stays fp64): [B, Hk, G, L, S], and B, H, L, S."""
    dims, mask = check_attention_inputs(
        q, k, k, attn_mask, enable_gqa=enable_gqa, causal_alignment=causal_alignment
    )
    B, H, Hk, L, S, E, G = dims.B, dims.H, dims.Hk, dims.L, dims.S, dims.E, dims.group_size
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    scores = scale * contract(SCORES, q.to(acc).reshape(B, Hk, G, L, E), k.to(acc))
    mask = combine_masks(mask, is_causal, L, S, causal_alignment, q.device)
    if mask is not None:
        mask = group_heads(mask, Hk, G)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)
    return scores, B, H, L, S


def softmax_weights(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    causal_alignment: CausalAlignment = "upper_left",
) -> Tensor:
    """A = softmax(scale q k^T + mask): the weights :func:`attnkit.sdpa` applies to v.

    Same arguments and masking rules as :func:`attnkit.sdpa` (bool mask True = attend,
    float mask added, ``is_causal`` with ``causal_alignment``); a query with no
    attendable key gets a row of zeros. Computed in float32 for half inputs.

    Shapes: q [B, H, L, E], k [B, Hk, S, E] -> weights [B, H, L, S] (float32, or
    float64 for float64 inputs).
    """
    scores, B, H, L, S = _scores(q, k, attn_mask, is_causal, scale, enable_gqa, causal_alignment)
    if S == 0:  # no key: every row is empty
        return scores.reshape(B, H, L, S)
    return masked_softmax(scores).reshape(B, H, L, S)


def argmax_weights(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    mode: str = "hard",
    tau: float = 1.0,
    scale: float | None = None,
    enable_gqa: bool = False,
    causal_alignment: CausalAlignment = "upper_left",
) -> Tensor:
    """The forward weights of :func:`attnkit.argmax_attention` for a noise-free mode.

    ``"hard"`` and ``"straight_through"``: the one-hot row of the highest-scoring
    attendable key (ties to the lowest index, as ``torch.argmax``); ``"softmax"``:
    softmax(scores / tau). A query with no attendable key gets a row of zeros. The
    Gumbel modes draw noise per call: capture them with :func:`implicit_weights` (or
    :func:`attnkit.patterns.record_attention`, which replays the same draw).

    Shapes: q [B, H, L, E], k [B, Hk, S, E] -> weights [B, H, L, S].
    """
    if mode not in EXPLICIT_ARGMAX_MODES:
        raise ValueError(
            f"argmax_weights computes the modes {list(EXPLICIT_ARGMAX_MODES)}, got "
            f"mode={mode!r}; the Gumbel modes draw noise: use implicit_weights with the "
            "same generator state"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    scores, B, H, L, S = _scores(q, k, attn_mask, is_causal, scale, enable_gqa, causal_alignment)
    if S == 0:  # no key: every row is empty
        return scores.reshape(B, H, L, S)
    attendable = (scores > float("-inf")).any(dim=-1, keepdim=True)
    if mode == "softmax":
        weights = masked_softmax(scores / tau)
    else:
        index = scores.argmax(dim=-1, keepdim=True)
        weights = torch.zeros_like(scores).scatter_(-1, index, 1.0)
    weights = torch.where(attendable, weights, 0.0)
    return weights.reshape(B, H, L, S)


def linear_weights(
    q: Tensor,
    k: Tensor,
    feature_map: str | FeatureMap = "elu",
    is_causal: bool = False,
    normalize: bool = True,
    eps: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    r"""The implicit weights of linear attention, written out: the plain reference.

    ::

        N[i, j] = phi(q_i) . phi(k_j)        (0 where j > i when causal, L == S)
        A[i, j] = N[i, j] / sum_j' N[i, j']   (normalize=True; N itself otherwise)

    ``eps``: ``None`` requires every denominator to be > 0 (ValueError otherwise, e.g.
    for relu or identity features on unlucky inputs); a float clamps the denominator
    from below, as :func:`attnkit.linear_attention` does with its ``eps``.

    Shapes: q [B, H, L, E], k [B, Hk, S, E] -> weights [B, H, L, S] (float32, or
    float64 for float64 inputs).
    """
    dims, _ = check_attention_inputs(
        q, k, k, None, enable_gqa=enable_gqa, causal_alignment="upper_left"
    )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and dims.L != dims.S:
        raise ValueError(
            f"causal linear attention needs as many queries as keys: q has L={dims.L}, "
            f"k has S={dims.S}"
        )
    phi = resolve(feature_map)
    acc = torch.promote_types(q.dtype, torch.float32)
    B, H, Hk, L, S, G = dims.B, dims.H, dims.Hk, dims.L, dims.S, dims.group_size
    fq = phi(q.to(acc)).reshape(B, Hk, G, L, -1)  # [B, Hk, G, L, D']
    fk = phi(k.to(acc))  # [B, Hk, S, D']
    num = torch.einsum("bkgld,bksd->bkgls", fq, fk)
    if is_causal:
        num = num * torch.ones(L, S, dtype=num.dtype, device=num.device).tril()
    if normalize:
        den = num.sum(dim=-1, keepdim=True)
        if eps is None:
            if bool((den <= 0).any()):
                raise ValueError(
                    f"a denominator sum_j phi(q_i).phi(k_j) is <= 0 (min {float(den.min()):.3g}) "
                    "with eps=None; pass eps to clamp it (as linear_attention does) or use a "
                    "positive feature map"
                )
        else:
            den = den.clamp_min(eps)
        num = num / den
    return num.reshape(B, H, L, S)
