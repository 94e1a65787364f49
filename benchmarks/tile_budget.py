"""How the CPU tile budget of the fast causal path changes its speed.

``attnkit.ops.linear_chunked`` cuts causal linear attention into tiles whose working
set fits about ``CPU_TILE_BYTES`` (see ``plan_tiles``). This script times, in one
process and interleaved round by round (so machine drift hits every budget alike),
the forward and the forward + backward of the benchmark's configurations for several
budgets (``attnkit.bench``'s ``time_interleaved``), and prints the median time of
each relative to the default budget, with the tile plan each budget gives.
"untiled" is one tile (what a GPU gets).

    python benchmarks/tile_budget.py                       # 2 threads, budgets 4..24 MiB
    python benchmarks/tile_budget.py --budgets 8 12 16 --rounds 21
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from attnkit import feature_maps
from attnkit.bench.core import time_interleaved
from attnkit.ops import linear_chunked
from attnkit.ops.linear import auto_chunk_size
from attnkit.ops.linear_chunked import TilePlan, causal_linear_attention, plan_tiles

CONFIGS = {
    # name: (feature map, E, N, train)
    "elu fwd N=4096": ("elu", 64, 4096, False),
    "elu fwd+bwd N=16384": ("elu", 64, 16384, True),
    "taylor-16 fwd N=4096": ("taylor", 16, 4096, False),
}
B, H, M = 1, 8, 64


def _case(name: str, budget: int | None) -> tuple[Callable[[], object], TilePlan]:
    map_name, E, N, train = CONFIGS[name]
    phi = feature_maps.get(map_name)
    Dp = phi.out_dim(E)
    C = auto_chunk_size(N, Dp, M)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, N, E, generator=g, requires_grad=train) for _ in range(2))
    v = torch.randn(B, H, N, M, generator=g, requires_grad=train)
    S0, z0 = torch.zeros(B, H, Dp, M), torch.zeros(B, H, Dp)
    plan = plan_tiles(B * H, 1, N, E, Dp, M, C, 4, budget)
    d_out = torch.randn(B, H, N, M, generator=g)

    def run() -> object:
        if not train:
            with torch.no_grad():
                return causal_linear_attention(q, k, v, phi, S0, z0, C, True, 1e-6, plan=plan)
        o, _, _ = causal_linear_attention(q, k, v, phi, S0, z0, C, True, 1e-6, plan=plan)
        return torch.autograd.grad(o, (q, k, v), d_out)

    return run, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 12, 16, 24], help="MiB")
    ap.add_argument("--rounds", type=int, default=11, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default = linear_chunked.CPU_TILE_BYTES // 2**20
    budgets: list[int | None] = [*args.budgets, None]
    print(f"threads={args.threads}, B={B}, H={H}, M={M}; default budget {default} MiB")
    for name in CONFIGS:
        cases = {b: _case(name, None if b is None else b * 2**20) for b in budgets}
        timings = time_interleaved(
            {str(b): fn for b, (fn, _) in cases.items()}, repeats=args.rounds
        )
        med = {b: timings[str(b)].median for b in budgets}
        ref = med.get(default, min(med.values()))
        print(f"\n{name}")
        print(
            f"  {'budget':>9} {'tokens f/b':>11} {'heads f/b':>9} {'median':>10} {'vs default':>10}"
        )
        for b in budgets:
            plan = cases[b][1]
            label = "untiled" if b is None else f"{b} MiB"
            heads = f"{plan.fwd_heads}/{plan.bwd_heads}"
            tokens = f"{plan.fwd_tokens}/{plan.bwd_tokens}"
            print(
                f"  {label:>9} {tokens:>11} {heads:>9} {med[b] * 1e3:>8.2f} ms "
                f"{med[b] / ref:>9.2f}x"
            )


if __name__ == "__main__":
    main()
