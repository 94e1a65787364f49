"""The cost model: a variant is a short program of declared steps; costs follow by rule.

A :class:`Variant` lists, in execution order, the :class:`~attnkit._contract.Contraction`
records its implementation runs (imported from the op modules, never retyped) and
small :class:`Elementwise` records for everything else (softmax, feature maps, masks,
cache copies). Tensors are named; their shapes come from the contractions (each
operand's subscripts give its axes) or, for tensors no contraction touches, from
``Variant.tensors``.

Rules (what each quantity means, exactly):

FLOPs
    A contraction costs 2 × the product of all its index sizes (a multiply and an add per
    term; 1 × for a product with no summed index). An elementwise step costs
    ``flops_per_element`` × the elements of ``over`` (its output by default).
    *train* = forward + backward. The backward of a contraction is one contraction of
    the same size for each operand that requires grad (dA = dC·Bᵀ, dB = Aᵀ·dC); the
    backward of an elementwise step costs ``backward_flops_per_element`` × the same
    elements. A tensor requires grad if it is a differentiable input (q, k, v) or is
    computed from one by a differentiable step.
    *matmul FLOPs* are the contraction terms alone: what
    ``torch.utils.flop_counter.FlopCounterMode`` counts (bmm/mm), checked exactly.
    *useful FLOPs* leave out what a contraction computes but the algorithm does not
    need (``Contraction.triangle``: the masked half of a causal chunk's products;
    ``Contraction.useful``: an augmented ones column) and every recomputation.

What is derived and what is typed
    Contraction FLOPs and every shape a contraction names are *derived*: they follow
    from the equation the implementation runs. Elementwise FLOPs are *typed*: each
    :class:`Elementwise` step carries a per-element constant (softmax 5, phi 2, a
    divide 2, ...) that is a convention, not a count; :attr:`StepCost.source` says
    which each step is, and ``attnkit cost VARIANT`` prints it. Bytes and memory follow
    from the shapes by the rules below; shapes of tensors no contraction names are
    declared in ``Variant.tensors``.

bytes (moved)
    Every step reads its inputs once and writes its output once:
    w × (Σ input elements + output elements), w bytes per element. A backward
    contraction for operand A reads dC and the other operands and writes dA; a backward
    elementwise step reads dC and what it saved and writes the input gradients.
    No caches are assumed: this is the traffic of the code as written.

memory (held)
    forward / decode: every tensor the step materialises plus its inputs (nothing
    freed: an upper bound on the peak, equal to it in Big-O for these programs).
    train: what autograd holds between forward and backward — the inputs, the outputs
    and the tensors saved for backward. A contraction saves operand A when another
    operand requires grad (dB needs A); an elementwise step saves what it declares.

activations="keep" | "recompute"
    ``keep`` (the implementations as written): saved tensors stay in memory.
    ``recompute``: the variant's ``recomputable`` tensors (e.g. phi(Q), phi(K)) are not
    held; the steps producing them run again in the backward pass (their FLOPs and
    bytes are added to *train*). This models a recomputing backward such as a flash
    attention kernel or :mod:`attnkit.ops.linear_chunked`.

Counts are exact for the sizes in the expressions: chunked linear attention counts
L/C chunks, exact when C divides L (the implementation pads the last chunk).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import sympy

from attnkit._contract import Contraction
from attnkit._registry import Registry
from attnkit.cost.einsum import (
    Shape,
    contraction_flops,
    is_matmul,
    numel,
    shapes,
    summed_size,
    useful_flops,
)
from attnkit.cost.symbols import SYMBOLS, parse

__all__ = [
    "ACTIVATIONS",
    "PHASES",
    "Activations",
    "Elementwise",
    "Phase",
    "Step",
    "StepCost",
    "Variant",
    "breakdown",
    "bytes_moved",
    "flops",
    "get",
    "matmul_flops_at",
    "memory",
    "register",
    "variants",
]

_ONE = sympy.Integer(1)
_ZERO = sympy.Integer(0)

Phase = Literal["forward", "train", "decode"]
PHASES: tuple[str, ...] = ("forward", "train", "decode")
Activations = Literal["keep", "recompute"]
ACTIVATIONS: tuple[str, ...] = ("keep", "recompute")


@dataclass(frozen=True)
class Elementwise:
    """A step that is not a contraction: softmax, a feature map, a mask, a copy.

    Attributes:
        name: what it does, e.g. ``"softmax"``.
        inputs: tensors it reads.
        output: the tensor it writes.
        flops_per_element: FLOPs per element of ``over`` (0 for a copy). Conventions:
            1 per add/multiply/compare, softmax 5 (max, subtract, exp, sum, divide).
        over: the tensor whose elements are counted; default ``output`` (give the input
            of a reduction).
        saves: tensors autograd keeps for its backward.
        backward_flops_per_element: default ``flops_per_element``.
        differentiable: False if no gradient flows through it (e.g. a cache copy in
            decoding); the hard argmax select *is* differentiable (its gradient is an
            explicit zero, computed).
    """

    name: str
    inputs: tuple[str, ...]
    output: str
    flops_per_element: int
    over: str | None = None
    saves: tuple[str, ...] = ()
    backward_flops_per_element: int | None = None
    differentiable: bool = True


#: A step of a variant's program.
Step = Contraction | Elementwise


@dataclass(frozen=True)
class Variant:
    """One attention variant, as the program of steps its implementation runs.

    Attributes:
        name: registry name (``attnkit cost NAME``).
        summary: one line for tables.
        implementation: the function it models, e.g. ``"attnkit.ops.softmax.sdpa_reference"``.
        steps: contractions and elementwise steps in execution order.
        tensors: shapes (size expressions per axis) of tensors no contraction names.
        inputs: tensors given to the implementation (read, held by the caller).
        outputs: tensors it returns.
        grad_inputs: inputs that require grad in the train phase.
        phases: the phases it supports; the first is the default.
        recomputable: tensors not held under ``activations="recompute"``.
        assumptions: the Big-O assumptions of its row in the complexity table.
        defaults: sizes used when the caller gives none (CLI ``--at``).
        derived: sizes computed from others, e.g. ``{"Dp": "binomial(E + 2, 2)"}``.
        default_activations: what the implementation does ("keep", or "recompute" for
            a path that recomputes in its backward); the default of ``attnkit cost``.
    """

    name: str
    summary: str
    implementation: str
    steps: tuple[Step, ...]
    tensors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    grad_inputs: tuple[str, ...] = ()
    phases: tuple[str, ...] = ("forward", "train")
    recomputable: tuple[str, ...] = ()
    assumptions: str = ""
    defaults: Mapping[str, int] = field(default_factory=dict)
    derived: Mapping[str, str] = field(default_factory=dict)
    default_activations: str = "keep"

    # ---- tensors --------------------------------------------------------------------
    def shapes(self) -> dict[str, Shape]:
        """Symbolic shape of every tensor; ValueError if two declarations disagree.

        A tensor may be viewed with different axes by different contractions (GQA's q
        is [b, h, k] and [b, g, h/g, k]); its element count must agree everywhere.
        """
        found: dict[str, tuple[Shape, str]] = {}

        def add(name: str, shape: Shape, where: str) -> None:
            if name in found:
                first, first_where = found[name]
                if sympy.simplify(numel(first) - numel(shape)) != 0:
                    raise ValueError(
                        f"variant {self.name!r}: tensor {name!r} is "
                        f"[{', '.join(map(str, first))}] in {first_where} but "
                        f"[{', '.join(map(str, shape))}] in {where}"
                    )
            else:
                found[name] = (shape, where)

        for tname, axes in self.tensors.items():
            add(tname, tuple(parse(a) for a in axes), "Variant.tensors")
        for step in self.steps:
            if isinstance(step, Contraction):
                ins, out = shapes(step)
                where = f"contraction {step.name!r} ({step.equation})"
                for tname, shape in zip(step.operands, ins, strict=True):
                    add(tname, shape, where)
                add(step.output, out, where)
        missing = sorted(
            {t for s in self.steps if isinstance(s, Elementwise) for t in (*s.inputs, s.output)}
            - set(found)
        )
        if missing:
            raise ValueError(
                f"variant {self.name!r}: no shape for tensor(s) {', '.join(missing)}; "
                "declare them in Variant.tensors"
            )
        return {name: shape for name, (shape, _) in found.items()}

    def sizes(self) -> dict[str, sympy.Expr]:
        """Element count of every tensor."""
        return {name: numel(shape) for name, shape in self.shapes().items()}

    def contractions(self) -> tuple[Contraction, ...]:
        """The contraction steps, in order."""
        return tuple(s for s in self.steps if isinstance(s, Contraction))

    def check_phase(self, phase: str | None) -> str:
        """``phase`` if this variant supports it (None -> its default); ValueError otherwise."""
        if phase is None:
            return self.phases[0]
        if phase not in self.phases:
            raise ValueError(
                f"variant {self.name!r} has phases {', '.join(map(repr, self.phases))}, "
                f"got {phase!r}"
            )
        return phase

    def symbols(self) -> set[str]:
        """Names of the size symbols its expressions use."""
        found: set[str] = set()
        for shape in self.shapes().values():
            for axis in shape:
                found |= {str(s) for s in axis.free_symbols}
        return found


@dataclass(frozen=True)
class StepCost:
    """Cost of one step in one pass (``pass_`` is forward, recompute or backward).

    ``summed`` is the product of the forward contraction's summed index sizes (1 for
    elementwise steps): where it is 1 at concrete sizes, torch.einsum multiplies
    instead of running a bmm (see :func:`matmul_flops_at`). ``useful`` is the part of
    ``flops`` the algorithm needs (0 for a recomputation). ``source`` says whether the
    FLOPs are derived from a contraction or typed per element.
    """

    name: str
    kind: str  # "matmul", "product" or "elementwise"
    pass_: str
    flops: sympy.Expr
    bytes: sympy.Expr
    summed: sympy.Expr = _ONE
    useful: sympy.Expr = _ZERO
    source: str = ""


_VARIANTS: Registry[Variant] = Registry("cost variant")


def register(variant: Variant) -> Variant:
    """Add a variant to the registry (its shapes are checked now)."""
    variant.shapes()
    _VARIANTS.register(variant.name)(variant)
    return variant


def variants() -> list[str]:
    """Names of the registered variants."""
    from attnkit.cost import variants as _declared  # noqa: F401  (registers them)

    return _VARIANTS.names()


def get(variant: str | Variant) -> Variant:
    """The variant registered as ``variant`` (or the Variant itself)."""
    if isinstance(variant, Variant):
        return variant
    variants()
    return _VARIANTS.get(variant)


def _check_activations(v: Variant, activations: str | None) -> str:
    """``activations``, or the variant's own when None; ValueError for an unknown one."""
    chosen = v.default_activations if activations is None else activations
    if chosen not in ACTIVATIONS:
        raise ValueError(f"activations must be 'keep' or 'recompute', got {activations!r}")
    return chosen


