"""Feature maps phi for kernelized ("linear") attention.

A feature map turns a key or query vector x in R^D into phi(x) in R^{D'} so that
the similarity sim(q, k) = phi(q) . phi(k) can be summed over keys *before* the
query is seen (Katharopoulos et al. 2020, eq. 6)::

    V'_i = phi(Q_i) (sum_j phi(K_j)^T V_j) / phi(Q_i) (sum_j phi(K_j)^T)

Every map is an ``nn.Module`` acting on the last axis ([..., D] -> [..., D'])
and knows its output width through ``out_dim(D)``. Maps are chosen by name from a
registry::

    phi = attnkit.feature_maps.get("polynomial", degree=2, c=1.0)
    phi.out_dim(16)   # C(16 + 2, 2) = 153

``positive`` tells whether phi(q) . phi(k) > 0 for all inputs (then the
denominator of linear attention can never vanish).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._registry import Registry

__all__ = [
    "FeatureMap",
    "available",
    "get",
    "register",
    "resolve",
]


class FeatureMap(nn.Module):
    """Base class of all feature maps: [..., D] -> [..., out_dim(D)]."""

    #: Registry name, set by :func:`register`.
    name: ClassVar[str] = ""
    #: True when phi(q) . phi(k) > 0 for every q, k (denominators never vanish).
    positive: ClassVar[bool] = False

    def out_dim(self, d: int) -> int:
        """Width D' of phi(x) for inputs of width ``d``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} input must be a torch.Tensor")
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} input must have a floating dtype, got {x.dtype}"
            )
        if x.dim() < 1:
            raise ValueError(f"{type(self).__name__} input must have a last axis [..., D]")


_REGISTRY: Registry[type[FeatureMap]] = Registry("feature map")


def register(name: str) -> Any:
    """Class decorator: register a :class:`FeatureMap` subclass under ``name``."""

    def add(cls: type[FeatureMap]) -> type[FeatureMap]:
        cls.name = name
        _REGISTRY.register(name)(cls)
        return cls

    return add


def get(name: str, **kwargs: Any) -> FeatureMap:
    """Build the feature map registered as ``name`` with keyword options ``kwargs``."""
    cls = _REGISTRY.get(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"feature map {name!r}: {err}") from None


def available() -> list[str]:
    """Names of the registered feature maps."""
    return _REGISTRY.names()


def resolve(feature_map: str | FeatureMap) -> FeatureMap:
    """Accept a registered name or a :class:`FeatureMap` instance; return the instance."""
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        return get(feature_map)
    raise TypeError(
        "feature_map must be a registered name or a attnkit.feature_maps.FeatureMap, "
        f"got {type(feature_map).__name__}"
    )


@register("identity")
class Identity(FeatureMap):
    """phi(x) = x: plain (unnormalised-friendly) linear attention. Not positive."""

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return x


@register("elu")
class EluPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020). Strictly positive."""

    positive = True

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return F.elu(x) + 1.0


@register("relu")
class ReLU(FeatureMap):
    """phi(x) = max(x, 0). Non-negative, so a row's denominator *can* be zero."""

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return torch.relu(x)
