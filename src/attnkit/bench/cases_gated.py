"""Benchmark cases of decay attention and the delta rule (Gated DeltaNet, simple GLA).

Competitors: HF transformers' Qwen3-Next functions ``torch_chunk_gated_delta_rule``
and ``torch_recurrent_gated_delta_rule`` (undecorated through ``__wrapped__``: with
fla installed HF routes them to Triton kernels, which need a GPU) and fla's
``naive_chunk_simple_gla`` (optional). Their native layout [B, T, H, D] is built
outside the timed calls. Shapes follow the benchmark's targets (fp32, D = M = 128).

FLOPs are *useful* FLOPs of the chunked algorithm (:func:`useful_flops`): the cost
model's contractions with the masked parts of the triangular [C, C] products left
out, the same count for every competitor of a row.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor

import attnkit
from attnkit.bench.cases import ATTNKIT, _max_abs_diff, _ratio, _row, _skip, saved_tensor_bytes
from attnkit.bench.competitors import Missing, import_optional
from attnkit.bench.core import BenchContext, register_case
from attnkit.bench.results import CaseResult, MachinePeaks, Metric, Row, Target
from attnkit.ops.decay.reference import chunked_decay

__all__ = ["SIZES", "hf_gated_delta_rule", "useful_flops"]

HF_CHUNK = "HF torch_chunk_gated_delta_rule"
HF_RECURRENT = "HF torch_recurrent_gated_delta_rule"
FLA_SIMPLE_GLA = "fla naive_chunk_simple_gla"
ATTNKIT_REF = "attnkit chunked reference (einsums)"
HALF = {"attnkit bf16": torch.bfloat16, "attnkit fp16": torch.float16}

#: profile -> (H fwd, N fwd list, H train, N train, H gla, N gla, decode B, decode H, D)
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "H": 16,
        "Ns": (4096, 16384),
        "H_train": 8,
        "N_train": 4096,
        "H_gla": 8,
        "N_gla": 4096,
        "B_dec": 8,
        "H_dec": 16,
        "D": 128,
    },
    "quick": {
        "H": 16,
        "Ns": (1024,),
        "H_train": 8,
        "N_train": 1024,
        "H_gla": 8,
        "N_gla": 1024,
        "B_dec": 8,
        "H_dec": 16,
        "D": 128,
    },
    "smoke": {
        "H": 2,
        "Ns": (128,),
        "H_train": 2,
        "N_train": 128,
        "H_gla": 2,
        "N_gla": 128,
        "B_dec": 2,
        "H_dec": 2,
        "D": 16,
    },
}
CHUNK = 64


def useful_flops(N: int, D: int, M: int, C: int, *, heads: int, delta: bool) -> int:
    """Useful forward FLOPs of the chunked algorithm (per :mod:`attnkit.cost`'s contractions).

    Per chunk: state work W S, Kt^T U', Qt S (2 C D M each; W S only for the delta
    rule), the lower triangle of Q K^T and of P U' (C (C + 1) / 2 pairs), and for the
    delta rule the strict lower triangle of K K^T (C (C - 1) / 2) and T [K, V] with T
    lower-triangular (C (C + 1) / 2 pairs over D + M). The triangular inverse itself
    (O(C^3) per chunk) is not counted.
    """
    lower, strict = C * (C + 1) // 2, C * (C - 1) // 2
    per_chunk = 2 * C * D * M * 2 + 2 * lower * (D + M)
    if delta:
        per_chunk += 2 * C * D * M + 2 * strict * D + 2 * lower * (D + M)
    return heads * -(-N // C) * per_chunk


def hf_gated_delta_rule() -> tuple[Callable[..., Any], Callable[..., Any]] | Missing:
    """HF's (chunk, recurrent) gated delta rule functions, undecorated."""
    mod = import_optional("transformers.models.qwen3_next.modeling_qwen3_next", "transformers")
    if isinstance(mod, Missing):
        return mod
    fns = []
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        fn = getattr(mod, name, None)
        if fn is None:
            return Missing(f"transformers: {name} not found (API changed?)")
        fns.append(getattr(fn, "__wrapped__", fn))
    return fns[0], fns[1]


def fla_naive_chunk_simple_gla() -> Callable[..., Any] | Missing:
    mod = import_optional("fla.ops.simple_gla.naive", "flash-linear-attention")
    if isinstance(mod, Missing):
        return mod
    fn = getattr(mod, "naive_chunk_simple_gla", None)
    return fn if fn is not None else Missing("fla: naive_chunk_simple_gla not found")


