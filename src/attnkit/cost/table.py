"""The complexity table of attention variants, regenerated from the model (nothing typed).

Each row names a variant, a phase and an activations strategy; its time is the
Big-O of :func:`~attnkit.cost.model.flops` and its memory the Big-O of either the
bytes moved per decoding step (:func:`~attnkit.cost.model.bytes_moved`, the
textbook's "memory traffic") or the memory held for the backward pass of a training
step (:func:`~attnkit.cost.model.memory`, the textbook's "memory" of softmax and
linear attention), under the variant's own assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnkit.cost import model
from attnkit.cost.bigo import big_o, format_big_o

__all__ = ["ROWS", "Row", "complexity", "markdown", "rows"]

#: (variant, phase, activations) of each row, the textbook's rows first.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("mha", "decode", "keep"),
    ("gqa", "decode", "keep"),
    ("mqa", "decode", "keep"),
    ("softmax", "train", "keep"),
    ("linear", "train", "recompute"),
    ("linear", "train", "keep"),
    ("softmax", "train", "recompute"),
    ("argmax", "train", "keep"),
    ("kernel", "train", "keep"),
    ("linear_chunked", "train", "keep"),
    ("linear_chunked", "train", "recompute"),
    ("linear_fast", "train", "recompute"),
    ("linear_step", "decode", "keep"),
)


@dataclass(frozen=True)
class Row:
    """One row: Big-O of time and memory, and what the memory column measures."""

    variant: str
    phase: str
    activations: str
    time: sympy.Expr
    memory: sympy.Expr
    memory_kind: str
    assumptions: str

    @property
    def time_text(self) -> str:
        return format_big_o(self.time)

    @property
    def memory_text(self) -> str:
        return format_big_o(self.memory)


def complexity(
    variant: str,
    phase: str | None = None,
    *,
    activations: str | None = None,
    assumptions: str | None = None,
) -> Row:
    """Big-O of time and memory of one variant (its own assumptions unless given).

    Memory is the bytes moved for a decoding step, and the bytes held for the backward
    pass otherwise (for forward, everything the pass materialises).
    """
    v = model.get(variant)
    phase = v.check_phase(phase)
    activations = v.default_activations if activations is None else activations
    a = v.assumptions if assumptions is None else assumptions
    if phase == "decode":
        mem = model.bytes_moved(v, phase, activations=activations)
        kind = "bytes moved per step"
    else:
        mem = model.memory(v, phase, activations=activations)
        kind = "held for backward" if phase == "train" else "materialised"
    return Row(
        variant,
        phase,
        activations,
        big_o(model.flops(v, phase, activations=activations), a),
        big_o(mem, a),
        kind,
        a,
    )


def rows() -> list[Row]:
    """Every row of :data:`ROWS`, derived now."""
    return [complexity(v, p, activations=a) for v, p, a in ROWS]


def markdown(table: list[Row] | None = None) -> str:
    """The table as Markdown, with the assumptions listed under it."""
    table = rows() if table is None else table
    notes: list[str] = []
    lines = [
        "| variant | phase | activations | time (FLOPs) | memory | memory is | assumptions |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if r.assumptions not in notes:
            notes.append(r.assumptions)
        mark = f"({notes.index(r.assumptions) + 1})"
        lines.append(
            f"| {r.variant} | {r.phase} | {r.activations} | {r.time_text} | {r.memory_text} "
            f"| {r.memory_kind} | {mark} |"
        )
    lines.append("")
    lines += [f"({i + 1}) {text}" for i, text in enumerate(notes)]
    return "\n".join(lines)
