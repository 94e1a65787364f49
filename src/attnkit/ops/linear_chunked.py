"""Fast causal linear attention: a chunked custom autograd Function that recomputes.

This is the fast path behind ``linear_attention(..., is_causal=True)``; the plain
chunked reference it is tested against is ``attnkit.ops.linear._causal_chunked``
(and, beyond it, ``kernel_attention(sim="linear")``).

Three ideas make it fast and lean on a CPU (and are plain torch, so they run on a
GPU too):

1. **One augmented value matrix.** The denominator phi(q_i) . z_i is the numerator
   of equation (6) for a value column of ones, so V' = [V, 1] (width M + 1) turns
   numerator and denominator into the *same* matmuls, forward and backward
   (the gradient of the ones column carries d(denominator)).
2. **Well-shaped batched matmuls.** GQA query heads are stacked along the chunk
   rows ([G * C, D'] per chunk), so every product is one ``bmm`` over B * Hk * n
   chunks with no broadcast copies; chunk states come from one ``cumsum`` written
   straight into a preallocated buffer.
3. **Recompute instead of store.** Only q, k, v and the (numerator, denominator)
   output are saved; the feature maps and the chunk states are recomputed in the
   backward pass, so the memory kept for training is O(N (D + M)) per head, not
   O(N D') (D' = 153 for Taylor at D = 16).

Backward, for o'_i = phi(q_i)^T S'_i with S'_i = S'_0 + sum_{j <= i} phi(k_j) v'_j^T::

    d phi(q_i) = S'_i do'_i
    d phi(k_j) = R_j v'_j,   dv'_j = R_j^T phi(k_j),   R_j = dS'_T + sum_{i >= j} phi(q_i) do'_i^T

i.e. the gradient is causal linear attention run backwards in time, chunked the
same way (intra-chunk masked matmuls, inter-chunk reverse running state R).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from attnkit.feature_maps import FeatureMap

__all__ = ["causal_linear_attention"]


def _augment(v: Tensor) -> Tensor:
    """V' = [V, 1]: [..., M] -> [..., M + 1] (the ones column yields the denominator)."""
    return torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)


def _to_chunks_q(fq: Tensor, n: int, C: int) -> Tensor:
    """[BHk, G, n*C, D'] -> [BHk*n, G*C, D']: the G heads' rows of a chunk, stacked."""
    BHk, G, _, Dp = fq.shape
    x = fq.view(BHk, G, n, C, Dp)
    if G > 1:
        x = x.transpose(1, 2)  # [BHk, n, G, C, D']
    return x.reshape(BHk * n, G * C, Dp)


def _from_chunks_q(x: Tensor, BHk: int, G: int, n: int, C: int) -> Tensor:
    """Inverse of :func:`_to_chunks_q`: [BHk*n, G*C, W] -> [BHk, G, n*C, W]."""
    W = x.shape[-1]
    y = x.view(BHk, n, G, C, W)
    if G > 1:
        y = y.transpose(1, 2)
    return y.reshape(BHk, G, n * C, W)


def _tril_(scores: Tensor, G: int, C: int) -> Tensor:
    """Zero, in place, where query row (g, i) may not see key j (j > i): [*, G*C, C]."""
    if G == 1:
        return scores.tril_()
    scores.view(-1, G, C, C).tril_()
    return scores


