r"""Sequence-parallel causal linear attention on ``torch.distributed`` (gloo or nccl).

Causal linear attention (:mod:`attnkit.ops.linear`) carries a fixed-size state from one token to the
next::

    S_i = sum_{j <= i} phi(K_j)^T V_j   [D', Ev],     z_i = sum_{j <= i} phi(K_j)   [D']

so a sequence cut into P contiguous shards, one per rank, needs only the states of the
shards *before* it. Rank r computes its local sums (S_r, z_r), the ranks exchange them,
rank r adds up those of ranks < r (an exclusive prefix over ranks), and then computes
its outputs locally with ``linear_attention(..., is_causal=True, initial_state=prefix)``.
No rank ever holds more than its own shard of q, k, v; what crosses the network is one
state per rank, B Hk D' (Ev + 1) numbers, independent of the sequence length.

Two ways to form the prefix are implemented (:data:`SCANS`):

- ``"all_gather"``: one collective; every rank receives the other P - 1 states and sums
  the ones it needs: (P - 1) D' (Ev + 1) values received per rank.
- ``"ring"``: rank r receives the inclusive prefix from r - 1, adds its own state and
  sends it on to r + 1: one state per rank on the wire, but P - 1 strictly sequential
  hops.

Which is cheaper is a measured question, not a theoretical one: both gloo's and
NCCL's all_gather are themselves ring algorithms (P - 1 steps), so the collective does
not save latency hops; it saves launches (one collective instead of P - 1 dependent
send/recv pairs, which matters on GPUs where each is a kernel launch). Measured here
(gloo over loopback, 2 CPU cores, ``benchmarks/comm_volume.py``), the forward + backward
exchange of a 66 kB state took 0.57 ms with all_gather and 0.18 ms with the ring for
P = 2, and 6-7.5 ms against 0.6-2.2 ms for P = 4 (4 processes on 2 cores). Hence the
default ``scan="auto"``: the ring on gloo, all_gather on every other backend (NCCL:
not measured here) and whenever the final state is wanted (the ring would need an
extra broadcast forward and all_reduce backward for it).

The backward pass is the same scan reversed: the gradient of rank r's state is the sum
of the prefix gradients of ranks > r (plus the final-state gradients of all ranks when
the final state is returned), exchanged by the same method, so gradients equal the
single-process ones. The local sums are computed (and differentiated) once outside
``linear_attention`` -- three extra L D' Ev matmuls (one forward, two backward), which
on this CPU made a P = 1 step 1.4x the plain ``linear_attention`` forward + backward at
L = 16384 (1.7x at L = 1024, where a fixed ~2 ms of overhead shows). That price keeps
the ranks' backward passes running in parallel: folding the state gradient into the
chunked kernel's backward would make each rank wait for the backward of every later
rank.

Shard lengths may differ between ranks (even 0): the state has a fixed size whatever
the shard length. Every rank must call the function with the same B, H, Hk, E, Ev,
dtype and options (checked by a small all_gather unless ``check_shapes=False``), and
every rank must take part in the backward pass (as with DistributedDataParallel).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import pickle
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.multiprocessing.spawn import ProcessContext, start_processes

from attnkit._registry import Registry
from attnkit._validation import check_qkv
from attnkit.feature_maps import FeatureMap, resolve
from attnkit.ops._guards import check_feature_shape
from attnkit.ops.linear import LinearAttentionState, linear_attention

__all__ = [
    "SCANS",
    "CommStats",
    "close_process_group",
    "comm_stats",
    "launch_local",
    "sequence_parallel_linear_attention",
    "shard_bounds",
    "state_nbytes",
]

ProcessGroup = dist.ProcessGroup

# --------------------------------------------------------------------------------------
# Communication accounting
# --------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes handed to and received from collectives, and the wall time spent in them.

    ``bytes_sent``: bytes this rank passed into collectives (its contribution);
    ``bytes_received``: bytes the collectives handed back from *other* ranks (an
    all_gather of n bytes over P ranks: sent n, received (P - 1) n; a send: sent n; a
    recv: received n). ``seconds``: wall time inside the calls, including waiting for
    slower ranks (CUDA work is synchronised around each call while recording).
    ``calls``: number of calls per operation name.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, sent: int, received: int, seconds: float) -> None:
        """Record one call of ``op``."""
        self.bytes_sent += sent
        self.bytes_received += received
        self.seconds += seconds
        self.calls[op] = self.calls.get(op, 0) + 1


_RECORDERS: list[CommStats] = []


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count the collectives issued by this module inside the ``with`` block.

    >>> with comm_stats() as stats:            # doctest: +SKIP
    ...     o, _ = sequence_parallel_linear_attention(q, k, v)
    ...     o.sum().backward()
    >>> stats.bytes_sent, stats.bytes_received, stats.calls   # doctest: +SKIP
    """
    stats = CommStats()
    _RECORDERS.append(stats)
    try:
        yield stats
    finally:
        _RECORDERS.remove(stats)


