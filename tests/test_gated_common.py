"""Input checks of the decay / delta-rule ops: every bad input names the argument."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.ops.gated_common import l2norm
from gated_inputs import make_inputs


def delta(q, k, v, beta, g=None, **kw):
    return attnkit.delta_rule_attention(q, k, v, beta, g, **kw)


def test_growing_gate_is_rejected_with_its_value() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 5, 3, 2, dtype=torch.float32)
    assert g is not None
    bad = g.clone()
    bad[0, 0, 3] = 0.25
    for call in (
        lambda: attnkit.gated_linear_attention(q, k, v, bad),
        lambda: delta(q, k, v, beta, bad),
        lambda: attnkit.delta_rule_step(
            q[:, :, :1], k[:, :, :1], v[:, :, :1], beta[:, :, :1], bad[:, :, 3:4]
        ),
    ):
        with pytest.raises(ValueError, match=r"g must be finite and in \(-inf, 0.0\].*0\.25"):
            call()


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_gates_are_rejected(value: float) -> None:
    q, k, v, g, _, _ = make_inputs(1, 1, 1, 1, 5, 3, 2, dtype=torch.float32)
    assert g is not None
    g[0, 0, 2] = value
    with pytest.raises(ValueError, match="g must be finite"):
        attnkit.gated_linear_attention(q, k, v, g)


@pytest.mark.parametrize("value", [-0.1, 2.5, float("nan")])
def test_beta_outside_zero_two_is_rejected(value: float) -> None:
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 5, 3, 2, dtype=torch.float32)
    beta[0, 0, 1] = value
    with pytest.raises(ValueError, match=r"beta must be finite"):
        delta(q, k, v, beta, g)


def test_beta_at_the_bounds_is_accepted() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 4, 3, 2, dtype=torch.float32)
    beta = torch.tensor([[[0.0, 1.0, 2.0, 2.0]]])
    o, _ = delta(q, k, v, beta, g)
    assert torch.isfinite(o).all()


def test_head_counts_need_enable_gqa() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 2, 2, 4, 5, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q: 2, k: 2, v: 4.*enable_gqa=True"):
        delta(q, k, v, beta, g)
    with pytest.raises(ValueError, match=r"q: 2, k: 2, v: 4.*enable_gqa=True"):
        attnkit.gated_linear_attention(q, k, v, g)
    delta(q, k, v, beta, g, enable_gqa=True)  # fine


def test_incompatible_head_counts_are_explained() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 3, 3, 4, 5, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"Hv=4 heads, k has Hk=3"):
        delta(q, k, v, beta, g, enable_gqa=True)
    q, k, v, g, beta, _ = make_inputs(1, 3, 2, 4, 5, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q has Hq=3, v has Hv=4"):
        delta(q, k, v, beta, g, enable_gqa=True)


def test_shape_mismatches_name_the_argument() -> None:
    q, k, v, g, beta, S0 = make_inputs(2, 2, 2, 2, 5, 3, 4, dtype=torch.float32)
    assert g is not None
    with pytest.raises(ValueError, match=r"g must have shape \[B, Hv, L\] = \[2, 2, 5\]"):
        attnkit.gated_linear_attention(q, k, v, g[:, :, :4])
    with pytest.raises(ValueError, match=r"g must have shape \[B, Hv, L, D\] = \[2, 2, 5, 3\]"):
        attnkit.gated_linear_attention(q, k, v, g[..., None].expand(2, 2, 5, 4))
    with pytest.raises(ValueError, match=r"beta must have shape \[B, Hv, L\]"):
        delta(q, k, v, beta[:1], g)
    with pytest.raises(ValueError, match=r"sequence length L.*q 5, k 4"):
        delta(q, k[:, :, :4], v, beta, g)
    with pytest.raises(ValueError, match=r"key width D: q has D=3, k has D=2"):
        delta(q, k[..., :2], v, beta, g)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, Hv, D, M\] = "):
        delta(q, k, v, beta, g, initial_state=S0[..., :3])
    with pytest.raises(ValueError, match=r"state must have shape"):
        attnkit.delta_rule_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], beta[:, :, :1], state=S0[:1])
    with pytest.raises(ValueError, match=r"takes one token \(L = 1\), got L=5"):
        attnkit.delta_rule_step(q, k, v, beta)
    with pytest.raises(ValueError, match=r"q must have 4 dims"):
        delta(q[0], k, v, beta)


def test_dtypes_are_checked() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 5, 3, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match="q must have a floating dtype"):
        delta(q.to(torch.int64), k, v, beta, g)
    with pytest.raises(TypeError, match="beta must have a floating dtype"):
        delta(q, k, v, beta.to(torch.int32), g)
    with pytest.raises(TypeError, match="g must have a floating dtype"):
        delta(q, k, v, beta, torch.zeros(1, 1, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        delta(q, k.double(), v, beta, g)
    with pytest.raises(TypeError, match=r"g must be a torch\.Tensor"):
        attnkit.gated_linear_attention(q, k, v, None)  # type: ignore[arg-type]
    # gates may come in another floating dtype (models compute them in fp32)
    o, _ = delta(q.half(), k.half(), v.half(), beta, g)
    assert o.dtype == torch.float16


def test_scalar_arguments_are_checked() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 5, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int, got 0"):
        delta(q, k, v, beta, g, chunk_size=0)
    with pytest.raises(ValueError, match="scale must be finite"):
        delta(q, k, v, beta, g, scale=float("nan"))
    with pytest.raises(TypeError, match="use_qk_l2norm must be a bool"):
        delta(q, k, v, beta, g, use_qk_l2norm=1)
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        delta(q, k, v, beta, g, enable_gqa="yes")


def test_default_scale_is_one_over_sqrt_d() -> None:
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 1, 6, 9, 2)
    o, _ = delta(q, k, v, beta, g)
    o3, _ = delta(q, k, v, beta, g, scale=1 / 3)
    torch.testing.assert_close(o, o3, atol=0, rtol=0)


def test_l2norm_matches_hf() -> None:
    x = torch.randn(3, 7)
    expect = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(l2norm(x), expect, atol=0, rtol=0)


def test_value_checks_do_not_sync_off_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off the CPU the range checks are queued with torch._assert_async, never read back.
    from attnkit.ops import gated_common

    calls: list[str] = []
    real = torch._assert_async

    def spy(cond: torch.Tensor, msg: str) -> None:
        calls.append(msg)
        real(cond, msg)

    class FakeDevice:
        type = "meta"

    g = torch.tensor([[[-1.0, 0.5]]])

    class Wrapped(torch.Tensor):
        pass

    monkeypatch.setattr(torch, "_assert_async", spy)
    x = g.as_subclass(Wrapped)
    monkeypatch.setattr(Wrapped, "device", property(lambda self: FakeDevice()), raising=False)
    with pytest.raises(RuntimeError, match="g must be finite"):
        gated_common.check_gate(x)
    assert calls and "g must be finite" in calls[0]
