"""What decay (gated linear) attention and the delta rule share: checks, head layouts, gates.

Both families carry a state S [D, M] per *state head* through the sequence,
S_t = F_t(S_{t-1}) + (a write of v_t at key k_t), and read o_t = S_t^T (scale q_t).
This module validates their inputs (shapes, dtypes, gate values), maps the head
layouts real models use onto state heads, and holds the helpers every form (the
recurrent references, the chunked fast path, the one-token steps) needs.

Head layouts (all in PyTorch's SDPA layout; ``enable_gqa=True`` for any of them)::

    q [B, Hq, L, D]   k [B, Hk, L, D]   v [B, Hv, L, M]   g, beta [B, Hv, L(, D)]
    state [B, Hv, D, M]: one state per value head ("state head")

- grouped value heads (Qwen3-Next, Qwen3.5): Hq = Hk < Hv = r Hk; each q/k head
  serves r consecutive value heads (state head j reads q/k head j // r, as HF's
  ``repeat_interleave``);
- grouped query heads (SDPA's GQA): Hq = G Hv > Hv = Hk; G consecutive query heads
  read one state (query head i reads state head i // G);
- in general Hv % Hk == 0 and either Hv % Hq == 0 or Hq % Hv == 0. The output has
  Ho = max(Hq, Hv) heads: one per state head, or one per query head when there
  are more query heads than states.

Value checks without a host sync: on a CPU the gate and beta ranges are checked
with one ``torch.aminmax`` each and raise ``ValueError`` with the offending value;
on any other device they go through ``torch._assert_async``, which raises
asynchronously (a device-side assert surfaces at a later synchronisation) and
never stalls the stream.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit._validation import (
    check_float,
    check_rank,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

__all__ = [
    "BETA_MAX",
    "L2NORM_EPS",
    "GatedDims",
    "acc_dtype",
    "check_bool",
    "check_chunk_size",
    "check_gated_inputs",
    "check_scale",
    "check_state",
    "expand_keys",
    "l2norm",
    "merge_output_heads",
    "queries_per_state",
]

#: The largest beta accepted: I - beta k k^T is non-expansive for unit keys iff
#: 0 <= beta <= 2 (its eigenvalue along k is 1 - beta); some models use 2 sigmoid(x).
BETA_MAX = 2.0
#: ``use_qk_l2norm``: x * rsqrt(sum(x^2) + eps), the eps of fla and HF transformers.
L2NORM_EPS = 1e-6


class GatedDims(NamedTuple):
    """Sizes of validated inputs (see the module's head layouts)."""

    B: int
    Hq: int
    Hk: int
    Hv: int
    L: int
    D: int
    M: int
    per_channel: bool  # g is [B, Hv, L, D] (GLA, KDA) rather than [B, Hv, L]

    @property
    def G(self) -> int:
        """Query heads per state head (1 unless Hq > Hv)."""
        return max(1, self.Hq // self.Hv)

    @property
    def Ho(self) -> int:
        """Output heads: max(Hq, Hv)."""
        return max(self.Hq, self.Hv)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and fp32 inputs, fp64 for fp64: the state's dtype."""
    return torch.promote_types(dtype, torch.float32)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_scale(scale: object, D: int) -> float:
    """``scale`` as a float; None -> 1/sqrt(D) (fla's and HF's convention)."""
    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_chunk_size(chunk_size: object, default: int) -> int:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size


def _heads_error(dims: tuple[int, int, int], enable_gqa: bool) -> str | None:
    Hq, Hk, Hv = dims
    if Hq == Hk == Hv:
        return None
    if not enable_gqa:
        return (
            f"q, k, v have different head counts (q: {Hq}, k: {Hk}, v: {Hv}); pass "
            "enable_gqa=True for grouped value heads (q/k heads serving consecutive value "
            "heads) or grouped query heads"
        )
    if Hk == 0 or Hv % Hk != 0:
        return (
            f"each key head must serve a whole number of value (state) heads: v has "
            f"Hv={Hv} heads, k has Hk={Hk} (Hv % Hk must be 0)"
        )
    if Hq == 0 or (Hv % Hq != 0 and Hq % Hv != 0):
        return (
            f"query heads must divide or be a multiple of the value (state) heads: q has "
            f"Hq={Hq}, v has Hv={Hv}"
        )
    return None


def _check_range(
    name: str, x: Tensor, low: float, high: float, low_inclusive: bool, what: str
) -> None:
    """Raise unless every element is finite and in [low, high] (or (low, high])."""
    if x.numel() == 0:
        return
    lo_t, hi_t = torch.aminmax(x.detach())
    if x.device.type != "cpu":
        # No host sync: the assert is queued on the device and fires asynchronously.
        ok_lo = lo_t >= low if low_inclusive else lo_t > low
        torch._assert_async(
            torch.logical_and(ok_lo, hi_t <= high),
            f"{name} must be finite and in {'[' if low_inclusive else '('}{low}, {high}] ({what})",
        )
        return
    lo, hi = float(lo_t), float(hi_t)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} must be finite ({what}), got NaN")
    bad_lo = lo < low or (not low_inclusive and lo == low)
    if bad_lo or hi > high or math.isinf(hi):
        bracket = "[" if low_inclusive else "("
        raise ValueError(
            f"{name} must be finite and in {bracket}{low}, {high}] ({what}), got values in "
            f"[{lo:g}, {hi:g}]"
        )


def check_gate(g: Tensor) -> None:
    """g <= 0 and finite: the state decays by exp(g) <= 1 per token (never grows)."""
    _check_range(
        "g", g, -math.inf, 0.0, False, "a log-space decay: exp(g) > 1 would grow the state"
    )


def check_beta(beta: Tensor) -> None:
    """0 <= beta <= 2: I - beta k k^T is non-expansive for unit keys only there."""
    _check_range(
        "beta",
        beta,
        0.0,
        BETA_MAX,
        True,
        "I - beta k k^T is non-expansive for unit keys only for 0 <= beta <= 2",
    )


def _check_side(name: str, x: Tensor, want: tuple[int, ...], legend: str) -> None:
    check_float(name, x)
    if tuple(x.shape) != want:
        raise ValueError(f"{name} must have shape [{legend}] = {list(want)}, got {tuple(x.shape)}")


def check_gated_inputs(
    q: object,
    k: object,
    v: object,
    g: object,
    beta: object,
    *,
    enable_gqa: bool,
    need_g: bool,
    need_beta: bool,
) -> GatedDims:
    """Validate q, k, v (and the gates g, beta where given) and return their sizes.

    q, k, v must share dtype, device, batch and length; q and k the key width. g is
    [B, Hv, L] or [B, Hv, L, D] with values <= 0; beta [B, Hv, L] in [0, 2]. Gates may
    have any floating dtype (they are used in the accumulation dtype).
    """
    q = check_tensor("q", q)
    k = check_tensor("k", k)
    v = check_tensor("v", v)
    check_rank("q", q, "B Hq L D")
    check_rank("k", k, "B Hk L D")
    check_rank("v", v, "B Hv L M")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    B, Hq, L, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    Bv, Hv, Lv, M = v.shape
    if not B == Bk == Bv:
        raise ValueError(f"q, k, v must share the batch size B: got q {B}, k {Bk}, v {Bv}")
    if not L == Lk == Lv:
        raise ValueError(
            f"q, k, v must share the sequence length L (causal, one state): got q {L}, "
            f"k {Lk}, v {Lv}"
        )
    if Dk != D:
        raise ValueError(f"q and k must share the key width D: q has D={D}, k has D={Dk}")
    err = _heads_error((Hq, Hk, Hv), check_bool("enable_gqa", enable_gqa))
    if err:
        raise ValueError(err)
    per_channel = False
    if g is None:
        if need_g:
            raise TypeError("g must be a torch.Tensor of log-space decays, got None")
    else:
        g = check_tensor("g", g)
        check_float("g", g)
        check_same_device(q=q, g=g)
        if g.dim() == 4:
            _check_side("g", g, (B, Hv, L, D), "B, Hv, L, D")
            per_channel = True
        else:
            _check_side("g", g, (B, Hv, L), "B, Hv, L")
        check_gate(g)
    if need_beta:
        beta = check_tensor("beta", beta)
        check_float("beta", beta)
        check_same_device(q=q, beta=beta)
        _check_side("beta", beta, (B, Hv, L), "B, Hv, L")
        check_beta(beta)
    return GatedDims(B, Hq, Hk, Hv, L, D, M, per_channel)


def check_state(
    name: str, state: object, dims: GatedDims, device: torch.device, acc: torch.dtype
) -> Tensor:
    """Validate a state [B, Hv, D, M] and return it in ``acc``."""
    S = check_tensor(name, state)
    want = (dims.B, dims.Hv, dims.D, dims.M)
    if tuple(S.shape) != want:
        raise ValueError(
            f"{name} must have shape [B, Hv, D, M] = {list(want)}, got {tuple(S.shape)}"
        )
    check_float(name, S)
    if S.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {S.device}")
    return S.to(acc)


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (fla's and HF's ``l2norm``)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def queries_per_state(q: Tensor, dims: GatedDims) -> Tensor:
    """q [B, Hq, L, D] -> [B, Hv, G, L, D]: the G query rows read by each state head.

    Grouped query heads (Hq = G Hv): a view. Grouped value heads (Hq < Hv): each q head
    repeated for its Hv / Hq consecutive state heads (a copy, like HF's
    ``repeat_interleave``).
    """
    B, Hq, L, D = q.shape
    if Hq >= dims.Hv:
        return q.reshape(B, dims.Hv, dims.G, L, D)
    return q.repeat_interleave(dims.Hv // Hq, dim=1).unsqueeze(2)


def expand_keys(k: Tensor, Hv: int) -> Tensor:
    """k [B, Hk, L, ...] -> [B, Hv, L, ...]: each key head for its Hv / Hk state heads."""
    Hk = k.shape[1]
    return k if Hk == Hv else k.repeat_interleave(Hv // Hk, dim=1)


def merge_output_heads(o: Tensor, dims: GatedDims) -> Tensor:
    """o [B, Hv, G, L, M] -> [B, Ho, L, M] (output head = state head, or query head)."""
    return o.reshape(dims.B, dims.Ho, o.shape[-2], o.shape[-1])
