"""Time the fast causal path at several chunk lengths: the evidence for ``auto_chunk_size``.

For each configuration (feature map, key width E, length N, forward or forward +
backward) this times ``linear_attention(..., is_causal=True, chunk_size=C)`` for
each C, interleaved round by round in one process, and prints the median time of
each C relative to the fastest, marking the C that ``chunk_size=None`` picks.

    python benchmarks/chunk_size.py                  # 2 threads, C in 16..256
    python benchmarks/chunk_size.py --chunks 32 64 128 --rounds 11
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from attnkit import feature_maps, linear_attention
from attnkit.bench.core import time_interleaved
from attnkit.ops.linear import auto_chunk_size

B, H, M = 1, 8, 64
CONFIGS = [
    # (feature map, map options, E, N, train)
    ("elu", {}, 64, 4096, False),
    ("elu", {}, 64, 16384, True),
    ("taylor", {}, 16, 4096, False),
    ("taylor", {}, 16, 8192, True),
    ("favor", {"num_features": 256, "dim": 64, "seed": 0}, 64, 4096, False),
]


def _runner(
    phi: feature_maps.FeatureMap, E: int, N: int, train: bool, C: int
) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, N, E, generator=g, requires_grad=train) for _ in range(2))
    v = torch.randn(B, H, N, M, generator=g, requires_grad=train)
    d_out = torch.randn(B, H, N, M, generator=g)

    def run() -> object:
        if not train:
            with torch.no_grad():
                return linear_attention(q, k, v, feature_map=phi, is_causal=True, chunk_size=C)
        o, _ = linear_attention(q, k, v, feature_map=phi, is_causal=True, chunk_size=C)
        return torch.autograd.grad(o, (q, k, v), d_out)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, B={B}, H={H}, M={M}; time / fastest chunk (* = auto pick)")
    for name, options, E, N, train in CONFIGS:
        phi = feature_maps.get(name, **options)
        auto = auto_chunk_size(N, phi.out_dim(E), M)
        runs = {C: _runner(phi, E, N, train, C) for C in args.chunks}
        timings = time_interleaved({str(C): fn for C, fn in runs.items()}, repeats=args.rounds)
        med = {C: timings[str(C)].median for C in runs}
        best = min(med.values())
        phase = "fwd+bwd" if train else "fwd"
        cells = "  ".join(
            f"C={C}{'*' if C == auto else ''}: {med[C] * 1e3:.1f} ms ({med[C] / best:.2f})"
            for C in runs
        )
        print(f"{name} D'={phi.out_dim(E)} {phase} N={N}:  {cells}")


if __name__ == "__main__":
    main()
