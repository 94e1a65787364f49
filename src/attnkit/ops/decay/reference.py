"""Plain references for decay ("gated linear") attention: the recurrence, and its chunked form.

The definition (Yang et al. 2023, GLA; Sun et al. 2023, RetNet; Dao & Gu 2024, Mamba-2)::

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T        S [D, M], g_t <= 0 in log space
    o_t = S_t^T (scale q_t)

with g_t one number per head and token (RetNet, Lightning / MiniMax, Mamba-2, simple
GLA: Diag(exp(g_t)) = exp(g_t) I) or one per key channel (GLA).

:func:`recurrent_decay` is that loop, token by token, in the accumulation dtype (fp64
stays fp64): the reference every other form is tested against.
:func:`chunked_decay` is the chunked form written with plain einsums (the algorithm
the fast path of :mod:`attnkit.ops.gated_chunked` runs): with G_i the within-chunk
cumulative log-gate,

    O_c = (Q_c * exp(G)) S_{c-1} + [(Q_c K_c^T) * Gamma] V_c,   Gamma_ij = exp(G_i - G_j), i >= j
    S_c = exp(G_C) S_{c-1} + (K_c * exp(G_C - G))^T V_c

(per key channel, Gamma is per channel and the score is sum_d q_id k_jd Gamma_ijd).
Every exponent above is <= 0. Its declared contractions are what ``attnkit cost``
counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._contract import Contraction, contract

__all__ = [
    "CHUNK_INTER",
    "CHUNK_INTRA",
    "CHUNK_SCORES",
    "CHUNK_STATE",
    "CONTRACTIONS",
    "channel_decay_matrix",
    "chunked_decay",
    "pad_chunks",
    "recurrent_decay",
    "scalar_decay_matrix",
]

# Letters: b = B, h = Hv (state heads), g = G query rows per state head, n = L/C chunks,
# c, s = C (query / key position in a chunk), d = D (key width), m = M (value width).
_CHUNKS = {"b": "B", "h": "Hv", "n": "L/C"}
#: Intra-chunk scores Q_c K_c^T -> [B, Hv, n, G C, C] (then * Gamma, lower triangle)
CHUNK_SCORES = Contraction(
    "decay_chunk_scores",
    "bhngcd,bhnsd->bhngcs",
    ("qc", "kc"),
    "scores",
    {**_CHUNKS, "g": "G", "c": "C", "s": "C", "d": "D"},
)
#: Per-chunk state contribution (K_c * exp(G_C - G))^T V_c -> [B, Hv, n, D, M]
CHUNK_STATE = Contraction(
    "decay_chunk_state",
    "bhncd,bhncm->bhndm",
    ("k_decayed", "vc"),
    "kv",
    {**_CHUNKS, "c": "C", "d": "D", "m": "M"},
)
#: Inter-chunk read (Q_c * exp(G)) S_{c-1} -> [B, Hv, n, G C, M]
CHUNK_INTER = Contraction(
    "decay_chunk_inter",
    "bhngcd,bhndm->bhngcm",
    ("q_decayed", "S_prev"),
    "o_inter",
    {**_CHUNKS, "g": "G", "c": "C", "d": "D", "m": "M"},
)
#: Intra-chunk output P V_c -> [B, Hv, n, G C, M]
CHUNK_INTRA = Contraction(
    "decay_chunk_intra",
    "bhngcs,bhnsm->bhngcm",
    ("P", "vc"),
    "o_intra",
    {**_CHUNKS, "g": "G", "c": "C", "s": "C", "m": "M"},
)
CONTRACTIONS: tuple[Contraction, ...] = (CHUNK_SCORES, CHUNK_STATE, CHUNK_INTER, CHUNK_INTRA)


def recurrent_decay(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor
) -> tuple[Tensor, Tensor]:
    """The recurrence, one token at a time (everything in S0's dtype).

    q [B, Hv, G, L, D] (already scaled), k [B, Hv, L, D], v [B, Hv, L, M],
    g [B, Hv, L] or [B, Hv, L, D], S0 [B, Hv, D, M] -> o [B, Hv, G, L, M], S_L.
    """
    acc = S0.dtype
    q, k, v, a = q.to(acc), k.to(acc), v.to(acc), g.to(acc).exp()
    S = S0
    out = []
    for t in range(q.shape[3]):
        decay = a[:, :, t, :, None] if a.dim() == 4 else a[:, :, t, None, None]
        S = decay * S + k[:, :, t, :, None] * v[:, :, t, None, :]  # Diag(a_t) S + k_t v_t^T
        out.append(torch.einsum("bhgd,bhdm->bhgm", q[:, :, :, t], S))  # S_t^T q_t
    if not out:  # L = 0: an empty output, still connected to the graph
        return torch.einsum("bhgld,bhdm->bhglm", q, S0), S
    return torch.stack(out, dim=3), S


def channel_decay_matrix(G: Tensor, strict: bool = False) -> Tensor:
    """Gamma_ijd = exp(G_id - G_jd) for i >= j (i > j with ``strict``), else 0: [..., C, C, D].

    The mask is applied *before* the exp (positions j > i have G_i - G_j >= 0 and could
    overflow); for i >= j the exponent is <= 0.
    """
    C = G.shape[-2]
    diff = G.unsqueeze(-2) - G.unsqueeze(-3)  # [..., C(i), C(j), D]
    keep = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    return diff.masked_fill(~keep[:, :, None], float("-inf")).exp()


def scalar_decay_matrix(G: Tensor, strict: bool = False) -> Tensor:
    """Gamma_ij = exp(G_i - G_j) for i >= j (i > j with ``strict``), else 0: [..., C, C]."""
    C = G.shape[-1]
    diff = G.unsqueeze(-1) - G.unsqueeze(-2)
    keep = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    return diff.masked_fill(~keep, float("-inf")).exp()


def pad_chunks(x: Tensor, dim: int, C: int) -> Tensor:
    """Pad ``dim`` (the sequence) with zeros to a multiple of C and split it into [n, C]."""
    L = x.shape[dim]
    n = max(1, -(-L // C))
    pad = n * C - L
    if pad:
        spec = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, pad]
        x = F.pad(x, spec)
    d = dim % x.dim()
    return x.reshape(*x.shape[:d], n, C, *x.shape[d + 1 :])


def chunked_decay(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, C: int
) -> tuple[Tensor, Tensor]:
    """The chunked form with plain einsums and autograd (shapes as :func:`recurrent_decay`).

    Zero padding past L is a no-op: a padded token has k = v = 0 and g = 0.
    """
    acc = S0.dtype
    B, Hv, Gq, L, _D = q.shape
    M = v.shape[-1]
    qc = pad_chunks(q.to(acc), 3, C)  # [B, Hv, G, n, C, D]
    qc = qc.transpose(2, 3)  # [B, Hv, n, G, C, D]
    kc = pad_chunks(k.to(acc), 2, C)  # [B, Hv, n, C, D]
    vc = pad_chunks(v.to(acc), 2, C)  # [B, Hv, n, C, M]
    per_channel = g.dim() == 4
    Gc = pad_chunks(g.to(acc), 2, C).cumsum(dim=3)  # [B, Hv, n, C(, D)]
    last = Gc[:, :, :, -1:]  # [B, Hv, n, 1(, D)]
    if per_channel:
        Gamma = channel_decay_matrix(Gc)  # [B, Hv, n, C, C, D]
        # sum_d q_id k_jd Gamma_ijd: the reference computes the [C, C, D] product directly
        P = torch.einsum("bhngcd,bhnsd,bhncsd->bhngcs", qc, kc, Gamma)
        q_dec = qc * Gc.exp().unsqueeze(3)
        k_dec = kc * (last - Gc).exp()
        a = last.squeeze(3).exp()[..., None]  # [B, Hv, n, D, 1]
    else:
        Gamma = scalar_decay_matrix(Gc)  # [B, Hv, n, C, C]
        P = contract(CHUNK_SCORES, qc, kc) * Gamma.unsqueeze(3)
        q_dec = qc * Gc.exp()[:, :, :, None, :, None]
        k_dec = kc * (last - Gc).exp()[..., None]
        a = last.exp()[..., None]  # [B, Hv, n, 1, 1]
    kv = contract(CHUNK_STATE, k_dec, vc)  # [B, Hv, n, D, M]
    states = []
    S = S0
    for c in range(kc.shape[2]):
        states.append(S)
        S = a[:, :, c] * S + kv[:, :, c]
    S_prev = torch.stack(states, dim=2)  # [B, Hv, n, D, M]: the state before each chunk
    o = contract(CHUNK_INTER, q_dec, S_prev) + contract(CHUNK_INTRA, P, vc)
    o = o.transpose(2, 3).reshape(B, Hv, Gq, -1, M)[:, :, :, :L]
    return o, S
