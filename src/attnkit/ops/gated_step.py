"""One decoding step of decay attention or the delta rule, reading the state once.

For a state S [D, M] per state head, decay a (scalar or per key channel), key k,
query q, value v and (delta rule) beta::

    S' = Diag(a) S
    u  = beta (v - S'^T k)      (delta rule)     u = v      (decay attention)
    S_new = S' + k u^T
    o  = S_new^T (scale q) = scale (q^T S' + (q . k) u)

The last line is why one read of S suffices: q^T S' and k^T S' come out of one
batched product [k; q] (Diag(a) S) = ([k; q] * a) S, so the step streams the state
once for those reads and twice for the update S_new = a S + k u^T (a fresh
``a * S``, then an in-place broadcast ``addcmul_`` of k u^T: no outer-product
temporary). A decoding step is memory-bound (O(D M) bytes for O(D M) FLOPs), so
the passes over the state are what its time is made of.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._contract import Contraction, contract
from attnkit.ops.gated_common import GatedDims, l2norm

__all__ = ["STEP_READ", "step"]

#: [k; q] S: one read of the state for both products -> [B, Hv, 1 + G, M]
STEP_READ = Contraction(
    "step_read",
    "bhrd,bhdm->bhrm",
    ("kq", "S"),
    "reads",
    {"b": "B", "h": "Hv", "r": "1 + G", "d": "D", "m": "M"},
)


def step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    S: Tensor,
    dims: GatedDims,
    scale: float,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor]:
    """One token on validated inputs: q [B, Hq, D], k [B, Hk, D], v [B, Hv, M],
    g None / [B, Hv] / [B, Hv, D], beta None / [B, Hv], S [B, Hv, D, M] (acc dtype).

    Returns o [B, Ho, M] in q's dtype and the new state (a new tensor; S is not modified).
    """
    acc = S.dtype
    B, Hv, D, M = S.shape
    qf, kf = q.to(acc), k.to(acc)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    if dims.Hq >= Hv:
        qs = qf.view(B, Hv, dims.G, D)
    else:
        qs = qf.repeat_interleave(Hv // dims.Hq, dim=1).unsqueeze(2)
    ks = kf if dims.Hk == Hv else kf.repeat_interleave(Hv // dims.Hk, dim=1)  # [B, Hv, D]
    kq = torch.cat([ks.unsqueeze(2), qs], dim=2)  # [B, Hv, 1 + G, D]
    a: Tensor | None = None
    if g is not None:
        a = g.to(acc).exp()
        # a channel decay scales the rows of S: read ([k; q] * a) S instead of [k; q] (a S)
        reads = contract(STEP_READ, kq * (a.unsqueeze(2) if a.dim() == 3 else 1.0), S)
        if a.dim() == 2:
            reads = reads * a[:, :, None, None]
    else:
        reads = contract(STEP_READ, kq, S)
    kS, qS = reads[:, :, 0], reads[:, :, 1:]  # k^T S', q^T S'
    vf = v.to(acc)
    u = vf if beta is None else beta.to(acc).unsqueeze(-1) * (vf - kS)  # [B, Hv, M]
    qk = (qs * ks.unsqueeze(2)).sum(-1, keepdim=True)  # [B, Hv, G, 1]
    o = (qS + qk * u.unsqueeze(2)) * scale  # [B, Hv, G, M]
    if a is None:
        S_new = S.clone()
    elif a.dim() == 2:
        S_new = S * a[:, :, None, None]
    else:
        S_new = S * a.unsqueeze(-1)
    S_new.addcmul_(ks.unsqueeze(-1), u.unsqueeze(-2))  # + k u^T, in place (no temporary)
    return o.reshape(B, dims.Ho, M).to(q.dtype), S_new
