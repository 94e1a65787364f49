"""Cost model of decay attention and the delta rule: counted FLOPs == the model's, exactly."""

from __future__ import annotations

import pytest

import attnkit.cost as cost

CHUNKED = {"B": 2, "Hv": 3, "G": 2, "L": 24, "D": 5, "M": 4, "C": 8}
STEP = {"B": 2, "Hv": 3, "G": 2, "D": 5, "M": 4}


@pytest.mark.parametrize(
    ("variant", "phase", "sizes"),
    [
        ("gla_chunked", "forward", CHUNKED),
        ("gla_chunked", "train", CHUNKED),
        ("gla_chunked", "forward", {**CHUNKED, "G": 1, "L": 7, "C": 7}),
        ("gated_delta_chunked", "forward", CHUNKED),
        ("gated_delta_chunked", "forward", {**CHUNKED, "Hv": 1, "G": 1, "L": 48, "C": 16}),
        ("gla_step", "decode", STEP),
        ("gated_delta_step", "decode", STEP),
        ("gated_delta_step", "decode", {**STEP, "G": 1}),
    ],
)
def test_counted_matmul_flops_equal_the_model(variant: str, phase: str, sizes: dict) -> None:
    values = cost.resolve_sizes(variant, sizes)
    measured = cost.measure(variant, values, phase, timed=False)
    assert measured.runner.pinned
    assert measured.flops == cost.matmul_flops_at(variant, values, phase) > 0


def test_delta_training_count_is_a_lower_bound() -> None:
    # autograd's backward of the triangular solve runs matmuls the model does not declare
    values = cost.resolve_sizes("gated_delta_chunked", CHUNKED)
    counted = cost.measure("gated_delta_chunked", values, "train", timed=False).flops
    assert counted > cost.matmul_flops_at("gated_delta_chunked", values, "train")


def test_big_o() -> None:
    N, D, M, C = (cost.SYMBOLS[x] for x in "NDMC")
    for variant in ("gla_chunked", "gated_delta_chunked"):
        v = cost.get(variant)
        time = cost.big_o(cost.flops(variant, "forward").subs(cost.SYMBOLS["L"], N), v.assumptions)
        assert cost.format_big_o(time) == "O(N D M)"
    for variant in ("gla_step", "gated_delta_step"):
        v = cost.get(variant)
        assert cost.format_big_o(cost.big_o(cost.bytes(variant, "decode"), v.assumptions)) == (
            "O(D M)"
        )
    # the delta rule adds the Gram matrix, [W, U] = T rhs and W S to decay attention
    extra = cost.flops("gated_delta_chunked", matmul_only=True) - cost.flops(
        "gla_chunked", matmul_only=True
    )
    B, Hv, L = (cost.SYMBOLS[x] for x in ("B", "Hv", "L"))
    assert (extra - 2 * B * Hv * L * (2 * C * D + C * M + D * M)).expand() == 0


@pytest.mark.parametrize("C", [1, 4, 64])
def test_useful_flops_are_the_models_minus_the_masked_triangles(C: int) -> None:
    from attnkit.bench.cases_gated import useful_flops

    L, D, M = 8 * C, 12, 10
    sizes = {"B": 1, "Hv": 1, "G": 1, "L": L, "D": D, "M": M, "C": C}
    model = {
        v: cost.evaluate(cost.flops(v, "forward", matmul_only=True), sizes)
        for v in ("gla_chunked", "gated_delta_chunked")
    }
    n = L // C
    upper = C * (C - 1) // 2  # pairs above the diagonal of a chunk
    # decay: Q K^T and P V skip the upper triangle
    assert useful_flops(L, D, M, C, heads=1, delta=False) == model[
        "gla_chunked"
    ] - 2 * n * upper * (D + M)
    # delta rule: also T [K, V] (T lower-triangular) and K K^T (strictly lower: diagonal too)
    masked = 2 * n * (upper * (D + M) + upper * (D + M) + (upper + C) * D)
    assert useful_flops(L, D, M, C, heads=1, delta=True) == model["gated_delta_chunked"] - masked
