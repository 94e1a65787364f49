"""Shape checking of einsum equations against named or sized operands.

:func:`check_einsum` binds every subscript letter to the axis it labels in each
operand and reports the first disagreement in words::

    >>> check_einsum("bd,hdq->bhq", x="b d", W_q="h d q")
    ('b', 'h', 'q')
    >>> check_einsum("bd,hq->bhq", x="b d", W_q="h d q")
    Traceback (most recent call last):
        ...
    ValueError: bd,hq->bhq: operand 2 (W_q) has 3 axes (h d q) but subscripts 'hq' name 2

The same machinery gives a :class:`~attnkit._contract.Contraction` its symbolic
operand shapes, output shape and FLOPs (:func:`shapes`, :func:`contraction_flops`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import sympy
from torch import Tensor

from attnkit._contract import Contraction
from attnkit.cost.symbols import parse

__all__ = [
    "Shape",
    "check_einsum",
    "contraction_flops",
    "is_matmul",
    "numel",
    "shapes",
    "summed_size",
    "useful_flops",
]

#: A symbolic shape: one sympy expression per axis.
Shape = tuple[sympy.Expr, ...]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def _axis(token: str | int) -> sympy.Expr:
    """An axis label as an expression: ``"d"``, ``"d/h"``, ``"n+1"`` or an int."""
    if isinstance(token, bool):
        raise TypeError("axis sizes must be ints or names, got a bool")
    if isinstance(token, int):
        return sympy.Integer(token)
    # Any identifier is a fresh positive symbol here (axis names are the caller's own).
    names = {m: sympy.Symbol(m, positive=True) for m in _IDENT.findall(token)}
    try:
        expr = sympy.sympify(token, locals=names)
    except (sympy.SympifyError, SyntaxError, TypeError) as err:
        raise ValueError(f"cannot read axis {token!r}: {err}") from None
    if not isinstance(expr, sympy.Expr):
        raise ValueError(f"axis {token!r} is not a size")
    return expr


def _axes(operand: object, label: str) -> list[str | int]:
    """The axes of one operand: ``"h d q"``, a sequence of names/ints, or a tensor."""
    if isinstance(operand, Tensor):
        return [int(s) for s in operand.shape]
    if isinstance(operand, str):
        return list(operand.split())
    if isinstance(operand, Sequence):
        axes: list[str | int] = []
        for a in operand:
            if isinstance(a, bool) or not isinstance(a, (str, int)):
                raise TypeError(f"{label}: axes must be names or ints, got {a!r}")
            axes.append(a)
        return axes
    raise TypeError(
        f"{label} must be axis names ('b d'), a sequence of sizes or a tensor, "
        f"got {type(operand).__name__}"
    )


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return bool(a == b) or bool(sympy.simplify(a - b) == 0)


def check_einsum(
    equation: str,
    *operands: str | Sequence[str | int] | Tensor,
    **named: str | Sequence[str | int] | Tensor,
) -> tuple[str | int, ...]:
    """Check an einsum equation against its operands' axes; return the output's axes.

    Operands are given positionally or by keyword (the keyword names appear in errors),
    each as space-separated axis names (``"h d q"``; expressions such as ``"d/h"`` or
    ``"n+1"`` are compared symbolically), a sequence of names or ints, or a tensor
    (its sizes). Raises ValueError, naming the operand and the subscripts, when:

    - the number of operands differs from the equation's;
    - an operand has a different number of axes than its subscripts name;
    - one letter labels axes of different sizes or names (``'d' is 'd' in operand 1
      (x) but 'e' in operand 2 (W_q)``);
    - a subscript is not a letter (``...`` is not supported: name the axes), an output
      letter appears in no operand or twice.

    Without ``->`` the output is torch's implicit one: the letters used exactly once,
    in alphabetical order.

    >>> from attnkit.cost import check_einsum
    >>> check_einsum("bhk,bhnk->bhn", q=(2, 4, 8), K="2 4 n 8")
    (2, 4, 'n')
    """
    given: list[tuple[str, object]] = [(f"operand {i + 1}", op) for i, op in enumerate(operands)]
    given += [
        (f"operand {len(given) + i + 1} ({name})", op) for i, (name, op) in enumerate(named.items())
    ]
    if not isinstance(equation, str):
        raise TypeError(f"equation must be a str, got {type(equation).__name__}")
    eq = equation.replace(" ", "")
    if "..." in eq:
        raise ValueError(f"{equation}: '...' is not supported by check_einsum; name every axis")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    for term in [*terms, rhs]:
        bad = sorted({c for c in term if not c.isalpha()})
        if bad:
            raise ValueError(
                f"{equation}: subscripts must be letters, got {''.join(bad)!r} in {term!r}"
            )
    if len(terms) != len(given):
        raise ValueError(
            f"{equation}: the equation has {len(terms)} operand subscripts "
            f"({', '.join(map(repr, terms))}) but {len(given)} operands were given"
        )
    bound: dict[str, tuple[str | int, sympy.Expr, str]] = {}  # letter -> (label, size, where)
    for term, (label, op) in zip(terms, given, strict=True):
        axes = _axes(op, label)
        if len(axes) != len(term):
            shown = " ".join(str(a) for a in axes)
            raise ValueError(
                f"{equation}: {label} has {len(axes)} axes ({shown}) but subscripts "
                f"{term!r} name {len(term)}"
            )
        for letter, axis in zip(term, axes, strict=True):
            size = _axis(axis)
            if letter in bound:
                first, first_size, where = bound[letter]
                if not _same(first_size, size):
                    raise ValueError(
                        f"{equation}: subscript {letter!r} is {first!r} in {where} but "
                        f"{axis!r} in {label}"
                    )
            else:
                bound[letter] = (axis, size, label)
    if arrow:
        out = rhs
        for letter in out:
            if letter not in bound:
                raise ValueError(f"{equation}: output subscript {letter!r} appears in no operand")
            if out.count(letter) > 1:
                raise ValueError(f"{equation}: output subscript {letter!r} appears twice")
    else:
        counts = {c: lhs.count(c) for c in bound}
        out = "".join(sorted(c for c, n in counts.items() if n == 1))
    return tuple(bound[letter][0] for letter in out)


def _sizes(spec: Contraction) -> dict[str, sympy.Expr]:
    return {letter: parse(text) for letter, text in spec.sizes.items()}


def shapes(spec: Contraction) -> tuple[list[Shape], Shape]:
    """Symbolic shapes of a contraction's operands and output (``...`` is one axis)."""
    size = _sizes(spec)
    ins = [tuple(size[c] for c in term) for term in spec.inputs]
    return ins, tuple(size[c] for c in spec.result)