def _prefix_states(kc: Tensor, vc: Tensor, S0: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """States before each chunk [BHk, n, D', M'] (contiguous) and the final state.

    prefix[:, c] = S'_0 + sum_{c' < c} phi(K_c')^T V'_c'; final = prefix[:, -1] + the last
    chunk's sum. Exclusive prefix sums, taken in place, without subtracting.
    """
    BHk = S0.shape[0]
    kv = torch.bmm(kc.transpose(1, 2), vc).view(BHk, n, *S0.shape[1:])  # [BHk, n, D', M']
    prefix = torch.empty_like(kv)
    prefix[:, 0] = S0
    prefix[:, 1:] = kv[:, :-1]
    prefix.cumsum_(dim=1)
    return prefix, prefix[:, -1] + kv[:, -1]


def _reverse_states(qc: Tensor, doc: Tensor, dST: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Reverse states after each chunk [BHk, n, D', M'] and the initial-state gradient.

    after[:, c] = dS'_T + sum_{c' > c} phi(Q_c')^T dO'_c' (what chunk c needs from the
    future); the gradient of S'_0 is after[:, 0] + chunk 0's own term.
    """
    BHk = dST.shape[0]
    qdo = torch.bmm(qc.transpose(1, 2), doc).view(BHk, n, *dST.shape[1:])  # [BHk, n, D', M']
    rev = torch.empty_like(qdo)  # chunks in reverse order: rev[:, i] is chunk n - 1 - i
    rev[:, 0] = dST
    rev[:, 1:] = qdo[:, 1:].flip(1)
    rev.cumsum_(dim=1)
    after = rev.flip(1)
    return after, after[:, 0] + qdo[:, 0]


def _forward_core(fq: Tensor, fk: Tensor, va: Tensor, S0: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """Unnormalised causal linear attention on augmented values.

    fq [BHk, G, N, D'], fk [BHk, N, D'], va [BHk, N, M'], S0 [BHk, D', M'], N = n*C.
    Returns o' [BHk, G, N, M'] and the final state [BHk, D', M'].
    """
    BHk, G, N, Dp = fq.shape
    n = N // C
    Mp = va.shape[-1]
    qc = _to_chunks_q(fq, n, C)  # [BHk*n, G*C, D']
    kc = fk.reshape(BHk * n, C, Dp)
    vc = va.reshape(BHk * n, C, Mp)
    prefix, final = _prefix_states(kc, vc, S0, n)
    o = torch.bmm(qc, prefix.view(BHk * n, Dp, Mp))  # inter-chunk: [BHk*n, G*C, M']
    A = _tril_(torch.bmm(qc, kc.transpose(1, 2)), G, C)  # [BHk*n, G*C, C]
    o.baddbmm_(A, vc)  # + intra-chunk
    return _from_chunks_q(o, BHk, G, n, C), final


def _backward_core(
    fq: Tensor, fk: Tensor, va: Tensor, S0: Tensor, do: Tensor, dST: Tensor, C: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_forward_core` wrt fq, fk, va and S0 (states recomputed)."""
    BHk, G, N, Dp = fq.shape
    n = N // C
    Mp = va.shape[-1]
    qc = _to_chunks_q(fq, n, C)
    doc = _to_chunks_q(do, n, C)  # [BHk*n, G*C, M']
    kc = fk.reshape(BHk * n, C, Dp)
    vc = va.reshape(BHk * n, C, Mp)

    # d phi(q) = do' S'_prev^T + tril(do' v'^T) phi(K_c)
    prefix, _ = _prefix_states(kc, vc, S0, n)
    Bm = _tril_(torch.bmm(doc, vc.transpose(1, 2)), G, C)  # [BHk*n, G*C, C]
    dq = torch.bmm(doc, prefix.view(BHk * n, Dp, Mp).transpose(1, 2)).baddbmm_(Bm, kc)

    # d phi(k) = V'_c R^T + tril(do' v'^T)^T phi(Q_c);  dV' = phi(K_c) R + tril(q k^T)^T do'
    after, dS0 = _reverse_states(qc, doc, dST, n)
    R = after.reshape(BHk * n, Dp, Mp)
    A = _tril_(torch.bmm(qc, kc.transpose(1, 2)), G, C)  # [BHk*n, G*C, C]
    dk = torch.bmm(vc, R.transpose(1, 2)).baddbmm_(Bm.transpose(1, 2), qc)
    dv = torch.bmm(kc, R).baddbmm_(A.transpose(1, 2), doc)
    dq = _from_chunks_q(dq, BHk, G, n, C)
    return dq, dk.reshape(BHk, N, Dp), dv.reshape(BHk, N, Mp), dS0


class _CausalLinearAttention(torch.autograd.Function):
    """Chunked causal linear attention with recomputation in the backward pass."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        S0: Tensor,
        phi: FeatureMap,
        chunk: int,
        normalize: bool,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        # q [BHk, G, L, E], k [BHk, L, E], v [BHk, L, M], S0 [BHk, D', M+1] (acc dtype)
        acc = S0.dtype
        L = k.shape[1]
        n = max(1, -(-L // chunk))
        pad = n * chunk - L
        fq = _features_padded(phi, q, acc, pad)
        fk = _features_padded(phi, k, acc, pad)
        va = _pad(_augment(v.to(acc)), pad)
        o_aug, final = _forward_core(fq, fk, va, S0, chunk)
        o_aug = o_aug[:, :, :L]
        num, den = o_aug[..., :-1], o_aug[..., -1:]
        out = num / den.clamp_min(eps) if normalize else num.clone()
        ctx.save_for_backward(q, k, v, S0, o_aug)
        ctx.phi = phi  # type: ignore[attr-defined]
        ctx.chunk = chunk  # type: ignore[attr-defined]
        ctx.normalize = normalize  # type: ignore[attr-defined]
        ctx.eps = eps  # type: ignore[attr-defined]
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor, d_final: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, S0, o_aug = ctx.saved_tensors
        phi: FeatureMap = ctx.phi
        chunk: int = ctx.chunk
        acc = S0.dtype
        L = k.shape[1]
        n = max(1, -(-L // chunk))
        pad = n * chunk - L
        num, den = o_aug[..., :-1], o_aug[..., -1:]
        d_out = d_out.to(acc)
        if ctx.normalize:
            den_c = den.clamp_min(ctx.eps)
            d_num = d_out / den_c
            # d den = -(dO . o) / den where the guard is inactive; 0 where it clamped.
            d_den = -(d_out * num).sum(-1, keepdim=True) / den_c.square()
            d_den = d_den.masked_fill(den < ctx.eps, 0.0)
        else:
            d_num = d_out
            d_den = torch.zeros_like(den)
        do_aug = _pad(torch.cat([d_num, d_den], dim=-1), pad)
        dST = d_final.to(acc) if d_final is not None else torch.zeros_like(S0)

        with torch.enable_grad():
            qr = q.detach().requires_grad_(ctx.needs_input_grad[0])
            kr = k.detach().requires_grad_(ctx.needs_input_grad[1])
            fq_full = phi(qr.to(acc))
            fk_full = phi(kr.to(acc))
        fq = _pad(fq_full.detach().to(acc), pad)
        fk = _pad(fk_full.detach().to(acc), pad)
        va = _pad(_augment(v.to(acc)), pad)
        dfq, dfk, dva, dS0 = _backward_core(fq, fk, va, S0, do_aug, dST, chunk)

        outputs, grads = [], []
        if ctx.needs_input_grad[0]:
            outputs.append(fq_full)
            grads.append(dfq[:, :, :L])
        if ctx.needs_input_grad[1]:
            outputs.append(fk_full)
            grads.append(dfk[:, :L])
        if outputs:
            torch.autograd.backward(outputs, grads)
        dq, dk = qr.grad, kr.grad
        dv = dva[:, :L, :-1].to(v.dtype) if ctx.needs_input_grad[2] else None
        dS0_out = dS0 if ctx.needs_input_grad[3] else None
        return dq, dk, dv, dS0_out, None, None, None, None


def _features_padded(phi: FeatureMap, x: Tensor, acc: torch.dtype, pad: int) -> Tensor:
    """phi(x) in the accumulation dtype, zero rows appended along the length axis (-2).

    Padding happens *after* phi: phi(0) != 0 for e.g. elu + 1, and padded keys must
    contribute nothing.
    """
    with torch.no_grad():
        f = phi(x.to(acc)).to(acc)
    return _pad(f, pad)


def _pad(x: Tensor, pad: int) -> Tensor:
    """Append ``pad`` zero rows along the length axis (-2); no copy when pad == 0."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi: FeatureMap,
    S0: Tensor,
    z0: Tensor,
    chunk: int,
    normalize: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fast causal linear attention on validated inputs; returns (o, S_T, z_T).

    Shapes (GQA: G = H / Hk query heads per key/value head)::

        q [B, H, L, E], k [B, Hk, L, E], v [B, Hk, L, M]
        S0 [B, Hk, D', M], z0 [B, Hk, D']   in the accumulation dtype ``acc``
        o [B, H, L, M] in q's dtype; S_T, z_T like S0, z0

    Callers (``linear_attention``) validate; this function assumes valid input. The
    feature map must have no trainable parameters (its inputs get gradients by
    recomputation, its parameters would not): ``linear_attention`` falls back to
    the plain chunked path otherwise.
    """
    B, H, L, E = q.shape
    Hk, M = k.shape[1], v.shape[-1]
    G = H // Hk
    qg = q.reshape(B * Hk, G, L, E)
    kg = k.reshape(B * Hk, L, E)
    vg = v.reshape(B * Hk, L, M)
    S0a = torch.cat([S0, z0.unsqueeze(-1)], dim=-1).reshape(B * Hk, -1, M + 1)
    apply = cast(Callable[..., tuple[Tensor, Tensor]], _CausalLinearAttention.apply)
    out, final = apply(qg, kg, vg, S0a, phi, chunk, normalize, eps)
    final = final.view(B, Hk, -1, M + 1)
    return out.reshape(B, H, L, M).to(q.dtype), final[..., :M], final[..., M]
