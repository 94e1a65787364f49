"""attnkit inside HF transformers, side by side on a CPU: Qwen3-Next and Llama.

Random models built from configs (nothing downloaded), timed in one process with
interleaved repeats (medians; ratios are what to read on a shared machine):

1. Qwen3-Next, hidden 256, 4 layers (3 Gated DeltaNet layers with 8 key / 16 value
   heads of width 128, then 1 softmax layer), 2 small experts:
   - whole-model prefill of ``--tokens`` tokens: HF's CPU fallback vs
     ``attnkit.hf.accelerate(model)``;
   - the kernels inside it, at the same shapes: HF's ``torch_chunk_gated_delta_rule`` vs
     ``attnkit.delta_rule_attention`` and HF's ``causal_conv1d_fn`` vs
     ``attnkit.ops.conv.causal_conv1d`` (each in the layout the model calls it with);
   - decoding one token after a ``--tokens`` context: ms per token of the whole model,
     and the per-token delta-rule step + conv update of one layer (HF's
     ``torch_recurrent_gated_delta_rule`` + the copy of its new state into the cache +
     ``causal_conv1d_update`` vs ``attnkit.delta_rule_step(inplace=True)`` +
     ``attnkit.ops.conv.causal_conv1d_update``, as each model's layer runs them) x 3 layers.
2. Llama (hidden 512, 8 heads, 2 key/value heads, 4 layers) prefill of ``--llama-tokens``
   tokens with ``attn_implementation="attnkit"`` vs ``"sdpa"``.

Every accelerated output is checked against the plain model before timing.

``--cpu-time`` times by the process's CPU time at 1 thread instead of wall-clock time
(``time.process_time``, as ``benchmarks/gated_cpu_time.py`` does): on a shared machine
a busy neighbour inflates wall-clock times, and at 2 threads every OpenMP barrier waits
for the busy core, but the CPU time of a single-threaded process barely moves.

    python benchmarks/hf_qwen3_next.py                  # wall clock, 2 threads, N = 4096
    python benchmarks/hf_qwen3_next.py --cpu-time       # CPU time, 1 thread
    python benchmarks/hf_qwen3_next.py --tokens 1024 --repeats 3     # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from gated_cpu_time import cpu_times  # benchmarks/ is on sys.path when run as a script
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next import modeling_qwen3_next as hfq

import attnkit
import attnkit.hf
from attnkit.bench.core import time_interleaved
from attnkit.ops.conv import causal_conv1d, causal_conv1d_update

VOCAB = 2048
CPU_TIME = False  # set by --cpu-time


def qwen3_next() -> Qwen3NextForCausalLM:
    cfg = Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=8,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        max_position_embeddings=65536,
    )
    return Qwen3NextForCausalLM(cfg).eval()


def llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=65536,
    )
    return LlamaForCausalLM(cfg).eval()


def ms(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"


def compare(
    rows: list[dict[str, Any]],
    what: str,
    fns: dict[str, Callable[[], object]],
    repeats: int,
    target: str,
) -> None:
    """Time the two entries of ``fns`` (baseline first) interleaved; add a table row."""
    (base_name, _), (ours_name, _) = fns.items()
    if CPU_TIME:
        t = cpu_times(fns, rounds=repeats)
        base, ours = t[base_name], t[ours_name]
    else:
        wall = time_interleaved(fns, repeats=repeats, warmup=1, min_sample_s=0.2)
        base, ours = wall[base_name].median, wall[ours_name].median
    rows.append(
        {
            "what": what,
            "baseline": base_name,
            "baseline_s": base,
            "attnkit": ours_name,
            "attnkit_s": ours,
            "speedup": base / ours,
            "target": target,
        }
    )
    print(f"  {what}: {base_name} {ms(base)}, {ours_name} {ms(ours)} -> {base / ours:.2f}x")


def check_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    if err > 1e-4:
        raise SystemExit(f"{what}: attnkit and HF differ by {err:.2e} (relative)")
    print(f"  {what}: max relative difference {err:.1e}")


def qwen_benchmarks(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    N = args.tokens
    torch.manual_seed(0)
    plain = qwen3_next()
    fast = attnkit.hf.accelerate(copy.deepcopy(plain))
    ids = torch.randint(0, VOCAB, (1, N))
    print(f"Qwen3-Next (random, {sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M params)")

    with torch.no_grad():
        check_close(fast(ids).logits, plain(ids).logits, f"prefill logits, N={N}")
        compare(
            rows,
            f"Qwen3-Next whole-model prefill, N={N}",
            {"HF CPU fallback": lambda: plain(ids), "accelerate": lambda: fast(ids)},
            args.repeats,
            ">= 1.5x",
        )

    # The kernels at the model's shapes and layouts: HF [B, T, H, D] in, attnkit views.
    layer = plain.model.layers[0].linear_attn
    B, Hk, Hv, D = 1, layer.num_k_heads, layer.num_v_heads, layer.head_k_dim
    C, K = layer.conv_dim, layer.conv_kernel_size
    g_ = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(B, N, Hk, D, generator=g_), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, N, Hk, D, generator=g_), dim=-1)
    v = torch.randn(B, N, Hv, D, generator=g_)
    beta = torch.rand(B, N, Hv, generator=g_)
    g = -torch.rand(B, N, Hv, generator=g_) * 0.1
    x = torch.randn(B, N, C, generator=g_).transpose(1, 2)  # [B, C, T] view, as in the model
    w = torch.randn(C, K, generator=g_)

    def hf_chunk() -> object:
        return hfq.torch_chunk_gated_delta_rule(
            q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True
        )

    def ak_chunk() -> object:
        # as accelerate calls it: transposed views, each q/k head serving Hv / Hk value heads
        o, _ = attnkit.delta_rule_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), beta.transpose(1, 2),
            g.transpose(1, 2), use_qk_l2norm=True, output_final_state=True, enable_gqa=True,
        )  # fmt: skip
        return o.transpose(1, 2)

    with torch.no_grad():
        check_close(ak_chunk(), hf_chunk()[0], "gated delta rule kernel")  # type: ignore[index]
        compare(
            rows,
            f"gated delta rule kernel (one layer), N={N}, Hk={Hk}, Hv={Hv}, D={D}",
            {"torch_chunk_gated_delta_rule": hf_chunk, "delta_rule_attention": ak_chunk},
            args.repeats,
            "",
        )
        y_hf = hfq.causal_conv1d_fn(x, w, None, "silu")
        check_close(causal_conv1d(x, w, None, "silu")[0], y_hf, "short conv")
        compare(
            rows,
            f"short conv + silu (one layer), C={C}, K={K}, N={N}",
            {
                "causal_conv1d_fn": lambda: hfq.causal_conv1d_fn(x, w, None, "silu"),
                "attnkit causal_conv1d": lambda: causal_conv1d(x, w, None, "silu"),
            },
            args.repeats,
            "",
        )

    # Decoding after an N-token context: each model keeps its own cache.
    with torch.no_grad():
        caches = {}
        for name, model in (("plain", plain), ("fast", fast)):
            out = model(ids, use_cache=True)
            caches[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        steps = {"plain": 0, "fast": 0}

        def step(name: str, model: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                cache, tok = caches[name]
                out = model(tok, use_cache=True, **attnkit.hf.cache_kwargs(model, cache))
                caches[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
                steps[name] += 1
                return out

            return run

        compare(
            rows,
            f"Qwen3-Next decode, ms per token after N={N}",
            {"HF CPU fallback": step("plain", plain), "accelerate": step("fast", fast)},
            args.repeats,
            ">= 1.3x tokens/s",
        )
        print(f"  (decode steps run: plain {steps['plain']}, accelerated {steps['fast']})")

    # The per-token delta step + conv update of the 3 layers (HF's vs attnkit's).
    Hl = 3
    S = torch.randn(B, Hv, D, D, generator=g_) * 0.1
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    b1, g1 = beta[:, :1], g[:, :1]
    x1 = torch.randn(B, 1, C, generator=g_).transpose(1, 2)
    conv_hf, conv_ak = torch.randn(B, C, K), torch.randn(B, C, K)

    # As inside the models: HF's layer copies the fresh state its function returns into
    # the cache's tensor (update_recurrent_state); the accelerated layer updates that
    # tensor in place (inplace=True). Each side keeps its own cached state.
    S_hf, S_ak = S.clone(), S.clone()

    def hf_step() -> object:
        for _ in range(Hl):
            hfq.causal_conv1d_update(x1, conv_hf, w, None, "silu")
            _, s_new = hfq.torch_recurrent_gated_delta_rule(
                q1, k1, v1, g=g1, beta=b1, initial_state=S_hf, output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )  # fmt: skip
            S_hf.copy_(s_new)
        return None

    def ak_step() -> object:
        for _ in range(Hl):
            causal_conv1d_update(x1, conv_ak, w, None, "silu")
            attnkit.delta_rule_step(
                q1.transpose(1, 2), k1.transpose(1, 2), v1.transpose(1, 2),
                b1.transpose(1, 2), g1.transpose(1, 2), state=S_ak, use_qk_l2norm=True,
                enable_gqa=True, inplace=True,
            )  # fmt: skip
        return None

    with torch.no_grad():
        o_hf, s_hf = hfq.torch_recurrent_gated_delta_rule(
            q1, k1, v1, g=g1, beta=b1, initial_state=S, output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        o_ak, s_ak = attnkit.delta_rule_step(
            q1.transpose(1, 2), k1.transpose(1, 2), v1.transpose(1, 2), b1.transpose(1, 2),
            g1.transpose(1, 2), state=S, use_qk_l2norm=True, enable_gqa=True,
        )  # fmt: skip
        check_close(o_ak.transpose(1, 2), o_hf, "delta rule step")
        check_close(s_ak, s_hf, "delta rule step state")
        compare(
            rows,
            f"delta-rule step + conv update per token (x{Hl} layers), B=1, Hv={Hv}, D={D}",
            {
                "HF recurrent + cache copy + conv update": hf_step,
                "attnkit step (in place) + conv update": ak_step,
            },
            args.repeats * 20,  # about a millisecond a call: more rounds for the median
            ">= 3x",
        )


def llama_benchmark(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    N = args.llama_tokens
    attnkit.hf.register()
    torch.manual_seed(0)
    sdpa = llama()
    sdpa.set_attn_implementation("sdpa")
    ours = copy.deepcopy(sdpa)
    ours.set_attn_implementation("attnkit")
    ids = torch.randint(0, VOCAB, (1, N))
    print("Llama (random, GQA 8:2)")
    with torch.no_grad():
        check_close(ours(ids).logits, sdpa(ids).logits, f"logits, N={N}")
        compare(
            rows,
            f'Llama prefill, N={N}, attn_implementation="attnkit" vs "sdpa"',
            {"sdpa": lambda: sdpa(ids), "attnkit": lambda: ours(ids)},
            args.repeats,
            "within 5%",
        )


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| what | HF / baseline | attnkit | speedup | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['baseline']} {ms(r['baseline_s'])} | "
            f"{ms(r['attnkit_s'])} | {r['speedup']:.2f}x | {r['target']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="Qwen3-Next context N")
    parser.add_argument("--llama-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="CPU time at 1 thread")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    global CPU_TIME
    CPU_TIME = args.cpu_time
    torch.set_num_threads(1 if args.cpu_time else args.threads)
    t0 = time.perf_counter()
    clock = "CPU time (process_time)" if CPU_TIME else "wall clock"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}; "
        f"{clock}, medians of {args.repeats} interleaved rounds"
    )
    rows: list[dict[str, Any]] = []
    qwen_benchmarks(args, rows)
    if not args.skip_llama:
        llama_benchmark(args, rows)
    print()
    print(markdown(rows))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"threads": torch.get_num_threads(), "clock": clock, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
