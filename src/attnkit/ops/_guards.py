"""The denominator and output policy shared by every form of linear attention.

Normalised linear attention divides phi(Q_i) S by phi(Q_i) . z. That denominator is
checked, never silently clamped (see :mod:`attnkit._numerics` for how the check runs
on each device):

- ``eps=None`` (default): every denominator must be finite and > 0, else ValueError
  saying how many rows fail. For a map that is not positive (identity, relu, odd
  polynomials) that is the signed-denominator case of Katharopoulos et al.'s eq. (6);
  for a positive map only floating-point underflow or overflow can fail it.
- ``eps`` a float > 0: a guard that changes the math. Denominators below eps become
  eps (a row with no weight then returns 0); they must still be finite.

The output is then cast to the inputs' dtype without ever turning a finite value
into inf (see :func:`finish`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._numerics import check_denominator, check_finite, check_output_range
from attnkit.feature_maps import FeatureMap

__all__ = [
    "check_feature_shape",
    "check_linear_denominator",
    "denominator_hint",
    "finish",
    "normalise",
]


def check_feature_shape(phi: FeatureMap, name: str, x: Tensor, f: object, Dp: int) -> None:
    """Raise ValueError unless phi mapped x [..., E] to [..., D'] with D' = phi.out_dim(E)."""
    if not isinstance(f, Tensor) or f.shape[:-1] != x.shape[:-1] or f.shape[-1] != Dp:
        got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(
            f"feature map {type(phi).__name__} must map {name} of shape {tuple(x.shape)} to "
            f"[..., D'] keeping the leading axes, with D' = out_dim(E={x.shape[-1]}) = {Dp}; "
            f"got {got} (out_dim must agree with what forward returns)"
        )


def denominator_hint(phi: FeatureMap) -> str:
    """What a caller can do about a bad denominator of linear attention with ``phi``."""
    name = type(phi).__name__
    if phi.positive:
        return (
            f"{name} is positive, so its features underflowed or overflowed: scale the "
            "inputs down, or compute in float64"
        )
    return (
        f"{name} is not a positive feature map (phi(q).phi(k) can be <= 0): pass eps=... "
        "(e.g. 1e-6; a guard that changes the result of every row whose denominator is "
        "below it) or use a positive map (elu, taylor, favor)"
    )


def check_linear_denominator(
    den: Tensor, phi: FeatureMap, eps: float | None, op: str = "linear_attention"
) -> None:
    """Raise ValueError for a denominator the policy above rejects (one reduction)."""
    check_denominator(
        den, op, positive=phi.positive, guarded=eps is not None, hint=denominator_hint(phi)
    )


def normalise(
    num: Tensor, den: Tensor, phi: FeatureMap, eps: float | None, op: str = "linear_attention"
) -> Tensor:
    """num [..., Ev] / den [...] after checking den (see :func:`linear_attention`, ``eps``)."""
    check_linear_denominator(den, phi, eps, op)
    if eps is not None:
        den = den.clamp_min(eps)
    return num / den.unsqueeze(-1)


def finish(
    o: Tensor, dtype: torch.dtype, phi: FeatureMap, normalize: bool, op: str = "linear_attention"
) -> Tensor:
    """Cast the output to ``dtype`` without ever turning a finite value into inf.

    A normalised output of a positive map is a convex combination of the values, so it
    fits their dtype; anything else (signed maps, ``normalize=False``) is checked. An
    unnormalised output has no denominator check, so its finiteness is checked here.
    """
    if not normalize:
        check_finite(
            o,
            op,
            "the numerator (normalize=False)",
            "NaN/inf in the inputs, or sums that overflow the accumulation dtype",
        )
    if not (normalize and phi.positive):
        check_output_range(o, dtype, op)
    return o.to(dtype)
