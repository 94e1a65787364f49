"""AttentionMaps: the captured weights of every layer and head, their scores and labels.

Shape legend::

    N layers, B sequences, H heads per layer, L tokens
    weights [N, B, H, L, L]   row i = query i, column j = key j
    tokens [B, L] (integer ids), delimiters / valid [B, L] (bool)
    scores: name -> [N, H]    one number per head, averaged over sequences and rows
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._validation import check_float, check_int, check_tensor
from attnkit.patterns.scores import SCORE_NAMES, label_heads, row_scores

__all__ = ["AttentionMaps"]


def _check_rows(name: str, x: Tensor | None, B: int, L: int, kind: str) -> Tensor | None:
    if x is None:
        return None
    x = check_tensor(name, x)
    if tuple(x.shape) != (B, L):
        raise ValueError(f"{name} must have shape [B, L] = {[B, L]}, got {list(x.shape)}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be bool, got {x.dtype}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    return x


@dataclass(frozen=True)
class AttentionMaps:
    """Attention weights of N self-attention layers on B sequences, with what they read.

    Attributes:
        weights: [N, B, H, L, L] (float32, or float64), detached.
        layers: N layer names (``blocks.0.attn``, ``layer 0``).
        tokens: [B, L] integer ids, or None (then no induction score).
        token_text: B rows of L strings for the plots' axes, or None (``str(id)``).
        delimiters: [B, L] bool, True at [CLS]/[SEP]-like positions, or None (then no
            delimiter score).
        valid: [B, L] bool, False at padding (those queries count in no score), or
            None (every position is real).
        source: a one-line description of the model.
    """

    weights: Tensor
    layers: tuple[str, ...]
    tokens: Tensor | None = None
    token_text: tuple[tuple[str, ...], ...] | None = None
    delimiters: Tensor | None = None
    valid: Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        w = check_tensor("weights", self.weights)
        check_float("weights", w)
        if w.dim() != 5 or w.shape[-1] != w.shape[-2]:
            raise ValueError(
                "weights must be self-attention maps [N, B, H, L, L] (N layers, B sequences, "
                f"H heads, L queries = L keys), got shape {tuple(w.shape)}"
            )
        N, B, _, L, _ = w.shape
        if len(self.layers) != N:
            raise ValueError(f"layers must name the N={N} layers, got {len(self.layers)} names")
        _check_rows("tokens", self.tokens, B, L, "int")
        _check_rows("delimiters", self.delimiters, B, L, "bool")
        _check_rows("valid", self.valid, B, L, "bool")
        if self.token_text is not None and (
            len(self.token_text) != B or any(len(row) != L for row in self.token_text)
        ):
            raise ValueError(
                f"token_text must hold B={B} rows of L={L} strings, got "
                f"{[len(row) for row in self.token_text]}"
            )

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def batch(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.weights.shape[2])

    @property
    def length(self) -> int:
        return int(self.weights.shape[3])

    # ---- reading ----------------------------------------------------------------------------
    def head(self, layer: int, head: int, sequence: int = 0) -> Tensor:
        """The [L, L] map of one head on one sequence."""
        check_int("layer", layer, 0)
        check_int("head", head, 0)
        check_int("sequence", sequence, 0)
        for name, value, size in (
            ("layer", layer, self.n_layers),
            ("head", head, self.n_heads),
            ("sequence", sequence, self.batch),
        ):
            if value >= size:
                raise ValueError(f"{name} must be < {size}, got {value}")
        return self.weights[layer, sequence, head]

    def labels_of(self, sequence: int = 0) -> list[str]:
        """The axis labels of one sequence: its token text, else its ids, else positions."""
        L = self.length
        if self.token_text is not None:
            return list(self.token_text[sequence])
        if self.tokens is not None:
            return [str(int(t)) for t in self.tokens[sequence]]
        return [str(i) for i in range(L)]

    def scores(self) -> dict[str, Tensor]:
        """Every available score per head: name -> [N, H] (see :mod:`attnkit.patterns.scores`).

        Averaged over every row that counts, of every sequence (padded queries excluded).
        ``induction`` needs ``tokens`` with a repeated token, ``delimiter`` needs
        ``delimiters``; a score no row applies to is left out. A head none of whose rows
        counts for a score present for other heads scores 0.
        """
        B, L = self.batch, self.length
        rows = (1, B, 1, L)  # broadcast per-sequence [B, L] rows over layers and heads
        kwargs: dict[str, Any] = {}
        if self.tokens is not None:
            kwargs["tokens"] = self.tokens.reshape(rows)
        if self.delimiters is not None:
            kwargs["delimiters"] = self.delimiters.reshape(rows)
        if self.valid is not None:
            kwargs["valid_queries"] = self.valid.reshape(rows)
        out: dict[str, Tensor] = {}
        for name, (value, counts) in row_scores(self.weights, **kwargs).items():
            n = counts.sum(dim=(1, 3))  # [N, H]
            if int(n.sum()) == 0:
                continue
            total = (value * counts.to(value.dtype)).sum(dim=(1, 3))
            out[name] = total / n.clamp_min(1).to(value.dtype)
        return out

    def labels(self, threshold: float = 0.4) -> list[list[str]]:
        """[N][H] head labels by top behaviour score (:func:`~attnkit.patterns.label_heads`)."""
        return label_heads(self.scores(), threshold)

    def table(self, threshold: float = 0.4) -> list[dict[str, Any]]:
        """One row per head: layer, head, label and every score (plain floats)."""
        scores = self.scores()
        labels = label_heads(scores, threshold)
        return [
            {
                "layer": n,
                "layer_name": self.layers[n],
                "head": h,
                "label": labels[n][h],
                **{name: float(scores[name][n, h]) for name in SCORE_NAMES if name in scores},
            }
            for n in range(self.n_layers)
            for h in range(self.n_heads)
        ]

    def best(self, score: str, layers: Sequence[int] | None = None) -> tuple[int, int, float]:
        """(layer, head, value) of the head with the highest ``score`` (among ``layers``)."""
        scores = self.scores()
        if score not in scores:
            raise ValueError(f"score {score!r} is not available here; have {sorted(scores)}")
        which = list(range(self.n_layers)) if layers is None else list(layers)
        if not which or any(not 0 <= n < self.n_layers for n in which):
            raise ValueError(f"layers must be in [0, {self.n_layers}), got {which}")
        s = scores[score][which]  # [len(which), H]
        flat = int(s.argmax())
        n, h = divmod(flat, self.n_heads)
        return which[n], h, float(s[n, h])
