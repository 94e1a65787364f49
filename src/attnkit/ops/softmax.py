"""Softmax scaled dot-product attention: torch's fused kernel and a plain reference.

``sdpa`` has the signature and semantics of
:func:`torch.nn.functional.scaled_dot_product_attention` and dispatches to it; it
adds input checks with readable errors, ``causal_alignment`` for decoding, and
``is_causal`` together with ``attn_mask``. ``sdpa_reference`` is the same math
written out plainly; the tests pin ``sdpa == sdpa_reference``.

Shape legend (PyTorch's SDPA layout)::

    q [B, H, L, E]     B batch, H query heads, L query length, E key width
    k [B, Hk, S, E]    Hk key/value heads (H % Hk == 0 for GQA), S key length
    v [B, Hk, S, Ev]   Ev value width
    out [B, H, L, Ev]
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._contract import Contraction, contract
from attnkit._validation import QKVDims, check_choice, check_mask, check_qkv

CausalAlignment = Literal["upper_left", "lower_right"]
CAUSAL_ALIGNMENTS: tuple[str, ...] = ("upper_left", "lower_right")

__all__ = [
    "CAUSAL_ALIGNMENTS",
    "CONTRACTIONS",
    "SCORES",
    "VALUES",
    "CausalAlignment",
    "causal_mask",
    "check_attention_inputs",
    "combine_masks",
    "group_heads",
    "masked_softmax",
    "sdpa",
    "sdpa_reference",
]

# ---- the contractions of sdpa_reference (read by attnkit.cost) -----------------------------
# Grouped-query layout: q is viewed as [B, Hk, G, L, E], G = H/Hk query heads per key/value
# head, so k and v are used per key/value head without copies.
_GROUPED = {"b": "B", "k": "Hk", "g": "H/Hk", "l": "L", "s": "S"}

#: scores = q kᵀ: q [B, Hk, G, L, E] · k [B, Hk, S, E] -> [B, Hk, G, L, S]
SCORES = Contraction("scores", "bkgle,bkse->bkgls", ("q", "k"), "scores", {**_GROUPED, "e": "E"})
#: out = weights v: weights [B, Hk, G, L, S] · v [B, Hk, S, Ev] -> [B, Hk, G, L, Ev]
VALUES = Contraction(
    "values", "bkgls,bksv->bkglv", ("weights", "v"), "out", {**_GROUPED, "v": "Ev"}
)
#: Both, in the order :func:`sdpa_reference` runs them.
CONTRACTIONS: tuple[Contraction, ...] = (SCORES, VALUES)


def causal_mask(L: int, S: int, alignment: str, device: torch.device | None = None) -> Tensor:
    """Bool mask [L, S], True = attend, for causal attention with the given alignment.

    ``"upper_left"`` (torch's ``is_causal``): query i attends keys j <= i.
    ``"lower_right"`` (decoding): query i attends keys j <= i + (S - L), i.e. the
    queries are the *last* L positions of a sequence whose first S - L keys are cached.
    """
    offset = 0 if alignment == "upper_left" else S - L
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=offset)


def combine_masks(
    attn_mask: Tensor | None,
    is_causal: bool,
    L: int,
    S: int,
    alignment: str,
    device: torch.device | None = None,
) -> Tensor | None:
    """Fold ``is_causal`` into ``attn_mask`` and return one mask (or None).

    A bool ``attn_mask`` is and-ed with the causal mask; a float one gets -inf where
    the causal mask forbids attending. Both broadcast to [..., L, S]. Lower-right
    alignment with L == 1 allows every key, so no causal mask is built.
    """
    if not is_causal or (alignment == "lower_right" and L == 1):
        return attn_mask
    causal = causal_mask(L, S, alignment, device)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return torch.where(causal, attn_mask, float("-inf"))


def masked_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` where a row of only -inf gives 0s, not NaNs.

    This matches torch 2.13's SDPA, which returns 0 for a query that may attend no
    key, and keeps gradients finite (they are 0 for such rows).
    """
    row_max = scores.amax(dim=dim, keepdim=True)
    # A fully masked row has max -inf; shift it by 0 instead so exp gives 0, not NaN.
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=dim, keepdim=True)
    return e / torch.where(denom == 0, 1.0, denom)


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    *,
    enable_gqa: bool,
    causal_alignment: str,
) -> tuple[QKVDims, Tensor | None]:
    """Validate q, k, v, the mask and the alignment shared by every softmax-like op.

    A floating mask must have q's dtype or float32 (what torch's SDPA accepts) and
    live on q's device. Returns the sizes and the mask.
    """
    dims = check_qkv(q, k, v, allow_gqa=enable_gqa)
    mask = check_mask(attn_mask, dims)
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
            raise TypeError(
                f"a floating attn_mask must have the query's dtype ({q.dtype}) or float32, "
                f"got {mask.dtype}"
            )
        if mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device ({q.device}), got {mask.device}")
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    return dims, mask


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
    """Scaled dot-product attention through torch's fused kernel.

    out = softmax(scale · q kᵀ + mask) v, with ``scale = 1/sqrt(E)`` by default.
    Same semantics as :func:`torch.nn.functional.scaled_dot_product_attention`:

    - ``attn_mask`` bool: True = attend; floating: added to the scores. It must
      broadcast to [B, H, L, S] through size-1 axes only (no silent broadcasts).
    - ``enable_gqa``: H may be a multiple of Hk; query head h uses key/value head
      h // (H // Hk).
    - ``dropout_p`` is applied to the attention weights (as torch does, always,
      whatever the module's training flag; pass 0.0 at evaluation).

    Unlike torch, ``is_causal`` may be combined with ``attn_mask``: both are folded
    into one mask (a key is attended only if both allow it).

    Causal alignment pitfall. When L != S, torch's ``is_causal`` is *upper-left*
    aligned: query i attends keys j <= i. Decoding appends L new queries after
    S - L cached keys, so it needs *lower-right* alignment: query i attends keys
    j <= i + S - L. For L = 2, S = 4 (``x`` = attend)::

        upper_left        lower_right
        x . . .           x x x .
        x x . .           x x x x

    The two agree when L == S; with L == 1 lower-right attends every key. With
    lower-right and L > S, the first L - S queries may attend no key.

    Fully masked rows: a query that may attend no key gets output 0 (and zero
    gradients), as torch 2.13 does, rather than NaN.

    Non-finite inputs (torch's behaviour, passed through unchecked): a query row with
    NaN gets 0 from torch's CPU fused kernel (its row maximum is NaN, which the kernel
    treats like a fully masked row) and NaN from :func:`sdpa_reference`; NaN in a key or
    value reaches every row, masked or not (0 * NaN is NaN). Finite inputs give finite
    outputs in every dtype.

    Shapes::

        q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]
        attn_mask broadcastable to [B, H, L, S]
        returns [B, H, L, Ev]
    """
    dims, mask = check_attention_inputs(
        q, k, v, attn_mask, enable_gqa=enable_gqa, causal_alignment=causal_alignment
    )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if is_causal and (mask is not None or (causal_alignment == "lower_right" and dims.L != dims.S)):
        # torch's is_causal is upper-left and refuses attn_mask: pass one combined mask.
        mask = combine_masks(mask, True, dims.L, dims.S, causal_alignment, q.device)
        is_causal = False
    if dims.H != dims.Hk and not is_causal and (mask is None or _folds_with_heads(mask, dims.L)):
        # GQA/MQA without a mask: the G query heads of a group are independent rows
        # against the same keys, so fold them into the query length ([B, Hk, G*L, E]).
        # torch's enable_gqa copies k and v G times on CPU; this streams them once
        # (decoding: one pass over the cache per step). A decoding step (L = 1) whose
        # mask is the same for every head (key padding) folds too: the mask row
        # [b, 1, 1, S] then serves all G rows (1.3x faster than enable_gqa at B=4,
        # H=32, Hk=8, S=4096 on the 2-core reference machine).
        qf = q.reshape(dims.B, dims.Hk, dims.group_size * dims.L, dims.E)
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # [b, 1, 1, S]
        o = F.scaled_dot_product_attention(qf, k, v, mask, dropout_p=dropout_p, scale=scale)
        return o.view(dims.B, dims.H, dims.L, dims.Ev)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa and dims.H != dims.Hk,
    )


