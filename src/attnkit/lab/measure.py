"""Measurement helpers of the lab: bytes moved by dispatched ops, peak allocation, fits.

- :class:`ByteCounter` counts the bytes every dispatched aten op reads (its tensor
  arguments) and writes (its outputs), skipping views. That is the cost model's rule
  ("every step reads its inputs once and writes its output once", no caches) applied
  to what actually runs, including the layout copies einsum inserts.
- :func:`peak_allocated` runs a call under the profiler and replays its allocations
  and frees in time order: the peak of extra memory the call held (CPU or CUDA).
- :func:`fit_offset_rate` fits t = t0 + x / rate by least squares on relative error.
- :func:`central_differences` differentiates a scalar function numerically (float64),
  independently of autograd: what the gradient claims compare autograd against.
- :func:`held_bytes` adds up the storages of every tensor an object holds (a cache, a
  state): the bytes actually allocated, not what the object says it holds.
- :func:`saved_tensor_bytes`: the storages autograd keeps between a forward and its
  backward (the training memory of a call), seen through saved-tensor hooks.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "ByteCounter",
    "central_differences",
    "count_bytes",
    "fit_offset_rate",
    "held_bytes",
    "peak_allocated",
    "saved_tensor_bytes",
]

_VIEW_LIKE = {torch.ops.aten._unsafe_view.default}


def _nbytes(tree: Any) -> int:
    return sum(
        t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)
    )


class ByteCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts bytes read and written by every aten op dispatched inside the ``with``.

    Views (ops whose result aliases an input, and ``_unsafe_view``) move nothing and
    are skipped. ``by_op`` holds the total per op name.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.read = 0
        self.written = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        aliases = any(
            r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns
        )
        if aliases or func in _VIEW_LIKE:
            return out
        read, written = _nbytes((args, kwargs)), _nbytes(out)
        self.read += read
        self.written += written
        name = str(func)
        self.by_op[name] = self.by_op.get(name, 0) + read + written
        return out

    @property
    def total(self) -> int:
        """Bytes read + written."""
        return self.read + self.written


def count_bytes(fn: Callable[[], object]) -> ByteCounter:
    """Run ``fn`` once (without autograd) under a :class:`ByteCounter` and return it."""
    counter = ByteCounter()
    with torch.no_grad(), counter:
        fn()
    return counter


def peak_allocated(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it (one call).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the profiler's allocation records
    (each op's own allocations and frees, plus the un-attributed ``[memory]`` frees),
    replayed in time order; allocations inside one op count at its start, so a
    temporary freed inside the same op is not seen.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        delta = int(e.self_cpu_memory_usage) if e.name != "[memory]" else int(e.cpu_memory_usage)
        if delta:
            events.append((e.time_range.start, delta))
    events.sort()
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines go straight to it)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def fit_offset_rate(xs: Sequence[float], ts: Sequence[float]) -> tuple[float, float]:
    """Least-squares (t0 >= 0, rate > 0) of t = t0 + x / rate, on relative errors.

    Minimises sum ((t0 + x_i / rate - t_i) / t_i)^2; falls back to t0 = 0 when the
    unconstrained offset is negative. Returns (t0, rate).
    """
    if len(xs) != len(ts) or len(xs) < 2:
        raise ValueError("need at least two (x, t) pairs of equal length")
    a = [[1.0 / t, x / t] for x, t in zip(xs, ts, strict=True)]  # rows of A, target 1
    s11 = sum(r[0] * r[0] for r in a)
    s12 = sum(r[0] * r[1] for r in a)
    s22 = sum(r[1] * r[1] for r in a)
    b1 = sum(r[0] for r in a)
    b2 = sum(r[1] for r in a)
    det = s11 * s22 - s12 * s12
    t0, inv_rate = (
        ((s22 * b1 - s12 * b2) / det, (s11 * b2 - s12 * b1) / det) if det > 0 else (-1.0, 0.0)
    )
    if t0 < 0 or inv_rate <= 0:
        t0, inv_rate = 0.0, b2 / s22
    return t0, (1.0 / inv_rate if inv_rate > 0 else math.inf)


def central_differences(fn: Callable[[Tensor], Tensor], x: Tensor, step: float) -> Tensor:
    """d fn / dx by central differences, one coordinate at a time: [*x.shape].

    ``fn`` maps a tensor shaped like ``x`` to a scalar tensor; each coordinate is
    moved by +-``step`` (x is not modified). Autograd plays no part, so a hand-written
    backward can be checked against it. The error is O(step^2) for a smooth ``fn``; a
    piecewise-constant ``fn`` gives exactly 0 unless the move crosses a jump.
    """
    base = x.detach()
    flat = base.reshape(-1)
    grad = torch.empty(flat.numel(), dtype=torch.float64)
    with torch.no_grad():
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += step
            minus[i] -= step
            up = float(fn(plus.view_as(base)))
            down = float(fn(minus.view_as(base)))
            grad[i] = (up - down) / (2 * step)
    return grad.view(base.shape)


def _tensors(obj: Any, seen: set[int]) -> Iterator[Tensor]:
    """Every tensor reachable from ``obj`` through attributes, mappings and sequences."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for value in vars(obj).values():
            yield from _tensors(value, seen)


def held_bytes(obj: Any) -> int:
    """Bytes of the distinct storages of every tensor ``obj`` holds (each storage once).

    ``untyped_storage().nbytes()`` of what is actually allocated: spare capacity counts,
    and two views of one buffer count once. It reads the object's attributes, not its
    own account of its size (e.g. ``KVCache.nbytes``, which is a formula). Modules are
    not entered (a cache does not own the model's weights).
    """
    storages: dict[tuple[str, int], int] = {}
    for t in _tensors(obj, set()):
        s = t.untyped_storage()
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Every tensor saved through ``torch.autograd.graph.saved_tensors_hooks`` (which sees
    custom Functions' ``save_for_backward`` too), each storage counted once; inputs
    count when they are saved. Exact and allocator-independent (torch's CPU allocations
    are invisible to tracemalloc, and an op's own temporaries to the profiler): the
    memory a training step holds between its forward and backward passes.
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())
