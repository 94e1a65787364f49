"""Input checks shared by every public op.

Every failure raises ``ValueError`` (shapes, values, names) or ``TypeError``
(dtypes, argument kinds) whose message names the argument, what was expected and
what was given. No ``assert``: asserts vanish under ``python -O``.

Shape legend used across attnkit (PyTorch's SDPA layout)::

    q [B, H, L, E]     B batch, H query heads, L query length, E key width
    k [B, Hk, S, E]    Hk key/value heads (H % Hk == 0 for GQA), S key length
    v [B, Hk, S, Ev]   Ev value width
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object) -> Tensor:
    """Return ``x`` if it is a tensor, else raise TypeError naming it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, x: Tensor) -> None:
    """Raise TypeError unless ``x`` has a floating dtype attnkit supports."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


def check_rank(name: str, x: Tensor, legend: str) -> None:
    """Raise ValueError unless ``x`` has as many dims as ``legend`` names.

    ``legend`` is a space-separated list of axis names such as ``"B H L E"``.
    """
    axes = legend.split()
    if x.dim() != len(axes):
        raise ValueError(
            f"{name} must have {len(axes)} dims [{', '.join(axes)}], "
            f"got {x.dim()} dims with shape {tuple(x.shape)}"
        )


def check_same_dtype(**tensors: Tensor) -> None:
    """Raise TypeError unless all tensors share one dtype."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"{', '.join(dtypes)} must share one dtype, got {listed}")


def check_same_device(**tensors: Tensor) -> None:
    """Raise ValueError unless all tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"{', '.join(devices)} must be on one device, got {listed}")


class QKVDims(NamedTuple):
    """Sizes read off validated q, k, v (see the module's shape legend)."""

    B: int
    H: int
    Hk: int
    L: int
    S: int
    E: int
    Ev: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA, H for MQA)."""
        return self.H // self.Hk


def check_qkv(q: object, k: object, v: object, *, allow_gqa: bool = True) -> QKVDims:
    """Validate the SDPA layout of q, k, v and return their sizes.

    With ``allow_gqa`` the query heads H must be a multiple of the key/value heads
    Hk; without it H must equal Hk.
    """
    # Fast path: valid input costs a handful of attribute reads (sdpa must stay within
    # a few percent of calling torch directly); any doubt falls through to the
    # message-building checks below.
    if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
        qs, ks, vs = q.shape, k.shape, v.shape
        if (
            len(qs) == 4
            and len(ks) == 4
            and len(vs) == 4
            and q.dtype in FLOAT_DTYPES
            and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device
            and qs[0] == ks[0] == vs[0]
            and ks[1] == vs[1]
            and qs[3] == ks[3]
            and ks[2] == vs[2]
            and ks[1] > 0
            and (qs[1] == ks[1] or (allow_gqa and qs[1] % ks[1] == 0))
        ):
            return QKVDims(qs[0], qs[1], ks[1], qs[2], ks[2], qs[3], vs[3])
    q = check_tensor("q", q)
    k = check_tensor("k", k)
    v = check_tensor("v", v)
    check_rank("q", q, "B H L E")
    check_rank("k", k, "B Hk S E")
    check_rank("v", v, "B Hk S Ev")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    B, H, L, E = q.shape
    Bk, Hk, S, Ek = k.shape
    Bv, Hv, Sv, Ev = v.shape
    if Bk != B or Bv != B:
        raise ValueError(
            f"q, k, v must share the batch size B: q has B={B}, k has B={Bk}, v has B={Bv}"
        )
    if Hv != Hk:
        raise ValueError(f"k and v must have the same number of heads: k has {Hk}, v has {Hv}")
    if Ek != E:
        raise ValueError(f"q and k must share the key width E: q has E={E}, k has E={Ek}")
    if Sv != S:
        raise ValueError(f"k and v must share the key length S: k has S={S}, v has S={Sv}")
    if H != Hk:
        if not allow_gqa:
            raise ValueError(
                f"q has {H} heads but k/v have {Hk}; pass enable_gqa=True for grouped-query "
                "attention"
            )
        if Hk == 0 or H % Hk != 0:
            raise ValueError(
                f"grouped-query attention needs the query heads to be a multiple of the "
                f"key/value heads: q has H={H}, k/v have Hk={Hk} (H % Hk = {H % Hk if Hk else H})"
            )
    return QKVDims(B=B, H=H, Hk=Hk, L=L, S=S, E=E, Ev=Ev)


def check_mask(attn_mask: object, dims: QKVDims, name: str = "attn_mask") -> Tensor | None:
    """Validate an attention mask against [B, H, L, S].

    The mask must be bool (True = attend) or the query's floating dtype (added to
    the scores). It may have fewer than 4 dims and size-1 axes, which broadcast
    like SDPA's masks; any other size is an error, never a silent broadcast.
    """
    if attn_mask is None:
        return None
    mask = check_tensor(name, attn_mask)
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be bool (True = attend) or floating (added to the scores), "
            f"got {mask.dtype}"
        )
    target = (dims.B, dims.H, dims.L, dims.S)
    if mask.dim() > 4 or mask.dim() < 2:
        raise ValueError(
            f"{name} must have 2 to 4 dims broadcastable to [B, H, L, S] = {list(target)}, "
            f"got shape {tuple(mask.shape)}"
        )
    for have, want, axis in zip(
        reversed(mask.shape), reversed(target), ("S", "L", "H", "B"), strict=False
    ):
        if have not in (1, want):
            raise ValueError(
                f"{name} of shape {tuple(mask.shape)} does not broadcast to [B, H, L, S] = "
                f"{list(target)}: axis {axis} has size {have}, expected {want} or 1"
            )
    return mask


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    """Raise ValueError unless ``value`` is one of the string ``choices``."""
    if not isinstance(value, str) or value not in choices:
        known = ", ".join(map(repr, choices))
        raise ValueError(f"unknown {name} {value!r}; expected one of {known}")
    return value