def _requires_grad(v: Variant) -> set[str]:
    grad = set(v.grad_inputs)
    for step in v.steps:
        if isinstance(step, Contraction):
            if grad & set(step.operands):
                grad.add(step.output)
        elif step.differentiable and grad & set(step.inputs):
            grad.add(step.output)
    return grad


def _live(v: Variant) -> set[str]:
    """Tensors the outputs depend on: backward runs only through these."""
    live = set(v.outputs)
    for step in reversed(v.steps):
        if step.output in live:
            live.update(step.operands if isinstance(step, Contraction) else step.inputs)
    return live


def _recomputed_steps(v: Variant) -> list[Step]:
    """Steps producing recomputable tensors: they run again in the backward pass."""
    targets = set(v.recomputable)
    return [s for s in v.steps if s.output in targets]


def breakdown(
    variant: str | Variant, phase: str | None = None, *, activations: str | None = None
) -> list[StepCost]:
    """Per-step FLOPs and bytes (in elements × w) of one pass of ``variant``.

    Forward steps first; with ``phase="train"`` then the recomputed steps (under
    ``activations="recompute"``) and one backward entry per step that needs one.
    """
    v = get(variant)
    phase = v.check_phase(phase)
    activations = _check_activations(v, activations)
    size = v.sizes()
    w = SYMBOLS["w"]

    zero = sympy.Integer(0)

    def derived(step: Contraction) -> str:
        return f"derived from {step.equation}"

    def typed(step: Elementwise, per: int) -> str:
        return f"typed: {per} FLOP per element of {step.over or step.output}"

    def forward_cost(step: Step, pass_: str) -> StepCost:
        if isinstance(step, Contraction):
            moved = sum((size[t] for t in (*step.operands, step.output)), sympy.Integer(0))
            kind = "matmul" if is_matmul(step) else "product"
            return StepCost(
                step.name,
                kind,
                pass_,
                contraction_flops(step),
                w * moved,
                summed_size(step),
                useful_flops(step) if pass_ == "forward" else zero,
                derived(step),
            )
        over = size[step.over or step.output]
        moved = sum((size[t] for t in (*step.inputs, step.output)), sympy.Integer(0))
        cost = step.flops_per_element * over
        return StepCost(
            step.name,
            "elementwise",
            pass_,
            cost,
            w * moved,
            useful=cost if pass_ == "forward" else zero,
            source=typed(step, step.flops_per_element),
        )

    rows = [forward_cost(s, "forward") for s in v.steps]
    if phase != "train":
        return rows
    if activations == "recompute":
        rows += [forward_cost(s, "recompute") for s in _recomputed_steps(v)]
    grad = _requires_grad(v) & _live(v)
    for step in reversed(v.steps):
        if step.output not in grad:
            continue
        if isinstance(step, Contraction):
            for i, operand in enumerate(step.operands):
                if operand not in grad:
                    continue
                others = [t for j, t in enumerate(step.operands) if j != i]
                moved = (
                    size[step.output]
                    + size[operand]
                    + sum((size[t] for t in others), sympy.Integer(0))
                )
                rows.append(
                    StepCost(
                        f"{step.name} d{operand}",
                        "matmul" if is_matmul(step) else "product",
                        "backward",
                        contraction_flops(step),
                        w * moved,
                        summed_size(step),
                        useful_flops(step),
                        derived(step),
                    )
                )
        elif step.differentiable:
            per = (
                step.flops_per_element
                if step.backward_flops_per_element is None
                else (step.backward_flops_per_element)
            )
            over = size[step.over or step.output]
            read = size[step.output] + sum((size[t] for t in step.saves), sympy.Integer(0))
            written = sum((size[t] for t in step.inputs if t in grad), sympy.Integer(0))
            rows.append(
                StepCost(
                    f"{step.name} backward",
                    "elementwise",
                    "backward",
                    per * over,
                    w * (read + written),
                    useful=per * over,
                    source=typed(step, per),
                )
            )
    return rows


