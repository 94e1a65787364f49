"""Random inputs for the decay / delta-rule tests (imported as ``gated_inputs``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Inputs(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    g: Tensor | None
    beta: Tensor
    S0: Tensor


def make_inputs(
    B: int = 2,
    Hq: int = 2,
    Hk: int = 2,
    Hv: int = 2,
    L: int = 13,
    D: int = 6,
    M: int = 5,
    *,
    gate: str | None = "scalar",  # None, "scalar" or "channel"
    g_min: float = -3.0,
    beta_max: float = 1.0,
    unit_keys: bool = True,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> Inputs:
    """q [B, Hq, L, D], k [B, Hk, L, D], v [B, Hv, L, M], g in [g_min, 0], beta in [0, beta_max]."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rand(B, Hq, L, D)
    k = rand(B, Hk, L, D)
    if unit_keys:
        k = torch.nn.functional.normalize(k, dim=-1)
    v = rand(B, Hv, L, M)
    g: Tensor | None = None
    if gate == "scalar":
        g = torch.rand(B, Hv, L, generator=gen, dtype=torch.float64) * g_min
    elif gate == "channel":
        g = torch.rand(B, Hv, L, D, generator=gen, dtype=torch.float64) * g_min
    beta = torch.rand(B, Hv, L, generator=gen, dtype=torch.float64) * beta_max
    S0 = rand(B, Hv, D, M) * 0.5
    cast = [t.to(dtype) for t in (q, k, v)]
    return Inputs(
        *cast,
        None if g is None else g.to(dtype),
        beta.to(dtype),
        S0.to(torch.promote_types(dtype, torch.float32)),
    )


def leaves(inp: Inputs) -> Inputs:
    """Detached copies that require grad (g stays None)."""

    def leaf(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().clone().requires_grad_(True)

    return Inputs(*(leaf(t) for t in inp))  # type: ignore[arg-type]


def outputs_and_grads(
    fn, inp: Inputs, *, seed: int = 1
) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:
    """Run ``fn(q, k, v, g, beta, S0) -> (o, S)`` on fresh leaves; backprop fixed random
    gradients of o and S; return o, S and the gradient of every input (None if absent)."""
    x = leaves(inp)
    o, S = fn(*x)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    torch.autograd.backward([o, S], [do, dS])
    grads = {
        name: (None if t is None else t.grad)
        for name, t in zip(("q", "k", "v", "g", "beta", "S0"), x, strict=True)
    }
    return o.detach(), S.detach(), grads


def assert_same(fast, ref, *, atol: float, rtol: float, skip: tuple[str, ...] = ()) -> None:
    """Outputs, final states and all gradients of two :func:`outputs_and_grads` results."""
    torch.testing.assert_close(fast[0], ref[0], atol=atol, rtol=rtol, msg="output")
    torch.testing.assert_close(fast[1], ref[1], atol=atol, rtol=rtol, msg="final state")
    for name, g_ref in ref[2].items():
        if name in skip:
            continue
        g_fast = fast[2][name]
        if g_ref is None or g_fast is None:  # None only where the gradient is all zero
            for a, b in ((g_ref, g_fast), (g_fast, g_ref)):
                if a is None and b is not None:
                    assert not b.any(), f"d{name}: None in one, nonzero in the other"
            continue
        torch.testing.assert_close(g_fast, g_ref, atol=atol, rtol=rtol, msg=f"d{name}")
