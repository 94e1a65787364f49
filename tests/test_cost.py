"""attnkit.cost, symbolic side: one source of truth, the complexity table, Big-O, shapes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sympy
import torch
from torch import Tensor

import attnkit.cost as cost
from attnkit import decoding
from attnkit._contract import Contraction, contract
from attnkit.cost.bigo import Assumptions, monomials
from attnkit.cost.einsum import contraction_flops, shapes, useful_flops
from attnkit.cost.symbols import SYMBOLS, parse
from attnkit.ops import argmax, kernel, linear, softmax

b, n, d, h, g, k, v = (SYMBOLS[x] for x in "bndhgkv")
B, H, Hk, L, S, E, Ev, Dp, C = (
    SYMBOLS[x] for x in ("B", "H", "Hk", "L", "S", "E", "Ev", "Dp", "C")
)
N, D, M, w = (SYMBOLS[x] for x in "NDMw")

ALL_CONTRACTIONS: list[Contraction] = [
    *softmax.CONTRACTIONS,
    *argmax.CONTRACTIONS,
    *kernel.CONTRACTIONS,
    *linear.CONTRACTIONS,
    *decoding.MHA_SPECS.values(),
    *decoding.MQA_SPECS.values(),
    *decoding.GQA_SPECS.values(),
]


def same(a: sympy.Expr, e: sympy.Expr) -> bool:
    return sympy.expand(a - e) == 0


# ---- one source of truth --------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_CONTRACTIONS, ids=lambda s: f"{s.name}-{s.equation}")
def test_every_declared_contraction_checks_against_its_own_sizes(spec: Contraction) -> None:
    ins, out = shapes(spec)
    for shape in (*ins, out):
        assert all(axis.free_symbols <= set(SYMBOLS.values()) for axis in shape)
    equation = spec.equation.replace("...", "Z")  # check_einsum names every axis
    operands = {
        name: [str(a) for a in shape] for name, shape in zip(spec.operands, ins, strict=True)
    }
    if len(operands) == len(spec.operands):
        assert cost.check_einsum(equation, **operands) == tuple(str(a) for a in out)


@pytest.fixture
def einsums(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every torch.einsum equation run (contract() looks torch.einsum up per call)."""
    seen: list[str] = []
    real = torch.einsum

    def spy(equation: str, *operands: Tensor) -> Tensor:
        seen.append(equation)
        return real(equation, *operands)

    monkeypatch.setattr(torch, "einsum", spy)
    yield seen


SMALL = {
    "softmax": {"B": 2, "H": 4, "Hk": 2, "L": 5, "S": 7, "E": 3, "Ev": 6},
    "argmax": {"B": 2, "H": 4, "Hk": 2, "L": 5, "S": 7, "E": 3, "Ev": 6},
    "kernel": {"B": 2, "H": 4, "Hk": 2, "L": 5, "S": 7, "E": 3, "Ev": 6},
    "linear": {"B": 2, "H": 4, "Hk": 2, "L": 5, "S": 7, "E": 3, "Ev": 6},
    "linear_chunked": {"B": 2, "H": 4, "Hk": 2, "L": 12, "S": 12, "E": 3, "Ev": 5, "C": 4},
    "linear_step": {"B": 2, "H": 6, "Hk": 3, "E": 3, "Ev": 5},
    "mha": {"b": 3, "d": 12, "h": 4, "k": 3, "v": 5, "n": 7},
    "mqa": {"b": 3, "d": 12, "h": 4, "k": 3, "v": 5, "n": 7},
    "gqa": {"b": 3, "d": 12, "h": 6, "g": 2, "k": 3, "v": 5, "n": 7},
}


@pytest.mark.parametrize("variant", sorted(SMALL))
def test_implementation_runs_exactly_the_models_contractions(
    variant: str, einsums: list[str]
) -> None:
    sizes = cost.resolve_sizes(variant, SMALL[variant])
    phase = cost.get(variant).phases[0]
    cost.runner(variant).build(sizes, phase, torch.float32)()
    assert einsums == [c.equation for c in cost.get(variant).contractions()]


