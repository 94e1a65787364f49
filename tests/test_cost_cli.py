"""attnkit.cost.cli: the ``cost`` command on its own Typer app (and registered on another)."""

from __future__ import annotations

import importlib

import pytest
import typer
from typer.testing import CliRunner

from attnkit.cost.cli import app, register

runner = CliRunner()
WIDE = {"COLUMNS": "220"}  # rich wraps long cells at 80 columns


def test_table_is_derived_and_has_the_doc_rows() -> None:
    result = runner.invoke(app, ["--table"], env=WIDE)
    assert result.exit_code == 0, result.output
    for claim in (
        "O(b d^2 + b n d)",
        "O(d^2 + b d + b n d / h)",
        "O(d^2 + b d + b n d g / h)",
        "O(N^2 D + N^2 M)",
        "O(N^2 + N D + N M)",
        "O(N D^2 M)",
        "O(N D + D^2 M)",
        "O(N D^2)",
    ):
        assert claim in result.output, claim
    assert "b, n, d >> h, g; g <= h; n >= 0" in result.output


def test_table_as_markdown() -> None:
    result = runner.invoke(app, ["--table", "--markdown"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "| mqa | decode | keep | O(b d^2 + b n d) | O(d^2 + b d + b n d / h) |" in result.output


def test_variant_prints_exact_big_o_and_numbers() -> None:
    result = runner.invoke(app, ["mha", "--at", "b=2,d=32,h=4,k=8,v=8,n=16"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "matmul FLOPs  = 2*b*h*(2*d*k + 2*d*v" in result.output  # exact
    assert "O(d^2 + b d + b n d)" in result.output
    assert "sizes b=2 n=16 d=32 h=4 k=8 v=8 w=4" in result.output
    # 2 b (3 d h k + h k (n+1) + h v (n+1) + h v d) matmul FLOPs at these sizes
    assert f"{2 * 2 * (3 * 32 * 32 + 32 * 17 + 32 * 17 + 32 * 32):,}" in result.output


def test_check_counts_flops_and_times_the_real_code() -> None:
    result = runner.invoke(app, ["mqa", "--at", "b=2,d=24,h=4,k=6,v=5,n=9", "--check"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "✓ equal" in result.output and "GFLOP/s" in result.output
    result = runner.invoke(
        app,
        ["softmax", "--phase", "train", "--at", "B=1,H=2,Hk=1,L=24,S=16,E=8,Ev=8", "--check"],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    assert "✓ equal" in result.output
    result = runner.invoke(
        app,
        ["softmax", "--phase", "train", "--activations", "recompute", "--check",
         "--at", "B=1,H=2,Hk=2,L=16,S=16,E=8,Ev=8"],
        env=WIDE,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fused" in result.output and "✓ equal" in result.output


def test_check_pins_the_fast_causal_path() -> None:
    result = runner.invoke(
        app,
        ["linear_fast", "--phase", "train", "--check",
         "--at", "B=1,H=4,Hk=2,L=16,S=16,E=3,Ev=4,C=4"],
        env=WIDE,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "activations recompute" in result.output  # what the fast path does
    assert "✓ equal" in result.output and "not pinned" not in result.output


def test_check_of_an_unpinned_implementation_shows_the_ratio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measure = importlib.import_module("attnkit.cost.measure")  # the package shadows it

    real = measure._RUNNERS[("mqa", "keep")]
    loose = measure.Runner(real.description, False, real.build)
    monkeypatch.setitem(measure._RUNNERS, ("mqa", "keep"), loose)
    result = runner.invoke(app, ["mqa", "--at", "b=2,d=24,h=4,k=6,v=5,n=9", "--check"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "not pinned (1.00x)" in result.output


def test_output_says_what_is_derived_and_what_is_typed() -> None:
    result = runner.invoke(app, ["softmax", "--at", "L=8,S=8"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "derived from bkgle,bkse->bkgls" in result.output  # the scores contraction
    assert "typed: 5 FLOP per element of scaled" in result.output  # softmax's constant
    assert "derived matmuls + typed elementwise" in result.output


def test_no_variant_lists_them() -> None:
    result = runner.invoke(app, [], env=WIDE)
    assert result.exit_code == 0, result.output
    for name in ("softmax", "linear_chunked", "linear_fast", "linear_step", "mha", "mqa", "gqa"):
        assert name in result.output


def test_bad_input_is_rejected_with_a_reason() -> None:
    cases = [
        (["flash"], "unknown variant 'flash'"),
        (["mha", "--phase", "train"], "phases 'decode', got 'train'"),
        (["mha", "--at", "b=two"], "b must be an integer"),
        (["mha", "--at", "x=3"], "expected NAME=INT"),
        (["softmax", "--activations", "always"], "keep"),
        (["softmax", "--dtype", "int8"], "float32"),
        (["linear_chunked", "--at", "L=10,S=10,C=4", "--check"], "must divide"),
        (["linear", "--at", "E=4,Dp=7"], "Dp must be binomial"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args, env=WIDE)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_register_adds_cost_to_another_app() -> None:
    parent = typer.Typer()

    @parent.command()
    def hello() -> None:
        typer.echo("hi")

    register(parent)
    result = runner.invoke(parent, ["cost", "--table", "--markdown"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "| softmax | train | keep |" in result.output
    assert runner.invoke(parent, ["hello"]).output == "hi\n"
