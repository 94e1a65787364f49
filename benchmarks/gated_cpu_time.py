"""Decay attention and the delta rule against their torch competitors, by CPU time.

The gated benchmark cases' comparisons, side by side in one process with interleaved repeats, timed
by the process's CPU time (``time.process_time``) at 1 thread: on a shared machine a
busy neighbour inflates wall-clock times (and, at 2 threads, OpenMP barriers wait on
the busy core), but barely the CPU time of a single-threaded process. Prints the
median of each competitor and the ratios; ``attnkit bench --op gated-delta-fwd ...``
gives the wall-clock figures at any thread count.

    python benchmarks/gated_cpu_time.py                 # all comparisons
    python benchmarks/gated_cpu_time.py --only fwd      # fwd, train, gla, decode, half
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

import attnkit
from attnkit.bench.cases_gated import (
    fla_naive_chunk_simple_gla,
    hf_gated_delta_rule,
    useful_flops,
)
from attnkit.bench.competitors import Missing

D = 128


def inputs(B: int, H: int, N: int, requires_grad: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {
        "q": torch.randn(B, H, N, D, generator=g),
        "k": torch.nn.functional.normalize(torch.randn(B, H, N, D, generator=g), dim=-1),
        "v": torch.randn(B, H, N, D, generator=g),
        "g": -torch.rand(B, H, N, generator=g) * 0.5,
        "beta": torch.rand(B, H, N, generator=g),
    }
    return {k: t.requires_grad_(requires_grad) for k, t in x.items()}


def btd(x: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        k: t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)
        for k, t in x.items()
    }


def cpu_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.process_time()
            fns[name]()
            samples[name].append(time.process_time() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def matmul_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = cpu_times({"mm": lambda: a @ b}, 5)["mm"]
    return 2 * 2048**3 / t


def show(title: str, t: dict[str, float], base: str, flops: int | None = None) -> None:
    print(f"\n{title}")
    peak = PEAK
    for name, sec in t.items():
        extra = f"  {flops / sec / peak:6.1%} of matmul peak (useful)" if flops else ""
        print(f"  {name:42s} {sec * 1e3:9.1f} ms  {t[base] / sec:5.2f}x{extra}")


def fwd(rounds: int) -> None:
    hf = hf_gated_delta_rule()
    for N in (4096, 16384):
        x = inputs(1, 16, N)
        fns: dict[str, Callable[[], object]] = {
            "attnkit delta_rule_attention": lambda x=x: attnkit.delta_rule_attention(
                x["q"], x["k"], x["v"], x["beta"], x["g"]
            ),
        }
        if not isinstance(hf, Missing):
            y = btd(x)
            fns["HF torch_chunk_gated_delta_rule"] = lambda y=y: hf[0](
                y["q"], y["k"], y["v"], y["g"], y["beta"]
            )
        with torch.no_grad():
            t = cpu_times(fns, rounds)
        show(
            f"gated delta rule forward, B=1 H=16 D=M=128 N={N}",
            t,
            list(fns)[-1],
            useful_flops(N, D, D, 64, heads=16, delta=True),
        )


def half(rounds: int) -> None:
    x = inputs(1, 16, 4096)
    fns = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        y = {k: (t.to(dt) if k in "qkv" else t) for k, t in x.items()}
        fns[f"attnkit {name}"] = lambda y=y: attnkit.delta_rule_attention(
            y["q"], y["k"], y["v"], y["beta"], y["g"]
        )
    with torch.no_grad():
        t = cpu_times(fns, rounds)
    print("\nhalf inputs, gated delta rule forward N=4096 (time / fp32 time)")
    for name, sec in t.items():
        print(f"  {name:42s} {sec * 1e3:9.1f} ms  {sec / t['attnkit fp32']:5.2f}x the time")


def train(rounds: int) -> None:
    hf = hf_gated_delta_rule()
    x = inputs(1, 8, 4096, requires_grad=True)
    dO = torch.randn(1, 8, 4096, D)

    def mine() -> None:
        o = attnkit.delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], x["g"])[0]
        torch.autograd.backward(o, dO)

    fns: dict[str, Callable[[], object]] = {"attnkit fwd+bwd": mine}
    if not isinstance(hf, Missing):
        y = btd(x)
        dOt = dO.transpose(1, 2).contiguous()

        def theirs() -> None:
            o = hf[0](y["q"], y["k"], y["v"], y["g"], y["beta"])[0]
            torch.autograd.backward(o, dOt)

        fns["autograd through HF chunked"] = theirs
    t = cpu_times(fns, rounds)
    show(
        "gated delta rule forward + backward, B=1 H=8 D=M=128 N=4096",
        t,
        list(fns)[-1],
        3 * useful_flops(4096, D, D, 64, heads=8, delta=True),
    )


def gla(rounds: int) -> None:
    fla = fla_naive_chunk_simple_gla()
    x = inputs(1, 8, 4096)
    fns: dict[str, Callable[[], object]] = {
        "attnkit gated_linear_attention": lambda: attnkit.gated_linear_attention(
            x["q"], x["k"], x["v"], x["g"]
        ),
    }
    if not isinstance(fla, Missing):
        y = btd(x)
        fns["fla naive_chunk_simple_gla"] = lambda: fla(y["q"], y["k"], y["v"], y["g"])
    with torch.no_grad():
        t = cpu_times(fns, rounds)
    show(
        "scalar-decay (simple GLA) forward, B=1 H=8 D=M=128 N=4096",
        t,
        list(fns)[-1],
        useful_flops(4096, D, D, 64, heads=8, delta=False),
    )


def decode(rounds: int) -> None:
    hf = hf_gated_delta_rule()
    x = inputs(8, 16, 1)
    S = torch.randn(8, 16, D, D) * 0.1
    fns: dict[str, Callable[[], object]] = {
        "attnkit delta_rule_step": lambda: attnkit.delta_rule_step(
            x["q"], x["k"], x["v"], x["beta"], x["g"], state=S
        ),
    }
    if not isinstance(hf, Missing):
        y = btd(x)
        fns["HF torch_recurrent_gated_delta_rule"] = lambda: hf[1](
            y["q"], y["k"], y["v"], y["g"], y["beta"], initial_state=S, output_final_state=True
        )
    state = S.clone()
    fns["attnkit delta_rule_step(inplace=True)"] = lambda: attnkit.delta_rule_step(
        x["q"], x["k"], x["v"], x["beta"], x["g"], state=state, inplace=True
    )
    src, dst = torch.randn(S.numel()), torch.empty(S.numel())
    fns["copy of the state (read + write)"] = lambda: dst.copy_(src)
    with torch.no_grad():
        t = cpu_times(fns, rounds * 10)
    show(
        "decode step, B=8 H=16 D=M=128 (ratio: HF time / time)",
        t,
        list(fns)[1] if len(fns) > 2 else next(iter(fns)),
    )
    copy = t["copy of the state (read + write)"]
    for name in ("attnkit delta_rule_step", "attnkit delta_rule_step(inplace=True)"):
        print(f"  {name}: state read + write at {copy / t[name]:.1%} of copy bandwidth")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["fwd", "half", "train", "gla", "decode"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    PEAK = matmul_peak()
    print(f"fp32 matmul peak ({args.threads} thread(s), CPU time): {PEAK / 1e9:.1f} GFLOP/s")
    for name in args.only:
        globals()[name](args.rounds)
