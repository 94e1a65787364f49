r"""Per-head scores of attention weights: what a head attends to, as one number each.

Every score reads the weights A [..., L, L] of one head on one sequence (row i is
query i, column j key j). Rows are first turned into distributions,
P[i, :] = |A[i, :]| / sum_j |A[i, j]|, which leaves a softmax, argmax or normalised
linear-attention head exactly as it is (its rows are non-negative and sum to 1) and
makes the unnormalised rows of decay and delta-rule attention comparable with them.
A row that sums to 0 (a query with no attendable key, or a padded query) counts in
no score. With rows i = 0 .. L - 1:

- ``previous`` (previous-token score): mean over i >= 1 of P[i, i - 1].
- ``next`` (next-token score, bidirectional heads; Clark et al. 2019): mean over
  i <= L - 2 of P[i, i + 1]. Always 0 for a causal head.
- ``first`` (first-token or *sink* mass; Xiao et al. 2023): mean over i >= 1 of
  P[i, 0]. Row 0 is left out because a causal head has nowhere else to look there.
- ``delimiter``: mean over all rows of the mass on delimiter positions ([CLS], [SEP]
  and the like, given as a mask): BERT's "no-op" heads put most of it there
  (Clark et al. 2019).
- ``induction`` (Olsson et al. 2022): mean, over the rows i whose token occurred
  before, of P[i, j + 1], where j < i is the latest earlier position of the same
  token: the head attends to the token that followed the previous occurrence. On T
  random tokens repeated twice (positions s .. s + 2T - 1, no token twice within a
  copy) the rows are the second copy and j + 1 = i - T + 1, the textbook
  definition (:func:`induction_score_periodic`, tested equal).
- ``entropy``: mean over rows of -sum_j P[i, j] ln P[i, j] (nats; 0 log 0 = 0).
- ``distance``: mean over rows of sum_j P[i, j] |i - j| (tokens).

The functions here take any leading axes and return the mean over rows, one number
per matrix ([..., L, L] -> [...]). :class:`attnkit.patterns.AttentionMaps` averages
over sequences and padding with the same row rules (:func:`row_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from attnkit._validation import check_float, check_tensor

__all__ = [
    "LABELS",
    "SCORE_NAMES",
    "attention_entropy",
    "delimiter_score",
    "first_token_score",
    "induction_score",
    "induction_score_periodic",
    "label_heads",
    "mean_attention_distance",
    "next_token_score",
    "previous_token_score",
    "row_distributions",
    "row_scores",
]

#: Every score :func:`row_scores` can compute, in display order.
SCORE_NAMES: tuple[str, ...] = (
    "induction",
    "previous",
    "next",
    "first",
    "delimiter",
    "entropy",
    "distance",
)

#: score name -> head label, for the scores that name a behaviour (in tie-break order).
LABELS: dict[str, str] = {
    "induction": "induction",
    "previous": "previous-token",
    "next": "next-token",
    "delimiter": "delimiter",
    "first": "first-token (sink)",
}


def _check_weights(name: str, weights: object) -> Tensor:
    A = check_tensor(name, weights)
    check_float(name, A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"{name} must be self-attention weights [..., L, L] (as many keys as queries), "
            f"got shape {tuple(A.shape)}"
        )
    return A


def row_distributions(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Rows as distributions: (P [..., L, L], valid [..., L]).

    ``P[i, :] = |A[i, :]| / sum_j |A[i, j]|`` in float32 (float64 stays float64); ``valid``
    marks rows whose sum is > 0 (the others are all-zero in P and count in no score).
    """
    A = _check_weights("weights", weights)
    acc = torch.promote_types(A.dtype, torch.float32)
    mag = A.to(acc).abs()
    total = mag.sum(dim=-1, keepdim=True)  # [..., L, 1]
    valid = total.squeeze(-1) > 0
    P = mag / torch.where(total > 0, total, torch.ones_like(total))
    return P, valid


def _check_positions(name: str, x: object, shape: tuple[int, ...], L: int) -> Tensor:
    t = check_tensor(name, x)
    if t.shape[-1:] != (L,):
        raise ValueError(
            f"{name} must have last axis L={L} (one entry per position), got shape {tuple(t.shape)}"
        )
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the weights' rows "
            f"{list(shape)} (weights [..., L, L] -> rows [..., L])"
        ) from None