def _dtype_bytes(expr: sympy.Expr, dtype: object) -> sympy.Expr:
    if dtype is None:
        return expr
    itemsize = getattr(dtype, "itemsize", None)
    if not isinstance(itemsize, int):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return expr.subs(SYMBOLS["w"], itemsize)


def flops(
    variant: str | Variant,
    phase: str | None = None,
    *,
    activations: str | None = None,
    matmul_only: bool = False,
    useful: bool = False,
) -> sympy.Expr:
    """Exact FLOPs of ``variant`` in ``phase`` (forward, train = forward + backward, decode).

    ``matmul_only=True`` keeps the contractions with a summed index: the FLOPs that
    ``torch.utils.flop_counter.FlopCounterMode`` counts. ``useful=True`` counts only
    the useful part (no masked halves, no ones columns, no recomputation): what a
    fraction of peak should be made of.
    """
    rows = breakdown(variant, phase, activations=activations)
    keep = [r for r in rows if not matmul_only or r.kind == "matmul"]
    return sympy.expand(sum((r.useful if useful else r.flops for r in keep), sympy.Integer(0)))


def bytes_moved(
    variant: str | Variant,
    phase: str | None = None,
    *,
    activations: str | None = None,
    dtype: object = None,
) -> sympy.Expr:
    """Exact bytes read and written by ``variant`` in ``phase`` (in terms of w, or ``dtype``)."""
    rows = breakdown(variant, phase, activations=activations)
    return _dtype_bytes(sympy.expand(sum((r.bytes for r in rows), sympy.Integer(0))), dtype)