def numel(shape: Shape) -> sympy.Expr:
    """Number of elements of a symbolic shape."""
    return sympy.Mul(*shape) if shape else sympy.Integer(1)


def is_matmul(spec: Contraction) -> bool:
    """True if some index is summed over (torch then runs a bmm); False for a pure product.

    ``torch.einsum`` turns a pair contraction without a summed index (an outer or
    elementwise product) into ``mul``, which FLOP counters do not count as a matmul.
    """
    return bool({c for term in spec.inputs for c in term} - set(spec.result))


def summed_size(spec: Contraction) -> sympy.Expr:
    """Product of the sizes of the summed indices (1 if none)."""
    size = _sizes(spec)
    summed = {c for term in spec.inputs for c in term} - set(spec.result)
    return sympy.Mul(*(size[c] for c in sorted(summed)))


def contraction_flops(spec: Contraction) -> sympy.Expr:
    """FLOPs of a contraction: 2 × the product of all index sizes (multiply and add).

    A contraction that sums over nothing is a product: 1 × the index sizes.
    """
    size = _sizes(spec)
    product = sympy.Mul(*size.values())
    return 2 * product if is_matmul(spec) else product


def useful_flops(spec: Contraction) -> sympy.Expr:
    """FLOPs of the useful part of a contraction (see ``Contraction.useful``/``triangle``).

    Each index counts with its useful size; a ``triangle`` (row, col) counts
    size(row) (size(col) + 1) / 2 pairs instead of size(row) size(col). Equal to
    :func:`contraction_flops` for a contraction that declares neither.
    """
    size = _sizes(spec)
    size.update({letter: parse(text) for letter, text in spec.useful.items()})
    product = sympy.Mul(*size.values())
    if spec.triangle is not None:
        _, col = spec.triangle
        product = product * (size[col] + 1) / (2 * size[col])
    return 2 * product if is_matmul(spec) else product


def describe(shapes_by_name: Mapping[str, Shape]) -> str:
    """``q [B, Hk, H/Hk, L, E]``-style listing, for error messages."""
    return ", ".join(f"{n} [{', '.join(map(str, s))}]" for n, s in shapes_by_name.items())
