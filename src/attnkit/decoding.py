r"""Incremental decoding in einsum form: one new token per sequence, MHA, MQA and GQA.

These are the reference functions of incremental decoding (Shazeer 2019, "Fast
Transformer Decoding: One Write-Head is All You Need"), written literally as that
paper's einsum contractions. Each takes the new token's input
``x``, the cached keys and values of the ``n`` previous tokens and the projection
weights, and returns the output for the new token and the caches grown by one.

Legend::

    b batch, d model width, h query heads, k key width per head (d/h in the doc),
    v value width per head, n cached tokens, g key/value heads (GQA groups),
    r = h/g query heads per group

    MHA  W_q, W_k [h, d, k], W_v [h, d, v], W_o [h, v, d]; cache K [b, h, n, k], V [b, h, n, v]
    MQA  W_q [h, d, k], W_k [d, k], W_v [d, v], W_o [h, v, d]; cache K [b, n, k], V [b, n, v]
    GQA  W_q [h, d, k], W_k [g, d, k], W_v [g, d, v], W_o [h, v, d];
         cache K [b, g, n, k], V [b, g, n, v]   (g = h is MHA, g = 1 is MQA)

Cost of one step (the doc's claims; the einsum specs below are exported as module
constants, and as :class:`~attnkit._contract.Contraction` records in ``MHA_SPECS``,
``MQA_SPECS`` and ``GQA_SPECS`` that the steps run and :mod:`attnkit.cost` counts):

- compute, all three: O(b d^2 + b n d) — the projections are b d^2, the logits and
  the weighted sum of values b n d;
- memory traffic (elements read): MHA O(d^2 + b d + b n d); MQA O(d^2 + b d + b n d/h),
  since all h heads share one [b, n, k] cache; GQA O(d^2 + b d + b n d g/h).

Memory traffic is what bounds decoding: for b n >> d the cache reads dominate, and
MQA/GQA shrink exactly that term by h (h/g).

The growing cache is returned as ``torch.cat([prev, new])``, which copies the whole
cache every step (O(b n d) extra traffic). That is how the textbook function is
written and it is kept here because these are the *reference* functions; the fast
cache with preallocated, geometrically growing buffers is
:class:`attnkit.layers.cache.KVCache`.

Scale 1/sqrt(k). fp16/bf16 inputs compute the softmax and the sum over the n + 1
cached values in float32 (that sum grows with n) and return ``y`` in x's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit._contract import Contraction, contract
from attnkit._validation import check_float, check_same_device, check_same_dtype, check_tensor

__all__ = [
    "GQA_EINSUMS",
    "GQA_K",
    "GQA_LOGITS",
    "GQA_OUT",
    "GQA_Q",
    "GQA_SPECS",
    "GQA_V",
    "GQA_VALUES",
    "MHA_EINSUMS",
    "MHA_K",
    "MHA_LOGITS",
    "MHA_OUT",
    "MHA_Q",
    "MHA_SPECS",
    "MHA_V",
    "MHA_VALUES",
    "MQA_EINSUMS",
    "MQA_K",
    "MQA_LOGITS",
    "MQA_OUT",
    "MQA_Q",
    "MQA_SPECS",
    "MQA_V",
    "MQA_VALUES",
    "gqa_step",
    "mha_step",
    "mqa_step",
]

# ---- einsum specs, in the order each step uses them -------------------------------------
# MHA: every query head has its own key/value head.
MHA_Q = "bd,hdk->bhk"  # queries        x [b, d] · W_q [h, d, k] -> q [b, h, k]
MHA_K = "bd,hdk->bhk"  # new key        x [b, d] · W_k [h, d, k] -> k [b, h, k]
MHA_V = "bd,hdv->bhv"  # new value      x [b, d] · W_v [h, d, v] -> v [b, h, v]
MHA_LOGITS = "bhk,bhnk->bhn"  # logits  q [b, h, k] · K [b, h, n, k] -> [b, h, n]
MHA_VALUES = "bhn,bhnv->bhv"  # mix     w [b, h, n] · V [b, h, n, v] -> o [b, h, v]
MHA_OUT = "bhv,hvd->bd"  # output       o [b, h, v] · W_o [h, v, d] -> y [b, d]

# MQA: one key/value head shared by all h query heads.
MQA_Q = "bd,hdk->bhk"  # queries        x [b, d] · W_q [h, d, k] -> q [b, h, k]
MQA_K = "bd,dk->bk"  # new key          x [b, d] · W_k [d, k] -> k [b, k]
MQA_V = "bd,dv->bv"  # new value        x [b, d] · W_v [d, v] -> v [b, v]
MQA_LOGITS = "bhk,bnk->bhn"  # logits   q [b, h, k] · K [b, n, k] -> [b, h, n]
MQA_VALUES = "bhn,bnv->bhv"  # mix      w [b, h, n] · V [b, n, v] -> o [b, h, v]
MQA_OUT = "bhv,hvd->bd"  # output       o [b, h, v] · W_o [h, v, d] -> y [b, d]

# GQA: g key/value heads, each shared by the r = h/g query heads of its group.
GQA_Q = "bd,hdk->bhk"  # queries        x [b, d] · W_q [h, d, k] -> q [b, h, k]
GQA_K = "bd,gdk->bgk"  # new key        x [b, d] · W_k [g, d, k] -> k [b, g, k]
GQA_V = "bd,gdv->bgv"  # new value      x [b, d] · W_v [g, d, v] -> v [b, g, v]
GQA_LOGITS = "bgrk,bgnk->bgrn"  # logits q [b, g, r, k] · K [b, g, n, k] -> [b, g, r, n]
GQA_VALUES = "bgrn,bgnv->bgrv"  # mix   w [b, g, r, n] · V [b, g, n, v] -> o [b, g, r, v]
GQA_OUT = "bhv,hvd->bd"  # output       o [b, h, v] · W_o [h, v, d] -> y [b, d]

#: The contractions of one step of each variant, by role.
MHA_EINSUMS: dict[str, str] = {
    "q": MHA_Q, "k": MHA_K, "v": MHA_V, "logits": MHA_LOGITS, "values": MHA_VALUES, "out": MHA_OUT
}  # fmt: skip
MQA_EINSUMS: dict[str, str] = {
    "q": MQA_Q, "k": MQA_K, "v": MQA_V, "logits": MQA_LOGITS, "values": MQA_VALUES, "out": MQA_OUT
}  # fmt: skip
GQA_EINSUMS: dict[str, str] = {
    "q": GQA_Q, "k": GQA_K, "v": GQA_V, "logits": GQA_LOGITS, "values": GQA_VALUES, "out": GQA_OUT
}  # fmt: skip

# ---- the same specs as Contraction records: what the steps run and attnkit.cost counts ---
# Sizes of the letters in the legend above; the cache index n is n + 1 long once the new
# token is appended, and r = h/g query heads share one key/value head.
_SIZES = {"b": "b", "d": "d", "h": "h", "g": "g", "k": "k", "v": "v", "n": "n + 1", "r": "h/g"}
# Tensor names: operands and result of each role, as the cost model calls them.
_TENSORS = {
    "q": (("x", "W_q"), "q"),
    "k": (("x", "W_k"), "k_new"),
    "v": (("x", "W_v"), "v_new"),
    "logits": (("q", "new_K"), "logits"),
    "values": (("w", "new_V"), "o"),
    "out": (("o", "W_o"), "y"),
}


def _specs(einsums: dict[str, str]) -> dict[str, Contraction]:
    """Contraction records of one variant's einsums, keyed by role."""
    specs = {}
    for role, equation in einsums.items():
        operands, output = _TENSORS[role]
        letters = {c for c in equation if c.isalpha()}
        sizes = {c: _SIZES[c] for c in sorted(letters)}
        specs[role] = Contraction(role, equation, operands, output, sizes)
    return specs