def matmul_flops_at(
    variant: str | Variant,
    sizes: Mapping[str, int],
    phase: str | None = None,
    *,
    activations: str | None = None,
) -> int:
    """Matmul FLOPs at concrete sizes, exactly as FlopCounterMode counts them.

    Equal to ``flops(..., matmul_only=True)`` at these sizes, except that a contraction
    whose summed indices all have size 1 (e.g. S = 1, or an empty decoding cache) is run
    by ``torch.einsum`` as a multiply, not a bmm, and so counts 0 (its backward too).
    """
    total = 0
    for row in breakdown(variant, phase, activations=activations):
        if row.kind == "matmul" and evaluate(row.summed, sizes) != 1:
            total += evaluate(row.flops, sizes)
    return total


def _saved(v: Variant, grad: set[str]) -> set[str]:
    saved: set[str] = set()
    for step in v.steps:
        if step.output not in grad:
            continue
        if isinstance(step, Contraction):
            for i, operand in enumerate(step.operands):
                if any(o in grad for j, o in enumerate(step.operands) if j != i):
                    saved.add(operand)
        elif step.differentiable:
            saved.update(step.saves)
    return saved


def memory(
    variant: str | Variant,
    phase: str | None = None,
    *,
    activations: str | None = None,
    dtype: object = None,
) -> sympy.Expr:
    """Exact bytes held by ``variant`` in ``phase`` (see the module docstring)."""
    v = get(variant)
    phase = v.check_phase(phase)
    activations = _check_activations(v, activations)
    size = v.sizes()
    if phase == "train":
        held = set(v.inputs) | set(v.outputs) | _saved(v, _requires_grad(v) & _live(v))
        if activations == "recompute":
            held -= set(v.recomputable)
    else:
        held = set(v.inputs) | {s.output for s in v.steps}
    total = sum((size[t] for t in sorted(held)), sympy.Integer(0))
    return _dtype_bytes(sympy.expand(SYMBOLS["w"] * total), dtype)


