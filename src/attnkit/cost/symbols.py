"""The shared size symbols of the cost model, and a parser that never mistakes them.

Every size expression in :mod:`attnkit._contract` records and in the variants of
:mod:`attnkit.cost.variants` is written over these positive integer symbols::

    decoding steps          b batch, d model width, h query heads, g key/value heads
                            (GQA groups), k / v key / value width per head, n cached tokens
    sequence ops            B batch, H query heads, Hk key/value heads, L query length,
    (SDPA layout)           S key length, E key width, Ev value width, Dp feature width D',
                            C chunk length (L/C chunks)
    the complexity table  N sequence length (L = S = N), D key width (= E),
                            M value width (= Ev)
    bytes                   w bytes per element (4 for float32)

Plain ``sympy.sympify`` would read ``S``, ``E``, ``N`` and ``C`` as sympy's singleton
registry, Euler's number, ``sympy.N`` and a removed class; :func:`parse` maps every
name above to its symbol and rejects any other name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import sympy

__all__ = ["LEGEND", "SYMBOLS", "parse", "symbol"]

#: name -> meaning, in display order.
LEGEND: dict[str, str] = {
    "b": "batch (decoding)",
    "n": "cached tokens (decoding); a step attends to n + 1",
    "d": "model width (decoding)",
    "h": "query heads (decoding)",
    "g": "key/value heads, GQA groups (decoding)",
    "k": "key width per head (decoding; d/h when the heads split d)",
    "v": "value width per head (decoding; d/h when the heads split d)",
    "B": "batch",
    "H": "query heads",
    "Hk": "key/value heads (H/Hk query heads share one)",
    "Hv": "value (state) heads of decay / delta-rule attention",
    "G": "query rows per state head (decay / delta rule; 1 unless Hq > Hv)",
    "L": "query length",
    "S": "key length",
    "N": "sequence length of the complexity table (L = S = N)",
    "C": "chunk length of causal linear attention (L/C chunks)",
    "E": "key width",
    "D": "key width of the complexity table (= E)",
    "Dp": "feature width D' of phi (C(D+2, 2) for the quadratic map)",
    "Ev": "value width",
    "M": "value width of the complexity table (= Ev)",
    "w": "bytes per element",
}

#: name -> sympy Symbol (positive integers).
SYMBOLS: dict[str, sympy.Symbol] = {
    name: sympy.Symbol(name, positive=True, integer=True) for name in LEGEND
}

_FUNCTIONS: dict[str, object] = {
    "binomial": sympy.binomial,
    "ceiling": sympy.ceiling,
    "floor": sympy.floor,
    "sqrt": sympy.sqrt,
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def symbol(name: str) -> sympy.Symbol:
    """The symbol called ``name``; ValueError listing the known names otherwise."""
    try:
        return SYMBOLS[name]
    except KeyError:
        raise ValueError(f"unknown size symbol {name!r}; known: {', '.join(SYMBOLS)}") from None


def parse(
    text: str | int | sympy.Expr, extra: Mapping[str, sympy.Symbol] | None = None
) -> sympy.Expr:
    """Parse a size expression such as ``"H/Hk"`` or ``"binomial(E + 2, 2)"``.

    Only the names of :data:`SYMBOLS`, those in ``extra`` and the functions
    binomial, ceiling, floor and sqrt are allowed; anything else raises ValueError.
    """
    if isinstance(text, sympy.Expr):
        return text
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise TypeError(f"a size expression must be a str or an int, got {type(text).__name__}")
    if isinstance(text, int):
        return sympy.Integer(text)
    names: dict[str, object] = {**_FUNCTIONS, **SYMBOLS, **(extra or {})}
    unknown = sorted({m for m in _NAME.findall(text) if m not in names})
    if unknown:
        raise ValueError(
            f"size expression {text!r} uses unknown name(s) {', '.join(unknown)}; "
            f"known symbols: {', '.join(SYMBOLS)}"
        )
    try:
        expr = sympy.sympify(text, locals=names)
    except (sympy.SympifyError, SyntaxError, TypeError) as err:
        raise ValueError(f"cannot parse size expression {text!r}: {err}") from None
    if not isinstance(expr, sympy.Expr):
        raise ValueError(f"size expression {text!r} is not an expression")
    return expr