def _inputs(ctx: BenchContext, B: int, H: int, N: int, D: int) -> dict[str, Tensor]:
    q, k, v = ctx.randn(B, H, N, D), ctx.randn(B, H, N, D), ctx.randn(B, H, N, D)
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, H, N, device=ctx.device) * 0.5
    beta = torch.rand(B, H, N, device=ctx.device)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta}


def _btd(x: Tensor) -> Tensor:
    """[B, H, T, ...] -> [B, T, H, ...] (HF's and fla's layout), contiguous."""
    return x.transpose(1, 2).contiguous()


def _attnkit_delta(x: dict[str, Tensor]) -> Tensor:
    return attnkit.delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], x["g"])[0]


def _hf_call(fn: Callable[..., Any], x: dict[str, Tensor]) -> Tensor:
    out: Tensor = fn(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]
    return out


@register_case(
    "gated-delta-fwd", "Gated delta rule (Qwen3-Next) forward", competitors=("transformers",)
)
def gated_delta_fwd(ctx: BenchContext) -> CaseResult:
    """attnkit's chunked fast path vs HF's chunked torch function, and half inputs."""
    z = SIZES[ctx.profile.name]
    B, H, D = 1, z["H"], z["D"]
    res = CaseResult(
        "gated-delta-fwd",
        "Gated delta rule forward",
        config={"B": B, "H": H, "D": D, "M": D, "dtype": "float32", "chunk": CHUNK},
    )
    res.notes.append(
        "HF gets its [B, T, H, D] layout built outside the timed call; keys unit-norm, "
        "g in [-0.5, 0], beta in [0, 1]. FLOPs: useful FLOPs of the chunked algorithm."
    )
    hf = hf_gated_delta_rule()
    speedups: dict[int, float | None] = {}
    half: dict[str, float | None] = {}
    rows = []
    for N in z["Ns"]:
        x = _inputs(ctx, B, H, N, D)
        fns: dict[str, Callable[[], Tensor]] = {ATTNKIT: partial(_attnkit_delta, x)}
        if N == z["Ns"][0]:
            for label, dt in HALF.items():
                xh = {k: (t.to(dt) if k in "qkv" else t) for k, t in x.items()}
                fns[label] = partial(_attnkit_delta, xh)
        if not isinstance(hf, Missing):
            fns[HF_CHUNK] = partial(_hf_call, hf[0], {k: _btd(t) for k, t in x.items()})
        sec = res.section(f"forward, N={N}", baseline=None if isinstance(hf, Missing) else HF_CHUNK)
        with torch.no_grad():
            ref = fns[ATTNKIT]()
            err: dict[str, float] = {}
            for label, fn in fns.items():
                o = fn()
                err[label] = _max_abs_diff(o.transpose(1, 2) if label == HF_CHUNK else o, ref)
            t = ctx.compare(fns)
        work = useful_flops(N, D, D, CHUNK, heads=B * H, delta=True)
        for label in fns:
            metrics: dict[str, Metric] = {"max_abs_err": err[label]}
            _row(sec, label, t, {"N": N}, flops=work, metrics=metrics)
        if isinstance(hf, Missing):
            _skip(sec, HF_CHUNK, hf.reason, {"N": N})
        sec.compare()
        rows.append(sec.find(ATTNKIT, N=N))
        speedups[N] = _ratio(t, HF_CHUNK, ATTNKIT)
        if N == z["Ns"][0]:
            half = {label: _ratio(t, label, ATTNKIT) for label in HALF}

    def finish(peaks: MachinePeaks | None) -> None:
        frac = rows[0].frac_matmul(peaks) if rows and rows[0] is not None else None
        res.summary = {
            **{f"speedup_vs_hf_N{n}": s for n, s in speedups.items()},
            "frac_matmul_peak_useful": frac,
            **{f"{label} / fp32 time": r for label, r in half.items()},
        }
        goals = {4096: 2.0, 16384: 3.0}
        res.targets = [
            *(
                Target(f"speed-up over HF chunked, N={n}", s, goals.get(n, 2.0), ">=", "x")
                for n, s in speedups.items()
            ),
            Target(f"useful FLOPs, fraction of matmul peak, N={z['Ns'][0]}", frac, 0.40, ">=", "%"),
            *(Target(f"{label} time / fp32 time", r, 1.3, "<=", "x") for label, r in half.items()),
        ]

    res.refresh = finish
    return res


def _train(fn: Callable[[], Tensor], leaves: list[Tensor], grad: Tensor) -> None:
    for t in leaves:
        t.grad = None
    torch.autograd.backward(fn(), grad)