def test_variants_hold_the_op_modules_own_records() -> None:
    # Not copies: change a record in the op module and the model changes with it.
    assert cost.get("softmax").contractions() == (softmax.SCORES, softmax.VALUES)
    assert cost.get("softmax").contractions()[0] is softmax.SCORES
    assert cost.get("linear_chunked").contractions()[2] is linear.CHUNK_INTER
    assert cost.get("mqa").contractions()[3] is decoding.MQA_SPECS["logits"]
    assert [c.equation for c in cost.get("gqa").contractions()] == list(
        decoding.GQA_EINSUMS.values()
    )


def test_fast_causal_path_declares_its_products() -> None:
    from attnkit.ops import linear_chunked

    assert cost.get("linear_fast").contractions() == linear_chunked.CONTRACTIONS
    assert cost.get("linear_fast").contractions()[0] is linear_chunked.CHUNK_STATES
    assert cost.get("linear_fast").default_activations == "recompute"


def test_useful_flops_leave_out_the_masked_half_and_the_ones_column() -> None:
    from attnkit.ops import linear_chunked

    G = H / Hk
    chunks = B * Hk * L / C
    full = cost.flops("linear_fast", "forward", matmul_only=True)
    useful = cost.flops("linear_fast", "forward", matmul_only=True, useful=True)
    # Masked halves: the scores' and the intra product's C (C - 1) / 2 upper entries per
    # chunk and query head (times D' and Ev); the ones column: the whole extra value
    # column of the chunk states (C D'), the inter term (G C D') and the intra term (G C C).
    masked = chunks * G * C * (C - 1) / 2 * 2 * (Dp + Ev)
    ones = 2 * chunks * (C * Dp + G * C * Dp + G * C * C)
    assert same(full - useful, masked + ones)
    # A contraction that declares neither computes only useful work.
    assert same(useful_flops(softmax.SCORES), contraction_flops(softmax.SCORES))
    with pytest.raises(ValueError, match="useful/triangle name indices"):
        Contraction(
            "x", "ab,bc->ac", ("p", "q"), "r", {"a": "C", "b": "C", "c": "C"}, triangle=("a", "z")
        )
    assert linear_chunked.CHUNK_SCORES.triangle == ("r", "c")


def test_model_follows_a_changed_contraction() -> None:
    spec = Contraction("s", "bkgle,bkse->bkgls", ("q", "k"), "scores", dict(softmax.SCORES.sizes))
    v = cost.get("softmax")
    wider = Contraction(
        spec.name, spec.equation, spec.operands, spec.output, {**spec.sizes, "e": "2*E"}
    )
    changed = cost.Variant(**{**v.__dict__, "name": "softmax_wide", "steps": (wider, *v.steps[1:])})
    delta = cost.flops(changed, "forward") - cost.flops(v, "forward")
    assert same(delta, 2 * B * H * L * S * E)


@pytest.mark.parametrize("variant", sorted(SMALL))
def test_variant_shapes_are_consistent(variant: str) -> None:
    shapes_ = cost.get(variant).shapes()
    for step in cost.get(variant).steps:
        names = step.operands if isinstance(step, Contraction) else step.inputs
        assert set(names) | {step.output} <= set(shapes_)


def test_inconsistent_tensor_shapes_are_reported() -> None:
    v = cost.get("softmax")
    bad = cost.Variant(**{**v.__dict__, "name": "bad", "tensors": {"q": ("B", "H", "L", "Ev")}})
    with pytest.raises(ValueError, match=r"tensor 'q' is \[B, H, L, Ev\] in Variant.tensors"):
        bad.shapes()


def test_contract_runs_the_declared_equation() -> None:
    spec = Contraction(
        "q", "bd,hdk->bhk", ("x", "W_q"), "q", {"b": "b", "d": "d", "h": "h", "k": "k"}
    )
    x, W = torch.randn(2, 3), torch.randn(4, 3, 5)
    torch.testing.assert_close(contract(spec, x, W), torch.einsum("bd,hdk->bhk", x, W))
    with pytest.raises(TypeError, match=r"takes 2 operands \(x, W_q\), got 1"):
        contract(spec, x)