#: The contractions of one step of each variant, by role, as run by the step functions.
MHA_SPECS: dict[str, Contraction] = _specs(MHA_EINSUMS)
MQA_SPECS: dict[str, Contraction] = _specs(MQA_EINSUMS)
GQA_SPECS: dict[str, Contraction] = _specs(GQA_EINSUMS)


def _shape(name: str, t: object, legend: str, expected: Sequence[int | None]) -> tuple[int, ...]:
    """Check ``t`` is a float tensor of shape ``expected`` (None = any size); return its shape.

    ``legend`` names the axes, e.g. ``"g d k"``; the error states the expected shape
    with the known sizes filled in and the actual shape.
    """
    t = check_tensor(name, t)
    check_float(name, t)
    axes = legend.split()
    ok = t.dim() == len(expected) and all(
        want is None or have == want for have, want in zip(t.shape, expected, strict=True)
    )
    if not ok:
        filled = ", ".join(
            a if w is None else f"{a}={w}" for a, w in zip(axes, expected, strict=True)
        )
        raise ValueError(
            f"{name} must be [{', '.join(axes)}] = [{filled}], got shape {tuple(t.shape)}"
        )
    return tuple(t.shape)


def _check_common(x: object, W_q: object) -> tuple[int, int, int, int]:
    """Validate x [b, d] and W_q [h, d, k]; return (b, d, h, k)."""
    b, d = _shape("x", x, "b d", (None, None))
    h, _, k = _shape("W_q", W_q, "h d k", (None, d, None))
    if h == 0 or k == 0:
        raise ValueError(f"W_q must have at least one head and key width >= 1, got [h={h}, k={k}]")
    return b, d, h, k


