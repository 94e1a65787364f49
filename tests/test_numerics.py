"""attnkit._numerics: how the denominator and range checks run on each device.

On a CPU a failing check raises ValueError with counts (the op tests pin those
messages). On a GPU, and under torch.compile, a check must not read its result on the
host: it is queued with torch._assert_async. There is no GPU here, so the deferred path
is forced on the CPU and every host read of a tensor is made to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import attnkit
from attnkit import _numerics, feature_maps
from helpers import make_qkv

Call = Callable[[], Any]


def _calls(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: Any, **kw: Any
) -> dict[str, Call]:
    step = (q[:, :, :1], k[:, :, :1], v[:, :, :1])
    return {
        "linear-full": lambda: attnkit.linear_attention(q, k, v, phi, **kw),
        "linear-causal-fast": lambda: attnkit.linear_attention(q, k, v, phi, is_causal=True, **kw),
        "linear-causal-reference": lambda: attnkit.linear_attention(
            q, k, v, phi, is_causal=True, implementation="reference", **kw
        ),
        "linear-step": lambda: attnkit.linear_attention_step(*step, None, phi, **kw),
        "kernel": lambda: attnkit.kernel_attention(
            q, k, v, sim="linear", sim_kwargs={"feature_map": phi}, **kw
        ),
    }


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, str]]:
    """Force the GPU policy on the CPU; record what is queued; forbid host reads."""
    queued: list[tuple[bool, str]] = []

    def record(ok: torch.Tensor, message: str) -> None:
        queued.append((bool(ok.detach().clone().numpy()), message))  # numpy: no Tensor.__bool__

    def host_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a check read a tensor on the host")

    monkeypatch.setattr(_numerics, "_deferred", lambda x: True)
    monkeypatch.setattr(_numerics, "_fail_async", record)
    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    monkeypatch.setattr(torch.Tensor, "item", host_read)
    return queued


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_deferred_checks_queue_and_never_read_on_the_host(deferred, dtype) -> None:
    """Valid input: one queued check per denominator (and per half output), all true."""
    q, k, v = make_qkv(1, 2, 2, 9, 9, 4, 3, dtype=dtype)
    for name, call in _calls(q, k, v, "elu").items():
        deferred.clear()
        call()
        assert deferred and all(ok for ok, _ in deferred), name
    # A signed map's denominator (q.k < 0 everywhere): the failure is queued, not raised.
    for name, call in _calls(q.abs(), -k.abs(), v, "identity").items():
        deferred.clear()
        call()
        assert any(not ok and "a denominator is <= 0 or not finite" in m for ok, m in deferred), (
            name
        )


def test_queued_failure_surfaces_as_the_assertion_message(monkeypatch) -> None:
    """What a GPU user eventually sees: torch._assert_async with the op and the advice."""
    monkeypatch.setattr(_numerics, "_deferred", lambda x: True)
    q, k, v = make_qkv(1, 1, 1, 5, 5, 3, 2)
    with pytest.raises(RuntimeError, match=r"linear_attention: a denominator .*pass eps="):
        attnkit.linear_attention(q, k, v, "identity")
    with pytest.raises(RuntimeError, match=r"kernel_attention: a denominator"):
        attnkit.kernel_attention(q, k, v, sim="linear", sim_kwargs={"feature_map": "identity"})


def test_cpu_checks_count_only_when_they_fail(monkeypatch) -> None:
    """On the CPU a passing check reads one 0-d result; counting happens on failure only."""
    sums: list[int] = []
    real_sum = torch.Tensor.sum

    def counting_sum(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.dtype == torch.bool:
            sums.append(1)
        return real_sum(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", counting_sum)
    q, k, v = make_qkv(1, 2, 2, 9, 9, 4, 3)
    for call in _calls(q, k, v, "elu").values():
        call()
    assert sums == []
    with pytest.raises(ValueError, match="rows have a denominator <= 0"):
        attnkit.linear_attention(q, k, v, "identity")
    assert sums


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_calls_do_not_synchronise() -> None:  # pragma: no cover - no GPU in CI here
    dev = torch.device("cuda")
    q, k, v = (t.to(dev) for t in make_qkv(1, 2, 2, 64, 64, 8, 8))
    phi = feature_maps.get("favor", dim=8, seed=0).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in ("elu", "taylor"):
            for call in _calls(q, k, v, name).values():
                call()
        for call in _calls(q, k, v, phi).values():
            call()
        for call in _calls(q.half(), k.half(), v.half(), "identity", eps=1e-6).values():
            call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