def _previous_occurrence(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """For each position i: (j + 1 for the latest j < i with tokens[j] == tokens[i], has one)."""
    L = tokens.shape[-1]
    same = tokens.unsqueeze(-1) == tokens.unsqueeze(-2)  # [..., L(i), L(j)]
    earlier = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril(-1)
    match = same & earlier
    j = torch.arange(L, device=tokens.device)
    # the latest earlier match: the largest j among the matches (-1 when none)
    latest = torch.where(match, j, torch.full_like(j, -1)).amax(dim=-1)  # [..., L]
    has = latest >= 0
    return (latest + 1).clamp_min(0), has


def row_scores(
    weights: Tensor,
    *,
    tokens: Tensor | None = None,
    delimiters: Tensor | None = None,
    valid_queries: Tensor | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Every score per row, with the rows it is defined on.

    Returns ``{name: (value [..., L], counts [..., L] bool)}``; a score is the mean of
    ``value`` over the rows where ``counts`` is True (see the module docstring for the
    definitions). ``induction`` needs ``tokens`` and ``delimiter`` needs ``delimiters``
    (each broadcastable to [..., L]); without them those scores are left out.
    ``valid_queries`` [..., L] (bool) drops rows, e.g. padded queries.
    """
    P, valid = row_distributions(weights)
    shape = tuple(P.shape[:-1])
    L = P.shape[-1]
    if valid_queries is not None:
        vq = _check_positions("valid_queries", valid_queries, shape, L)
        if vq.dtype != torch.bool:
            raise TypeError(f"valid_queries must be bool (True = a real query), got {vq.dtype}")
        valid = valid & vq
    i = torch.arange(L, device=P.device)
    zero = torch.zeros(shape, dtype=P.dtype, device=P.device)
    prev = zero.clone()
    nxt = zero.clone()
    if L > 1:
        prev[..., 1:] = P.diagonal(offset=-1, dim1=-2, dim2=-1)
        nxt[..., :-1] = P.diagonal(offset=1, dim1=-2, dim2=-1)
    out: dict[str, tuple[Tensor, Tensor]] = {
        "previous": (prev, valid & (i >= 1)),
        "next": (nxt, valid & (i <= L - 2)),
        "first": (P[..., 0], valid & (i >= 1)),
    }
    if delimiters is not None:
        d = _check_positions("delimiters", delimiters, shape, L)
        if d.dtype != torch.bool:
            raise TypeError(f"delimiters must be bool (True = a delimiter), got {d.dtype}")
        out["delimiter"] = ((P * d.unsqueeze(-2).to(P.dtype)).sum(-1), valid)
    if tokens is not None:
        t = _check_positions("tokens", tokens, shape, L)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"tokens must have an integer dtype, got {t.dtype}")
        target, has = _previous_occurrence(t)
        # target = j + 1 <= i, so it is always a valid column
        out["induction"] = (P.gather(-1, target.unsqueeze(-1)).squeeze(-1), valid & has)
    logp = torch.where(P > 0, P.log(), torch.zeros_like(P))
    out["entropy"] = (-(P * logp).sum(-1), valid)
    dist = (i.unsqueeze(-1) - i.unsqueeze(-2)).abs().to(P.dtype)  # [L, L]
    out["distance"] = ((P * dist).sum(-1), valid)
    return {name: out[name] for name in SCORE_NAMES if name in out}


def _mean_rows(name: str, value: Tensor, counts: Tensor) -> Tensor:
    n = counts.sum(-1)
    if bool((n == 0).any()):
        raise ValueError(
            f"the {name} score is undefined for a matrix with no row it applies to "
            "(see attnkit.patterns.scores for which rows count)"
        )
    return (value * counts.to(value.dtype)).sum(-1) / n.to(value.dtype)


def _score(name: str, weights: Tensor, **kwargs: Tensor) -> Tensor:
    value, counts = row_scores(weights, **kwargs)[name]
    return _mean_rows(name, value, counts)


def previous_token_score(weights: Tensor) -> Tensor:
    """Mean over rows i >= 1 of P[i, i - 1]. Shapes: weights [..., L, L] -> [...] (L >= 2)."""
    return _score("previous", weights)


def next_token_score(weights: Tensor) -> Tensor:
    """Mean over rows i <= L - 2 of P[i, i + 1]. Shapes: [..., L, L] -> [...] (L >= 2)."""
    return _score("next", weights)


def first_token_score(weights: Tensor) -> Tensor:
    """Sink mass: mean over rows i >= 1 of P[i, 0]. Shapes: [..., L, L] -> [...] (L >= 2)."""
    return _score("first", weights)


def delimiter_score(weights: Tensor, delimiters: Tensor) -> Tensor:
    """Mean over rows of the mass on delimiter positions.

    Shapes: weights [..., L, L], delimiters bool broadcastable to [..., L] -> [...].
    """
    return _score("delimiter", weights, delimiters=delimiters)


def induction_score(weights: Tensor, tokens: Tensor) -> Tensor:
    """Mean over rows whose token occurred before of P[i, j + 1] (j: its latest occurrence).

    Shapes: weights [..., L, L], tokens (integer) broadcastable to [..., L] -> [...].
    ValueError when a sequence has no repeated token (the score is undefined there).
    """
    return _score("induction", weights, tokens=tokens)


def induction_score_periodic(weights: Tensor, period: int, start: int = 0) -> Tensor:
    """The textbook induction score on T = ``period`` tokens repeated twice from ``start``.

    Mean over the second copy, i = start + T .. start + 2T - 1, of A[i, i - T + 1]
    (row-normalised as in every score). Needs start + 2T <= L.
    Shapes: weights [..., L, L] -> [...].
    """
    P, _ = row_distributions(weights)
    L = P.shape[-1]
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if start + 2 * period > L:
        raise ValueError(
            f"two copies of period={period} from start={start} need L >= {start + 2 * period}, "
            f"got L={L}"
        )
    rows = torch.arange(start + period, start + 2 * period, device=P.device)
    return P[..., rows, rows - period + 1].mean(-1)


def attention_entropy(weights: Tensor) -> Tensor:
    """Mean over rows of -sum_j P[i, j] ln P[i, j] (nats). Shapes: [..., L, L] -> [...]."""
    return _score("entropy", weights)


def mean_attention_distance(weights: Tensor) -> Tensor:
    """Mean over rows of ``sum_j P[i, j] |i - j|`` (tokens). Shapes: [..., L, L] -> [...]."""
    return _score("distance", weights)


def label_heads(scores: Mapping[str, Tensor], threshold: float = 0.4) -> list[list[str]]:
    """Name each head by its top behaviour score, or ``"mixed"`` when none reaches ``threshold``.

    ``scores`` maps score names to [layers, heads] tensors (as
    :meth:`attnkit.patterns.AttentionMaps.scores` returns). The candidates are the
    scores in :data:`LABELS` that are present (entropy and distance name no
    behaviour); ties go to the earlier one in :data:`LABELS`. ``threshold`` is a
    fraction of each query's attention: 0.4 means the head puts at least 40% of its
    mass, on average, where the score looks.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    present = [name for name in LABELS if name in scores]
    if not present:
        raise ValueError(
            f"scores has none of the labelled scores {list(LABELS)}; got {sorted(scores)}"
        )
    shape = tuple(scores[present[0]].shape)
    if len(shape) != 2:
        raise ValueError(f"scores must be [layers, heads] tensors, got shape {shape}")
    for name in present:
        if tuple(scores[name].shape) != shape:
            raise ValueError(
                f"scores[{name!r}] has shape {tuple(scores[name].shape)}, "
                f"scores[{present[0]!r}] {shape}: all must be [layers, heads]"
            )
    stacked = torch.stack([scores[name].float() for name in present])  # [K, N, H]
    best = stacked.amax(dim=0)
    which = stacked.argmax(dim=0)  # the first maximal index on ties
    return [
        [
            LABELS[present[int(which[n, h])]] if float(best[n, h]) >= threshold else "mixed"
            for h in range(shape[1])
        ]
        for n in range(shape[0])
    ]
