"""Fast chunked decay attention and delta rule: a tiled custom autograd Function that recomputes.

This is the fast path behind :func:`attnkit.gated_linear_attention` and
:func:`attnkit.delta_rule_attention`. The plain references it is tested against are
the recurrences (:func:`attnkit.ops.decay.reference.recurrent_decay`,
:func:`attnkit.ops.delta.reference.recurrent_delta`); the chunked algorithm it runs is
written out plainly in :func:`~attnkit.ops.delta.reference.chunked_delta` (with the
math). Per chunk of C tokens, with cumulative log-gates G (scalar or per channel)::

    prepare (no state involved; batched over every chunk of a tile)
        Qt = scale Q * exp(G),  Kt = K * exp(G_C - G),  a = exp(G_C)
        P  = Tril(scale Q K^T * Gamma)                          Gamma_ij = exp(G_i - G_j)
        delta rule only:  T = (I + StrictTril(Diag(beta) K K^T * Gamma))^{-1}
                          [W, U] = T [Diag(beta) K * exp(G), Diag(beta) V]
        decay only:       U = V (and W = 0)
    sequential (one chunk after the other)
        U'_c = U_c - W_c S_{c-1}
        S_c  = a_c S_{c-1} + Kt_c^T U'_c
    output (batched again)
        O_c = Qt_c S_{c-1} + P_c U'_c

Ideas that make it fast on a CPU (plain torch, so it runs on a GPU as one tile):

1. **Everything but the state update is batched over all chunks of a tile.** The
   [C, C] products, the triangular inverse, W = T K and U = T V, and, after the
   sequential loop has stored every chunk's state, the outputs Qt S_{c-1} + P U'
   are each one ``bmm`` over (heads x chunks). What is left sequential is one pair
   of [C, D] x [D, M] products per chunk (``baddbmm_`` in place, all heads of the
   tile at once); for decay attention not even that: the chunk states
   Kt_c^T V_c are one bmm and the loop is a decayed in-place scan. Measured against
   HF's ``torch_chunk_gated_delta_rule``, which runs its whole inter-chunk part
   chunk by chunk: 2.38x faster at B=1, H=16, D=M=128, N=4096 and 2.52x at N=16384
   (1 thread, CPU time; ``python benchmarks/gated_cpu_time.py``). Chunks of 32, 96
   or 128 were no faster than 64, and one bmm of [Qt, P] against the stacked
   [S_{c-1}; U'] no faster than the two products (same FLOPs, plus the copies).
2. **The UT transform as one explicit inverse and one bmm.** T = (I + A)^{-1} comes
   from one batched ``solve_triangular`` against the identity, then W and U are one
   bmm of T with the stacked right-hand side [beta K exp(G), beta V]. Measured (64
   chunks of 64, D = M = 128, 1 thread, CPU time): 3.1 ms for T plus 4.5 ms for the
   bmm, against 11.8 ms for ``solve_triangular`` on the [64, 256] right-hand side
   directly and 8.4 ms for a blocked forward substitution written in torch ops; a
   recursive 2 x 2 block inverse (T21 = -T22 A21 T11) took 2.4 ms against 1.6 ms for
   the one solve (another run).
3. **Cache-sized tiles.** As in :mod:`attnkit.ops.linear_chunked`: a tile of
   several state heads by a few hundred tokens whose working set fits about
   :data:`CPU_TILE_BYTES`; the state is carried from tile to tile along the
   sequence, and the forward saves it at every backward tile. Heads are grouped
   first (:func:`plan_tiles`), so the sequential loop's bmm run over every head of a
   tile at once. Measured: see :data:`CPU_TILE_BYTES`.
4. **Recompute instead of store; backward by hand.** Only the inputs and one state
   per backward tile are saved (training memory O(N (D + M)) per head, plus D M per
   tile). The backward pass, per tile in reverse: recompute the prepare step, rerun
   the sequential forward loop without autograd to get the chunk states S_c and
   U'_c, run the reverse loop below by hand, then carry the gradients of (Qt, Kt,
   P, a, W, U) back to q, k, v, g, beta. For the delta rule with a scalar gate or
   none (Gated DeltaNet, DeltaNet) that last part is hand-written too
   (:func:`prepare_backward`: the inverse's gradient -T^T dT T^T as two bmm with
   the explicit T, one pass for the gates' E = dGamma * Gamma); autograd is left
   with the L2 norm of q and k only. Decay attention and per-channel gates (GLA,
   KDA) recompute the prepare step under autograd and hand it the gradients.
   Autograd through the sequential loop itself would record ~5 nodes per chunk and
   keep every chunk's state alive; the hand-written reverse loop keeps the same two
   bmm per chunk as the forward. Measured (B=1, H=8, D=M=128): 14.4 KB saved per
   token, flat from N=256 to 1024 (HF's chunked function under autograd: 71.8 KB);
   the hand-written prepare backward made forward + backward at N=4096 1.14x faster
   than autograd through the prepare step (1 thread, CPU time, interleaved), and
   forward + backward runs 2.81x faster than autograd through HF's function.
5. **Safe decays.** Every exponential is of a number <= 0: exp(G) and exp(G_C - G)
   directly, Gamma clamped at 0 *before* the exp (then lower-triangular). For
   per-channel gates (GLA, KDA) the scores sum_d x_id y_jd exp(G_id - G_jd) are not
   formed as (x * exp(G)) (y * exp(-G))^T, whose second factor overflows fp32 once a
   chunk's cumulative decay passes ~88 (C = 64 tokens at g = -1.4 each, or 5 tokens
   at g = -20): the chunk is cut into sub-chunks of :data:`SUB_CHUNK`; a query
   sub-chunk I and an earlier key sub-chunk J use the reference point r = the first
   position of I (x_i exp(G_i - G_r) and y_j exp(G_r - G_j), both <= 1); the
   diagonal sub-blocks are summed exactly, elementwise. So there is **no chunk-length
   limit** from the gates: what underflows is a weight below 1e-38.

Backward of the sequential part (R_c = dL/dS_c, the gradient of the state after chunk
c; R_n = the gradient of the final state)::

    dU'_c    = P_c^T dO_c + Kt_c R_c
    R_{c-1}  = a_c R_c + Qt_c^T dO_c - W_c^T dU'_c
    dQt_c = dO_c S_{c-1}^T,  dP_c = dO_c U'_c^T,  dKt_c = U'_c R_c^T,
    da_c = <S_{c-1}, R_c> (summed over M; over D too for a scalar gate),
    dW_c = -dU'_c S_{c-1}^T,  dU_c = dU'_c

(for decay attention U' = V, so dV = dU' and R is a decayed reverse scan).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from attnkit.ops.gated_common import GatedDims, l2norm

__all__ = [
    "DEFAULT_CHUNK",
    "SUB_CHUNK",
    "Plan",
    "channel_scores",
    "chunked_attention",
    "plan_tiles",
    "unit_lower_inverse",
]

#: Chunk length C when ``chunk_size=None``.
DEFAULT_CHUNK = 64
#: Sub-chunk length of the per-channel scores (their diagonal blocks are summed exactly).
SUB_CHUNK = 16
#: Working-set budget of one tile on a CPU. Measured on the 2-core machine (gated delta
#: rule, B=1, H=16, D=M=128, N=2048, 1 thread, CPU time of interleaved runs): tiles of
#: all 16 heads x 256 tokens were 1.06x the speed of one head x 2048 tokens and 1.5x
#: that of all heads x 2048 tokens (the big batched products then stream from DRAM).
CPU_TILE_BYTES = 36 * 2**20
#: Forward tiles of decay attention, whose sequential part is an elementwise scan (no
#: bmm to batch over heads): measured (simple GLA, B=1, H=8, D=M=128, N=4096, 1 thread,
#: CPU time, 9 interleaved rounds) 384 tokens x 4 heads was 1.20x the speed of the
#: :data:`CPU_TILE_BYTES` plan (768 x 8); its backward tiles kept that budget (a quarter
#: made forward + backward 0.89x the speed).
DECAY_FWD_TILE_BYTES = CPU_TILE_BYTES // 4
#: A tile holds at least this many chunks per head before more heads are grouped.
MIN_TILE_CHUNKS = 4


# --------------------------------------------------------------------------------------
# Building blocks (all differentiable: the backward pass runs them under autograd)
# --------------------------------------------------------------------------------------


def unit_lower_inverse(A: Tensor) -> Tensor:
    """T = (I + A)^{-1} for strictly lower-triangular A [N, C, C] (a unit lower-triangular T).

    One batched ``torch.linalg.solve_triangular`` against the identity with
    ``unitriangular=True`` (the diagonal of A is never read); differentiable.
    """
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
    T: Tensor = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    return T


def channel_scores(
    x: Tensor, y: Tensor, Gc: Tensor, groups: int, strict: bool, sub: int = SUB_CHUNK
) -> Tensor:
    """S[(g, i), j] = sum_d x_gid y_jd exp(G_id - G_jd) for j <= i (j < i: ``strict``), else 0.

    x [N, groups C, D] (``groups`` row blocks of C positions), y [N, C, D], Gc [N, C, D]
    cumulative log-gates (non-increasing along C) -> [N, groups C, C]. Safe for any
    gate strength: every exponential is of a number <= 0 (see idea 5 of the module).
    """
    N, C, D = y.shape
    c = sub if (C > sub and C % sub == 0) else C
    ns = C // c
    xg = x.view(N, groups, ns, c, D)
    Gs = Gc.view(N, ns, c, D)
    # diagonal sub-blocks, exactly: E_ijd = exp(G_id - G_jd) masked (j <= i) before the exp
    keep = torch.ones(c, c, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    diff = Gs.unsqueeze(3) - Gs.unsqueeze(2)  # [N, ns, c(i), c(j), D]
    E = diff.masked_fill(~keep[:, :, None], float("-inf")).exp()
    yE = E * y.view(N, ns, 1, c, D)  # y_jd E_ijd
    # [N, ns, c(i), groups, D] @ [N, ns, c(i), D, c(j)] -> [N, ns, c(i), groups, c(j)]
    diag = torch.matmul(xg.permute(0, 2, 3, 1, 4), yE.transpose(-1, -2))
    blocks = x.new_zeros(N, groups, ns, c, ns, c)
    blocks.diagonal(dim1=2, dim2=4).copy_(diag.permute(0, 3, 2, 4, 1))
    out = blocks.view(N, groups, C, C)
    if ns > 1:
        # off-diagonal: reference r = first position of the query sub-chunk I
        ref = Gs[:, :, :1]  # [N, ns, 1, D]
        xr = xg * (Gs - ref).exp().unsqueeze(1)  # x_i exp(G_i - G_r) <= 1
        pos = torch.arange(C, device=x.device)
        before = pos[None, :] < (torch.arange(ns, device=x.device) * c)[:, None]  # [ns, C]
        dk = ref - Gc.unsqueeze(1)  # [N, ns(I), C(j), D]: G_r - G_j, <= 0 where j < r
        yr = y.unsqueeze(1) * dk.masked_fill(~before[None, :, :, None], float("-inf")).exp()
        off = torch.bmm(
            xr.permute(0, 2, 1, 3, 4).reshape(N * ns, groups * c, D),
            yr.reshape(N * ns, C, D).transpose(1, 2),
        )  # [N ns, groups c, C]
        out = out + off.view(N, ns, groups, c, C).permute(0, 2, 1, 3, 4).reshape(N, groups, C, C)
    return out.reshape(N, groups * C, C)


def scalar_gamma(Gc: Tensor, strict: bool = False) -> Tensor:
    """Gamma_ij = exp(G_i - G_j) for j <= i (j < i: ``strict``), else 0; Gc [N, C] -> [N, C, C].

    G is non-increasing (every g <= 0), so G_i - G_j <= 0 on the lower triangle and
    >= 0 above it: clamping at 0 before the exp keeps every exponential <= 1 (the
    upper triangle becomes exp(0) = 1) and ``tril`` then zeroes it. Clamp, exp and
    tril run in place on one buffer without autograd; measured 0.27 ms against
    0.76 ms for masking the upper triangle to -inf before the exp (64 chunks of 64,
    1 thread, CPU time). The clamp's gradient passes at 0 (``clamp_max`` is
    inclusive), so a run of g = 0 keeps its gradient.
    """
    diff = Gc.unsqueeze(-1) - Gc.unsqueeze(-2)
    diag = -1 if strict else 0
    if torch.is_grad_enabled():
        return diff.clamp(max=0.0).exp().tril(diag)
    return diff.clamp_(max=0.0).exp_().tril_(diag)


class Prepared(NamedTuple):
    """What the sequential part needs, per chunk, in chunk rows (see the module docstring)."""

    Qt: Tensor  # [N, G C, D]
    Kt: Tensor  # [N, C, D]
    P: Tensor  # [N, G C, C]
    a: Tensor | None  # [N] (scalar gate), [N, D] (per channel), None (no gate)
    W: Tensor | None  # [N, C, D] (delta rule) or None
    U: Tensor  # [N, C, M]: U = T beta V (delta rule) or V (decay)


class Kept(NamedTuple):
    """What :func:`prepare_backward` needs besides the inputs (delta rule, scalar gate or
    none): Gamma, K K^T Gamma, A = Diag(beta) K K^T Gamma, T, the right-hand side
    [beta K exp(G), beta V], exp(G) and exp(G_C - G) (Gamma and the exps: None without
    a gate)."""

    gamma: Tensor | None  # [N, C, C] (None: no gate, Gamma = the lower triangle of ones)
    gg: Tensor  # [N, C, C]
    A: Tensor  # [N, C, C] (strict lower triangle read)
    T: Tensor  # [N, C, C]
    rhs: Tensor  # [N, C, D + M]
    eG: Tensor | None  # [N, C]
    eK: Tensor | None  # [N, C]


def prepare(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    gc: Tensor | None,
    bc: Tensor | None,
    G: int,
    scale: float,
    use_qk_l2norm: bool,
) -> Prepared:
    """The state-free part of every chunk: qc [N, G C, D], kc [N, C, D], vc [N, C, M],
    gc [N, C] or [N, C, D] (log-gates, not yet cumulated) or None, bc [N, C] or None."""
    return prepare_kept(qc, kc, vc, gc, bc, G, scale, use_qk_l2norm)[0]


def hand_backward(gc: Tensor | None, bc: Tensor | None) -> bool:
    """Whether the backward pass of this prepare step is hand-written (:func:`prepare_backward`):
    the delta rule with a scalar gate or none; decay attention and per-channel gates
    (GLA, KDA) go through autograd."""
    return bc is not None and (gc is None or gc.dim() == 2)


def prepare_kept(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    gc: Tensor | None,
    bc: Tensor | None,
    G: int,
    scale: float,
    use_qk_l2norm: bool,
) -> tuple[Prepared, Kept | None]:
    """:func:`prepare`, and what its hand-written backward needs (when :func:`hand_backward`)."""
    N, C, D = kc.shape
    if use_qk_l2norm:
        qc, kc = l2norm(qc), l2norm(kc)
    # Without autograd (the forward pass) products are scaled in place; under autograd
    # (the backward pass recomputes this step) every op is out of place.
    fresh = not torch.is_grad_enabled()
    a: Tensor | None = None
    gamma: Tensor | None = None
    eG: Tensor | None = None
    eK: Tensor | None = None
    scores = torch.bmm(qc, kc.transpose(1, 2)).view(N, G, C, C)
    gram = torch.bmm(kc, kc.transpose(1, 2)) if bc is not None else None
    if gc is None:
        Qt, Kt, k_rhs = qc * scale, kc, kc
        P = scores.tril_().mul_(scale) if fresh else scores.tril() * scale
    elif gc.dim() == 2:
        Gc = gc.cumsum(dim=1)  # [N, C]
        last = Gc[:, -1:]
        eG = Gc.exp()
        a = last.squeeze(1).exp()
        Qt = (qc.view(N, G, C, D) * (eG * scale)[:, None, :, None]).view(N, G * C, D)
        eK = (last - Gc).exp()
        Kt = kc * eK.unsqueeze(-1)
        gamma = scalar_gamma(Gc)
        P = scores.mul_(gamma.unsqueeze(1)) if fresh else scores * gamma.unsqueeze(1)
        P = P.mul_(scale) if fresh else P * scale
        k_rhs = kc * eG.unsqueeze(-1)
        if gram is not None:
            gram = gram.mul_(gamma) if fresh else gram * gamma
    else:
        Gc = gc.cumsum(dim=1)  # [N, C, D]
        last = Gc[:, -1:]
        eG = Gc.exp()
        a = last.squeeze(1).exp()
        Qt = (qc.view(N, G, C, D) * (eG * scale)[:, None]).view(N, G * C, D)
        Kt = kc * (last - Gc).exp()
        P = channel_scores(qc * scale, kc, Gc, G, strict=False)
        k_rhs = kc * eG
        gram = channel_scores(kc, kc, Gc, 1, strict=True) if bc is not None else None
    P = P.view(N, G * C, C)
    if bc is None or gram is None:
        return Prepared(Qt, Kt, P, a, None, vc), None
    b = bc.unsqueeze(-1)
    keep = fresh and hand_backward(gc, bc)
    # solve_triangular reads the strict lower triangle only (unitriangular): no tril needed
    A = gram * b if keep else (gram.mul_(b) if fresh else gram * b)
    T = unit_lower_inverse(A)
    if fresh:
        rhs = vc.new_empty(N, C, D + vc.shape[-1])
        torch.mul(k_rhs, b, out=rhs[..., :D])
        torch.mul(vc, b, out=rhs[..., D:])
    else:
        rhs = torch.cat([k_rhs * b, vc * b], dim=-1)
    WU = torch.bmm(T, rhs)
    prep = Prepared(Qt, Kt, P, a, WU[..., :D], WU[..., D:])
    if not keep:
        return prep, None
    return prep, Kept(gamma, gram, A, T, rhs, eG, eK)


def prepare_backward(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    bc: Tensor,
    G: int,
    scale: float,
    prep: Prepared,
    kept: Kept,
    d: Prepared,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Hand-written backward of :func:`prepare_kept` (delta rule, scalar gate or none).

    qc, kc are the (normalised) queries and keys the step ran on, ``d`` the gradients
    of its outputs (field by field). Returns the gradients of qc, kc, vc, gc (None
    without a gate) and bc. With Gamma_ij = exp(G_i - G_j), E = dGamma * Gamma and
    G = cumsum(g)::

        dT = [dW, dU] rhs^T;  d rhs = T^T [dW, dU];  dA = -StrictTril(T^T dT T^T)
        A = Diag(beta) (K K^T * Gamma):  dbeta_i += sum_j dA_ij (K K^T Gamma)_ij,
                                          d(K K^T) = Diag(beta) dA * Gamma,  E += dA * A
        P = scale Tril(Q K^T * Gamma):    d(Q K^T) = scale Tril(dP) * Gamma,   E += Tril(dP) * P
        dG_i += sum_j E_ij - sum_j E_ji  (and the terms of Qt, Kt, a, rhs),  dg = reverse cumsum

    Autograd through the same step records ~40 nodes per tile and runs the inverse's
    backward as a triangular solve; here it is two bmm with the explicit T.
    """
    N, C, D = kc.shape
    gamma, T, rhs, eG, eK = kept.gamma, kept.T, kept.rhs, kept.eG, kept.eK
    b = bc.unsqueeze(-1)
    Tt = T.transpose(1, 2)
    dWU = torch.cat([cast(Tensor, d.W), d.U], dim=-1)  # [N, C, D + M]
    dT = torch.bmm(dWU, rhs.transpose(1, 2))
    drhs = torch.bmm(Tt, dWU)
    dA = torch.bmm(Tt, torch.bmm(dT, Tt)).neg_().tril_(-1)
    db = (dA * kept.gg).sum(-1)  # [N, C]
    E = None if gamma is None else dA * kept.A  # dGamma * Gamma from A, before dA is scaled
    dKK = dA.mul_(b) if gamma is None else dA.mul_(b).mul_(gamma)  # d(K K^T), strict lower
    dPm = d.P.view(N, G, C, C).tril()
    dS = dPm * scale if gamma is None else dPm * (gamma * scale).unsqueeze(1)
    dS = dS.view(N, G * C, C)
    dq = torch.bmm(dS, kc)
    dk = torch.bmm(dS.transpose(1, 2), qc).baddbmm_(dKK + dKK.transpose(1, 2), kc)
    drk, drv = drhs[..., :D], drhs[..., D:]
    dv = drv * b
    db += (drv * vc).sum(-1)
    if E is None or eG is None or eK is None:
        dq += d.Qt * scale
        dk += d.Kt
        dk.addcmul_(drk, b)
        db += (drk * kc).sum(-1)
        return dq, dk, dv, None, db
    E += (dPm * prep.P.view(N, G, C, C)).sum(1)  # dGamma * Gamma from P
    dG = E.sum(-1) - E.sum(-2)  # [N, C]
    dq.view(N, G, C, D).addcmul_(d.Qt.view(N, G, C, D), (eG * scale)[:, None, :, None])
    dG += (d.Qt * prep.Qt).view(N, G, C, D).sum((1, 3))
    t = (d.Kt * prep.Kt).sum(-1)  # Kt = K exp(G_C - G)
    dG -= t
    dlast = t.sum(-1)
    dk.addcmul_(d.Kt, eK.unsqueeze(-1))
    t2 = (drk * kc).sum(-1).mul_(eG)  # rhs_K = beta K exp(G)
    dk.addcmul_(drk, (eG * bc).unsqueeze(-1))
    dG.addcmul_(t2, bc)
    db += t2
    if d.a is not None and prep.a is not None:
        dlast += d.a * prep.a  # a = exp(G_C)
    dG[:, -1] += dlast
    dg = dG.flip(1).cumsum(1).flip(1)
    return dq, dk, dv, dg, db