def test_contraction_record_validates_its_sizes() -> None:
    with pytest.raises(ValueError, match=r"missing \['k'\]"):
        Contraction("q", "bd,hdk->bhk", ("x", "W_q"), "q", {"b": "b", "d": "d", "h": "h"})
    with pytest.raises(ValueError, match="2 operands but 1 operand names"):
        Contraction("q", "bd,hdk->bhk", ("x",), "q", {"b": "b", "d": "d", "h": "h", "k": "k"})
    with pytest.raises(ValueError, match="explicitly"):
        Contraction("q", "bd,hdk", ("x", "W"), "q", {"b": "b", "d": "d", "h": "h", "k": "k"})


# ---- the derivation rules ------------------------------------------------------------------


def test_contraction_flops_are_twice_the_index_product() -> None:
    assert same(contraction_flops(softmax.SCORES), 2 * B * Hk * (H / Hk) * L * S * E)
    outer = Contraction("o", "bd,bv->bdv", ("a", "c"), "o", {"b": "b", "d": "d", "v": "v"})
    assert same(contraction_flops(outer), b * d * v)  # no summed index: a product


def test_softmax_forward_is_the_textbook_count() -> None:
    assert same(cost.flops("softmax", "forward", matmul_only=True), 2 * B * H * L * S * (E + Ev))


@pytest.mark.parametrize("variant", ["softmax", "argmax", "kernel", "linear", "linear_chunked"])
def test_backward_is_two_contractions_per_contraction(variant: str) -> None:
    fwd = cost.flops(variant, "forward", matmul_only=True)
    assert same(cost.flops(variant, "train", matmul_only=True), 3 * fwd)


def test_recompute_adds_the_recomputed_contractions() -> None:
    keep = cost.flops("softmax", "train", matmul_only=True)
    recompute = cost.flops("softmax", "train", activations="recompute", matmul_only=True)
    assert same(recompute - keep, 2 * B * H * L * S * E)  # scores again (flash backward)
    # phi is elementwise: recomputing it adds no matmul.
    assert same(
        cost.flops("linear", "train", activations="recompute", matmul_only=True),
        cost.flops("linear", "train", matmul_only=True),
    )


def test_bytes_and_memory_take_a_dtype() -> None:
    expr = cost.bytes("mha", "decode")
    assert cost.bytes is cost.bytes_moved
    assert same(cost.bytes("mha", "decode", dtype=torch.float16), expr.subs(w, 2))
    assert same(
        cost.memory("mha", "decode", dtype=torch.float32), cost.memory("mha", "decode").subs(w, 4)
    )


def test_memory_held_for_training_by_strategy() -> None:
    keep = cost.memory("linear", "train")
    recompute = cost.memory("linear", "train", activations="recompute")
    # Recompute drops exactly phi(Q) [B, H, L, D'] and phi(K) [B, Hk, S, D'].
    assert same(keep - recompute, w * (B * H * L * Dp + B * Hk * S * Dp))


def test_decode_cache_bytes_scale_with_key_value_heads() -> None:
    # d/dn of the bytes moved: the cache term. MQA reads 1/h of MHA's, GQA g/h.
    def slope(variant: str) -> sympy.Expr:
        return sympy.diff(cost.bytes(variant, "decode"), n)

    # Each cached element is read by torch.cat, written by it and read by a contraction
    # (3 (k + v) per key/value head); the h logits and weights per token add 4 h.
    assert same(slope("mha"), w * b * (3 * h * (k + v) + 4 * h))
    assert same(slope("gqa"), w * b * (3 * g * (k + v) + 4 * h))
    assert same(slope("mqa"), w * b * (3 * (k + v) + 4 * h))

    # The cache held: exactly 1/h (g/h) of MHA's per token.
    def held(variant: str) -> sympy.Expr:
        sizes = cost.get(variant).sizes()
        return sympy.diff(sizes["prev_K"] + sizes["prev_V"], n)

    assert sympy.simplify(held("mqa") / held("mha") - 1 / h) == 0
    assert sympy.simplify(held("gqa") / held("mha") - g / h) == 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown cost variant 'flash'"):
        cost.flops("flash")
    with pytest.raises(ValueError, match="phases 'decode', got 'train'"):
        cost.flops("mha", "train")
    with pytest.raises(ValueError, match="activations must be"):
        cost.flops("softmax", activations="sometimes")
    with pytest.raises(ValueError, match="Dp must be binomial"):
        cost.resolve_sizes("linear", {"E": 16, "Dp": 100})
    with pytest.raises(ValueError, match="missing size"):
        cost.evaluate(cost.flops("mha", "decode"), {"b": 1})


