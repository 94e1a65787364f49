"""Plain references for the delta rule: the recurrence, and its chunked (UT/WY) form.

The definition (DeltaNet: Schlag et al. 2021, Yang et al. 2024; Gated DeltaNet: Yang
et al. 2024, as in Qwen3-Next; KDA: Kimi Linear, with a per-channel gate)::

    S'  = Diag(exp(g_t)) S_{t-1}                      decay (g = 0 for DeltaNet)
    u_t = beta_t (v_t - S'^T k_t)                      what k_t should read, minus what it reads
    S_t = S' + k_t u_t^T = (I - beta_t k_t k_t^T) S' + beta_t k_t v_t^T
    o_t = S_t^T (scale q_t)

It writes v_t at address k_t after erasing what was there; for unit keys and
0 <= beta <= 2 the erase I - beta k k^T is non-expansive.

:func:`recurrent_delta` is that loop in the accumulation dtype (fp64 stays fp64).
:func:`chunked_delta` is the chunked form with plain einsums (the algorithm of the
fast path, :mod:`attnkit.ops.gated_chunked`). Within a chunk of C tokens with
cumulative log-gates G and Gamma_ij = exp(G_i - G_j) (i >= j; per channel for KDA)
the C rank-1 updates collapse through the UT transform (Yang et al. 2024, after the
WY representation of Householder products)::

    A = StrictTril(Diag(beta) (K K^T * Gamma))        T = (I + A)^{-1}   (unit lower-triangular)
    W = T Diag(beta) (K * exp(G)),   U = T Diag(beta) V
    U' = U - W S_{c-1}                                 the chunk's u_t, all at once
    O_c = (Q * exp(G)) S_{c-1} + Tril(Q K^T * Gamma) U'
    S_c = exp(G_C) S_{c-1} + (K * exp(G_C - G))^T U'

Every exponent is <= 0. The state recurrence S_{c-1} -> S_c is not a prefix sum (U'
depends on S_{c-1}), so it runs chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._contract import Contraction, contract
from attnkit.ops.decay.reference import channel_decay_matrix, pad_chunks, scalar_decay_matrix

__all__ = [
    "CHUNK_GRAM",
    "CHUNK_INTER",
    "CHUNK_INTRA",
    "CHUNK_SCORES",
    "CHUNK_STATE",
    "CHUNK_WS",
    "CHUNK_WU",
    "CONTRACTIONS",
    "chunked_delta",
    "recurrent_delta",
]

# Letters: b = B, h = Hv (state heads), g = G query rows per state head, n = L/C chunks,
# c, s, t = C (positions in a chunk), d = D (key width), m = M (value width),
# e = D + M (the stacked right-hand sides [beta K exp(G), beta V]).
_CHUNKS = {"b": "B", "h": "Hv", "n": "L/C"}
#: Key Gram matrix K_c K_c^T -> [B, Hv, n, C, C] (then * beta Gamma, strict lower triangle)
CHUNK_GRAM = Contraction(
    "delta_chunk_gram",
    "bhncd,bhnsd->bhncs",
    ("kc", "kc_"),
    "gram",
    {**_CHUNKS, "c": "C", "s": "C", "d": "D"},
)
#: [W, U] = T [beta K exp(G), beta V] -> [B, Hv, n, C, D + M]
CHUNK_WU = Contraction(
    "delta_chunk_wu",
    "bhncs,bhnse->bhnce",
    ("T", "rhs"),
    "WU",
    {**_CHUNKS, "c": "C", "s": "C", "e": "D + M"},
)
#: Intra-chunk scores Q_c K_c^T -> [B, Hv, n, G C, C]
CHUNK_SCORES = Contraction(
    "delta_chunk_scores",
    "bhngcd,bhnsd->bhngcs",
    ("qc", "kc"),
    "scores",
    {**_CHUNKS, "g": "G", "c": "C", "s": "C", "d": "D"},
)
#: Sequential, per chunk: W_c S_{c-1} -> [B, Hv, C, M]
CHUNK_WS = Contraction(
    "delta_chunk_ws",
    "bhncd,bhndm->bhncm",
    ("W", "S_prev"),
    "WS",
    {**_CHUNKS, "c": "C", "d": "D", "m": "M"},
)
#: Sequential, per chunk: (K_c * exp(G_C - G))^T U'_c -> [B, Hv, D, M]
CHUNK_STATE = Contraction(
    "delta_chunk_state",
    "bhncd,bhncm->bhndm",
    ("k_decayed", "U_new"),
    "kv",
    {**_CHUNKS, "c": "C", "d": "D", "m": "M"},
)
#: (Q_c * exp(G)) S_{c-1} -> [B, Hv, n, G C, M]
CHUNK_INTER = Contraction(
    "delta_chunk_inter",
    "bhngcd,bhndm->bhngcm",
    ("q_decayed", "S_prev"),
    "o_inter",
    {**_CHUNKS, "g": "G", "c": "C", "d": "D", "m": "M"},
)
#: Tril(Q K^T * Gamma) U' -> [B, Hv, n, G C, M]
CHUNK_INTRA = Contraction(
    "delta_chunk_intra",
    "bhngcs,bhnsm->bhngcm",
    ("P", "U_new"),
    "o_intra",
    {**_CHUNKS, "g": "G", "c": "C", "s": "C", "m": "M"},
)
CONTRACTIONS: tuple[Contraction, ...] = (
    CHUNK_GRAM,
    CHUNK_WU,
    CHUNK_SCORES,
    CHUNK_WS,
    CHUNK_STATE,
    CHUNK_INTER,
    CHUNK_INTRA,
)


def recurrent_delta(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, S0: Tensor
) -> tuple[Tensor, Tensor]:
    """The recurrence, one token at a time (everything in S0's dtype).

    q [B, Hv, G, L, D] (already scaled), k [B, Hv, L, D], v [B, Hv, L, M],
    beta [B, Hv, L], g None, [B, Hv, L] or [B, Hv, L, D], S0 [B, Hv, D, M]
    -> o [B, Hv, G, L, M], S_L.
    """
    acc = S0.dtype
    q, k, v, beta = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    a = None if g is None else g.to(acc).exp()
    S = S0
    out = []
    for t in range(q.shape[3]):
        if a is not None:  # S' = Diag(a_t) S
            S = (a[:, :, t, :, None] if a.dim() == 4 else a[:, :, t, None, None]) * S
        kt = k[:, :, t]
        read = torch.einsum("bhd,bhdm->bhm", kt, S)  # S'^T k_t
        u = beta[:, :, t, None] * (v[:, :, t] - read)
        S = S + kt[..., None] * u[..., None, :]
        out.append(torch.einsum("bhgd,bhdm->bhgm", q[:, :, :, t], S))
    if not out:  # L = 0: an empty output, still connected to the graph
        return torch.einsum("bhgld,bhdm->bhglm", q, S0), S
    return torch.stack(out, dim=3), S


def chunked_delta(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, S0: Tensor, C: int
) -> tuple[Tensor, Tensor]:
    """The chunked UT/WY form with plain einsums and autograd (shapes as :func:`recurrent_delta`).

    Padding past L with k = v = 0, beta = 0, g = 0 is a no-op on the state.
    """
    acc = S0.dtype
    B, Hv, Gq, L, D = q.shape
    M = v.shape[-1]
    qc = pad_chunks(q.to(acc), 3, C).transpose(2, 3)  # [B, Hv, n, G, C, D]
    kc = pad_chunks(k.to(acc), 2, C)  # [B, Hv, n, C, D]
    vc = pad_chunks(v.to(acc), 2, C)  # [B, Hv, n, C, M]
    bc = pad_chunks(beta.to(acc), 2, C)  # [B, Hv, n, C]
    n = kc.shape[2]
    if g is None:
        g = torch.zeros(B, Hv, L, dtype=acc, device=q.device)
    Gc = pad_chunks(g.to(acc), 2, C).cumsum(dim=3)  # [B, Hv, n, C(, D)]
    last = Gc[:, :, :, -1:]
    if g.dim() == 4:  # KDA: per-channel decays, scores summed over channels exactly
        Gamma = channel_decay_matrix(Gc)  # [B, Hv, n, C, C, D]
        A = torch.einsum("bhncd,bhnsd,bhncsd->bhncs", kc, kc, Gamma)
        P = torch.einsum("bhngcd,bhnsd,bhncsd->bhngcs", qc, kc, Gamma)
        eG = Gc.exp()  # [B, Hv, n, C, D]
        q_dec = qc * eG.unsqueeze(3)
        k_rhs = kc * eG
        k_dec = kc * (last - Gc).exp()
        a = last.squeeze(3).exp()[..., None]  # [B, Hv, n, D, 1]
    else:
        Gamma = scalar_decay_matrix(Gc)  # [B, Hv, n, C, C]
        A = contract(CHUNK_GRAM, kc, kc) * Gamma
        P = contract(CHUNK_SCORES, qc, kc) * Gamma.unsqueeze(3)
        eG = Gc.exp()[..., None]  # [B, Hv, n, C, 1]
        q_dec = qc * eG.unsqueeze(3)
        k_rhs = kc * eG
        k_dec = kc * (last - Gc).exp()[..., None]
        a = last.exp()[..., None]  # [B, Hv, n, 1, 1]
    A = (A * bc[..., None]).tril(-1)
    eye = torch.eye(C, dtype=acc, device=q.device)
    T = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    rhs = torch.cat([k_rhs * bc[..., None], vc * bc[..., None]], dim=-1)  # [B, Hv, n, C, D + M]
    WU = contract(CHUNK_WU, T, rhs)
    W, U = WU[..., :D], WU[..., D:]
    S = S0
    states, news = [], []
    for c in range(n):  # sequential; each contraction runs on one chunk (n = 1 at a time)
        states.append(S)
        Sc = S.unsqueeze(2)
        U_new = U[:, :, c : c + 1] - contract(CHUNK_WS, W[:, :, c : c + 1], Sc)
        news.append(U_new)  # the u_t of the chunk's tokens, [B, Hv, 1, C, M]
        S = a[:, :, c] * S + contract(CHUNK_STATE, k_dec[:, :, c : c + 1], U_new).squeeze(2)
    S_prev = torch.stack(states, dim=2)  # [B, Hv, n, D, M]
    U_new_all = torch.cat(news, dim=2)  # [B, Hv, n, C, M]
    o = contract(CHUNK_INTER, q_dec, S_prev) + contract(CHUNK_INTRA, P, U_new_all)
    o = o.transpose(2, 3).reshape(B, Hv, Gq, -1, M)[:, :, :, :L]
    return o, S
