"""attnkit.distributed: sequence-parallel causal linear attention == single process.

One spawn per world size (2 and 4 gloo processes on localhost, bounded in time; with 4,
also two interleaved subgroups {0, 2} and {1, 3}); every case runs inside the workers,
which compare their shard's output, the final state and the gradients to q, k, v with
the single-process ``linear_attention(..., is_causal=True)`` and return a list of
failures (empty when all agree).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from attnkit import feature_maps
from attnkit.distributed import (
    SCANS,
    comm_stats,
    launch_local,
    sequence_parallel_linear_attention,
    shard_bounds,
    state_nbytes,
)
from attnkit.ops.linear import linear_attention

MAPS = feature_maps.available()
F64 = torch.float64
BF16 = torch.bfloat16


def make_map(name: str, E: int) -> feature_maps.FeatureMap:
    """Every registered map at a small width; favor with a fixed dim and seed (W on all ranks)."""
    if name == "favor":
        return feature_maps.get("favor", num_features=8, dim=E, seed=0)
    return feature_maps.get(name)


def tol(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.bfloat16:  # one bf16 rounding of outputs and gradients
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-9, "atol": 1e-10} if dtype == F64 else {"rtol": 2e-4, "atol": 2e-5}


def _compare(failures: list[str], what: str, got: Tensor, want: Tensor, **kw: float) -> None:
    try:
        torch.testing.assert_close(got, want, **kw)
    except AssertionError as err:
        failures.append(f"{what}: {str(err).splitlines()[0:4]}")


def _one_case(
    rank: int,
    world: int,
    failures: list[str],
    *,
    fmap: str,
    lengths: list[int],
    scan: str,
    dtype: torch.dtype = torch.float32,
    B: int = 2,
    H: int = 4,
    Hk: int = 2,
    E: int = 5,
    Ev: int = 3,
    normalize: bool = True,
    chunk_size: int | None = None,
    group: Any = None,
    group_rank: int | None = None,
) -> None:
    """Shard a sequence by ``lengths`` (one entry per group rank) and compare with one process."""
    r = rank if group_rank is None else group_rank
    name = f"[{fmap} {scan} lengths={lengths} {dtype} normalize={normalize} chunk={chunk_size}]"
    phi = make_map(fmap, E)
    g = torch.Generator().manual_seed(1234 + sum(lengths))
    N = sum(lengths)
    q = torch.randn(B, H, N, E, generator=g, dtype=dtype)
    k = torch.randn(B, Hk, N, E, generator=g, dtype=dtype)
    v = torch.randn(B, Hk, N, Ev, generator=g, dtype=dtype)
    if not phi.positive:  # q.k > 0 keeps denominators away from 0 (as in test_linear)
        q, k = q.abs() + 0.05, k.abs() + 0.05
    cot = torch.randn(B, H, N, Ev, generator=g, dtype=dtype)
    acc = torch.promote_types(dtype, torch.float32)
    cS = torch.randn(B, Hk, phi.out_dim(E), Ev, generator=g, dtype=acc)
    cz = torch.randn(B, Hk, phi.out_dim(E), generator=g, dtype=acc)

    # Single-process reference (the whole sequence: only the test does this).
    qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
    o_ref, st_ref = linear_attention(
        qf,
        kf,
        vf,
        phi,
        is_causal=True,
        normalize=normalize,
        output_final_state=True,
        enable_gqa=True,
    )
    assert st_ref is not None
    ((o_ref * cot).sum() + (st_ref.S * cS).sum() + (st_ref.z * cz).sum()).backward()

    start = sum(lengths[:r])
    stop = start + lengths[r]
    ql, kl, vl = (t[:, :, start:stop].clone().requires_grad_(True) for t in (q, k, v))
    o, st = sequence_parallel_linear_attention(
        ql,
        kl,
        vl,
        phi,
        group=group,
        normalize=normalize,
        chunk_size=chunk_size,
        output_final_state=True,
        scan=scan,
        enable_gqa=True,
    )
    assert st is not None
    loss = (o * cot[:, :, start:stop]).sum()
    if r == 0:  # the replicated final state enters the global loss once
        loss = loss + (st.S * cS).sum() + (st.z * cz).sum()
    loss.backward()

    kw = tol(dtype)
    _compare(failures, f"{name} output", o, o_ref[:, :, start:stop].detach(), **kw)
    _compare(failures, f"{name} final S", st.S.detach(), st_ref.S.detach(), **kw)
    _compare(failures, f"{name} final z", st.z.detach(), st_ref.z.detach(), **kw)
    for label, mine, full in (("q", ql, qf), ("k", kl, kf), ("v", vl, vf)):
        assert mine.grad is not None and full.grad is not None
        _compare(failures, f"{name} grad {label}", mine.grad, full.grad[:, :, start:stop], **kw)


def _even(N: int, world: int) -> list[int]:
    return [b - a for a, b in (shard_bounds(N, world, r) for r in range(world))]


def equivalence_worker(rank: int, world: int) -> list[str]:
    """All cases of one world size; returns the failures seen on this rank."""
    failures: list[str] = []
    # Every feature map x both scans, on GQA heads, odd widths and uneven shards (13 tokens).
    for fmap in MAPS:
        for scan in SCANS.names():
            _one_case(rank, world, failures, fmap=fmap, lengths=_even(13, world), scan=scan)
    # Ragged shards with an empty one, a chunk size that does not divide them, fp64.
    ragged = [9, 0] if world == 2 else [0, 5, 1, 7]
    _one_case(rank, world, failures, fmap="elu", lengths=ragged, scan="all_gather", chunk_size=3)
    _one_case(rank, world, failures, fmap="elu", lengths=ragged, scan="ring", dtype=F64)
    _one_case(rank, world, failures, fmap="taylor", lengths=ragged, scan="auto", dtype=BF16)
    _one_case(
        rank, world, failures, fmap="identity", lengths=_even(7, world), scan="ring",
        normalize=False, H=3, Hk=1, E=4, Ev=6,
    )  # fmt: skip

    # Communication volume per rank, for every scan, with and without the final state,
    # in both directions: one state per direction and hop; all_gather receives P - 1.
    # Every entry is checked (a missing one is a failure, not a skip).
    B, H, E, Ev, L = 1, 2, 4, 3, 5
    n = state_nbytes(B, H, E, Ev)  # elu: D' = E
    first, last = rank == 0, rank == world - 1
    gathered = (n, (world - 1) * n, {"all_gather": 1})
    ring_fwd = (
        0 if last else n,
        0 if first else n,
        {**({} if first else {"recv": 1}), **({} if last else {"send": 1})},
    )
    ring_bwd = (
        0 if first else n,
        0 if last else n,
        {**({} if last else {"recv": 1}), **({} if first else {"send": 1})},
    )
    want: dict[tuple[str, bool, str], tuple[int, int, dict[str, int]]] = {
        ("all_gather", False, "forward"): gathered,
        ("all_gather", False, "backward"): gathered,
        ("all_gather", True, "forward"): gathered,
        # the backward gathers the prefix gradient and the total's gradient together
        ("all_gather", True, "backward"): (2 * n, 2 * (world - 1) * n, {"all_gather": 1}),
        ("ring", False, "forward"): ring_fwd,
        ("ring", False, "backward"): ring_bwd,
        # the total: broadcast from the last rank forward, all_reduce of its gradient back
        ("ring", True, "forward"): (
            ring_fwd[0] + (n if last else 0),
            ring_fwd[1] + (0 if last else n),
            {**ring_fwd[2], "broadcast": 1},
        ),
        ("ring", True, "backward"): (
            ring_bwd[0] + n,
            ring_bwd[1] + (world - 1) * n,
            {**ring_bwd[2], "all_reduce": 1},
        ),
    }
    # scan="auto" on gloo: the ring, or all_gather when the final state is wanted.
    for final, chosen in ((False, "ring"), (True, "all_gather")):
        for direction in ("forward", "backward"):
            want[("auto", final, direction)] = want[(chosen, final, direction)]
    assert len(want) == len(["all_gather", "ring", "auto"]) * 2 * 2
    for scan, final in sorted({(sc, fi) for sc, fi, _ in want}):
        q = torch.randn(B, H, L, E, requires_grad=True)
        k = torch.randn(B, H, L, E, requires_grad=True)
        v = torch.randn(B, H, L, Ev, requires_grad=True)
        with comm_stats() as fwd:
            o, _ = sequence_parallel_linear_attention(
                q, k, v, "elu", scan=scan, output_final_state=final, check_shapes=False
            )
        with comm_stats() as bwd:
            o.sum().backward()
        for label, stats in (("forward", fwd), ("backward", bwd)):
            expected = want[(scan, final, label)]
            got = (stats.bytes_sent, stats.bytes_received, stats.calls)
            if got != expected:
                failures.append(
                    f"comm_stats {scan} final={final} {label}: got {got}, want {expected}"
                )
    try:
        sequence_parallel_linear_attention(q, k, v, scan="tree")
        failures.append("unknown scan did not raise")
    except ValueError as err:
        if "unknown scan 'tree'" not in str(err):
            failures.append(f"unknown scan message: {err}")

    if world == 4:
        _subgroup_cases(rank, world, failures)

    # Ranks that disagree on a width fail with a ValueError on every rank (no hang).
    Ev_bad = 3 + rank
    try:
        sequence_parallel_linear_attention(
            torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, Ev_bad)
        )
        failures.append("mismatched Ev across ranks did not raise")
    except ValueError as err:
        if "Ev: rank 0=3, rank 1=4" not in str(err):
            failures.append(f"mismatch message does not name the ranks' Ev: {err}")
    return failures


def _subgroup_cases(rank: int, world: int, failures: list[str]) -> None:
    """group= with non-contiguous members: ranks {0, 2} and {1, 3} each shard one sequence."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = groups[rank % 2]
    for scan in SCANS.names():
        _one_case(
            rank, world, failures, fmap="taylor", lengths=[4, 7], scan=scan,
            group=mine, group_rank=rank // 2,
        )  # fmt: skip


