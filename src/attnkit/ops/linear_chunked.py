"""Fast causal linear attention: a chunked, tiled custom autograd Function that recomputes.

This is the fast path behind ``linear_attention(..., is_causal=True)``; the plain
chunked reference it is tested against is ``attnkit.ops.linear._causal_chunked``
(and, beyond it, ``kernel_attention(sim="linear")``).

Four ideas make it fast and lean on a CPU (all plain torch, so it runs on a GPU too):

1. **One augmented value matrix.** The denominator phi(q_i) . z_i is the numerator
   of :mod:`attnkit.ops.linear`'s equation (6) for a value column of ones, so
   V' = [V, 1] (width M' = M + 1) turns numerator and denominator into the *same*
   matmuls, forward and backward (the gradient of the ones column carries d(denominator)).
2. **Well-shaped batched matmuls, no state copies.** GQA query heads are stacked
   along the chunk rows ([G C, D'] per chunk), so every product is one ``bmm`` over
   all chunks of a tile. The per-chunk states phi(K_c)^T V'_c are summed *in place*
   into inclusive prefixes, and chunk c reads chunk c - 1's prefix through a
   one-chunk shift of the flattened batch (``bmm(q[1:], prefix[:-1])``), so no
   exclusive-prefix copy is ever made; the first chunk of each head is then
   overwritten with its product against the incoming state.
3. **Cache-sized tiles.** On a CPU the work is cut into tiles of a few key/value
   heads by a few thousand tokens whose working set (inputs, features, scores,
   outputs) fits in about :data:`CPU_TILE_BYTES`; the state is carried from tile to
   tile along the sequence. The backward pass holds twice as much per token, so its
   tiles are shorter; the forward saves the state at each backward tile boundary
   (it has every chunk's prefix at hand). Memory traffic to DRAM, not arithmetic,
   is what made the untiled version slow: every fresh 8 MB temporary cost about
   1 ms of page and cache misses on the 2-core reference machine. On a GPU the whole problem is one
   tile (big kernels are what a GPU wants). See :func:`plan_tiles`.
4. **Recompute instead of store.** Only q, k, v, the output, its denominator and
   the state at each tile boundary along the sequence are saved; the feature maps
   and the chunk states are recomputed tile by tile in the backward pass, so the
   memory kept for training is O(N (D + M)) per head, not O(N D') (D' = 153 for
   Taylor at D = 16).

Backward, for o'_i = phi(q_i)^T S'_i with S'_i = S'_0 + sum_{j <= i} phi(k_j) v'_j^T::

    d phi(q_i) = S'_i do'_i
    d phi(k_j) = R_j v'_j,   dv'_j = R_j^T phi(k_j),   R_j = dS'_T + sum_{i >= j} phi(q_i) do'_i^T

i.e. the gradient is causal linear attention run backwards in time, chunked the
same way (intra-chunk masked matmuls, inter-chunk reverse running state R), over
the tiles in reverse order.

Its four products, per chunk, are declared below as :class:`~attnkit._contract.Contraction`
records (:data:`CONTRACTIONS`), which :mod:`attnkit.cost` reads; the backward runs
exactly one product of the same size per operand that needs a gradient, plus the
chunk states and the scores again (recomputed). One bmm product per chunk, whatever
the tile plan (see :func:`_bmm_neighbour`), so FlopCounterMode's count of this path
equals the cost model's at every plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from attnkit._contract import Contraction
from attnkit.feature_maps import FeatureMap
from attnkit.ops._guards import check_feature_shape, check_linear_denominator, finish

__all__ = [
    "CONTRACTIONS",
    "CPU_TILE_BYTES",
    "TilePlan",
    "causal_linear_attention",
    "plan_tiles",
]

# The bmm products of one tile, over every chunk x of every key/value head (B Hk L/C
# chunks in all): G query heads' rows stacked per chunk (r: G C rows), values augmented
# with a ones column (m: Ev + 1; the extra column computes the denominator).
_TILE = {"x": "B*Hk*L/C", "c": "C", "r": "H/Hk*C", "d": "Dp", "m": "Ev + 1"}
_ONES = {"m": "Ev"}  # useful: the numerator's Ev columns


def _sizes(indices: str) -> dict[str, str]:
    return {i: _TILE[i] for i in indices}


#: phi(K_c)^T V'_c, each chunk's state: [x, C, D'] . [x, C, M'] -> [x, D', M']
CHUNK_STATES = Contraction(
    "chunk_states", "xcd,xcm->xdm", ("fk", "va"), "kv", _sizes("xcdm"), useful=_ONES
)
#: phi(Q_c) S'_{c-1}, the inter-chunk term: [x, G C, D'] . [x, D', M'] -> [x, G C, M']
CHUNK_INTER = Contraction(
    "chunk_inter", "xrd,xdm->xrm", ("fq", "S_prev"), "o_inter", _sizes("xrdm"), useful=_ONES
)
#: phi(Q_c) phi(K_c)^T, then masked causally: [x, G C, D'] . [x, C, D'] -> [x, G C, C]
CHUNK_SCORES = Contraction(
    "chunk_scores", "xrd,xcd->xrc", ("fq", "fk"), "A_raw", _sizes("xrcd"), triangle=("r", "c")
)
#: tril(A) V'_c, the intra-chunk term: [x, G C, C] . [x, C, M'] -> [x, G C, M']
CHUNK_INTRA = Contraction(
    "chunk_intra",
    "xrc,xcm->xrm",
    ("A", "va"),
    "o_intra",
    _sizes("xrcm"),
    useful=_ONES,
    triangle=("r", "c"),
)
#: The fast path's products, in the order its forward runs them.
CONTRACTIONS: tuple[Contraction, ...] = (CHUNK_STATES, CHUNK_INTER, CHUNK_SCORES, CHUNK_INTRA)

#: Working-set budget of one tile on a CPU, a fraction of the last-level cache (32 MiB
#: on the 2-core reference machine). ``python benchmarks/tile_budget.py`` there, four
#: runs: 8, 12 and 16 MiB were within noise of each other (0.90-1.05x), 4 MiB was
#: 1.10-1.18x slower and one untiled call 1.7-2.6x slower (elu forward N=4096, elu
#: forward + backward N=16384, Taylor-16 forward N=4096; B=1, H=8, M=64, 2 threads).
CPU_TILE_BYTES = 12 * 2**20


@dataclass(frozen=True)
class TilePlan:
    """How the fast path cuts [B Hk, N] into tiles (see :func:`plan_tiles`).

    The forward pass takes ``fwd_heads`` key/value heads by ``fwd_tokens`` tokens at a
    time, the backward ``bwd_heads`` by ``bwd_tokens``. Token counts are multiples of
    the chunk length (the last tile along the sequence may be shorter); the forward
    saves the state before every backward tile.
    """

    fwd_tokens: int
    fwd_heads: int
    bwd_tokens: int
    bwd_heads: int


def _token_floats(G: int, E: int, Dp: int, M: int, C: int) -> tuple[int, int]:
    """Floats held per key/value head per token by a forward and a backward tile."""
    Mp = M + 1
    state = -(-Dp * Mp // C)  # the per-chunk [D', M'] states, spread over C tokens
    fwd = G * (E + Dp + Mp + C) + (E + Dp + Mp) + state
    bwd = fwd + G * (E + Dp + Mp + C) + (E + Dp + Mp) + state
    return fwd, bwd


def plan_tiles(
    BHk: int,
    G: int,
    L: int,
    E: int,
    d_feature: int,
    M: int,
    C: int,
    itemsize: int,
    budget: int | None,
) -> TilePlan:
    """Tile sizes for ``BHk`` key/value heads (``G`` query heads each) of length ``L``.

    With ``budget=None`` (a GPU) the whole problem is one tile. Otherwise, for each
    pass, the tile length is the largest multiple of C whose working set for one
    head fits the budget (at least one chunk), and as many heads as fit are grouped.

    The states saved at the backward tile boundaries take D' (M + 1) floats per head
    per ``bwd_tokens`` tokens; backward tiles are therefore at least D' (M + 1) / (E + M)
    tokens long (rounded up to chunks), so those states never outweigh the q, k, v
    rows saved beside them and training memory stays O(N (E + M) + D' M) per head,
    whatever the budget.
    """
    L_pad = max(C, -(-L // C) * C)  # an empty sequence still gets one chunk
    if budget is None:
        return TilePlan(L_pad, BHk, L_pad, BHk)
    per_token = _token_floats(G, E, d_feature, M, C)
    tokens = [max(C, min(L_pad, budget // (f * itemsize) // C * C)) for f in per_token]
    state_floor = -(-d_feature * (M + 1) // (E + M) // C) * C
    tokens[1] = min(L_pad, max(tokens[1], state_floor))
    heads = [
        max(1, min(BHk, budget // (f * itemsize * t)))
        for f, t in zip(per_token, tokens, strict=True)
    ]
    return TilePlan(tokens[0], heads[0], tokens[1], heads[1])


# --------------------------------------------------------------------------------------
# Layout helpers: [h, G, T, W] rows <-> [h n, G C, W] chunk rows
# --------------------------------------------------------------------------------------


def _chunk_rows(x: Tensor, n: int, C: int, dtype: torch.dtype) -> Tensor:
    """[h, G, T, W] (T <= n C) -> [h n, G C, W] in ``dtype``, zero rows past T.

    Row block c of batch entry (i, c) holds the G heads' rows of chunk c, stacked.
    No copy when G == 1, T == n C, the dtype matches and the rows are contiguous.
    """
    h, G, T, W = x.shape
    if T < n * C:
        x = F.pad(x, (0, 0, 0, n * C - T))
    x = x.to(dtype).reshape(h, G, n, C, W)
    if G > 1:
        x = x.transpose(1, 2)
    return x.reshape(h * n, G * C, W)


def _unchunk_rows(y: Tensor, h: int, G: int, C: int, T: int) -> Tensor:
    """Inverse of :func:`_chunk_rows`: [h n, G C, W] -> [h, G, T, W] (a view when G == 1)."""
    W = y.shape[-1]
    n = y.shape[0] // h
    z = y.view(h, n, G, C, W)
    if G > 1:
        z = z.transpose(1, 2)
    return z.reshape(h, G, n * C, W)[:, :, :T]


def _augmented_rows(v: Tensor, n: int, C: int, dtype: torch.dtype) -> Tensor:
    """V' = [V, 1] in chunk rows: [h, T, M] -> [h n, C, M + 1], zero rows (ones too) past T."""
    h, T, M = v.shape
    alloc = v.new_zeros if T < n * C else v.new_empty
    va = alloc((h, n * C, M + 1), dtype=dtype)
    va[:, :T, :M] = v
    va[:, :T, M] = 1.0
    return va.view(h * n, C, M + 1)


def _tril_(scores: Tensor, G: int, C: int) -> Tensor:
    """Zero, in place, where query row (g, i) may not see key j (j > i): [*, G C, C]."""
    if G == 1:
        return scores.tril_()
    scores.view(-1, G, C, C).tril_()
    return scores


def _scan_(x: Tensor, reverse: bool = False, loop: bool | None = None) -> Tensor:
    """Inclusive prefix (or, with ``reverse``, suffix) sums over dim 1, in place.

    On a CPU (``loop`` defaults to True there) a blocked scan of in-place adds: the n
    chunks are cut into blocks of b ~ sqrt(n); each block is scanned (b - 1 adds over
    all blocks at once), then the block totals (n / b - 1 adds), then the earlier
    blocks' totals are added to each block (one broadcast add): about 2 sqrt(n) ops
    instead of n - 1. A loop of single-chunk adds measured 2x faster than ``cumsum_``
    along a middle dimension (0.31 vs 0.62 ms for [8, 64, 4160] on 2 cores), and at
    ~1-2 µs per op the blocked form saves most of what is left. Elsewhere one
    ``cumsum`` (a GPU wants few kernels).
    """
    if loop is None:
        loop = x.device.type == "cpu"
    if not loop:
        if reverse:
            x.copy_(x.flip(1).cumsum(1).flip(1))
        else:
            x.cumsum_(1)
        return x
    n = x.shape[1]
    b = max(1, math.isqrt(n))
    nb = n // b
    n0 = nb * b  # chunks in whole blocks: the first n0 (prefix) or the last n0 (suffix)
    if b > 1 and nb > 1:
        whole = x[:, n - n0 :] if reverse else x[:, :n0]
        blocks = whole.view(x.shape[0], nb, b, *x.shape[2:])
        _loop_(blocks, 2, reverse)  # within each block
        _loop_(blocks.select(2, 0 if reverse else b - 1), 1, reverse)  # block totals
        if reverse:
            blocks[:, :-1, 1:] += blocks[:, 1:, :1]
        else:
            blocks[:, 1:, :-1] += blocks[:, :-1, -1:]
    else:
        n0 = 1
    # the chunks outside whole blocks, one at a time (with the block next to them)
    if n0 < n:
        _loop_(x[:, : n - n0 + 1] if reverse else x[:, n0 - 1 :], 1, reverse)
    return x


def _loop_(x: Tensor, dim: int, reverse: bool) -> None:
    """Inclusive prefix (suffix) sums over ``dim`` in place, one add per index."""
    parts = x.unbind(dim)
    if reverse:
        for c in range(len(parts) - 2, -1, -1):
            parts[c].add_(parts[c + 1])
    else:
        for c in range(1, len(parts)):
            parts[c].add_(parts[c - 1])


# --------------------------------------------------------------------------------------
# One tile: chunked forward and backward on features already in chunk rows
# --------------------------------------------------------------------------------------


def _chunk_states(x: Tensor, y: Tensor, edge: Tensor, reverse: bool) -> Tensor:
    """Running sums of the chunks' x_c^T y_c over each of h heads, [h n, D', M'].

    Forward (x, y = phi(K), V', edge = the state S entering the tile): row h n + c is
    head h's state after its chunk c, S + sum_{c' <= c}. Reverse (x, y = phi(Q), dO',
    edge = the reverse state R leaving the tile): R + sum_{c' >= c}. One bmm for the
    per-chunk products, then an in-place inclusive scan.
    """
    h, Dp, Mp = edge.shape
    sums = torch.bmm(x.transpose(1, 2), y)  # [h n, D', M']: each chunk's x_c^T y_c
    incl = sums.view(h, -1, Dp, Mp)
    incl[:, -1 if reverse else 0] += edge
    _scan_(incl, reverse=reverse)
    return sums


def _bmm_neighbour(a: Tensor, b: Tensor, edge: Tensor, reverse: bool) -> Tensor:
    """a[c] @ b[c - 1] (``reverse``: b[c + 1]) for every chunk c of each of h heads.

    a [h n, X, Y], b [h n, Y, Z], edge [h, Y, Z] -> [h n, X, Z]. A head's first (last)
    chunk has no neighbour in b and takes ``edge`` (the state entering the tile, or
    the reverse state leaving it) instead. One bmm over the flattened batch shifted
    by one chunk, with no shifted copy of b: the pairs that straddle two heads read
    the next head's edge, swapped into b's neighbouring slot for the call and swapped
    back after, so every product computed is one the result needs (h n in all; the
    cost model counts exactly that). Only the very first (last) chunk's edge product
    is a separate bmm. b is restored bit for bit before returning.
    """
    h = edge.shape[0]
    hn, X, _ = a.shape
    n = hn // h
    out = a.new_empty((hn, X, b.shape[-1]))
    bh = b.view(h, n, *b.shape[1:])
    if reverse:  # head i's last chunk reads head i + 1's first slot: put edge[i] there
        slots, edges, lone = bh[1:, 0], edge[:-1], -1
    else:  # head i's first chunk reads head i - 1's last slot: put edge[i] there
        slots, edges, lone = bh[:-1, -1], edge[1:], 0
    if hn > 1:
        kept = slots.clone() if h > 1 else None
        if kept is not None:
            slots.copy_(edges)
        if reverse:
            torch.bmm(a[:-1], b[1:], out=out[:-1])
        else:
            torch.bmm(a[1:], b[:-1], out=out[1:])
        if kept is not None:
            slots.copy_(kept)
    out[lone] = a[lone] @ edge[lone]
    return out


def _tile_forward(
    qc: Tensor, kc: Tensor, vc: Tensor, S: Tensor, G: int, C: int
) -> tuple[Tensor, Tensor]:
    """Unnormalised causal linear attention of one tile on augmented values.

    qc [h n, G C, D'], kc [h n, C, D'], vc [h n, C, M'], S [h, D', M'] the state
    before the tile. Returns o' [h n, G C, M'] and the states after each chunk
    [h, n, D', M'] (the last one is the state after the tile).
    """
    states = _chunk_states(kc, vc, S, reverse=False)
    o = _bmm_neighbour(qc, states, S, reverse=False)  # inter-chunk: the state before c
    A = _tril_(torch.bmm(qc, kc.transpose(1, 2)), G, C)  # [h n, G C, C]
    o.baddbmm_(A, vc)  # + intra-chunk
    return o, states.view(S.shape[0], -1, *S.shape[1:])


def _tile_backward(
    qc: Tensor, kc: Tensor, vc: Tensor, doc: Tensor, S: Tensor, R: Tensor, G: int, C: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_tile_forward` wrt qc, kc, vc, and the reverse state before it.

    S [h, D', M'] is the state before the tile, R [h, D', M'] the reverse state after
    it (dS'_T plus what later tiles send back). Pad rows of vc and doc must be zero.
    """
    # d phi(q) = do' S'_prev^T + tril(do' v'^T) phi(K_c)
    states = _chunk_states(kc, vc, S, reverse=False)
    dq = _bmm_neighbour(doc, states.transpose(1, 2), S.transpose(1, 2), reverse=False)
    Bm = _tril_(torch.bmm(doc, vc.transpose(1, 2)), G, C)  # [h n, G C, C]
    dq.baddbmm_(Bm, kc)

    # R_c = R + sum_{c' >= c} phi(Q_c')^T dO'_c'; chunk c reads R_{c + 1}
    after = _chunk_states(qc, doc, R, reverse=True)
    dk = _bmm_neighbour(vc, after.transpose(1, 2), R.transpose(1, 2), reverse=True)
    dv = _bmm_neighbour(kc, after, R, reverse=True)
    # d phi(k) += tril(do' v'^T)^T phi(Q_c);  dV' += tril(q k^T)^T do'
    dk.baddbmm_(Bm.transpose(1, 2), qc)
    A = _tril_(torch.bmm(qc, kc.transpose(1, 2)), G, C)
    dv.baddbmm_(A.transpose(1, 2), doc)
    return dq, dk, dv, after.view(R.shape[0], -1, *R.shape[1:])[:, 0]


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(total, a + step)) for a in range(0, total, step)]


class _CausalLinearAttention(torch.autograd.Function):
    """Chunked, tiled causal linear attention with recomputation in the backward pass."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        S0: Tensor,
        phi: FeatureMap,
        C: int,
        normalize: bool,
        eps: float | None,
        plan: TilePlan,
    ) -> tuple[Tensor, Tensor]:
        # q [BHk, G, L, E], k [BHk, L, E], v [BHk, L, M], S0 [BHk, D', M+1] (acc dtype)
        acc = S0.dtype
        BHk, G, L, _ = q.shape
        M = v.shape[-1]
        Dp = S0.shape[1]
        # Queries of a normalised call may be rescaled per row (phi.query_features).
        phi_q = phi.query_features if normalize else phi
        # Detached views for the tile work (phi is a module: hooks such as
        # FlopCounterMode's module tracker must not see inputs that require grad).
        qd, kd, vd, S0d = q.detach(), k.detach(), v.detach(), S0.detach()
        out = q.new_empty((BHk, G, L, M), dtype=acc)
        den = q.new_empty((BHk, G, L, 1), dtype=acc)
        # the state before each backward tile along the sequence
        starts = S0d.new_empty((len(_ranges(L, plan.bwd_tokens)), *S0.shape))
        final = torch.empty_like(S0d)
        for h0, h1 in _ranges(BHk, plan.fwd_heads):
            h = h1 - h0
            S = S0d[h0:h1]
            for t0, t1 in _ranges(L, plan.fwd_tokens):
                T = t1 - t0
                n = -(-T // C)
                xq = _chunk_rows(qd[h0:h1, :, t0:t1], n, C, acc)
                xk = _chunk_rows(kd[h0:h1, None, t0:t1], n, C, acc)
                qc, kc = phi_q(xq), phi(xk)
                if h0 == 0 and t0 == 0:  # a wrong out_dim would fail inside bmm
                    check_feature_shape(phi, "q", xq, qc, Dp)
                    check_feature_shape(phi, "k", xk, kc, Dp)
                if T < n * C:  # padded keys must add nothing (phi(0) != 0 for elu + 1);
                    kc.view(h, n * C, -1)[:, T:] = 0.0  # kc is fresh (phi of a padded copy)
                vc = _augmented_rows(vd[h0:h1, t0:t1], n, C, acc)
                o, states = _tile_forward(qc, kc, vc, S, G, C)
                first = -(-t0 // plan.bwd_tokens) * plan.bwd_tokens
                for b in range(first, t1, plan.bwd_tokens):  # backward tiles starting here
                    j = (b - t0) // C - 1  # the chunk that ends at b (-1: the tile's start)
                    starts[b // plan.bwd_tokens, h0:h1] = S if j < 0 else states[:, j]
                S = states[:, -1]
                o = _unchunk_rows(o, h, G, C, T)
                den[h0:h1, :, t0:t1] = o[..., M:]
                if not normalize:
                    out[h0:h1, :, t0:t1] = o[..., :M]
                elif eps is None:
                    torch.div(o[..., :M], o[..., M:], out=out[h0:h1, :, t0:t1])
                else:
                    torch.div(o[..., :M], o[..., M:].clamp_min(eps), out=out[h0:h1, :, t0:t1])
            final[h0:h1] = S
        if normalize:  # one reduction over the B H L denominators, after the fact
            check_linear_denominator(den, phi, eps)
        ctx.save_for_backward(q, k, v, out, den, starts)
        ctx.phi = phi  # type: ignore[attr-defined]
        ctx.chunk = C  # type: ignore[attr-defined]
        ctx.normalize = normalize  # type: ignore[attr-defined]
        ctx.eps = eps  # type: ignore[attr-defined]
        ctx.plan = plan  # type: ignore[attr-defined]
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor, d_final: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, den, starts = ctx.saved_tensors
        phi: FeatureMap = ctx.phi
        phi_q = phi.query_features if ctx.normalize else phi
        eps: float | None = ctx.eps
        C: int = ctx.chunk
        plan: TilePlan = ctx.plan
        need_q, need_k, need_v, need_S0 = ctx.needs_input_grad[:4]
        acc = starts.dtype
        BHk, G, L, _ = q.shape
        M = v.shape[-1]
        segments = _ranges(L, plan.bwd_tokens)
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        dS0 = starts.new_empty(starts.shape[1:])  # (starts is empty when L == 0)
        dST = d_final.to(acc) if d_final is not None else torch.zeros_like(dS0)
        for h0, h1 in _ranges(BHk, plan.bwd_heads):
            h = h1 - h0
            R = dST[h0:h1]
            for s in range(len(segments) - 1, -1, -1):
                t0, t1 = segments[s]
                T = t1 - t0
                n = -(-T // C)
                # do' = [dO / den, -(dO . o) / den]; zero where the eps guard clamped
                g = d_out[h0:h1, :, t0:t1].to(acc)
                if ctx.normalize:
                    d = den[h0:h1, :, t0:t1]
                    dc = d if eps is None else d.clamp_min(eps)
                    d_num = g / dc
                    d_den = (g * out[h0:h1, :, t0:t1]).sum(-1, keepdim=True).div_(dc).neg_()
                    if eps is not None:
                        d_den.masked_fill_(d < eps, 0.0)
                else:
                    d_num, d_den = g, g.new_zeros((*g.shape[:-1], 1))
                doc = _chunk_rows(torch.cat([d_num, d_den], dim=-1), n, C, acc)
                xq = _chunk_rows(q[h0:h1, :, t0:t1], n, C, acc).detach()
                xk = _chunk_rows(k[h0:h1, None, t0:t1], n, C, acc).detach()
                with torch.enable_grad():
                    fq = phi_q(xq.requires_grad_(need_q))
                    fk = phi(xk.requires_grad_(need_k))
                vc = _augmented_rows(v[h0:h1, t0:t1], n, C, acc)
                dqc, dkc, dvc, R = _tile_backward(
                    fq.detach(), fk.detach(), vc, doc, starts[s, h0:h1], R, G, C
                )
                outputs = [t for t, need in ((fq, need_q), (fk, need_k)) if need]
                grads = [t for t, need in ((dqc, need_q), (dkc, need_k)) if need]
                if outputs:
                    torch.autograd.backward(outputs, grads)
                if dq is not None:
                    dq[h0:h1, :, t0:t1] = _unchunk_rows(cast(Tensor, xq.grad), h, G, C, T)
                if dk is not None:
                    dk[h0:h1, t0:t1] = _unchunk_rows(cast(Tensor, xk.grad), h, 1, C, T)[:, 0]
                if dv is not None:
                    dv[h0:h1, t0:t1] = _unchunk_rows(dvc, h, 1, C, T)[:, 0, :, :M]
            dS0[h0:h1] = R
        return dq, dk, dv, dS0 if need_S0 else None, None, None, None, None, None


def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi: FeatureMap,
    S0: Tensor,
    z0: Tensor,
    chunk: int,
    normalize: bool,
    eps: float | None,
    *,
    plan: TilePlan | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fast causal linear attention on validated inputs; returns (o, S_T, z_T).

    Shapes (GQA: G = H / Hk query heads per key/value head)::

        q [B, H, L, E], k [B, Hk, L, E], v [B, Hk, L, M]
        S0 [B, Hk, D', M], z0 [B, Hk, D']   in the accumulation dtype ``acc``
        o [B, H, L, M] in q's dtype; S_T, z_T like S0, z0

    Denominators and the output follow :mod:`attnkit.ops._guards` (``eps=None``: every
    denominator must be finite and > 0, checked once after the forward; a float:
    clamped, and the backward masks the gradient where it clamped). Queries go through
    ``phi.query_features`` when ``normalize``.

    Callers (``linear_attention``) validate; this function assumes valid input. The
    feature map must have no trainable parameters (its inputs get gradients by
    recomputation, its parameters would not): ``linear_attention`` falls back to
    the plain chunked path otherwise. ``plan`` overrides :func:`plan_tiles` (tests
    use it to force many small tiles).
    """
    B, H, L, E = q.shape
    Hk, M = k.shape[1], v.shape[-1]
    G = H // Hk
    Dp = S0.shape[-2]
    qg = q.reshape(B * Hk, G, L, E)
    kg = k.reshape(B * Hk, L, E)
    vg = v.reshape(B * Hk, L, M)
    S0a = torch.cat([S0, z0.unsqueeze(-1)], dim=-1).reshape(B * Hk, Dp, M + 1)
    if plan is None:
        budget = CPU_TILE_BYTES if q.device.type == "cpu" else None
        itemsize = S0.element_size()
        plan = plan_tiles(B * Hk, G, L, E, Dp, M, chunk, itemsize, budget)
    apply = cast(Callable[..., tuple[Tensor, Tensor]], _CausalLinearAttention.apply)
    out, final = apply(qg, kg, vg, S0a, phi, chunk, normalize, eps, plan)
    final = final.view(B, Hk, Dp, M + 1)
    o = finish(out.reshape(B, H, L, M), q.dtype, phi, normalize)
    return o, final[..., :M], final[..., M]