@contextlib.contextmanager
def _recorded(op: str, sent: int, received: int, device: torch.device) -> Iterator[None]:
    if not _RECORDERS:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    for stats in _RECORDERS:
        stats.add(op, sent, received, dt)


# torch 2.13 renamed all_gather_into_tensor to all_gather_single; keep older torch working.
_all_gather_single = cast(
    Callable[..., Any],
    getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor,
)


def _all_gather(x: Tensor, group: ProcessGroup | None, world: int, op: str) -> Tensor:
    """[n] on every rank -> [P, n], row r from group rank r."""
    x = x.contiguous()
    out = x.new_empty(world * x.numel())  # the concatenated form: gloo has no stacked one
    nbytes = x.numel() * x.element_size()
    with _recorded(op, nbytes, (world - 1) * nbytes, x.device):
        _all_gather_single(out, x, group=group)
    return out.view(world, x.numel())


def _global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _send(x: Tensor, group: ProcessGroup | None, dst: int, op: str) -> None:
    x = x.contiguous()
    with _recorded(op, x.numel() * x.element_size(), 0, x.device):
        dist.send(x, _global_rank(group, dst), group=group)


def _recv(like: Tensor, group: ProcessGroup | None, src: int, op: str) -> Tensor:
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    with _recorded(op, 0, out.numel() * out.element_size(), out.device):
        dist.recv(out, _global_rank(group, src), group=group)
    return out


def _broadcast(x: Tensor, group: ProcessGroup | None, src: int, rank: int, op: str) -> Tensor:
    x = x.contiguous()
    nbytes = x.numel() * x.element_size()
    with _recorded(op, nbytes if rank == src else 0, 0 if rank == src else nbytes, x.device):
        dist.broadcast(x, _global_rank(group, src), group=group)
    return x


def _all_reduce(x: Tensor, group: ProcessGroup | None, world: int, op: str) -> Tensor:
    x = x.contiguous()
    nbytes = x.numel() * x.element_size()
    with _recorded(op, nbytes, (world - 1) * nbytes, x.device):
        dist.all_reduce(x, group=group)
    return x


# --------------------------------------------------------------------------------------
# The scan over ranks: forward exclusive prefix, backward reverse exclusive prefix
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """One way to form the exclusive prefix over ranks (and its reverse for backward).

    ``forward(local, group, rank, world, with_total) -> (prefix, total)`` on flat
    states [n]; ``total`` is the sum over all ranks, or an empty tensor when not wanted.
    ``backward(g_prefix, g_total, group, rank, world, with_total) -> g_local`` with
    g_local = sum_{r' > rank} g_prefix[r'] (+ sum_{all r'} g_total[r']).
    """

    forward: Callable[[Tensor, ProcessGroup | None, int, int, bool], tuple[Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, ProcessGroup | None, int, int, bool], Tensor]
    doc: str


#: Registered ways to exchange the states: ``"all_gather"`` (one collective) and
#: ``"ring"`` (P - 1 sequential send/recv hops); ``scan="auto"`` chooses between them.
SCANS: Registry[Scan] = Registry("sequence-parallel scan")


def _gather_forward(
    local: Tensor, group: ProcessGroup | None, rank: int, world: int, with_total: bool
) -> tuple[Tensor, Tensor]:
    states = _all_gather(local, group, world, "all_gather")  # [P, n]
    prefix = states[:rank].sum(dim=0)  # zeros for rank 0
    total = states.sum(dim=0) if with_total else local.new_empty(0)
    return prefix, total


def _gather_backward(
    g_prefix: Tensor,
    g_total: Tensor,
    group: ProcessGroup | None,
    rank: int,
    world: int,
    with_total: bool,
) -> Tensor:
    n = g_prefix.numel()
    packed = torch.cat([g_prefix, g_total]) if with_total else g_prefix
    grads = _all_gather(packed, group, world, "all_gather")  # [P, n] or [P, 2n]
    g_local = grads[rank + 1 :, :n].sum(dim=0)  # ranks after this one read its state
    if with_total:
        g_local = g_local + grads[:, n:].sum(dim=0)  # every rank's copy of the total
    return g_local


