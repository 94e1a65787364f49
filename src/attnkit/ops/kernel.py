"""Kernelized attention, equation (4), for any similarity function.

Tsai et al. (2019) read attention as a kernel smoother: every query averages the
values, weighted by a similarity ``sim`` between the query and each key::

    V'_i = sum_j sim(Q_i, K_j) V_j / sum_j sim(Q_i, K_j)              (4)

Softmax attention is the case sim(q, k) = exp(q . k / sqrt(E)). This module is the
plain O(L S) *reference* for every similarity: it materialises the full [L, S]
similarity matrix. The linearized O(N D' M) form of the same sum, for similarities
that factor as phi(q) . phi(k), lives in :mod:`attnkit.ops.linear`; the tests pin
the two together.

Similarities are chosen by name from a small registry (see :func:`similarities`)
or given as a callable ``(q [B, H, L, E], k [B, H, S, E]) -> sim [B, H, L, S]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit import feature_maps
from attnkit._contract import Contraction, contract
from attnkit._numerics import check_denominator, check_finite, check_output_range
from attnkit._registry import Registry
from attnkit._validation import QKVDims, check_choice, check_mask, check_qkv
from attnkit.ops.softmax import CausalAlignment, causal_mask

__all__ = [
    "CONTRACTIONS",
    "FEATURE_DOTS",
    "NUMERATOR",
    "SIM_DOTS",
    "LogSimilarity",
    "Similarity",
    "SimilarityBuilder",
    "get_similarity",
    "kernel_attention",
    "register_similarity",
    "similarities",
]

#: ``(q [B, H, L, E], k [B, H, S, E]) -> sim [B, H, L, S]``, one head of k per head of q.
Similarity = Callable[[Tensor, Tensor], Tensor]

# ---- the contractions of kernel_attention (read by attnkit.cost) ---------------------------
#: q kᵀ inside the registered similarities (softmax, gaussian, polynomial): any leading
#: axes, [B, H] in kernel_attention, where k has been expanded to the H query heads.
SIM_DOTS = Contraction(
    "dots",
    "...le,...se->...ls",
    ("q", "k_heads"),
    "dots",
    {"...": "B*H", "l": "L", "s": "S", "e": "E"},
)
#: phi(q) phi(k)ᵀ of ``sim="linear"``, D' = Dp features.
FEATURE_DOTS = Contraction(
    "feature_dots",
    "...ld,...sd->...ls",
    ("fq", "fk_heads"),
    "dots",
    {"...": "B*H", "l": "L", "s": "S", "d": "Dp"},
)
#: sum_j sim(Q_i, K_j) V_j, per key/value head and its G = H/Hk query heads (no copy of v).
NUMERATOR = Contraction(
    "numerator",
    "bkgls,bksv->bkglv",
    ("sim", "v"),
    "num",
    {"b": "B", "k": "Hk", "g": "H/Hk", "l": "L", "s": "S", "v": "Ev"},
)
#: Every contraction of this module.
CONTRACTIONS: tuple[Contraction, ...] = (SIM_DOTS, FEATURE_DOTS, NUMERATOR)

_ALIGNMENTS: tuple[str, ...] = ("upper_left", "lower_right")


@dataclass(frozen=True)
class LogSimilarity:
    """A similarity given by its logarithm: ``sim(q, k) = exp(log_sim(q, k))``.

    :func:`kernel_attention` treats it in log space, as softmax does: a float mask is
    added to ``log_sim`` and the row maximum is subtracted before ``exp`` (the
    normalisation in equation (4) cancels it), so large scores never overflow.
    Calling the object returns the plain (unshifted) similarity.
    """

    log_sim: Similarity

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.exp(self.log_sim(q, k))


#: ``(**options) -> Similarity``: what the registry stores, e.g. ``degree=3, c=0.5``.
SimilarityBuilder = Callable[..., Similarity]

_SIMILARITIES: Registry[SimilarityBuilder] = Registry("similarity")


def register_similarity(name: str) -> Callable[[SimilarityBuilder], SimilarityBuilder]:
    """Decorator registering a similarity *builder* ``(**options) -> Similarity`` as ``name``.

    A builder returning a :class:`LogSimilarity` is evaluated in log space.
    """
    return _SIMILARITIES.register(name)


def similarities() -> list[str]:
    """Names of the registered similarities, for ``kernel_attention(sim=...)``."""
    return _SIMILARITIES.names()


def get_similarity(name: str, **options: Any) -> Similarity:
    """Build the similarity registered as ``name`` with keyword ``options``."""
    builder = _SIMILARITIES.get(name)
    try:
        return builder(**options)
    except TypeError as err:
        raise TypeError(f"similarity {name!r}: {err}") from None


def _default_scale(scale: float | None, q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


@register_similarity("softmax")
def _softmax(scale: float | None = None) -> Similarity:
    """sim(q, k) = exp(scale * q . k), scale = 1/sqrt(E) by default: softmax attention."""

    def log_sim(q: Tensor, k: Tensor) -> Tensor:
        return contract(SIM_DOTS, q, k) * _default_scale(scale, q)

    return LogSimilarity(log_sim)


@register_similarity("gaussian")
def _gaussian(scale: float | None = None) -> Similarity:
    """sim(q, k) = exp(-scale/2 * ||q - k||^2), scale = 1/sqrt(E) (RBF kernel, Tsai et al.)."""

    def log_sim(q: Tensor, k: Tensor) -> Tensor:
        # ||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2, without an [L, S, E] difference tensor.
        sq = (q * q).sum(-1, keepdim=True) - 2.0 * contract(SIM_DOTS, q, k)
        sq = sq + (k * k).sum(-1).unsqueeze(-2)
        return -0.5 * _default_scale(scale, q) * sq

    return LogSimilarity(log_sim)


@register_similarity("polynomial")
def _polynomial(degree: int = 2, c: float = 1.0) -> Similarity:
    """sim(q, k) = (q . k + c)^degree. Can reach 0 (or go negative for odd degree)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"polynomial similarity: degree must be an int >= 1, got {degree!r}")

    def sim(q: Tensor, k: Tensor) -> Tensor:
        return (contract(SIM_DOTS, q, k) + c) ** degree

    return sim


