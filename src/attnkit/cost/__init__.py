"""attnkit.cost: complexity derived from the code, checked by measurement.

The op modules declare their einsums once, as :class:`~attnkit._contract.Contraction`
records they execute; this package reads those same records (plus small declared
elementwise steps) and derives, exactly, as sympy expressions::

    import attnkit.cost as cost
    cost.flops("mqa", phase="decode")            # 2*b*d*h*k + 2*b*d*k + ...
    cost.bytes("mqa", phase="decode")            # bytes moved, in terms of w (or dtype=)
    cost.memory("linear", "train", activations="recompute")
    cost.big_o(cost.bytes("mqa", "decode"), "b, n, d >> h; n >= 0; k = d/h; v = d/h")
    # -> d**2 + b*d + b*d*n/h
    cost.check_einsum("bd,hdq->bhq", x="b d", W_q="h d q")   # ('b', 'h', 'q')

and checks them: :func:`count_flops` counts the real implementation's matmul FLOPs
with ``torch.utils.flop_counter.FlopCounterMode`` (equal to
``flops(..., matmul_only=True)``, tested exactly), and :func:`fit_exponent` fits
measured growth exponents with a confidence band.

``attnkit cost VARIANT`` and ``attnkit cost --table`` are :mod:`attnkit.cost.cli`.
Symbols: :data:`SYMBOLS` (see :mod:`attnkit.cost.symbols`); rules: :mod:`attnkit.cost.model`;
Big-O: :mod:`attnkit.cost.bigo`; variants: :mod:`attnkit.cost.variants`.
"""

from attnkit.cost import variants as _variants  # noqa: F401  (registers the variants)
from attnkit.cost.bigo import Assumptions, big_o, format_big_o
from attnkit.cost.einsum import check_einsum
from attnkit.cost.measure import (
    ExponentFit,
    Measurement,
    count_flops,
    fit_exponent,
    fit_loglog,
    measure,
    runner,
)
from attnkit.cost.model import (
    ACTIVATIONS,
    PHASES,
    Elementwise,
    StepCost,
    Variant,
    breakdown,
    bytes_moved,
    evaluate,
    flops,
    get,
    matmul_flops_at,
    memory,
    resolve_sizes,
    variants,
)
from attnkit.cost.symbols import LEGEND, SYMBOLS
from attnkit.cost.table import Row, complexity, markdown, rows

#: Same as :func:`bytes_moved` (named as the issue asks; shadows the builtin only here).
bytes = bytes_moved

__all__ = [
    "ACTIVATIONS",
    "LEGEND",
    "PHASES",
    "SYMBOLS",
    "Assumptions",
    "Elementwise",
    "ExponentFit",
    "Measurement",
    "Row",
    "StepCost",
    "Variant",
    "big_o",
    "breakdown",
    "bytes",
    "bytes_moved",
    "check_einsum",
    "complexity",
    "count_flops",
    "evaluate",
    "fit_exponent",
    "fit_loglog",
    "flops",
    "format_big_o",
    "get",
    "markdown",
    "matmul_flops_at",
    "measure",
    "memory",
    "resolve_sizes",
    "rows",
    "runner",
    "variants",
]