def _ring_forward(
    local: Tensor, group: ProcessGroup | None, rank: int, world: int, with_total: bool
) -> tuple[Tensor, Tensor]:
    # Rank r waits for the inclusive prefix of r - 1, then passes its own on: P - 1 hops.
    prefix = torch.zeros_like(local) if rank == 0 else _recv(local, group, rank - 1, "recv")
    inclusive = prefix + local
    if rank < world - 1:
        _send(inclusive, group, rank + 1, "send")
    total = local.new_empty(0)
    if with_total:
        total = _broadcast(inclusive, group, world - 1, rank, "broadcast")
    return prefix, total


def _ring_backward(
    g_prefix: Tensor,
    g_total: Tensor,
    group: ProcessGroup | None,
    rank: int,
    world: int,
    with_total: bool,
) -> Tensor:
    # The reverse ring: rank r receives G_r = sum_{r' > r} g_prefix[r'] from r + 1 and
    # passes g_prefix[r] + G_r to r - 1.
    last = world - 1
    later = torch.zeros_like(g_prefix) if rank == last else _recv(g_prefix, group, rank + 1, "recv")
    if rank > 0:
        _send(g_prefix + later, group, rank - 1, "send")
    if with_total:
        later = later + _all_reduce(g_total.clone(), group, world, "all_reduce")
    return later


SCANS.register("all_gather")(
    Scan(_gather_forward, _gather_backward, "one all_gather of the states")
)
SCANS.register("ring")(Scan(_ring_forward, _ring_backward, "P - 1 sequential send/recv hops"))