@register_similarity("linear")
def _linear(feature_map: str | feature_maps.FeatureMap = "elu") -> Similarity:
    """sim(q, k) = phi(q) . phi(k) for a feature map phi (name or instance; default elu+1).

    The unbiased phi on both sides (no query rescaling), so this is the reference the
    linear forms are checked against. A name of a map drawn for one width (``"favor"``)
    is built for the input width with seed 0, as :func:`attnkit.linear_attention` does.
    """
    given = feature_maps.resolve(feature_map)  # validates the name or the type now
    built: dict[int, feature_maps.FeatureMap] = {}

    def phi_for(d: int) -> feature_maps.FeatureMap:
        if not (isinstance(feature_map, str) and given.needs_dim):
            return given
        if d not in built:
            built[d] = feature_maps.resolve(feature_map, d)
        return built[d]

    def sim(q: Tensor, k: Tensor) -> Tensor:
        phi = phi_for(q.shape[-1])
        phi.check_width(q.shape[-1])
        fq: Tensor = phi(q)
        fk: Tensor = phi(k)
        return contract(FEATURE_DOTS, fq, fk)

    return sim


def _resolve_sim(sim: object, sim_kwargs: Mapping[str, Any] | None) -> Similarity:
    if isinstance(sim, str):
        return get_similarity(sim, **dict(sim_kwargs or {}))
    if callable(sim):
        if sim_kwargs:
            raise ValueError(
                "sim_kwargs only configures a registered similarity name; got a callable sim "
                f"and sim_kwargs={dict(sim_kwargs)!r} (bind options into the callable instead)"
            )
        return sim
    raise TypeError(
        f"sim must be a registered name ({', '.join(map(repr, similarities()))}) or a callable "
        f"(q, k) -> sim, got {type(sim).__name__}"
    )