# ---- the complexity table, derived ---------------------------------------------------------


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa"])
def test_doc_decode_compute(variant: str) -> None:
    row = cost.complexity(variant, "decode")
    assert same(row.time, b * d**2 + b * n * d)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("mha", d**2 + b * d + b * n * d),
        ("mqa", d**2 + b * d + b * n * d / h),
        ("gqa", d**2 + b * d + b * n * d * g / h),
    ],
)
def test_doc_decode_memory_traffic(variant: str, expected: sympy.Expr) -> None:
    assert same(cost.complexity(variant, "decode").memory, expected)


def test_doc_softmax_time_and_memory() -> None:
    for phase in ("forward", "train"):
        row = cost.complexity("softmax", phase)
        assert same(row.time, N**2 * (D + M))
        assert same(row.memory, N**2 + N * D + N * M)
    traffic = cost.big_o(cost.bytes("softmax", "forward"), cost.get("softmax").assumptions)
    assert same(traffic, N**2 + N * D + N * M)


def test_doc_quadratic_linear_attention_time() -> None:
    for phase in ("forward", "train"):
        assert same(cost.complexity("linear", phase).time, N * D**2 * M)
    # With M ~ D this is the doc's O(N D^3).
    assert same(
        cost.big_o(cost.flops("linear"), cost.get("linear").assumptions + "; M = D"), N * D**3
    )


def test_doc_quadratic_linear_attention_memory_recompute_vs_keep() -> None:
    assert same(
        cost.complexity("linear", "train", activations="recompute").memory, N * D + D**2 * M
    )
    assert same(cost.complexity("linear", "train", activations="keep").memory, N * D**2)


def test_table_has_a_row_per_doc_claim() -> None:
    text = cost.markdown()
    for claim in (
        "O(b d^2 + b n d)",
        "O(d^2 + b d + b n d)",
        "O(d^2 + b d + b n d / h)",
        "O(d^2 + b d + b n d g / h)",
        "O(N^2 D + N^2 M)",
        "O(N^2 + N D + N M)",
        "O(N D^2 M)",
        "O(N D + D^2 M)",
        "O(N D^2)",
    ):
        assert claim in text, claim
    assert len(cost.rows()) == len(cost.table.ROWS)


# ---- Big-O -----------------------------------------------------------------------------------


def test_big_o_drops_dominated_terms_and_constants() -> None:
    expr = 8 * b * d**2 + 4 * b * n * d + 6 * b * h * n + 3 * b * d
    assert same(cost.big_o(expr, "b, n, d >> h"), b * d**2 + b * n * d)


def test_big_o_keeps_terms_of_a_size_that_may_vanish() -> None:
    expr = b * d * (n + 1)
    assert same(cost.big_o(expr, "b, n, d >> 1"), b * n * d)
    assert same(cost.big_o(expr, "b, n, d >> 1; n >= 0"), b * n * d + b * d)


def test_big_o_merges_bounded_factors_by_their_order() -> None:
    expr = d**2 + g * d**2 / h + b * n * d * g / h
    assert same(cost.big_o(expr, "b, n, d >> h, g; g <= h"), d**2 + b * n * d * g / h)
    # Without g <= h neither factor dominates the other.
    assert same(cost.big_o(expr, "b, n, d >> h, g"), d**2 + g * d**2 / h + b * n * d * g / h)


def test_big_o_orders_and_incomparable_terms() -> None:
    assert same(cost.big_o(N * D + N * M, "M <= D"), N * D)
    assert same(cost.big_o(N * D + N * M), N * D + N * M)
    assert same(cost.big_o(N**2 + N * D + D**2), N**2 + N * D + D**2)


