"""Communication volume and compute/communication time of sequence-parallel linear attention.

For each number of ranks P and global sequence length N, P local gloo processes each
hold N / P tokens and run forward + backward of
``attnkit.distributed.sequence_parallel_linear_attention``. Every collective it issues
is counted by ``attnkit.distributed.comm_stats`` (bytes passed in and handed back, wall
time inside the call). Printed next to the cost model: each rank contributes one state
of B Hk D' (Ev + 1) values per direction (forward, backward) and receives P - 1 of
them, *whatever N is*; the compute grows like N / P.

    python benchmarks/comm_volume.py                                  # P = 2, 4; N = 1k..16k
    python benchmarks/comm_volume.py --ranks 2 --lengths 4096 --scans all_gather ring
    python benchmarks/comm_volume.py --json comm.json

Columns: bytes sent / received per rank and step (forward + backward), the prediction,
step time (slowest rank, median over repeats), the time inside collectives (median
over ranks and repeats; it includes waiting for slower ranks), the exchange alone
(ranks in lock-step, no compute), and the compute share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch import Tensor

from attnkit import feature_maps
from attnkit.distributed import (
    SCANS,
    CommStats,
    comm_stats,
    launch_local,
    sequence_parallel_linear_attention,
    shard_bounds,
    state_nbytes,
)
from attnkit.feature_maps import FeatureMap
from attnkit.ops.linear import linear_attention


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(
    q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap, scan: str | None, check: bool
) -> None:
    """One forward + backward; ``scan=None`` is the local compute alone (no communication)."""
    if scan is None:
        o, _ = linear_attention(q, k, v, phi, is_causal=True)
    else:
        o, _ = sequence_parallel_linear_attention(q, k, v, phi, scan=scan, check_shapes=check)
    torch.autograd.backward(o.sum())


def _time_case(
    q: Tensor, k: Tensor, v: Tensor, phi: FeatureMap, scan: str, cfg: dict[str, Any]
) -> dict[str, Any]:
    check = bool(cfg["check_shapes"])
    for _ in range(cfg["warmup"]):
        _fwd_bwd(q, k, v, phi, scan, check)
    steps, comms, local = [], [], []
    last = CommStats()
    for _ in range(cfg["repeats"]):
        dist.barrier()  # start together: time the step, not the skew between ranks
        with comm_stats() as stats:
            t0 = time.perf_counter()
            _fwd_bwd(q, k, v, phi, scan, check)
            _sync(q.device)
            steps.append(time.perf_counter() - t0)
        comms.append(stats.seconds)
        last = stats
    dist.barrier()
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        _fwd_bwd(q, k, v, phi, None, check)
        _sync(q.device)
        local.append(time.perf_counter() - t0)
    # The exchange alone (forward scan + backward scan of one state), ranks in lock-step.
    method = SCANS.get(scan)
    n = state_nbytes(q.shape[0], k.shape[1], phi.out_dim(q.shape[-1]), v.shape[-1]) // 4
    flat = torch.randn(n, device=q.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = []
    for _ in range(cfg["repeats"] * 4):
        dist.barrier()
        t0 = time.perf_counter()
        method.forward(flat, None, rank, world, False)
        method.backward(flat, flat.new_empty(0), None, rank, world, False)
        _sync(q.device)
        alone.append(time.perf_counter() - t0)
    return {
        "exchange_alone_s": statistics.median(alone),
        "step_s": statistics.median(steps),
        "comm_s": statistics.median(comms),
        "local_compute_s": statistics.median(local),
        "bytes_sent": last.bytes_sent,
        "bytes_received": last.bytes_received,
        "calls": dict(last.calls),
    }


def _worker(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Time every (N, scan) on this rank; returns one record per case."""
    B, H, E, Ev = cfg["batch"], cfg["heads"], cfg["dim"], cfg["value_dim"]
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["cuda"] else None
    phi = feature_maps.resolve(cfg["feature_map"], E).to(device)  # favor: seed-0 W of width E
    records = []
    for N in cfg["lengths"]:
        lo, hi = shard_bounds(N, world, rank)
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(B, H, hi - lo, E, generator=g).to(device).requires_grad_(True)
        k = torch.randn(B, H, hi - lo, E, generator=g).to(device).requires_grad_(True)
        v = torch.randn(B, H, hi - lo, Ev, generator=g).to(device).requires_grad_(True)
        for scan in cfg["scans"]:
            rec = _time_case(q, k, v, phi, scan, cfg)
            records.append({"N": N, "scan": scan, "rank": rank, "L_local": hi - lo, **rec})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--scans", nargs="+", default=["all_gather", "ring"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="key width E")
    parser.add_argument("--value-dim", type=int, default=64, help="value width Ev")
    parser.add_argument("--feature-map", default="elu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--check-shapes", action="store_true", help="include the 80-byte shape agreement check"
    )
    parser.add_argument(
        "--backend",
        default="gloo",
        choices=["gloo", "nccl"],
        help="nccl: one GPU per rank (untested here)",
    )
    parser.add_argument("--json", default=None, help="also write the records here")
    args = parser.parse_args()

    cfg = {
        "batch": args.batch,
        "heads": args.heads,
        "dim": args.dim,
        "value_dim": args.value_dim,
        "feature_map": args.feature_map,
        "lengths": args.lengths,
        "scans": args.scans,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "check_shapes": args.check_shapes,
        "cuda": args.backend == "nccl",
    }
    d_feat = feature_maps.get(args.feature_map).out_dim(args.dim)
    state = state_nbytes(args.batch, args.heads, d_feat, args.value_dim)
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(
        f"B={args.batch} H=Hk={args.heads} E={args.dim} Ev={args.value_dim} "
        f"phi={args.feature_map} (D'={d_feat}); state per rank = B Hk D' (Ev+1) x 4 bytes "
        f"= {state:,} bytes; {args.backend} on localhost, 1 thread per rank, "
        f"{torch.get_num_threads()} threads here"
    )
    table = Table(title="per rank and step (forward + backward)", title_justify="left")
    for col in (
        "P",
        "N",
        "scan",
        "sent B",
        "pred. sent",
        "recv B (max)",
        "pred. recv",
        "step",
        "in collectives",
        "exchange alone",
        "compute share",
        "local compute only",
    ):
        table.add_column(col, justify="right")
    all_records: list[dict[str, Any]] = []
    for P in args.ranks:
        results = launch_local(
            _worker, P, args=(cfg,), backend=args.backend, timeout=600.0, collective_timeout=120.0
        )
        records = [rec for per_rank in results for rec in per_rank]
        all_records += [{**rec, "P": P} for rec in records]
        for N in args.lengths:
            for scan in args.scans:
                rows = [r for r in records if r["N"] == N and r["scan"] == scan]
                step = max(r["step_s"] for r in rows)
                comm = statistics.median(r["comm_s"] for r in rows)
                sent = max(r["bytes_sent"] for r in rows)
                recv = max(r["bytes_received"] for r in rows)
                # all_gather: n sent and (P-1) n received per direction. Ring: a middle rank
                # sends and receives one state per direction; the end ranks only one way.
                if scan == "all_gather":
                    pred_sent, pred_recv = 2 * state, 2 * (P - 1) * state
                else:
                    pred_sent = pred_recv = (2 if P > 2 else P - 1) * state
                table.add_row(
                    str(P),
                    str(N),
                    scan,
                    f"{sent:,}",
                    f"{pred_sent:,}",
                    f"{recv:,}",
                    f"{pred_recv:,}",
                    f"{step * 1e3:.2f} ms",
                    f"{comm * 1e3:.2f} ms",
                    f"{statistics.median(r['exchange_alone_s'] for r in rows) * 1e3:.2f} ms",
                    f"{max(0.0, 1 - comm / step):.0%}",
                    f"{statistics.median(r['local_compute_s'] for r in rows) * 1e3:.2f} ms",
                )
    console.print(table)
    console.print(
        "Bytes do not change with N (the state has a fixed size); only the compute does. "
        "'in collectives': time inside the collectives during the step, including waiting "
        "for the slowest rank; 'exchange alone': the forward + backward exchange of one "
        "state with the ranks in lock-step (the pure communication cost); 'compute share' = "
        "1 - in collectives / step; 'local compute only': linear_attention on the shard, "
        "no communication."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "state_bytes": state, "records": all_records}, f, indent=1)


if __name__ == "__main__":
    main()