@register_case(
    "gated-delta-train",
    "Gated delta rule forward + backward",
    competitors=("transformers",),
)
def gated_delta_train(ctx: BenchContext) -> CaseResult:
    """Forward + backward vs autograd through HF's chunked function; saved bytes vs N."""
    z = SIZES[ctx.profile.name]
    B, H, D, N = 1, z["H_train"], z["D"], z["N_train"]
    res = CaseResult(
        "gated-delta-train",
        "Gated delta rule forward + backward",
        config={"B": B, "H": H, "D": D, "M": D, "N": N, "dtype": "float32", "chunk": CHUNK},
    )
    res.notes.append(
        "One call: forward, then backward of a fixed output gradient into q, k, v, g, beta. "
        "FLOPs = 3 x useful forward FLOPs. Memory: bytes saved for backward."
    )
    hf = hf_gated_delta_rule()
    x = _inputs(ctx, B, H, N, D)
    dO = ctx.randn(B, H, N, D)
    fns: dict[str, Callable[[], None]] = {}
    saved: dict[str, int] = {}
    mine = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    fns[ATTNKIT] = partial(_train, partial(_attnkit_delta, mine), list(mine.values()), dO)
    saved[ATTNKIT] = saved_tensor_bytes(partial(_attnkit_delta, mine))
    if not isinstance(hf, Missing):
        theirs = {k: _btd(t).requires_grad_(True) for k, t in x.items()}
        fns[HF_CHUNK] = partial(
            _train, partial(_hf_call, hf[0], theirs), list(theirs.values()), _btd(dO)
        )
        saved[HF_CHUNK] = saved_tensor_bytes(partial(_hf_call, hf[0], theirs))
    sec = res.section(
        f"forward + backward, N={N}", baseline=None if isinstance(hf, Missing) else HF_CHUNK
    )
    t = ctx.compare(fns)
    work = 3 * useful_flops(N, D, D, CHUNK, heads=B * H, delta=True)
    for label in fns:
        _row(sec, label, t, {"N": N}, flops=work, metrics={"saved_bytes": saved[label]})
    if isinstance(hf, Missing):
        _skip(sec, HF_CHUNK, hf.reason, {"N": N})
    sec.compare()
    sweep = res.section("saved-for-backward bytes vs N (attnkit)")
    per_token = []
    for n in (N // 4, N // 2, N):
        xs = {k: t.clone().requires_grad_(True) for k, t in _inputs(ctx, B, H, n, D).items()}
        nbytes = saved_tensor_bytes(partial(_attnkit_delta, xs))
        per_token.append(nbytes / n)
        sweep.add(Row(ATTNKIT, {"N": n}, metrics={"saved_bytes": nbytes, "per_token": nbytes / n}))
    speedup = _ratio(t, HF_CHUNK, ATTNKIT)
    flat = max(per_token) / min(per_token) if per_token else None
    res.summary = {
        "speedup_vs_hf": speedup,
        "saved_bytes_per_token": per_token[-1],
        "per_token_max_over_min": flat,
    }
    res.targets = [
        Target(
            f"fwd+bwd speed-up over autograd through HF chunked, N={N}", speedup, 3.0, ">=", "x"
        ),
        Target(
            "saved bytes per token, max / min over N/4..N (flat = linear)", flat, 1.1, "<=", "x"
        ),
    ]
    return res


@register_case(
    "simple-gla-fwd",
    "Scalar-decay (simple GLA) forward",
    competitors=("flash-linear-attention",),
)
def simple_gla_fwd(ctx: BenchContext) -> CaseResult:
    """attnkit.gated_linear_attention (scalar gate) vs fla's naive_chunk_simple_gla."""
    z = SIZES[ctx.profile.name]
    B, H, D, N = 1, z["H_gla"], z["D"], z["N_gla"]
    res = CaseResult(
        "simple-gla-fwd",
        "Scalar-decay (simple GLA) forward",
        config={"B": B, "H": H, "D": D, "M": D, "N": N, "dtype": "float32", "chunk": CHUNK},
    )
    x = _inputs(ctx, B, H, N, D)
    fns: dict[str, Callable[[], Tensor]] = {
        ATTNKIT: lambda: attnkit.gated_linear_attention(x["q"], x["k"], x["v"], x["g"])[0],
    }
    S0 = torch.zeros(B, H, D, D, device=ctx.device)
    fns[ATTNKIT_REF] = lambda: chunked_decay(
        x["q"].unsqueeze(2) * D**-0.5, x["k"], x["v"], x["g"], S0, CHUNK
    )[0][:, :, 0]
    fla = fla_naive_chunk_simple_gla()
    if not isinstance(fla, Missing):
        xt = {k: _btd(t) for k, t in x.items()}
        fla_fn = fla

        def run_fla() -> Tensor:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                out = fla_fn(xt["q"], xt["k"], xt["v"], xt["g"], scale=D**-0.5)
            o: Tensor = out[0] if isinstance(out, tuple) else out
            return o.transpose(1, 2)

        fns[FLA_SIMPLE_GLA] = run_fla
    base = ATTNKIT_REF if isinstance(fla, Missing) else FLA_SIMPLE_GLA
    sec = res.section(f"forward, N={N}", baseline=base)
    with torch.no_grad():
        ref = fns[ATTNKIT]()
        err = {label: _max_abs_diff(fn(), ref) for label, fn in fns.items()}
        t = ctx.compare(fns)
    work = useful_flops(N, D, D, CHUNK, heads=B * H, delta=False)
    for label in fns:
        _row(sec, label, t, {"N": N}, flops=work, metrics={"max_abs_err": err[label]})
    if isinstance(fla, Missing):
        _skip(sec, FLA_SIMPLE_GLA, fla.reason, {"N": N})
    sec.compare()
    vs_fla = _ratio(t, FLA_SIMPLE_GLA, ATTNKIT)
    res.summary = {
        "speedup_vs_fla": vs_fla,
        "speedup_vs_attnkit_reference": _ratio(t, ATTNKIT_REF, ATTNKIT),
    }
    res.targets = [
        Target(
            f"speed-up over fla naive_chunk_simple_gla, N={N}",
            vs_fla,
            3.0,
            ">=",
            "x",
        ),
    ]
    return res


@register_case("gated-delta-decode", "Gated delta rule decode step", competitors=("transformers",))
def gated_delta_decode(ctx: BenchContext) -> CaseResult:
    """attnkit.delta_rule_step vs HF's recurrent function on one token, from a state."""
    z = SIZES[ctx.profile.name]
    B, H, D = z["B_dec"], z["H_dec"], z["D"]
    res = CaseResult(
        "gated-delta-decode",
        "Gated delta rule decode step",
        config={"B": B, "H": H, "D": D, "M": D, "dtype": "float32"},
    )
    x = _inputs(ctx, B, H, 1, D)
    S = ctx.randn(B, H, D, D) * 0.1
    fns: dict[str, Callable[[], object]] = {
        ATTNKIT: lambda: attnkit.delta_rule_step(
            x["q"], x["k"], x["v"], x["beta"], x["g"], state=S
        ),
    }
    hf = hf_gated_delta_rule()
    if not isinstance(hf, Missing):
        xt = {k: _btd(t) for k, t in x.items()}
        rec = hf[1]
        fns[HF_RECURRENT] = lambda: rec(
            xt["q"],
            xt["k"],
            xt["v"],
            xt["g"],
            xt["beta"],
            initial_state=S,
            output_final_state=True,
        )
    sec = res.section(
        "one token from a state", baseline=None if isinstance(hf, Missing) else HF_RECURRENT
    )
    state_bytes = 2 * S.nbytes  # the state read once and written once
    with torch.no_grad():
        o1, S1 = cast(tuple[Tensor, Tensor], fns[ATTNKIT]())
        metrics: dict[str, dict[str, Metric]] = {ATTNKIT: {"max_abs_err": 0.0}}
        if HF_RECURRENT in fns:
            o2, S2 = cast(tuple[Tensor, Tensor], fns[HF_RECURRENT]())
            metrics[HF_RECURRENT] = {
                "max_abs_err": max(_max_abs_diff(o2.transpose(1, 2), o1), _max_abs_diff(S2, S1))
            }
        t = ctx.compare(fns)
    for label in fns:
        _row(sec, label, t, nbytes=state_bytes, metrics=metrics.get(label))
    if isinstance(hf, Missing):
        _skip(sec, HF_RECURRENT, hf.reason)
    sec.compare()
    row = sec.find(ATTNKIT)
    speedup = _ratio(t, HF_RECURRENT, ATTNKIT)

    def finish(peaks: MachinePeaks | None) -> None:
        frac = row.frac_copy(peaks) if row is not None else None
        res.summary = {"speedup_vs_hf": speedup, "frac_copy_bandwidth": frac}
        res.targets = [
            Target("speed-up over HF recurrent, one token", speedup, 4.0, ">=", "x"),
            Target("state read + write, fraction of copy bandwidth", frac, 0.50, ">=", "%"),
        ]

    res.refresh = finish
    return res