def test_big_o_substitutes_in_order_and_expands_binomials() -> None:
    assert same(cost.big_o(N * Dp * M, "Dp = binomial(D + 2, 2)"), N * D**2 * M)
    assert same(cost.big_o(L * S * E, "L = S = N; E = D"), N**2 * D)
    a = Assumptions.parse("L = S = N; b, n >> h, g; g <= h; n >= 0")
    assert a.substitutions == (("L", "N"), ("S", "N"))
    assert a.bounded == frozenset({"h", "g"}) and a.vanishing == frozenset({"n"})
    assert a.order == (("g", "h"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n ~ d", "cannot read assumption"),
        ("x >> 1", "not a size symbol"),
        ("d >> d", "both grow and stay bounded"),
        ("n >= 0; n <= d", "may be 0 takes no order"),
        ("h >> 1; g >> 1; d >> h; g <= h", "both grow and stay bounded"),
        ("b >> h; h <= d", "relates a bounded and a growing"),
    ],
)
def test_bad_assumptions_are_explained(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Assumptions.parse(text)


def test_big_o_needs_positive_monomials() -> None:
    with pytest.raises(ValueError, match="not positive"):
        cost.big_o(N**2 - N)
    with pytest.raises(ValueError, match="not a monomial"):
        cost.big_o(sympy.log(N))
    assert monomials(2 * N**2 * D) == [(2, {"N": 2, "D": 1})]


def test_format_big_o_reads_like_the_doc() -> None:
    assert cost.format_big_o(d**2 + b * d + b * n * d * g / h) == "O(d^2 + b d + b n d g / h)"
    assert cost.format_big_o(N * D**2 * M) == "O(N D^2 M)"


# ---- symbols and check_einsum ----------------------------------------------------------------


def test_symbols_are_ours_not_sympys() -> None:
    assert parse("S + E + N + C") == S + E + SYMBOLS["N"] + C  # not sympy.S, E, N
    assert parse("binomial(E + 2, 2)").subs(E, 16) == 153
    with pytest.raises(ValueError, match="unknown name"):
        parse("H / heads")


def test_check_einsum_returns_the_output_axes() -> None:
    assert cost.check_einsum("bd,hdq->bhq", x="b d", W_q="h d q") == ("b", "h", "q")
    assert cost.check_einsum("bhk,bhnk->bhn", (2, 4, 8), "2 4 n 8") == (2, 4, "n")
    assert cost.check_einsum("bd,dk->bk", torch.zeros(3, 5), torch.zeros(5, 7)) == (3, 7)
    assert cost.check_einsum("ij,jk", "i j", "j k") == ("i", "k")  # implicit output
    assert cost.check_einsum("bgrk,bgnk->bgrn", "b g h/g k", "b g n+1 k") == (
        "b",
        "g",
        "h/g",
        "n+1",
    )


@pytest.mark.parametrize(
    ("equation", "operands", "message"),
    [
        (
            "bd,dq->bhq",
            {"x": "b d", "W_q": "h d q"},
            r"operand 2 \(W_q\) has 3 axes \(h d q\) but subscripts 'dq' name 2",
        ),
        (
            "bd,hdq->bhq",
            {"x": "b d", "W_q": "h e q"},
            r"subscript 'd' is 'd' in operand 1 \(x\) but 'e' in operand 2 \(W_q\)",
        ),
        ("bd,hdq->bhq", {"x": (2, 3), "W_q": (4, 5, 6)}, "subscript 'd' is 3 in operand 1"),
        ("bd,hdq->bhq", {"x": "b d"}, "2 operand subscripts .* but 1 operands"),
        ("bd,hdq->bhz", {"x": "b d", "W_q": "h d q"}, "output subscript 'z' appears in no operand"),
        ("bd,hdq->bbq", {"x": "b d", "W_q": "h d q"}, "output subscript 'b' appears twice"),
        ("b1,hdq->bhq", {"x": "b d", "W_q": "h d q"}, "subscripts must be letters"),
        ("...d,hdq->...hq", {"x": "b d", "W_q": "h d q"}, "not supported"),
    ],
)
def test_check_einsum_explains_the_mismatch(
    equation: str, operands: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cost.check_einsum(equation, **operands)  # type: ignore[arg-type]


def test_check_einsum_compares_expressions_symbolically() -> None:
    assert cost.check_einsum("ab,ba->a", "2*h n", "n h+h") == ("2*h",)
    with pytest.raises(ValueError, match="subscript 'a'"):
        cost.check_einsum("ab,ba->a", "2*h n", "n h+1")