def at(expr: sympy.Expr, values: Mapping[str, int]) -> sympy.Expr:
    """``expr`` with the named symbols replaced by ``values``."""
    return expr.subs({SYMBOLS[name]: val for name, val in values.items()})


def resolve_sizes(
    variant: str | Variant, given: Mapping[str, int] | None = None, *, dtype_bytes: int = 4
) -> dict[str, int]:
    """Concrete sizes for ``variant``: its defaults, overridden by ``given``, plus derived ones.

    Raises ValueError for unknown names, non-positive sizes or a given derived size
    that disagrees with its formula (e.g. Dp != C(E+2, 2)).
    """
    v = get(variant)
    values = dict(v.defaults)
    for name, val in (given or {}).items():
        if name not in SYMBOLS:
            raise ValueError(f"unknown size {name!r}; known: {', '.join(SYMBOLS)}")
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"size {name} must be an int >= 0, got {val!r}")
        values[name] = val
    values.setdefault("w", dtype_bytes)
    for name, formula in v.derived.items():
        value = parse(formula).subs({SYMBOLS[k]: x for k, x in values.items()})
        if not value.is_Integer:
            raise ValueError(f"{name} = {formula} needs sizes for {value.free_symbols}")
        if name in (given or {}) and int(value) != values[name]:
            raise ValueError(f"{name} must be {formula} = {int(value)} here, got {values[name]}")
        values[name] = int(value)
    return values


def evaluate(expr: sympy.Expr, values: Mapping[str, int]) -> int:
    """``expr`` at concrete sizes, as an int; ValueError naming any missing size."""
    result = at(expr, values)
    if result.free_symbols:
        missing = ", ".join(sorted(str(s) for s in result.free_symbols))
        raise ValueError(f"missing size(s) {missing} to evaluate {expr}")
    if not result.is_Integer:
        if result.is_Rational:
            raise ValueError(
                f"{expr} is not an integer at these sizes ({result}); check divisibility"
            )
        raise ValueError(f"{expr} did not evaluate to a number: {result}")
    return int(result)


def free_names(exprs: Iterable[sympy.Expr]) -> list[str]:
    """Sorted names of the symbols in ``exprs``."""
    return sorted({str(s) for e in exprs for s in e.free_symbols})