class _PrefixOverRanks(torch.autograd.Function):
    """Exclusive prefix (and total) of a flat state over the ranks of a group."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        local: Tensor,
        group: ProcessGroup | None,
        scan: Scan,
        rank: int,
        world: int,
        with_total: bool,
    ) -> tuple[Tensor, Tensor]:
        ctx.group = group  # type: ignore[attr-defined]
        ctx.scan = scan  # type: ignore[attr-defined]
        ctx.rank = rank  # type: ignore[attr-defined]
        ctx.world = world  # type: ignore[attr-defined]
        ctx.with_total = with_total  # type: ignore[attr-defined]
        prefix, total = scan.forward(local.detach(), group, rank, world, with_total)
        if not with_total:
            ctx.mark_non_differentiable(total)
        return prefix, total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_prefix: Tensor, g_total: Tensor
    ) -> tuple[Tensor, None, None, None, None, None]:
        scan: Scan = ctx.scan
        g_local = scan.backward(
            g_prefix.contiguous(),
            g_total.contiguous(),
            ctx.group,
            ctx.rank,
            ctx.world,
            ctx.with_total,
        )
        return g_local, None, None, None, None, None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def shard_bounds(length: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s contiguous shard of ``length`` tokens.

    The first ``length % world_size`` ranks get one token more than the others, so
    shard lengths differ by at most one (and may be 0 when length < world_size).

    >>> from attnkit.distributed import shard_bounds
    >>> [shard_bounds(10, 4, r) for r in range(4)]
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    for name, value, minimum in (("length", length, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def state_nbytes(B: int, Hk: int, d_feat: int, Ev: int, dtype: torch.dtype = torch.float32) -> int:
    """Cost model: bytes of one rank's state (S [B, Hk, D', Ev], z [B, Hk, D']).

    This is what each rank contributes to the exchange, once in the forward and once
    in the backward pass; the all_gather hands every rank (P - 1) times as much. None
    of it depends on the sequence length N.
    """
    return B * Hk * d_feat * (Ev + 1) * torch.empty(0, dtype=dtype).element_size()


def _resolve_scan(scan: object, group: ProcessGroup | None, output_final_state: bool) -> str:
    if scan == "auto":
        gloo = str(dist.get_backend(group)) == "gloo"
        return "ring" if gloo and not output_final_state else "all_gather"
    if not isinstance(scan, str) or scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r}; expected 'auto' or one of {SCANS.names()}")
    return scan


_DTYPE_CODES = {
    torch.float16: 0,
    torch.bfloat16: 1,
    torch.float32: 2,
    torch.float64: 3,
}
_META_FIELDS = ("B", "H", "Hk", "E", "Ev", "D'", "dtype", "normalize", "final state", "scan")


def _check_agreement(
    meta: list[int], group: ProcessGroup | None, world: int, device: torch.device
) -> None:
    """All ranks must agree on everything but their shard length (else a clear error)."""
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    table = _all_gather(mine, group, world, "check").cpu().tolist()  # [P, fields]
    bad = [
        f"{name}: " + ", ".join(f"rank {r}={row[i]}" for r, row in enumerate(table))
        for i, name in enumerate(_META_FIELDS)
        if len({row[i] for row in table}) > 1
    ]
    if bad:
        raise ValueError(
            "sequence_parallel_linear_attention: all ranks must pass q, k, v with the same "
            "B, H, Hk, E, Ev and dtype (only the shard length L may differ) and the same "
            "options; they disagree on " + "; ".join(bad)
        )


def sequence_parallel_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: str | FeatureMap = "elu",
    group: ProcessGroup | None = None,
    normalize: bool = True,
    eps: float | None = None,
    chunk_size: int | None = None,
    *,
    output_final_state: bool = False,
    scan: str = "auto",
    check_shapes: bool = True,
    enable_gqa: bool = False,
) -> tuple[Tensor, LinearAttentionState | None]:
    r"""Causal linear attention over a sequence sharded across the ranks of ``group``.

    Rank r (of P in ``group``) holds tokens [start_r, stop_r) of every sequence, the
    shards contiguous and in rank order; the result on each rank equals the matching
    slice of ``linear_attention(q_full, k_full, v_full, feature_map, is_causal=True)``,
    and so do the gradients to q, k and v::

        S_r, z_r   = phi(K_r)^T V_r, sum phi(K_r)              local sums      [D', Ev], [D']
        prefix_r   = sum_{r' < r} (S_r', z_r')                  exchanged (see ``scan``)
        o_r        = linear_attention(q_r, k_r, v_r, is_causal=True, initial_state=prefix_r)

    Shape legend (PyTorch's SDPA layout, local shards)::

        q [B, H, L_r, E]     B batch, H query heads, L_r this rank's shard length
        k [B, Hk, L_r, E]    Hk key/value heads (H == Hk, or H % Hk == 0 with
                             enable_gqa), E key width
        v [B, Hk, L_r, Ev]   Ev value width
        o [B, H, L_r, Ev]    q's dtype
        final state S [B, Hk, D', Ev], z [B, Hk, D']   accumulation dtype, replicated

    Args:
        feature_map: a registered name or a FeatureMap instance. Maps with random
            parameters must be identical on every rank: the name ``"favor"`` means the
            seed-0 projection for width E on every rank; an instance must be built with
            the same ``seed`` (or loaded from the same state_dict) everywhere.
        group: the process group over which the sequence is sharded (None: the default
            group). Group rank order is sequence order.
        normalize, eps, chunk_size, enable_gqa: as in :func:`attnkit.linear_attention`
            (``eps=None``: a denominator <= 0 or not finite raises ValueError on the
            rank that holds it, after the forward exchange; the other ranks then wait
            in the backward exchange until the process group's timeout, so where ranks
            must not fail alone use a positive map or pass eps).
        output_final_state: also return the state after the *whole* sequence, the same
            on every rank (to continue decoding). Its gradient is the sum of what every
            rank passes back, as if each rank's loss were summed.
        scan: how the states are exchanged: ``"all_gather"`` (one collective),
            ``"ring"`` (P - 1 sequential send/recv hops) or ``"auto"`` (the default: the
            ring on gloo without a final state, where it measured 3-10x faster;
            all_gather otherwise). See the module docstring for the measurements.
        check_shapes: first all_gather 10 integers so that ranks which disagree on
            B, H, Hk, E, Ev, dtype or options raise ValueError instead of hanging or
            mixing garbage. One more collective per call (0.25 ms for P = 2 on gloo
            over loopback here); turn it off once the shapes are known to agree.

    Shards of different lengths (including empty ones) are handled: the state has a
    fixed size. Every rank of ``group`` must call this function (and later the
    backward pass, if any rank needs gradients) in the same order.

    Communication per call and per rank: forward and backward each exchange one state of
    B Hk D' (Ev + 1) values (:func:`state_nbytes`); all_gather hands each rank the P - 1
    others, the ring passes one state per hop. Independent of the sequence length.
    Raises RuntimeError when torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sequence_parallel_linear_attention needs an initialised torch.distributed "
            "process group (torch.distributed.init_process_group, e.g. under torchrun); "
            "on one process use attnkit.linear_attention(..., is_causal=True)"
        )
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    dims = check_qkv(q, k, v, allow_gqa=enable_gqa)
    if dims.L != dims.S:
        raise ValueError(
            f"each rank's q and k must cover the same tokens: q has L={dims.L}, k has "
            f"S={dims.S} on this rank"
        )
    for name, flag in (
        ("normalize", normalize),
        ("output_final_state", output_final_state),
        ("check_shapes", check_shapes),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    phi = resolve(feature_map, dims.E)
    phi.check_width(dims.E)
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    scan = _resolve_scan(scan, group, output_final_state)
    method = SCANS.get(scan)

    acc = torch.promote_types(q.dtype, torch.float32)
    fk = phi(k.to(acc))  # [B, Hk, L_r, D']: keys always take the unscaled phi
    check_feature_shape(phi, "k", k, fk, phi.out_dim(dims.E))
    fk = fk.to(acc)
    d_feat = fk.shape[-1]
    if check_shapes:
        meta = [dims.B, dims.H, dims.Hk, dims.E, dims.Ev, d_feat, _DTYPE_CODES[q.dtype]]
        meta += [int(normalize), int(output_final_state), SCANS.names().index(scan)]
        _check_agreement(meta, group, world, q.device)

    S_local = torch.einsum("bhld,bhlm->bhdm", fk, v.to(acc))  # [B, Hk, D', Ev]
    z_local = fk.sum(dim=-2)  # [B, Hk, D']
    n_S = S_local.numel()
    local = torch.cat([S_local.reshape(-1), z_local.reshape(-1)])  # [n] = [B Hk D' (Ev + 1)]
    scan_over_ranks = cast(Callable[..., tuple[Tensor, Tensor]], _PrefixOverRanks.apply)
    prefix, total = scan_over_ranks(local, group, method, rank, world, output_final_state)

    def unflat(flat: Tensor) -> LinearAttentionState:
        return LinearAttentionState(
            flat[:n_S].reshape(S_local.shape), flat[n_S:].reshape(z_local.shape)
        )

    o, _ = linear_attention(
        q,
        k,
        v,
        phi,
        is_causal=True,
        normalize=normalize,
        eps=eps,
        chunk_size=chunk_size,
        initial_state=unflat(prefix),
        enable_gqa=enable_gqa,
    )
    return o, (unflat(total) if output_final_state else None)


# --------------------------------------------------------------------------------------
# Local launcher (tests, benchmarks, trying it out on one machine)
# --------------------------------------------------------------------------------------


def _loopback_interface() -> str | None:
    with contextlib.suppress(OSError, AttributeError):
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    return None


def _local_worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    tmpdir: str,
    backend: str,
    timeout_s: float,
) -> None:
    """Entry point of one process started by :func:`launch_local`."""
    iface = _loopback_interface()
    if iface is not None and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)  # loopback only
    torch.set_num_threads(1)  # P processes share the machine's cores
    if backend == "nccl":  # one GPU per process (untested here: no multi-GPU machine)
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(tmpdir, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    finished = False
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(tmpdir, f"result-{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        finished = True
    finally:
        close_process_group(finished)


def close_process_group(finished: bool) -> None:
    """Destroy the default process group in order: free, wait, then close.

    Frees what still holds the group (a DDP reducer and gloo's worker threads) while
    it is alive, then, if this rank ``finished`` its work, waits at a barrier so that
    no rank closes its connections while a peer still uses them, then destroys the
    group. Without this a gloo rank exiting mid-teardown aborted its peer ("terminate
    called without an active exception") in about 1 of 6 loaded torchrun runs. After a
    failure there is no barrier (the peers may never reach it).
    """
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def launch_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    timeout: float = 120.0,
    collective_timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh local processes.

    Each process joins one process group (``backend``, a ``file://`` store in a
    temporary directory, gloo bound to the loopback interface; with ``"nccl"`` process r
    uses GPU r) before ``fn`` runs, and leaves it afterwards. Returns the ``fn`` results
    in rank order (they must be picklable; ``fn`` must be importable, i.e. defined at
    module level).

    Bounded: a collective that waits longer than ``collective_timeout`` seconds fails,
    and if the processes have not all finished after ``timeout`` seconds they are
    killed and TimeoutError is raised. An exception in any process is re-raised here
    (``torch.multiprocessing.ProcessRaisedException``, with the worker's traceback).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    tmpdir = tempfile.mkdtemp(prefix="attnkit-dist-")
    try:
        spawn = cast(Callable[..., ProcessContext], start_processes)  # untyped in torch
        ctx = spawn(
            _local_worker,
            args=(fn, world_size, args, tmpdir, backend, collective_timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                for proc in ctx.processes:
                    proc.join(5.0)
                raise TimeoutError(
                    f"launch_local: {world_size} processes did not finish within {timeout} s"
                )
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmpdir, f"result-{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