def _finish(x: Tensor, logits: Tensor, V: Tensor, spec: Contraction, k: int) -> Tensor:
    """softmax(logits / sqrt(k)) mixed with V; fp32 accumulation for half inputs."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = torch.softmax(logits.to(acc) / math.sqrt(k), dim=-1)  # [..., n + 1]
    return contract(spec, w, V.to(acc)).to(x.dtype)  # [..., v]


def mha_step(
    x: Tensor,
    prev_K: Tensor,
    prev_V: Tensor,
    W_q: Tensor,
    W_k: Tensor,
    W_v: Tensor,
    W_o: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One decoding step of multi-head attention (MHA).

    Shapes::

        x [b, d]; W_q, W_k [h, d, k]; W_v [h, d, v]; W_o [h, v, d]
        prev_K [b, h, n, k], prev_V [b, h, n, v]     (n >= 0 cached tokens)
        returns y [b, d], new_K [b, h, n + 1, k], new_V [b, h, n + 1, v]

    The new token attends to all n cached tokens and to itself. Compute
    O(b d^2 + b n d); memory traffic O(d^2 + b d + b n d).
    """
    b, d, h, k = _check_common(x, W_q)
    _shape("W_k", W_k, "h d k", (h, d, k))
    _, _, v = _shape("W_v", W_v, "h d v", (h, d, None))
    _shape("W_o", W_o, "h v d", (h, v, d))
    _, _, n, _ = _shape("prev_K", prev_K, "b h n k", (b, h, None, k))
    _shape("prev_V", prev_V, "b h n v", (b, h, n, v))
    check_same_dtype(x=x, prev_K=prev_K, prev_V=prev_V, W_q=W_q, W_k=W_k, W_v=W_v, W_o=W_o)
    check_same_device(x=x, prev_K=prev_K, prev_V=prev_V, W_q=W_q, W_k=W_k, W_v=W_v, W_o=W_o)

    c = MHA_SPECS
    q = contract(c["q"], x, W_q)  # [b, h, k]
    new_K = torch.cat([prev_K, contract(c["k"], x, W_k)[:, :, None]], dim=2)  # [b, h, n+1, k]
    new_V = torch.cat([prev_V, contract(c["v"], x, W_v)[:, :, None]], dim=2)  # [b, h, n+1, v]
    logits = contract(c["logits"], q, new_K)  # [b, h, n+1]
    o = _finish(x, logits, new_V, c["values"], k)  # [b, h, v]
    y = contract(c["out"], o, W_o)  # [b, d]
    return y, new_K, new_V