def _decay_rows(a: Tensor | None, h: int, n: int) -> Tensor | None:
    """a [h n] or [h n, D] -> broadcastable against states [h, n, D, M]."""
    if a is None:
        return None
    return a.view(h, n, 1, 1) if a.dim() == 1 else a.view(h, n, -1, 1)


def sequential_forward(prep: Prepared, S_in: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """States after each chunk [h, n, D, M] and U' [h n, C, M] (a new tensor)."""
    N, C, D = prep.Kt.shape
    n = N // h
    M = S_in.shape[-1]
    a = _decay_rows(prep.a, h, n)
    Kt = prep.Kt.view(h, n, C, D)
    if prep.W is None:
        Unew = prep.U
        states = torch.bmm(prep.Kt.transpose(1, 2), Unew).view(h, n, D, M)
        prev = S_in
        for c in range(n):  # S_c = a_c S_{c-1} + Kt_c^T V_c (in place, a decayed scan)
            if a is None:
                states[:, c].add_(prev)
            else:
                states[:, c].addcmul_(prev, a[:, c])
            prev = states[:, c]
        return states, Unew
    Unew = prep.U.clone()
    Uv = Unew.view(h, n, C, M)
    Wv = prep.W.view(h, n, C, D)
    states = S_in.new_empty(h, n, D, M)
    prev = S_in
    for c in range(n):
        Uv[:, c].baddbmm_(Wv[:, c], prev, alpha=-1.0)  # U'_c = U_c - W_c S_{c-1}
        Sc = states[:, c]
        if a is None:
            Sc.copy_(prev)
        else:
            torch.mul(prev, a[:, c], out=Sc)
        Sc.baddbmm_(Kt[:, c].transpose(1, 2), Uv[:, c])  # + Kt_c^T U'_c
        prev = Sc
    return states, Unew


def _previous(states: Tensor, S_in: Tensor) -> Tensor:
    """[h, n, D, M] states after each chunk -> the state before each chunk, [h n, D, M]."""
    h, n = states.shape[:2]
    return torch.cat([S_in.unsqueeze(1), states[:, :-1]], dim=1).view(h * n, *S_in.shape[1:])


def _output(prep: Prepared, states: Tensor, Unew: Tensor, S_in: Tensor) -> Tensor:
    """O = Qt S_{c-1} + P U' for every chunk: [h n, G C, M]."""
    h, n, D, M = states.shape
    N, GC, _ = prep.Qt.shape
    o = prep.Qt.new_empty(N, GC, M)
    if n > 1:  # chunk c reads chunk c - 1's state: one bmm over the batch shifted by one
        torch.bmm(prep.Qt[1:], states.view(N, D, M)[:-1], out=o[1:])
    o.view(h, n, GC, M)[:, 0] = torch.bmm(prep.Qt.view(h, n, GC, D)[:, 0], S_in)
    return o.baddbmm_(prep.P, Unew)


def sequential_backward(
    prep: Prepared, states: Tensor, Unew: Tensor, S_in: Tensor, dO: Tensor, R: Tensor
) -> tuple[Prepared, Tensor]:
    """Gradients of the prepared tensors (field by field; None where a field is None)
    and dL/dS_in."""
    h, n, D, M = states.shape
    N, C, _ = prep.Kt.shape
    a = _decay_rows(prep.a, h, n)
    Kt = prep.Kt.view(h, n, C, D)
    dU = torch.bmm(prep.P.transpose(1, 2), dO)  # [N, C, M]: P^T dO, the intra part of dU'
    Y = torch.bmm(prep.Qt.transpose(1, 2), dO).view(h, n, D, M)  # Qt^T dO; becomes R_{c-1}
    dUv = dU.view(h, n, C, M)
    after = R
    for c in range(n - 1, -1, -1):
        Yc = Y[:, c]
        if prep.W is not None:
            dUv[:, c].baddbmm_(Kt[:, c], after)  # dU'_c = P^T dO + Kt_c R_c
            Yc.baddbmm_(prep.W.view(h, n, C, D)[:, c].transpose(1, 2), dUv[:, c], alpha=-1.0)
        if a is None:
            Yc.add_(after)
        else:
            Yc.addcmul_(after, a[:, c])  # R_{c-1} = a_c R_c + Qt^T dO (- W^T dU')
        after = Yc
    Rc = torch.cat([Y[:, 1:], R.unsqueeze(1)], dim=1).view(N, D, M)  # R_c for every chunk
    if prep.W is None:
        dU.baddbmm_(prep.Kt, Rc)  # dV = P^T dO + Kt R_c
    S_prev = _previous(states, S_in)
    da: Tensor | None = None
    if prep.a is not None:
        prod = S_prev * Rc
        da = prod.sum((1, 2)) if prep.a.dim() == 1 else prod.sum(2)
    grads = Prepared(
        torch.bmm(dO, S_prev.transpose(1, 2)),
        torch.bmm(Unew, Rc.transpose(1, 2)),
        torch.bmm(dO, Unew.transpose(1, 2)),
        da,
        None if prep.W is None else torch.bmm(dU, S_prev.transpose(1, 2)).neg_(),
        dU,
    )
    return grads, Y[:, 0].clone()


# --------------------------------------------------------------------------------------
# Tiles and the autograd Function
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Tile sizes along (state heads, tokens) of the forward and the backward pass.

    Token counts are multiples of the chunk length; the forward saves the state before
    every backward tile.
    """

    fwd_tokens: int
    fwd_heads: int
    bwd_tokens: int
    bwd_heads: int


def _token_floats(G: int, D: int, M: int, C: int, delta: bool) -> tuple[int, int]:
    """Floats held per state head per token by a forward and a backward tile (estimates)."""
    fwd = G * (2 * D + C + M) + 2 * D + 2 * M + C + 2 * D * M // C
    if delta:
        fwd += 2 * D + M + 3 * C
    return fwd, 3 * fwd


def plan_tiles(
    BH: int,
    G: int,
    L: int,
    D: int,
    M: int,
    C: int,
    delta: bool,
    itemsize: int,
    budget: int | None,
) -> Plan:
    """Tiles for ``BH`` state heads of length ``L``; ``budget=None`` (a GPU): one tile.

    Heads first: each pass groups as many state heads as fit the budget with
    :data:`MIN_TILE_CHUNKS` chunks each (the sequential loop then runs every head of
    the group in one bmm per chunk), then takes as many whole chunks as still fit.
    Backward tiles are at least 2 D M / (D + M) tokens long, so the saved states
    never outweigh q, k, v.
    """
    L_pad = max(C, -(-L // C) * C)
    if budget is None:
        return Plan(L_pad, BH, L_pad, BH)
    plan: list[int] = []
    floor = -(-2 * D * M // (D + M) // C) * C
    for i, f in enumerate(_token_floats(G, D, M, C, delta)):
        per_head = f * itemsize * min(L_pad, MIN_TILE_CHUNKS * C)
        heads = max(1, min(BH, budget // per_head))
        heads = -(-BH // -(-BH // heads))  # balanced groups: 16 heads by <= 15 -> 2 x 8
        tokens = max(C, min(L_pad, budget // (f * itemsize * heads) // C * C))
        if i == 1:
            tokens = min(L_pad, max(tokens, floor))
        plan += [tokens, heads]
    return Plan(*plan)


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(total, a + step)) for a in range(0, total, step)]


def _rows(x: Tensor, n: int, C: int, dtype: torch.dtype) -> Tensor:
    """[h, T, *W] (T <= n C) -> [h n, C, *W] in ``dtype``, zero rows past T."""
    h, T = x.shape[:2]
    if T < n * C:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, n * C - T])
    return x.to(dtype).reshape(h * n, C, *x.shape[2:])


def _group_rows(x: Tensor, n: int, C: int, dtype: torch.dtype) -> Tensor:
    """[h, G, T, D] -> [h n, G C, D] (row block g of chunk c holds query head g's rows)."""
    h, G, T, D = x.shape
    if T < n * C:
        x = F.pad(x, (0, 0, 0, n * C - T))
    x = x.to(dtype).reshape(h, G, n, C, D)
    if G > 1:
        x = x.transpose(1, 2)
    return x.reshape(h * n, G * C, D)


def _ungroup_rows(y: Tensor, h: int, G: int, C: int, T: int) -> Tensor:
    """Inverse of :func:`_group_rows`: [h n, G C, W] -> [h, G, T, W]."""
    W = y.shape[-1]
    n = y.shape[0] // h
    z = y.view(h, n, G, C, W)
    if G > 1:
        z = z.transpose(1, 2)
    return z.reshape(h, G, n * C, W)[:, :, :T]


@dataclass(frozen=True)
class _Config:
    G: int  # query rows per state head
    q_index: Tensor | None  # state head -> q row (grouped value heads), None: a view
    k_index: Tensor | None  # state head -> k row, None: Hk == Hv
    scale: float
    use_qk_l2norm: bool
    chunk: int
    plan: Plan


class _Tile(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    g: Tensor | None
    b: Tensor | None


def _gather(src: Tensor, index: Tensor | None, h0: int, h1: int, t0: int, t1: int) -> Tensor:
    """Rows h0:h1 of the state heads (through ``index``), tokens t0:t1 (slice first: the
    gather copies only the tile's tokens)."""
    if index is None:
        return src[h0:h1, ..., t0:t1, :] if src.dim() == 4 else src[h0:h1, t0:t1]
    return src[..., t0:t1, :].index_select(0, index[h0:h1])


def _tile_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    b: Tensor | None,
    cfg: _Config,
    h0: int,
    h1: int,
    t0: int,
    t1: int,
    acc: torch.dtype,
) -> _Tile:
    """The tile's inputs in chunk rows and ``acc`` (q [h n, G C, D], k, v, g, b [h n, C, ...])."""
    C = cfg.chunk
    n = -(-(t1 - t0) // C)
    qt = _gather(q, cfg.q_index, h0, h1, t0, t1)  # [h, G, T, D]
    kt = _gather(k, cfg.k_index, h0, h1, t0, t1)  # [h, T, D]
    return _Tile(
        _group_rows(qt, n, C, acc),
        _rows(kt, n, C, acc),
        _rows(v[h0:h1, t0:t1], n, C, acc),
        None if g is None else _rows(g[h0:h1, t0:t1], n, C, acc),
        None if b is None else _rows(b[h0:h1, t0:t1], n, C, acc),
    )


class _ChunkedGated(torch.autograd.Function):
    """Tiled chunked decay attention / delta rule with a recomputing backward pass."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor | None,
        b: Tensor | None,
        S0: Tensor,
        cfg: _Config,
    ) -> tuple[Tensor, Tensor]:
        # q [BHq, G', L, D] (G' = G, or 1 with q_index), k [BHk, L, D], v [BH, L, M],
        # g [BH, L(, D)] or None, b [BH, L] or None, S0 [BH, D, M] (acc dtype)
        acc = S0.dtype
        BH, D, M = S0.shape
        L = v.shape[1]
        G, C, plan = cfg.G, cfg.chunk, cfg.plan
        out = q.new_empty((BH, G, L, M), dtype=acc)
        starts = S0.new_empty((len(_ranges(L, plan.bwd_tokens)), BH, D, M))
        final = S0.detach().clone()
        with torch.no_grad():
            for h0, h1 in _ranges(BH, plan.fwd_heads):
                h = h1 - h0
                S = S0.detach()[h0:h1]
                for t0, t1 in _ranges(L, plan.fwd_tokens):
                    x = _tile_inputs(q, k, v, g, b, cfg, h0, h1, t0, t1, acc)
                    prep = prepare(*x, G, cfg.scale, cfg.use_qk_l2norm)
                    states, Unew = sequential_forward(prep, S, h)
                    first = -(-t0 // plan.bwd_tokens) * plan.bwd_tokens
                    for s in range(first, t1, plan.bwd_tokens):  # backward tiles starting here
                        j = (s - t0) // C - 1  # the chunk that ends at s (-1: the tile's start)
                        starts[s // plan.bwd_tokens, h0:h1] = S if j < 0 else states[:, j]
                    o = _output(prep, states, Unew, S)
                    out[h0:h1, :, t0:t1] = _ungroup_rows(o, h, G, C, t1 - t0)
                    S = states[:, -1]
                final[h0:h1] = S
        ctx.save_for_backward(q, k, v, g, b, starts)  # type: ignore[arg-type]  # None allowed
        ctx.cfg = cfg  # type: ignore[attr-defined]
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor, d_final: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, g, b, starts = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        need = ctx.needs_input_grad[:6]
        acc = starts.dtype
        BH, D, M = starts.shape[1:]
        L = v.shape[1]
        G, C, plan = cfg.G, cfg.chunk, cfg.plan
        grads: list[Tensor | None] = [
            torch.zeros_like(t, dtype=acc) if (t is not None and need[i]) else None
            for i, t in enumerate((q, k, v, g, b))
        ]
        dS0 = starts.new_zeros((BH, D, M))
        dST = d_final.to(acc) if d_final is not None else torch.zeros_like(dS0)
        segments = _ranges(L, plan.bwd_tokens)
        for h0, h1 in _ranges(BH, plan.bwd_heads):
            h = h1 - h0
            R = dST[h0:h1]
            for s in range(len(segments) - 1, -1, -1):
                t0, t1 = segments[s]
                T = t1 - t0
                n = -(-T // C)
                x = _tile_inputs(q, k, v, g, b, cfg, h0, h1, t0, t1, acc)
                dO = _group_rows(d_out[h0:h1, :, t0:t1], n, C, acc)
                tile_grads, R = _tile_backward(x, need, cfg, starts[s, h0:h1], dO, R, h)
                _scatter_grads(grads, tile_grads, cfg, h0, h1, t0, t1, h, G, C, T)
            dS0[h0:h1] = R
        dq, dk, dv, dg, db = (
            None if t is None or src is None else t.to(src.dtype)
            for t, src in zip(grads, (q, k, v, g, b), strict=True)
        )
        return dq, dk, dv, dg, db, (dS0 if need[5] else None), None


def _tile_backward(
    x: _Tile, need: tuple[bool, ...], cfg: _Config, S_in: Tensor, dO: Tensor, R: Tensor, h: int
) -> tuple[list[Tensor | None], Tensor]:
    """Gradients of one backward tile's inputs (chunk rows; None where not needed) and
    dL/dS before the tile, from dO (chunk rows) and R = dL/dS after it."""
    G, scale, l2 = cfg.G, cfg.scale, cfg.use_qk_l2norm
    leaves = [
        None if t is None else t.detach().requires_grad_(bool(need[i])) for i, t in enumerate(x)
    ]
    lq, lk, lv, lg, lb = leaves
    if lb is not None and hand_backward(lg, lb):
        # delta rule, scalar gate or none: the prepare step's backward by hand; autograd
        # only for the L2 norm of q and k
        lq, lk = cast(Tensor, lq), cast(Tensor, lk)
        with torch.enable_grad():
            qn, kn = (l2norm(lq), l2norm(lk)) if l2 else (lq, lk)
        with torch.no_grad():
            prep, kept = prepare_kept(qn, kn, x.v, x.g, lb.detach(), G, scale, False)
            states, Unew = sequential_forward(prep, S_in, h)
            d, R = sequential_backward(prep, states, Unew, S_in, dO, R)
            dq, dk, dv, dg, db = prepare_backward(
                qn, kn, x.v, lb.detach(), G, scale, prep, cast(Kept, kept), d
            )
        tile: list[Tensor | None] = [dq, dk, dv, dg, db]
        if l2:  # through the L2 norm to the raw q, k
            pairs = [(t, dt) for t, dt in ((qn, dq), (kn, dk)) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [dt for _, dt in pairs])
            tile[0], tile[1] = lq.grad, lk.grad
        return tile, R
    with torch.enable_grad():
        prep = prepare(cast(Tensor, lq), cast(Tensor, lk), cast(Tensor, lv), lg, lb, G, scale, l2)
    plain = Prepared(*(None if t is None else t.detach() for t in prep))  # type: ignore[arg-type]
    states, Unew = sequential_forward(plain, S_in, h)
    d, R = sequential_backward(plain, states, Unew, S_in, dO, R)
    outs: list[Tensor] = []
    grads: list[Tensor] = []
    for t, dt in zip(prep, d, strict=True):
        if t is not None and dt is not None and t.requires_grad:
            outs.append(t)
            grads.append(dt)
    if outs:
        torch.autograd.backward(outs, grads)
    return [None if t is None else t.grad for t in leaves], R


def _scatter_grads(
    grads: list[Tensor | None],
    tile_grads: list[Tensor | None],
    cfg: _Config,
    h0: int,
    h1: int,
    t0: int,
    t1: int,
    h: int,
    G: int,
    C: int,
    T: int,
) -> None:
    """Add the tile leaves' gradients (chunk rows) into the full gradients."""
    for i, (full, tg) in enumerate(zip(grads, tile_grads, strict=True)):
        if full is None or tg is None:
            continue
        if i == 0:
            part = _ungroup_rows(tg, h, G, C, T)  # [h, G, T, D]
            index = cfg.q_index
        else:
            part = tg.view(h, -1, *tg.shape[2:])[:, :T]
            index = cfg.k_index if i == 1 else None
        if index is None:
            target = full[h0:h1, ..., t0:t1, :] if full.dim() == 4 else full[h0:h1, t0:t1]
            target.add_(part)
        else:  # several state heads share this q / k head: accumulate
            full[..., t0:t1, :].index_add_(0, index[h0:h1], part)


def _head_index(B: int, Hv: int, Hx: int, device: torch.device) -> Tensor | None:
    """State head s (of B Hv) -> row of an input with Hx heads that it reads (None: same)."""
    if Hx == Hv:
        return None
    s = torch.arange(B * Hv, device=device)
    return (s // Hv) * Hx + (s % Hv) // (Hv // Hx)


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
    plan: Plan | None = None,
) -> tuple[Tensor, Tensor]:
    """Validated inputs -> (o [B, Ho, L, M] in q's dtype, final state [B, Hv, D, M] in S0's).

    ``beta=None`` is decay attention (``g`` required), otherwise the delta rule.
    ``plan`` overrides :func:`plan_tiles` (tests force many small tiles with it).
    """
    B, Hq, Hk, Hv, L, D, M = dims.B, dims.Hq, dims.Hk, dims.Hv, dims.L, dims.D, dims.M
    G = dims.G
    BH = B * Hv
    if Hq >= Hv:
        qs, q_index = q.reshape(BH, G, L, D), None
    else:
        qs, q_index = q.reshape(B * Hq, 1, L, D), _head_index(B, Hv, Hq, q.device)
    ks = k.reshape(B * Hk, L, D)
    k_index = _head_index(B, Hv, Hk, q.device)
    gs = None if g is None else g.reshape(BH, L, *g.shape[3:])
    bs = None if beta is None else beta.reshape(BH, L)
    if plan is None:
        cpu = q.device.type == "cpu"
        delta, size = beta is not None, S0.element_size()
        plan = plan_tiles(BH, G, L, D, M, chunk, delta, size, CPU_TILE_BYTES if cpu else None)
        if cpu and not delta:
            fwd = plan_tiles(BH, G, L, D, M, chunk, delta, size, DECAY_FWD_TILE_BYTES)
            plan = replace(plan, fwd_tokens=fwd.fwd_tokens, fwd_heads=fwd.fwd_heads)
    cfg = _Config(G, q_index, k_index, scale, use_qk_l2norm, chunk, plan)
    apply = cast(Callable[..., tuple[Tensor, Tensor]], _ChunkedGated.apply)
    out, final = apply(qs, ks, v.reshape(BH, L, M), gs, bs, S0.reshape(BH, D, M), cfg)
    o = out.reshape(B, dims.Ho, L, M).to(q.dtype)
    return o, final.view(B, Hv, D, M)
