"""KV-cache bytes of MHA vs GQA vs MQA at a given size, as KVCache.nbytes computes them.

Run: python benchmarks/kv_cache_bytes.py [--b 8 --d 1024 --h 16 --n 8192]
Uses the meta device, so nothing of that size is allocated: the numbers are the
formula B Hk n (d_k + d_v) w that KVCache.nbytes evaluates, not a measurement. The
lab's ``decode`` experiment measures the storage a cache actually holds
(``attnkit.lab.measure.held_bytes``) and checks it against this formula.
"""

from __future__ import annotations

import argparse

import torch

import attnkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=8, help="batch")
    parser.add_argument("--d", type=int, default=1024, help="model width")
    parser.add_argument("--h", type=int, default=16, help="query heads")
    parser.add_argument("--n", type=int, default=8192, help="cached tokens")
    args = parser.parse_args()
    b, d, h, n = args.b, args.d, args.h, args.n
    width = d // h
    for name, hk in (("MHA", h), ("GQA (2 groups)", 2), ("MQA", 1)):
        cache = attnkit.KVCache(b, hk, width, width, dtype=torch.float32, device="meta")
        kv = torch.empty(b, hk, n, width, device="meta")
        cache.update(kv, kv)
        print(
            f"{name:15s} n_kv_heads={hk:3d}  nbytes={cache.nbytes:>13,} "
            f"({cache.nbytes / 2**20:,.0f} MiB; "
            f"{cache.nbytes // (b * n):,} B per token and sequence)"
        )


if __name__ == "__main__":
    main()
