"""Per-token decode time of a softmax vs a linear-attention TinyLM at several context lengths.

Each model prefills ``n`` random tokens through its cache, then decodes single tokens;
every step is timed on its own (perf_counter around one ``model(token, cache)`` call)
and the median over the steps is reported. Softmax reads its n cached keys/values per
step (O(n)); linear attention updates a constant-size state (O(1)), so only the
softmax time should grow with the context.

    python benchmarks/decode_tinylm.py                        # d=128, 2 layers, 4 heads, B=1
    python benchmarks/decode_tinylm.py --contexts 256 2048 8192 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnkit.layers.transformer import TinyLM

VOCAB = 256


def decode_times(model: TinyLM, context: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` single-token decode calls after ``context`` cached tokens."""
    device = next(model.parameters()).device
    cache = model.new_cache(1, max_len=context + warmup + steps)
    times: list[float] = []
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, context), device=device), cache)  # prefill
        token = torch.randint(0, VOCAB, (1, 1), device=device)
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(token, cache)  # [1, 1, V]
            token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]; greedy keeps it honest
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--steps", type=int, default=200, help="timed decode steps per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    max_len = max(args.contexts) + args.warmup + args.steps
    variants = {
        "softmax": {"backend": "softmax"},
        "linear (elu)": {"backend": "linear", "feature_map": "elu"},
    }
    print(
        f"TinyLM d_model={args.d_model} n_layers={args.layers} n_heads={args.heads} batch=1, "
        f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}; "
        f"median of {args.steps} single-token steps after {args.warmup} warm-up steps"
    )
    header = f"{'backend':<14}" + "".join(f"{f'n={n}':>16}" for n in args.contexts)
    print(header)
    for name, opts in variants.items():
        model = TinyLM(VOCAB, args.d_model, args.layers, args.heads, max_len=max_len, **opts)
        model = model.to(args.device).eval()
        row = f"{name:<14}"
        for n in args.contexts:
            med = statistics.median(decode_times(model, n, args.steps, args.warmup))
            row += f"{med * 1e3:>13.3f} ms"
        print(row)


if __name__ == "__main__":
    main()
