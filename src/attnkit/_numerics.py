"""Checks on computed quantities that must never go silently wrong.

Two things can turn finite inputs into a wrong or non-finite answer inside an
attention op, and both are checked here rather than clamped away:

- a **denominator** sum_j sim(q_i, k_j) that is <= 0 (a kernel or feature map that
  is not positive, a row with nothing to attend) or not finite (overflow, or NaN /
  inf reaching it from the inputs). Dividing by it returns garbage (num / eps, about
  1e9 for an identity map on random inputs) or inf / NaN;
- a half-precision **output** whose float32 value lies outside the range of its dtype
  (fp16 ends at 65504): the final cast would turn it into inf.

Device policy. On a CPU a check reads one 0-d result, which costs no synchronisation,
and only when it fails counts the offending rows for the message. Elsewhere (CUDA)
a host synchronisation per call would stall the launch queue, so the check is queued
with :func:`torch._assert_async` instead: nothing waits for it, and a failure
surfaces as a device-side assertion at the next synchronisation (after which the
CUDA context is unusable, as after an out-of-range index). There the message cannot
carry counts; validate a failing case on the CPU to get them. Under ``torch.compile``
the check is queued the same way on every device (a data-dependent branch would
break the graph), so there a failure raises from the compiled code without counts.
Meta tensors (shape propagation) and empty tensors are not checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_denominator", "check_finite", "check_output_range"]


def _checkable(x: Tensor) -> bool:
    return x.numel() > 0 and x.device.type != "meta"


def _deferred(x: Tensor) -> bool:
    """True where the check must not read its result on the host (see the module doc)."""
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def _fail_async(ok: Tensor, message: str) -> None:
    try:
        torch._assert_async(ok, message)
    except NotImplementedError:  # a backend without the async assert: check on the host
        if not bool(ok):
            raise ValueError(message) from None


def check_denominator(den: Tensor, op: str, *, positive: bool, guarded: bool, hint: str) -> None:
    """Raise ValueError unless every denominator is finite and (unless ``guarded``) > 0.

    ``den`` holds one denominator per output row (any shape). ``guarded``: the caller
    clamps with ``eps`` afterwards, so only finiteness is required. ``positive``: the
    similarity is positive in exact arithmetic, so a zero can only be floating-point
    underflow (the message says so). ``hint`` ends the message: what the caller can do.
    One reduction over ``den`` (``torch.aminmax``), no copy of it.
    """
    if not _checkable(den):
        return
    d = den.detach()
    lo, hi = torch.aminmax(d)
    # NaN fails both comparisons, so it is caught too.
    ok = (hi < float("inf")) & (lo > -float("inf") if guarded else lo > 0)
    if _deferred(d):
        _fail_async(ok, f"{op}: a denominator is <= 0 or not finite ({hint})")
        return
    if bool(ok):
        return
    finite = torch.isfinite(d)
    n_nonfinite = int((~finite).sum())
    n_nonpos = 0 if guarded else int((d <= 0).sum())
    parts = []
    if n_nonpos:
        cause = "that underflowed to 0" if positive else "<= 0"
        smallest = float(d[finite].min()) if finite.any() else float("nan")
        parts.append(
            f"{n_nonpos} of {d.numel()} rows have a denominator {cause} (smallest {smallest:.3g})"
        )
    if n_nonfinite:
        parts.append(
            f"{n_nonfinite} of {d.numel()} rows have a denominator that is not finite (NaN or "
            "inf in the inputs, or sums that overflow the accumulation dtype)"
        )
    raise ValueError(f"{op}: " + "; ".join(parts) + f"; {hint}")


def check_finite(x: Tensor, op: str, name: str, hint: str) -> None:
    """Raise ValueError unless every entry of ``x`` is finite (one ``aminmax`` pass)."""
    if not _checkable(x):
        return
    lo, hi = torch.aminmax(x.detach())
    ok = (lo > -float("inf")) & (hi < float("inf"))
    if _deferred(x):
        _fail_async(ok, f"{op}: {name} is not finite ({hint})")
        return
    if not bool(ok):
        bad = int((~torch.isfinite(x.detach())).sum())
        raise ValueError(f"{op}: {bad} of {x.numel()} entries of {name} are not finite; {hint}")


def check_output_range(x: Tensor, dtype: torch.dtype, op: str, name: str = "the output") -> None:
    """Raise ValueError if casting ``x`` (float32/64) to ``dtype`` would overflow to inf.

    Only half dtypes need it (float16 ends at 65504; bfloat16 at 3.39e38, just below
    float32's 3.40e38). One ``aminmax`` pass; no-op when ``dtype`` is as wide as x's.
    NaN is left alone (it is not an overflow; the callers' own checks decide on it).
    """
    if dtype not in (torch.float16, torch.bfloat16) or not _checkable(x):
        return
    top = torch.finfo(dtype).max
    lo, hi = torch.aminmax(x.detach())
    ok = ~((hi > top) | (lo < -top))
    if _deferred(x):
        _fail_async(ok, f"{op}: {name} exceeds the range of {dtype}")
        return
    if not bool(ok):
        big = max(abs(float(lo)), abs(float(hi)))
        what = (
            "is infinite (inf in the inputs, or a float32 overflow)"
            if big == float("inf")
            else f"reaches {big:.4g}, outside the range of {dtype} (|x| <= {top:.5g})"
        )
        raise ValueError(
            f"{op}: {name} {what}; cast to {dtype} it would be inf. Pass float32 inputs, or "
            "scale the inputs down"
        )
