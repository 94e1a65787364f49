"""Declared contractions: the one place an implementation's einsums are written down.

Each op module declares its einsums as module-level :class:`Contraction` constants and
runs them with :func:`contract`, so the equation that executes is the very object
:mod:`attnkit.cost` reads to derive FLOPs, bytes and shapes. Change a contraction
here and the cost model changes with it; no totals are typed twice.

This module is deliberately tiny (torch and the standard library only): the ops
import it on every call path, and must not pay for sympy.

Size vocabulary. ``Contraction.sizes`` maps every index letter of the equation (and
``"..."`` for an ellipsis) to a size expression in sympy syntax over these symbols::

    sequence ops (PyTorch's SDPA layout, q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev])
        B batch, H query heads, Hk key/value heads (H/Hk query heads per group),
        L query length, S key length, E key width, Ev value width,
        Dp feature width D' of phi, C chunk length (L/C chunks)
    decoding steps (attnkit.decoding)
        b batch, d model width, h query heads, g key/value heads, k key width per head,
        v value width per head, n cached tokens (a step attends to n + 1)

The same letter may mean different sizes in different contractions (``h`` is H in a
decoding step but Hk in linear attention); ``sizes`` says which, per contraction.

Useful work. A contraction may compute more than the algorithm needs: the upper
triangle of a causal chunk's scores, which a mask then zeroes, or a column of ones
appended to the values so that the denominator rides along in the same matmul.
``triangle`` and ``useful`` declare that, so the cost model can count *useful* FLOPs
beside the FLOPs actually computed (what a fraction of peak should be made of).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Contraction", "contract"]


def _terms(equation: str) -> tuple[list[str], str | None]:
    """Split ``"ab,bc->ac"`` into (["ab", "bc"], "ac"); the output is None if implicit."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    return lhs.split(","), (rhs if arrow else None)


def _letters(subscripts: str) -> list[str]:
    """Index names of one operand: letters, with ``"..."`` as a single name."""
    names: list[str] = []
    rest = subscripts
    while rest:
        if rest.startswith("..."):
            names.append("...")
            rest = rest[3:]
        else:
            names.append(rest[0])
            rest = rest[1:]
    return names


@dataclass(frozen=True)
class Contraction:
    """One einsum of an implementation, with names and symbolic sizes for the cost model.

    Attributes:
        name: its role, e.g. ``"scores"``.
        equation: the einsum equation that :func:`contract` runs, e.g. ``"bkgle,bkse->bkgls"``.
        operands: names of the operand tensors, in order (the cost model's tensor names).
        output: name of the result tensor.
        sizes: index letter (or ``"..."``) -> size expression over the module docstring's
            symbols, e.g. ``{"g": "H/Hk", "n": "n + 1"}``.
        useful: index letter -> the part of its size that does useful work, when less
            than ``sizes`` says, e.g. ``{"m": "Ev"}`` for values augmented to Ev + 1
            columns (the extra column computes a denominator, not an output).
        triangle: ``(row, col)``: only the entries with col <= row are useful (a causal
            mask), within each block of rows as long as ``col``; rows may stack several
            such blocks (G query heads per chunk). Useful pairs: size(row) (size(col)
            + 1) / 2 instead of size(row) size(col).

    >>> sizes = {"b": "b", "d": "d", "h": "h", "k": "k"}
    >>> spec = Contraction("q", "bd,hdk->bhk", ("x", "W_q"), "q", sizes)
    >>> contract(spec, torch.ones(2, 3), torch.ones(4, 3, 5)).shape
    torch.Size([2, 4, 5])
    """

    name: str
    equation: str
    operands: tuple[str, ...]
    output: str
    sizes: Mapping[str, str] = field(compare=False)
    useful: Mapping[str, str] = field(default_factory=dict, compare=False)
    triangle: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        inputs, out = _terms(self.equation)
        if out is None:
            raise ValueError(f"contraction {self.name!r}: write the output explicitly ('->')")
        if len(inputs) != len(self.operands):
            raise ValueError(
                f"contraction {self.name!r}: equation {self.equation!r} has {len(inputs)} "
                f"operands but {len(self.operands)} operand names were given"
            )
        used = {c for term in [*inputs, out] for c in _letters(term)}
        missing = sorted(used - set(self.sizes))
        extra = sorted(set(self.sizes) - used)
        if missing or extra:
            raise ValueError(
                f"contraction {self.name!r}: sizes must name exactly the indices of "
                f"{self.equation!r}; missing {missing}, unused {extra}"
            )
        unknown = sorted((set(self.useful) | set(self.triangle or ())) - used)
        if unknown:
            raise ValueError(
                f"contraction {self.name!r}: useful/triangle name indices {unknown} that "
                f"{self.equation!r} does not have"
            )

    @property
    def inputs(self) -> list[list[str]]:
        """Index names of each operand, e.g. ``[["b", "d"], ["h", "d", "k"]]``."""
        return [_letters(t) for t in _terms(self.equation)[0]]

    @property
    def result(self) -> list[str]:
        """Index names of the output."""
        out = _terms(self.equation)[1]
        return _letters(out or "")


def contract(spec: Contraction, *operands: Tensor) -> Tensor:
    """Run ``torch.einsum(spec.equation, *operands)``: the declared contraction, executed."""
    if len(operands) != len(spec.operands):
        raise TypeError(
            f"contraction {spec.name!r} ({spec.equation}) takes {len(spec.operands)} operands "
            f"({', '.join(spec.operands)}), got {len(operands)}"
        )
    return torch.einsum(spec.equation, *operands)