def _check_sim_output(scores: object, dims: QKVDims) -> Tensor:
    want = (dims.B, dims.H, dims.L, dims.S)
    if not isinstance(scores, Tensor):
        raise TypeError(f"sim(q, k) must return a torch.Tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != want:
        raise ValueError(
            f"sim(q, k) must return shape [B, H, L, S] = {list(want)}, got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"sim(q, k) must return a floating tensor, got {scores.dtype}")
    return scores


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sim: str | Similarity = "softmax",
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    eps: float | None = None,
    sim_kwargs: Mapping[str, Any] | None = None,
    *,
    causal_alignment: CausalAlignment = "upper_left",
    normalize: bool = True,
    enable_gqa: bool = False,
) -> Tensor:
    r"""Kernelized attention with any similarity: the quadratic reference of equation (4).

    ::

        V'_i = sum_j sim(Q_i, K_j) V_j / sum_j sim(Q_i, K_j)

    Shape legend (PyTorch's SDPA layout)::

        q [B, H, L, E]     B batch, H query heads, L query length, E key width
        k [B, Hk, S, E]    Hk key/value heads (H == Hk unless enable_gqa; then
        v [B, Hk, S, Ev]   H % Hk == 0 and query head h uses key/value head
                           h // (H / Hk)); S key length, Ev value width
        attn_mask          broadcastable to [B, H, L, S]
        returns [B, H, L, Ev]

    Args:
        sim: a registered name (:func:`similarities`: ``"softmax"`` exp(q.k * scale),
            ``"gaussian"`` exp(-scale/2 ||q-k||^2), ``"polynomial"`` (q.k + c)^degree,
            ``"linear"`` phi(q).phi(k)) or a callable ``(q [B, H, L, E], k [B, H, S, E])
            -> [B, H, L, S]``; with GQA the callable sees k expanded to H heads. A
            :class:`LogSimilarity` is evaluated in log space.
        attn_mask: bool (True = attend; a masked similarity becomes 0) or float, added
            in log space like softmax's additive mask: sim is multiplied by exp(mask),
            so -inf removes the key. Size-1 axes broadcast as in SDPA.
        is_causal: query i attends keys j <= i (``causal_alignment="upper_left"``,
            torch's convention) or j <= i + S - L (``"lower_right"``). May be combined
            with ``attn_mask`` (both must allow a key).
        eps: the denominator policy. ``None`` (default): any row that may attend at
            least one key and whose denominator is <= 0 or not finite raises ValueError
            saying how many rows. A float > 0 is a guard that changes the math: the
            denominator is ``clamp_min(eps)``-ed (it must still be finite), so rows whose
            denominator is below eps are damped instead of raising; rows above eps are
            unchanged.
        sim_kwargs: options for a registered similarity, e.g. ``{"scale": 0.1}``,
            ``{"degree": 3, "c": 0.5}``, ``{"feature_map": "elu"}``.
        causal_alignment: see ``is_causal``.
        normalize: ``False`` returns the numerator sum_j sim(Q_i, K_j) V_j alone (log-space
            similarities are then exponentiated without the row-max shift); it must be
            finite (ValueError otherwise).
        enable_gqa: allow H != Hk (grouped-query attention), as in
            :func:`attnkit.sdpa`; without it H != Hk raises ValueError.

    Fully masked rows: a query that ``attn_mask`` and ``is_causal`` leave no key to
    attend (bool False or float -inf everywhere, or S = 0) outputs 0, as
    :func:`attnkit.sdpa` does, whatever ``eps``; it is not an error.

    Positivity: sim > 0 everywhere (softmax, gaussian, ``linear`` with a positive
    feature map such as elu+1) is sufficient for a nonzero denominator. A kernel that
    can reach 0, e.g. (q.k + 1)^2 at q.k = -1, needs ``eps``.

    Non-finite values: NaN or inf in q or k reach the denominators of the rows they
    touch, which raises ValueError. NaN/inf in v is not checked: it reaches every row
    (a masked weight is 0, and 0 * NaN is NaN in the product with v). Finite inputs
    never give a non-finite output: sims that overflow raise, and an fp16/bf16 output
    that would not fit its dtype raises ValueError naming the dtype.
    The checks are reductions over the B H L denominators (and the output for half
    dtypes); on a GPU they are queued with ``torch._assert_async`` (no host sync).

    Cost: time O(B H L S (E + Ev)), memory O(B H L S) for the similarity matrix.
    fp16/bf16 inputs are computed and accumulated in fp32; the output has q's dtype.

    Equivalent to (for a plain-space similarity, bool mask, no GQA)::

        w = sim(q, k).masked_fill(~mask, 0)
        return (w @ v) / w.sum(-1, keepdim=True)
    """
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    dims = check_qkv(q, k, v, allow_gqa=enable_gqa)
    mask = check_mask(attn_mask, dims)
    if mask is not None and mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device ({q.device}), got {mask.device}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    check_choice("causal_alignment", causal_alignment, _ALIGNMENTS)
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0
    ):
        raise ValueError(f"eps must be None or a float > 0, got {eps!r}")
    similarity = _resolve_sim(sim, sim_kwargs)

    out_dtype = q.dtype
    # Sums over S grow with the key length: accumulate half inputs in fp32.
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    B, H, Hk, G, L, S, Ev = dims.B, dims.H, dims.Hk, dims.group_size, dims.L, dims.S, dims.Ev
    # The reference may expand k to the H query heads (a copy; the fast paths avoid it).
    k_heads = kf if G == 1 else kf[:, :, None].expand(B, Hk, G, S, dims.E).reshape(B, H, S, -1)

    keep: Tensor | None = None
    if mask is not None and mask.dtype == torch.bool:
        keep = mask
    if is_causal:
        cmask = causal_mask(L, S, causal_alignment, q.device)
        keep = cmask if keep is None else keep & cmask
    add: Tensor | None = None
    if mask is not None and mask.dtype != torch.bool:
        add = mask.to(acc)
    # Rows that may attend at least one key (None: all of them); the others output 0.
    allowed = keep
    if add is not None:
        finite_add = add > float("-inf")
        allowed = finite_add if allowed is None else allowed & finite_add
    attendable = None if allowed is None else allowed.any(dim=-1)
    if S == 0:  # no keys at all: every row outputs 0
        attendable = torch.zeros(B, H, L, dtype=torch.bool, device=q.device)

    if isinstance(similarity, LogSimilarity):
        scores = _check_sim_output(similarity.log_sim(qf, k_heads), dims)
        if add is not None:
            scores = scores + add
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        if normalize and S > 0:
            # exp(s - m) / sum exp(s - m) == exp(s) / sum exp(s): the shift cancels, so it
            # is detached (exactly zero gradient); a fully masked row keeps m = 0 and w = 0.
            m = scores.detach().amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            scores = scores - m
        w = torch.exp(scores)
    else:
        w = _check_sim_output(similarity(qf, k_heads), dims)
        if add is not None:
            w = w * torch.exp(add)
        if keep is not None:
            w = w.masked_fill(~keep, 0.0)
    w = w.to(acc)

    # [B, H, L, S] -> [B, Hk, G, L, S] so v is used per key/value head without a copy.
    num = contract(NUMERATOR, w.reshape(B, Hk, G, L, S), vf).reshape(B, H, L, Ev)
    if not normalize:
        check_finite(num, "kernel_attention", "the numerator (normalize=False)", _HINT)
        check_output_range(num, out_dtype, "kernel_attention")
        return num.to(out_dtype)
    den = w.sum(dim=-1)  # [B, H, L]
    if attendable is not None:
        # A row with no key to attend has num = 0: divide it by 1, outside the check.
        den = torch.where(attendable, den, torch.ones_like(den))
    check_denominator(den, "kernel_attention", positive=False, guarded=eps is not None, hint=_HINT)
    if eps is not None:
        den = den.clamp_min(eps)
    out = num / den.unsqueeze(-1)
    if not isinstance(similarity, LogSimilarity):  # exp-similarities average the values
        check_output_range(out, out_dtype, "kernel_attention")
    return out.to(out_dtype)


_HINT = (
    "kernels that can reach 0 such as (q.k+1)^2 or non-positive feature maps need "
    "eps=... (e.g. eps=1e-6; a guard that changes the result of rows below it), or use a "
    "positive similarity; NaN/inf in q or k, or sims that overflow, are never guarded"
)
