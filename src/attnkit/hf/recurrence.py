r"""Normalised linear attention with a per-head decay, on precomputed features.

A converted attention layer may carry a decay gate gamma in (0, 1] per key/value head
(RetNet, Sun et al. 2023, uses fixed gammas; here they are trained). Its state decays
before each token is written::

    S_t = gamma S_{t-1} + phi(k_t)^T v_t        S [D', Ev]
    z_t = gamma z_{t-1} + phi(k_t)              z [D']
    o_t = phi(q_t) S_t / max(phi(q_t) . z_t, eps)

i.e. o_i = sum_{j<=i} gamma^{i-j} phi(q_i).phi(k_j) v_j / sum_{j<=i} gamma^{i-j} phi(q_i).phi(k_j):
old tokens fade, which softmax attention (its mass concentrated on recent tokens in many
heads) often needs. gamma = 1 is plain causal linear attention.

Three forms, each returning ``(o, (S, z))``:

- :func:`decayed_step`: one token (decoding);
- :func:`decayed_reference`: a loop of steps, the definition the tests compare with;
- :func:`decayed_chunked`: chunks of C tokens; inside a chunk a [C, C] matrix of
  phi(q_t).phi(k_s) gamma^{t-s} (s <= t), across chunks the state decayed by gamma^{t+1};
  every exponent is <= 0, so nothing overflows however long the sequence is.

Shape legend (SDPA layout; features already computed, padded keys already zeroed)::

    fq [B, H, L, D'], fk [B, Hk, L, D'], v [B, Hk, L, Ev]    H % Hk == 0 (query head h
                                                             reads key/value head h // (H/Hk))
    log_decay [Hk]  log gamma <= 0
    S [B, Hk, D', Ev], z [B, Hk, D']   (fp32; fp64 for fp64 inputs)
    o [B, H, L, Ev] in fq's dtype
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decayed_chunked", "decayed_reference", "decayed_step"]

State = tuple[Tensor, Tensor]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check(fq: Tensor, fk: Tensor, v: Tensor, log_decay: Tensor) -> tuple[int, int, int]:
    if fq.dim() != 4 or fk.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "fq, fk, v must be [B, H, L, D'], [B, Hk, L, D'], [B, Hk, L, Ev], got "
            f"{tuple(fq.shape)}, {tuple(fk.shape)}, {tuple(v.shape)}"
        )
    B, H, L, F = fq.shape
    Hk = fk.shape[1]
    if fk.shape != (B, Hk, L, F) or v.shape[:3] != (B, Hk, L) or H % Hk:
        raise ValueError(
            f"fk must be [B, Hk, L, D'] = [{B}, Hk, {L}, {F}] with H={H} divisible by Hk, and v "
            f"[B, Hk, L, Ev]; got fk {tuple(fk.shape)}, v {tuple(v.shape)}"
        )
    if log_decay.shape != (Hk,):
        raise ValueError(f"log_decay must be [Hk] = [{Hk}], got {tuple(log_decay.shape)}")
    return B, Hk, H // Hk


def _zeros(B: int, Hk: int, F: int, Ev: int, like: Tensor) -> State:
    acc = _acc(like.dtype)
    return (
        torch.zeros(B, Hk, F, Ev, dtype=acc, device=like.device),
        torch.zeros(B, Hk, F, dtype=acc, device=like.device),
    )


def decayed_step(
    fq: Tensor, fk: Tensor, v: Tensor, log_decay: Tensor, state: State | None, eps: float
) -> tuple[Tensor, State]:
    """One token: fq [B, H, 1, D'], fk [B, Hk, 1, D'], v [B, Hk, 1, Ev] -> o [B, H, 1, Ev]."""
    B, Hk, G = _check(fq, fk, v, log_decay)
    F, Ev = fq.shape[-1], v.shape[-1]
    if fq.shape[2] != 1:
        raise ValueError(f"decayed_step takes one token, got L={fq.shape[2]}")
    acc = _acc(fq.dtype)
    S, z = _zeros(B, Hk, F, Ev, fq) if state is None else state
    g = log_decay.to(acc).exp()
    k1, v1 = fk[:, :, 0].to(acc), v[:, :, 0].to(acc)  # [B, Hk, D'], [B, Hk, Ev]
    S = g[None, :, None, None] * S + k1.unsqueeze(-1) * v1.unsqueeze(-2)
    z = g[None, :, None] * z + k1
    q1 = fq[:, :, 0].to(acc).reshape(B, Hk, G, F)
    num = torch.einsum("bhgf,bhfm->bhgm", q1, S)
    den = torch.einsum("bhgf,bhf->bhg", q1, z)
    o = num / den.clamp_min(eps).unsqueeze(-1)
    return o.reshape(B, Hk * G, 1, Ev).to(fq.dtype), (S, z)


def decayed_reference(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    log_decay: Tensor,
    state: State | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """The definition: :func:`decayed_step` token by token (O(L) Python steps)."""
    B, Hk, _ = _check(fq, fk, v, log_decay)
    st = _zeros(B, Hk, fq.shape[-1], v.shape[-1], fq) if state is None else state
    outs = []
    for t in range(fq.shape[2]):
        o, st = decayed_step(
            fq[:, :, t : t + 1], fk[:, :, t : t + 1], v[:, :, t : t + 1], log_decay, st, eps
        )
        outs.append(o)
    if not outs:
        return fq.new_zeros(B, fq.shape[1], 0, v.shape[-1]), st
    return torch.cat(outs, dim=2), st


def decayed_chunked(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    log_decay: Tensor,
    state: State | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> tuple[Tensor, State]:
    """Chunked form of :func:`decayed_reference` (same result, O(L C) work in [C, C] tiles)."""
    B, Hk, G = _check(fq, fk, v, log_decay)
    H, L, F = fq.shape[1], fq.shape[2], fq.shape[3]
    Ev = v.shape[-1]
    acc = _acc(fq.dtype)
    S, z = _zeros(B, Hk, F, Ev, fq) if state is None else state
    lg = log_decay.to(acc)  # [Hk]
    q5 = fq.to(acc).reshape(B, Hk, G, L, F)
    kf, vf = fk.to(acc), v.to(acc)
    outs = []
    for c0 in range(0, L, chunk_size):
        qc = q5[:, :, :, c0 : c0 + chunk_size]  # [B, Hk, G, c, D']
        kc, vc = kf[:, :, c0 : c0 + chunk_size], vf[:, :, c0 : c0 + chunk_size]
        c = kc.shape[2]
        t = torch.arange(c, device=fq.device, dtype=acc)
        lag = t[:, None] - t[None, :]  # t - s
        # gamma^(t-s) on and below the diagonal, 0 above (exponents <= 0: no overflow).
        dmask = torch.where(lag >= 0, torch.exp(lg[:, None, None] * lag.clamp_min(0)), 0.0)
        A = torch.einsum("bhgtf,bhsf->bhgts", qc, kc) * dmask[None, :, None]  # [B, Hk, G, c, c]
        into = torch.exp(lg[:, None] * (t + 1))  # [Hk, c]: the incoming state's decay at t
        num = torch.einsum("bhgts,bhsm->bhgtm", A, vc)
        num = num + into[None, :, None, :, None] * torch.einsum("bhgtf,bhfm->bhgtm", qc, S)
        den = A.sum(-1) + into[None, :, None, :] * torch.einsum("bhgtf,bhf->bhgt", qc, z)
        outs.append(num / den.clamp_min(eps).unsqueeze(-1))
        out_of = torch.exp(lg[:, None] * (c - 1 - t))  # [Hk, c]: key s's decay to the chunk end
        kd = kc * out_of[None, :, :, None]
        whole = torch.exp(lg * c)  # [Hk]
        S = whole[None, :, None, None] * S + torch.einsum("bhsf,bhsm->bhfm", kd, vc)
        z = whole[None, :, None] * z + kd.sum(2)
    if not outs:
        return fq.new_zeros(B, H, 0, Ev), (S, z)
    o = torch.cat(outs, dim=3).reshape(B, H, L, Ev)
    return o.to(fq.dtype), (S, z)