def _run(worker: Callable[[int, int], list[str]], world: int) -> None:
    results = launch_local(worker, world, timeout=90.0, collective_timeout=30.0)
    failures = [f"rank {r}: {msg}" for r, fails in enumerate(results) for msg in fails]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4], ids=["P2", "P4"])
def test_sequence_parallel_equals_single_process(world: int) -> None:
    _run(equivalence_worker, world)


# ---- no processes needed --------------------------------------------------------------


def test_shard_bounds_cover_the_sequence() -> None:
    for N in (0, 1, 7, 13, 64):
        for P in (1, 2, 3, 4, 8):
            bounds = [shard_bounds(N, P, r) for r in range(P)]
            assert bounds[0][0] == 0 and bounds[-1][1] == N
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((10, 0, 0), ValueError, "world_size must be >= 1"),
        ((10, 2, 2), ValueError, r"rank must be in \[0, world_size=2\)"),
        ((-1, 2, 0), ValueError, "length must be >= 0"),
        ((10.0, 2, 0), TypeError, "length must be an int"),
    ],
)
def test_shard_bounds_rejects_bad_arguments(
    args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        shard_bounds(*args)


def test_state_nbytes_is_the_state_size() -> None:
    assert state_nbytes(1, 4, 64, 64) == 4 * 64 * 65 * 4
    assert state_nbytes(2, 1, 153, 16, torch.float64) == 2 * 153 * 17 * 8


def test_needs_an_initialised_process_group() -> None:
    q = torch.randn(1, 1, 3, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_linear_attention(q, q, q)


def test_launch_local_rejects_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        launch_local(equivalence_worker, 0)


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of this one process (no spawn), destroyed afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_follows_the_denominator_and_gqa_policy(one_rank_group) -> None:
    """Signed denominators raise unless eps is given; H != Hk needs enable_gqa, as in sdpa."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match=r"rows have a denominator <= 0.*eps="):
        sequence_parallel_linear_attention(q, k, v, "identity")
    o, _ = sequence_parallel_linear_attention(q, k, v, "identity", eps=1e-6)
    ref, _ = linear_attention(q, k, v, "identity", is_causal=True, eps=1e-6)
    torch.testing.assert_close(o, ref)
    with pytest.raises(ValueError, match=r"q has 2 heads but k/v have 1; pass enable_gqa=True"):
        sequence_parallel_linear_attention(q, k[:, :1], v[:, :1])
    o, _ = sequence_parallel_linear_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
    ref, _ = linear_attention(q, k[:, :1], v[:, :1], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(o, ref)
    # By name, favor is the seed-0 projection of the input width on every rank.
    o, _ = sequence_parallel_linear_attention(q, k, v, "favor")
    ref, _ = linear_attention(q, k, v, feature_maps.get("favor", dim=4, seed=0), is_causal=True)
    torch.testing.assert_close(o, ref)
