"""One decoding step of decay attention or the delta rule, reading the state once.

For a state S [D, M] per state head, decay a (scalar or per key channel), key k,
query q, value v and (delta rule) beta::

    S' = Diag(a) S
    u  = beta (v - S'^T k)      (delta rule)     u = v      (decay attention)
    S_new = S' + k u^T
    o  = S_new^T (scale q) = scale (q^T S' + (q . k) u)

The last line is why one read of S suffices. The step makes three passes over the
state: the decay S' = Diag(a) S (a fresh tensor, or the caller's state in place with
``inplace``), one batched product [k; q] S' that reads S' once for both k^T S' and
q^T S', and the in-place broadcast ``addcmul_`` of k u^T (no outer-product temporary).
Decaying first means the reads need no rescaling, scalar or per-channel gate alike.
A decoding step is memory-bound (O(D M) bytes for O(D M) FLOPs), so the passes over
the state, and at small batch the number of torch ops, are what its time is made of.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._contract import Contraction, contract
from attnkit.ops.gated_common import GatedDims, l2norm

__all__ = ["STEP_READ", "check_inplace", "step"]

#: [k; q] S: one read of the state for both products -> [B, Hv, 1 + G, M]
STEP_READ = Contraction(
    "step_read",
    "bhrd,bhdm->bhrm",
    ("kq", "S"),
    "reads",
    {"b": "B", "h": "Hv", "r": "1 + G", "d": "D", "m": "M"},
)


def check_inplace(inplace: object, given: Tensor | None, S: Tensor) -> None:
    """``inplace=True`` needs the caller's own state, already in the accumulation dtype."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not inplace:
        return
    if given is None:
        raise ValueError("inplace=True updates the given state in place: pass state=")
    if given is not S:
        raise TypeError(
            f"inplace=True needs the state in the accumulation dtype {S.dtype}, got "
            f"{given.dtype} (it would be updated through a copy)"
        )
    if S.requires_grad:
        raise ValueError("inplace=True cannot update a state that requires grad")


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
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token on validated inputs: q [B, Hq, D], k [B, Hk, D], v [B, Hv, M],
    g None / [B, Hv] / [B, Hv, D], beta None / [B, Hv], S [B, Hv, D, M] (acc dtype).

    Returns o [B, Ho, M] in q's dtype and the new state: a new tensor, or S itself
    updated in place with ``inplace`` (S must then be the caller's own acc-dtype tensor).
    """
    acc = S.dtype
    B, M = S.shape[0], S.shape[-1]
    kq = _rows(q, k, dims, acc, use_qk_l2norm)  # [B, Hv, 1 + G, D]: k, then the queries
    qk = (kq[:, :, 1:] * kq[:, :, :1]).sum(-1, keepdim=True)  # q . k: [B, Hv, G, 1]
    # S' = Diag(a) S first (in place with ``inplace``), then both reads come from S'
    if g is None:
        S_new = S if inplace else S.clone()
    else:
        a = g.to(acc).exp()
        decay = a[:, :, None, None] if a.dim() == 2 else a.unsqueeze(-1)
        S_new = S.mul_(decay) if inplace else S * decay
    reads = contract(STEP_READ, kq, S_new)  # [k; q]^T S': [B, Hv, 1 + G, M]
    u = v.to(acc)  # [B, Hv, M]
    if beta is not None:
        u = (u - reads[:, :, 0]).mul_(beta.to(acc).unsqueeze(-1))
    o = torch.addcmul(reads[:, :, 1:], qk, u.unsqueeze(2)).mul_(scale)  # [B, Hv, G, M]
    S_new.addcmul_(kq[:, :, 0].unsqueeze(-1), u.unsqueeze(-2))  # + k u^T, in place
    return o.reshape(B, dims.Ho, M).to(q.dtype), S_new


def _rows(q: Tensor, k: Tensor, dims: GatedDims, acc: torch.dtype, l2: bool) -> Tensor:
    """[k; q] per state head, [B, Hv, 1 + G, D] in ``acc`` (L2-normalised with ``l2``).

    q [B, Hq, D], k [B, Hk, D]. When q and k have one layout (Hq = G Hk) the rows are
    stacked first, so the cast and the normalisation run once over both, and grouped
    value heads (Hk < Hv) repeat the stacked rows once.
    """
    B, Hq, D = q.shape
    Hk, Hv = k.shape[1], dims.Hv
    if Hq % Hk == 0 and (Hk == Hv or Hq == Hk):
        rows = torch.cat([k.unsqueeze(2), q.reshape(B, Hk, Hq // Hk, D)], dim=2).to(acc)
        if l2:
            rows = l2norm(rows)
        return rows if Hk == Hv else rows.repeat_interleave(Hv // Hk, dim=1)
    qf, kf = q.to(acc), k.to(acc)  # e.g. Hq < Hk < Hv: q and k repeated apart
    if l2:
        qf, kf = l2norm(qf), l2norm(kf)
    if Hq >= Hv:
        qs = qf.view(B, Hv, dims.G, D)
    else:
        qs = qf.repeat_interleave(Hv // Hq, dim=1).unsqueeze(2)
    ks = kf if Hk == Hv else kf.repeat_interleave(Hv // Hk, dim=1)
    return torch.cat([ks.unsqueeze(2), qs], dim=2)
