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
