r"""Feature maps with one set of weights per attention head, for converting softmax attention.

A converted model replaces each head's ``exp(q.k / sqrt(D))`` by ``phi_q(q) . phi_k(k)``.
The maps here act on the SDPA layout and know which head each row belongs to::

    x [B, h, L, D]  ->  phi(x) [B, h, L, D']     (h = the heads this map serves)

Queries and keys get separate maps (as in Hedgehog and LoLCATs): the query map has
one set of weights per *query* head (H of them), the key map one per *key/value* head
(Hk), so a grouped-query model keeps its smaller recurrent state [B, Hk, D', Ev].

- :class:`Hedgehog` (Zhang et al. 2024, "The Hedgehog & the Porcupine: expressive
  linear attentions with softmax mimicry"): a trainable linear layer per head, then
  ``[softmax(W x + b), softmax(-(W x + b))]``, the two softmaxes taken separately over
  the F features, as in the Hedgehog and LoLCATs code (Zhang et al. 2025). Width 2F,
  strictly positive (so every denominator is > 0). Initialised to W = I, b = 0, where
  it is already a spiky, softmax-like map of q and k.
- :class:`T2R` (Kasai et al. 2021, "Finetuning pretrained transformers into RNNs"):
  ``relu(W x + b)``, width F. Non-negative but *not* positive: a query can see a zero
  denominator, so the converted attention guards it with ``eps``.
- :class:`Fixed`: any map of :mod:`attnkit.feature_maps` (``elu``, ``taylor``,
  ``favor``, ``relu``, ...), shared by all heads and without trainable weights.

Build one by name with :func:`build`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import feature_maps as _fm
from attnkit._validation import check_int

__all__ = ["LEARNABLE", "T2R", "Fixed", "HeadwiseMap", "Hedgehog", "available", "build"]

#: Names of the trainable per-head maps (:func:`build` also takes every fixed map name).
LEARNABLE: tuple[str, ...] = ("hedgehog", "t2r")


class HeadwiseMap(nn.Module):
    """Base class: ``forward(x [B, h, L, D]) -> [B, h, L, out_features]``."""

    #: True when phi(q) . phi(k) > 0 for all q, k (no denominator guard needed).
    positive: bool = False
    heads: int
    dim: int
    out_features: int

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} input must be a torch.Tensor")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} input must be floating point, got {x.dtype}")
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} input must be [B, h, L, D] with D={self.dim}, got "
                f"{tuple(x.shape)}"
            )


class _Linear(HeadwiseMap):
    """A per-head affine map W x + b, W [h, D, F], b [h, F], followed by a nonlinearity."""

    def __init__(self, heads: int, dim: int, feature_dim: int | None, seed: int) -> None:
        super().__init__()
        self.heads = check_int("heads", heads, 1)
        self.dim = check_int("dim", dim, 1)
        self.feature_dim = (
            self.dim if feature_dim is None else check_int("feature_dim", feature_dim, 1)
        )
        gen = torch.Generator().manual_seed(seed)
        # Identity where it fits (the map starts as the plain nonlinearity of q and k), small
        # random columns beyond D.
        w = torch.zeros(self.heads, self.dim, self.feature_dim)
        n = min(self.dim, self.feature_dim)
        w[:, torch.arange(n), torch.arange(n)] = 1.0
        if self.feature_dim > self.dim:
            extra = self.feature_dim - self.dim
            w[:, :, self.dim :] = torch.randn(
                self.heads, self.dim, extra, generator=gen
            ) / math.sqrt(self.dim)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(self.heads, self.feature_dim))

    def _affine(self, x: Tensor) -> Tensor:
        self._check(x)
        if x.shape[1] != self.heads:
            raise ValueError(
                f"{type(self).__name__} has weights for {self.heads} heads, got x with "
                f"{x.shape[1]} heads (shape {tuple(x.shape)})"
            )
        w = self.weight.to(x.dtype)
        return torch.einsum("bhld,hdf->bhlf", x, w) + self.bias.to(x.dtype)[:, None, :]

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, feature_dim={self.feature_dim}"


class Hedgehog(_Linear):
    """phi(x) = [softmax(W x + b), softmax(-(W x + b))] per head (Zhang et al. 2024). Width 2F."""

    positive = True

    def __init__(self, heads: int, dim: int, feature_dim: int | None = None, seed: int = 0) -> None:
        super().__init__(heads, dim, feature_dim, seed)
        self.out_features = 2 * self.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        y = self._affine(x)
        return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1)


class T2R(_Linear):
    """phi(x) = relu(W x + b) per head (Kasai et al. 2021). Width F; can be all zero."""

    positive = False

    def __init__(self, heads: int, dim: int, feature_dim: int | None = None, seed: int = 0) -> None:
        super().__init__(heads, dim, feature_dim, seed)
        self.out_features = self.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self._affine(x))


class Fixed(HeadwiseMap):
    """A map of :mod:`attnkit.feature_maps`, the same for every head, nothing to train."""

    def __init__(self, heads: int, dim: int, name: str, **options: Any) -> None:
        super().__init__()
        self.heads = check_int("heads", heads, 1)
        self.dim = check_int("dim", dim, 1)
        self.name = name
        if name == "favor":
            # Estimate softmax's exp(q.k / sqrt(D)): scale the inputs by D^-1/4 (Performer).
            options = {"input_scale": dim**-0.25, "dim": dim, **options}
        self.map = _fm.get(name, **options)
        self.positive = bool(self.map.positive)
        self.out_features = self.map.out_dim(dim)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        y: Tensor = self.map(x)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, out_features={self.out_features}"


def available() -> list[str]:
    """Every name :func:`build` accepts: the learnable maps, then attnkit's fixed maps."""
    return [*LEARNABLE, *_fm.available()]


def build(
    name: str, heads: int, dim: int, *, feature_dim: int | None = None, seed: int = 0
) -> HeadwiseMap:
    """The map called ``name`` for ``heads`` heads of width ``dim``.

    ``feature_dim`` (F) sizes the learnable maps (default D; Hedgehog's output is 2F wide);
    fixed maps take none. ``seed`` draws the random parts (extra columns, FAVOR+ rows).
    """
    if name == "hedgehog":
        return Hedgehog(heads, dim, feature_dim, seed)
    if name == "t2r":
        return T2R(heads, dim, feature_dim, seed)
    if name not in _fm.available():
        raise ValueError(f"unknown feature map {name!r}; known: {', '.join(available())}")
    if feature_dim is not None:
        if name != "favor":
            raise ValueError(
                f"feature_dim applies to the learnable maps ({', '.join(LEARNABLE)}) and favor, "
                f"not to {name!r}"
            )
        return Fixed(heads, dim, name, num_features=feature_dim, seed=seed)
    if name == "favor":
        return Fixed(heads, dim, name, seed=seed)
    return Fixed(heads, dim, name)
