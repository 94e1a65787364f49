"""The shared input checks: each failure names the argument, expectation and value."""

from __future__ import annotations

import pytest
import torch

from attnkit._registry import Registry
from attnkit._timing import format_seconds, time_call
from attnkit._validation import check_choice, check_mask, check_qkv


def _qkv(B=2, H=4, Hk=2, L=5, S=7, E=6, Ev=3, dtype=torch.float32):
    return (
        torch.randn(B, H, L, E, dtype=dtype),
        torch.randn(B, Hk, S, E, dtype=dtype),
        torch.randn(B, Hk, S, Ev, dtype=dtype),
    )


def test_check_qkv_reads_dims() -> None:
    dims = check_qkv(*_qkv())
    assert (dims.B, dims.H, dims.Hk, dims.L, dims.S, dims.E, dims.Ev) == (2, 4, 2, 5, 7, 6, 3)
    assert dims.group_size == 2


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dims \[B, H, L, E\]"),
        (lambda q, k, v: (q, k[..., None], v), ValueError, r"k must have 4 dims"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"batch size B: q has B=2, k has B=1"),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, r"k has 2, v has 1"),
        (lambda q, k, v: (q, k[..., :5], v), ValueError, r"q has E=6, k has E=5"),
        (lambda q, k, v: (q, k, v[:, :, :6]), ValueError, r"k has S=7, v has S=6"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, r"H=3, k/v have Hk=2"),
        (lambda q, k, v: (q.long(), k, v), TypeError, r"q must have a floating dtype"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"must share one dtype"),
        (lambda q, k, v: ("q", k, v), TypeError, r"q must be a torch.Tensor"),
    ],
    ids=["rank-q", "rank-k", "batch", "heads-kv", "width", "length", "gqa", "int", "mixed", "type"],
)
def test_check_qkv_errors(change, error, match) -> None:
    with pytest.raises(error, match=match):
        check_qkv(*change(*_qkv()))


def test_check_qkv_gqa_needs_permission() -> None:
    with pytest.raises(ValueError, match="enable_gqa=True"):
        check_qkv(*_qkv(), allow_gqa=False)


@pytest.mark.parametrize("shape", [(5, 7), (1, 7), (2, 1, 1, 7), (2, 4, 5, 7), (4, 5, 7)])
def test_check_mask_accepts_broadcastable(shape) -> None:
    dims = check_qkv(*_qkv())
    mask = torch.ones(shape, dtype=torch.bool)
    assert check_mask(mask, dims) is mask


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((5, 6), "axis S has size 6, expected 7 or 1"),
        ((3, 5, 7), "axis H has size 3"),
        ((7,), "2 to 4 dims"),
        ((1, 2, 4, 5, 7), "2 to 4 dims"),
    ],
)
def test_check_mask_rejects_other_shapes(shape, match) -> None:
    dims = check_qkv(*_qkv())
    with pytest.raises(ValueError, match=match):
        check_mask(torch.ones(shape, dtype=torch.bool), dims)


def test_check_mask_rejects_int_dtype() -> None:
    dims = check_qkv(*_qkv())
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        check_mask(torch.ones(5, 7, dtype=torch.int64), dims)


def test_check_choice() -> None:
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="unknown mode 'c'; expected one of 'a', 'b'"):
        check_choice("mode", "c", ("a", "b"))


def test_registry() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("one")(1)
    assert reg.get("one") == 1 and "one" in reg and list(reg) == ["one"]
    with pytest.raises(ValueError, match="unknown thing 'two'; known: 'one'"):
        reg.get("two")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one")(2)
    with pytest.raises(TypeError, match="name must be a str"):
        reg.get(3)  # type: ignore[arg-type]


def test_time_call_counts_calls() -> None:
    calls = []
    t = time_call(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and t.repeats == 5 and t.low <= t.median <= t.high
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_call(lambda: None, repeats=0)


def test_format_seconds() -> None:
    assert format_seconds(1.5e-5) == "15.0 µs"
    assert format_seconds(0.0123) == "12.30 ms"
    assert format_seconds(2.0) == "2.00 s"


def test_check_int() -> None:
    from attnkit._validation import check_int

    assert check_int("n", 3, 1) == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int("n", True, 1)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        check_int("n", 2.0, 1)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0, 1)