def _folds_with_heads(mask: Tensor, L: int) -> bool:
    """A mask for one query row that every head shares (head axis absent or of size 1)."""
    return L == 1 and (mask.dim() < 3 or mask.shape[-3] == 1)


def group_heads(mask: Tensor, Hk: int, G: int) -> Tensor:
    """View a mask broadcastable to [B, H, L, S] as one broadcastable to [B, Hk, G, L, S]."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # [b, h, l, s]
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)  # [b, 1, 1, l, s]
    b, _, l_, s_ = mask.shape
    return mask.reshape(b, Hk, G, l_, s_)


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
    """Plain math scaled dot-product attention, the reference for :func:`sdpa`.

    Same semantics as :func:`sdpa` without dropout; see it for masks, GQA, causal
    alignment and fully masked rows (output 0). Half-precision inputs are computed
    in float32 and the result is cast back. Grouped-query attention reshapes q to
    [B, Hk, G, L, E] so each key/value head serves its G query heads without copies::

        scores = scale · q kᵀ + mask          [B, Hk, G, L, S]
        out    = softmax(scores) v            [B, Hk, G, L, Ev] -> [B, H, L, Ev]

    Shapes::

        B batch, H query heads, Hk key/value heads, G = H // Hk, L query length,
        S key length, E key width, Ev value width
        q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]
        attn_mask broadcastable to [B, H, L, S]
        returns [B, H, L, Ev]
    """
    dims, mask = check_attention_inputs(
        q, k, v, attn_mask, enable_gqa=enable_gqa, causal_alignment=causal_alignment
    )
    B, H, Hk, L, S, E, G = dims.B, dims.H, dims.Hk, dims.L, dims.S, dims.E, dims.group_size
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 accumulate in fp32
    scale = 1.0 / math.sqrt(E) if scale is None else scale

    qg = q.to(acc).reshape(B, Hk, G, L, E)  # query head h = hk * G + g
    kf, vf = k.to(acc), v.to(acc)
    scores = scale * contract(SCORES, qg, kf)  # [B, Hk, G, L, S]

    mask = combine_masks(mask, is_causal, L, S, causal_alignment, q.device)
    if mask is not None:
        mask = group_heads(mask, Hk, G)  # [b, hk, g, l, s], broadcastable to scores
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)

    weights = masked_softmax(scores)  # [B, Hk, G, L, S]
    out = contract(VALUES, weights, vf)  # [B, Hk, G, L, Ev]
    return out.reshape(B, H, L, dims.Ev).to(q.dtype)
