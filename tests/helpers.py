"""Helpers shared by the op tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def make_qkv(B, H, Hk, L, S, E, Ev, dtype=torch.float32, positive=False):
    """Random q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev].

    ``positive`` keeps q.k > 0, so non-positive kernels and maps (identity, relu,
    polynomial) keep their denominators > 0.
    """
    q = torch.randn(B, H, L, E, dtype=dtype)
    k = torch.randn(B, Hk, S, E, dtype=dtype)
    v = torch.randn(B, Hk, S, Ev, dtype=dtype)
    if positive:
        q, k = q.abs() + 0.05, k.abs() + 0.05
    return q, k, v


def shape_id(s) -> str:
    """Readable parametrize id of a (B, H, Hk, L, S, E, Ev) shape."""
    B, H, Hk, L, S, E, Ev = s
    return f"B{B}-H{H}-Hk{Hk}-L{L}-S{S}-E{E}-Ev{Ev}"


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two float16/bfloat16 tensors.

    The bit patterns, read as sign-magnitude integers and mapped onto one monotone
    line (+0 and -0 both at 0), differ by the number of representable values between
    a and b. 0 means equal, 1 means neighbours.
    """
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"ulp_distance needs two float16 or bfloat16 tensors, got {a.dtype}, {b.dtype}"
        )

    def key(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i + 32768), i)

    return (key(a) - key(b)).abs()