def mqa_step(
    x: Tensor,
    prev_K: Tensor,
    prev_V: Tensor,
    W_q: Tensor,
    W_k: Tensor,
    W_v: Tensor,
    W_o: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One decoding step of multi-query attention (MQA): one K/V head for all h query heads.

    Shapes::

        x [b, d]; W_q [h, d, k]; W_k [d, k]; W_v [d, v]; W_o [h, v, d]
        prev_K [b, n, k], prev_V [b, n, v]           (shared by all heads; n >= 0)
        returns y [b, d], new_K [b, n + 1, k], new_V [b, n + 1, v]

    Compute O(b d^2 + b n d); memory traffic O(d^2 + b d + b n d / h): the cache is
    h times smaller than MHA's.
    """
    b, d, h, k = _check_common(x, W_q)
    _shape("W_k", W_k, "d k", (d, k))
    _, v = _shape("W_v", W_v, "d v", (d, None))
    _shape("W_o", W_o, "h v d", (h, v, d))
    _, n, _ = _shape("prev_K", prev_K, "b n k", (b, None, k))
    _shape("prev_V", prev_V, "b n v", (b, n, v))
    check_same_dtype(x=x, prev_K=prev_K, prev_V=prev_V, W_q=W_q, W_k=W_k, W_v=W_v, W_o=W_o)
    check_same_device(x=x, prev_K=prev_K, prev_V=prev_V, W_q=W_q, W_k=W_k, W_v=W_v, W_o=W_o)

    c = MQA_SPECS
    q = contract(c["q"], x, W_q)  # [b, h, k]
    new_K = torch.cat([prev_K, contract(c["k"], x, W_k)[:, None]], dim=1)  # [b, n+1, k]
    new_V = torch.cat([prev_V, contract(c["v"], x, W_v)[:, None]], dim=1)  # [b, n+1, v]
    logits = contract(c["logits"], q, new_K)  # [b, h, n+1]
    o = _finish(x, logits, new_V, c["values"], k)  # [b, h, v]
    y = contract(c["out"], o, W_o)  # [b, d]
    return y, new_K, new_V


def gqa_step(
    x: Tensor,
    prev_K: Tensor,
    prev_V: Tensor,
    W_q: Tensor,
    W_k: Tensor,
    W_v: Tensor,
    W_o: Tensor,
    n_groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One decoding step of grouped-query attention (GQA, Ainslie et al. 2023).

    g = ``n_groups`` key/value heads; query head i belongs to group i // (h/g), the
    convention of torch's SDPA ``enable_gqa``. The queries are *viewed* as
    [b, g, h/g, k], so each cached K/V head serves its group without a
    ``repeat_interleave`` or any copy of the cache.

    Shapes::

        x [b, d]; W_q [h, d, k]; W_k [g, d, k]; W_v [g, d, v]; W_o [h, v, d]
        prev_K [b, g, n, k], prev_V [b, g, n, v]     (n >= 0)
        returns y [b, d], new_K [b, g, n + 1, k], new_V [b, g, n + 1, v]

    g = h is :func:`mha_step`, g = 1 is :func:`mqa_step` (with the cache's head axis
    of size 1). Compute O(b d^2 + b n d); memory traffic O(d^2 + b d + b n d g / h).
    """
    b, d, h, k = _check_common(x, W_q)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int):
        raise TypeError(f"n_groups must be an int, got {type(n_groups).__name__}")
    if n_groups < 1 or h % n_groups != 0:
        raise ValueError(
            f"n_groups must be >= 1 and divide the query heads h={h} (from W_q), got {n_groups}"
        )
    g = n_groups
    r = h // g
    _shape("W_k", W_k, "g d k", (g, d, k))
    _, _, v = _shape("W_v", W_v, "g d v", (g, d, None))
    _shape("W_o", W_o, "h v d", (h, v, d))
    _, _, n, _ = _shape("prev_K", prev_K, "b g n k", (b, g, None, k))
    _shape("prev_V", prev_V, "b g n v", (b, g, n, v))
    check_same_dtype(x=x, prev_K=prev_K, prev_V=prev_V, W_q=W_q, W_k=W_k, W_v=W_v, W_o=W_o)
    check_same_device(x=x, prev_K=prev_K, prev_V=prev_V, W_q=W_q, W_k=W_k, W_v=W_v, W_o=W_o)

    c = GQA_SPECS
    q = contract(c["q"], x, W_q).view(b, g, r, k)  # [b, h, k] -> [b, g, r, k], a view
    new_K = torch.cat([prev_K, contract(c["k"], x, W_k)[:, :, None]], dim=2)  # [b, g, n+1, k]
    new_V = torch.cat([prev_V, contract(c["v"], x, W_v)[:, :, None]], dim=2)  # [b, g, n+1, v]
    logits = contract(c["logits"], q, new_K)  # [b, g, r, n+1]
    o = _finish(x, logits, new_V, c["values"], k).reshape(b, h, v)  # [b, g, r, v] -> [b, h, v]
    y = contract(c["out"], o, W_o)  # [b, d]
    return y, new_K, new_V
