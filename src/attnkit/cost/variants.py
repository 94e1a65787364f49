"""Every attention variant of attnkit, as the program of steps its implementation runs.

The contractions are the op modules' own records (``softmax.SCORES``,
``linear.CHUNK_INTER``, ``decoding.MHA_SPECS["logits"]``, ...), the very objects the
implementations pass to :func:`attnkit._contract.contract`; only the elementwise steps,
cache copies and the shapes of tensors no contraction names are declared here.

Variants (``attnkit cost --table`` lists them with their complexity)::

    softmax          sdpa_reference                     forward, train
    argmax           argmax_attention(mode="hard")      forward, train
    kernel           kernel_attention(sim="polynomial") forward, train  (q.k + 1)^2
    linear           linear_attention, non-causal       forward, train  quadratic phi
    linear_chunked   linear_attention, causal chunked   forward, train  quadratic phi
                     (the plain reference path)
    linear_fast      linear_attention, causal (default) forward, train  quadratic phi
                     (the fast path of attnkit.ops.linear_chunked; it recomputes)
    linear_step      linear_attention_step              decode          quadratic phi
    mha, mqa, gqa    decoding.mha_step / mqa_step / gqa_step           decode
    gla_chunked      decay.reference.chunked_decay      forward, train  scalar gate
    gla_step         gated_linear_attention_step        decode          scalar gate
    gated_delta_chunked  delta.reference.chunked_delta  forward, train  scalar gate
    gated_delta_step     delta_rule_step                decode          scalar gate

Non-causal softmax, argmax and kernel attention; no masks, dropout or eps checks
(they are O(L S) elementwise at most and change no matmul).
"""

from __future__ import annotations

from attnkit import decoding
from attnkit._contract import Contraction
from attnkit.cost.model import Elementwise, Step, Variant, register
from attnkit.ops import gated_step, kernel, linear, linear_chunked, softmax
from attnkit.ops.decay import reference as decay_ref
from attnkit.ops.delta import reference as delta_ref

__all__ = [
    "DECODE_ASSUMPTIONS",
    "GATED_ASSUMPTIONS",
    "GATED_STEP_ASSUMPTIONS",
    "LINEAR_ASSUMPTIONS",
    "SEQUENCE_ASSUMPTIONS",
    "STEP_ASSUMPTIONS",
]

#: Big-O assumptions of the complexity table, per head and sequence: the table writes
#: N, D, M for L = S, E, Ev and drops B and H.
SEQUENCE_ASSUMPTIONS = "N, D, M >> 1; B = H = Hk = 1; L = S = N; E = D; Ev = M"
#: Linear attention: the quadratic feature map (D' = C(D+2, 2)), value width at most the
#: key width and the sequence length (the textbook's "M ~ D").
LINEAR_ASSUMPTIONS = SEQUENCE_ASSUMPTIONS + "; Dp = binomial(D + 2, 2); M <= D; M <= N; C <= N"
#: One recurrent step: no sequence length at all.
STEP_ASSUMPTIONS = "D, M >> 1; B = H = Hk = 1; E = D; Ev = M; Dp = binomial(D + 2, 2); M <= D"
#: Decoding: "n, d >> h" of the textbook, head widths d/h; the cache may be empty (n >= 0).
DECODE_ASSUMPTIONS = "b, n, d >> h, g; g <= h; n >= 0; k = d/h; v = d/h"

_SEQUENCE_DEFAULTS = {"B": 1, "H": 4, "Hk": 4, "L": 1024, "S": 1024, "E": 64, "Ev": 64}
_LINEAR_DEFAULTS = {**_SEQUENCE_DEFAULTS, "E": 16, "Ev": 16, "C": 64}
_DECODE_DEFAULTS = {"b": 8, "d": 1024, "h": 16, "g": 4, "k": 64, "v": 64, "n": 1024}
_QUADRATIC = {"Dp": "binomial(E + 2, 2)"}  # Polynomial(degree=2, c=1).out_dim(E)

_QKV = ("q", "k", "v")
_GROUPED = ("B", "Hk", "H/Hk", "L", "S")  # [B, Hk, G, L, S], G = H/Hk


def _divide(over: str = "num") -> Elementwise:
    # num / den.clamp_min(eps).unsqueeze(-1): clamp and divide.
    return Elementwise(
        "guard and divide", ("num", "den"), "out", 2, over=over, saves=("num", "den")
    )


def _phi(x: str, out: str) -> Elementwise:
    # PowerSeries: one gathered product and one coefficient multiply per feature.
    return Elementwise(f"phi({x})", (x,), out, 2, saves=(x,), backward_flops_per_element=3)


# ---- softmax and argmax ----------------------------------------------------------------------
register(
    Variant(
        name="softmax",
        summary="softmax attention, plain reference (the fused kernel's math)",
        implementation="attnkit.ops.softmax.sdpa_reference",
        steps=(
            softmax.SCORES,
            Elementwise("scale", ("scores",), "scaled", 1),
            Elementwise(
                "softmax",
                ("scaled",),
                "weights",
                5,
                over="scaled",
                saves=("weights",),
                backward_flops_per_element=4,
            ),
            softmax.VALUES,
        ),
        tensors={"scaled": _GROUPED},
        inputs=_QKV,
        outputs=("out",),
        grad_inputs=_QKV,
        recomputable=("scores", "scaled", "weights"),
        assumptions=SEQUENCE_ASSUMPTIONS,
        defaults=_SEQUENCE_DEFAULTS,
    )
)

register(
    Variant(
        name="argmax",
        summary="hard (argmax) attention; q, k get exact-zero gradients, computed by bmm",
        implementation="attnkit.ops.argmax.argmax_attention",
        steps=(
            softmax.SCORES,
            Elementwise("scale", ("scores",), "scaled", 1),
            Elementwise("one-hot argmax", ("scaled",), "onehot", 1, backward_flops_per_element=0),
            Elementwise(
                "zero unattendable rows", ("scaled", "onehot"), "weights", 2, over="scaled"
            ),
            softmax.VALUES,
        ),
        tensors={"scaled": _GROUPED, "onehot": _GROUPED},
        inputs=_QKV,
        outputs=("out",),
        grad_inputs=_QKV,
        recomputable=("scores", "scaled", "onehot", "weights"),
        assumptions=SEQUENCE_ASSUMPTIONS,
        defaults=_SEQUENCE_DEFAULTS,
    )
)

# ---- kernelized attention (ops/kernel.py), quadratic kernel --------------------------------
register(
    Variant(
        name="kernel",
        summary="kernel attention, sim = (q.k + 1)^2, the O(L S) reference",
        implementation='attnkit.ops.kernel.kernel_attention(sim="polynomial")',
        steps=(
            Elementwise("expand k to the H heads (a copy when H != Hk)", ("k",), "k_heads", 0),
            kernel.SIM_DOTS,
            Elementwise("(q.k + 1)^2", ("dots",), "sim", 2, saves=("dots",)),
            kernel.NUMERATOR,
            Elementwise("row sums", ("sim",), "den", 1, over="sim"),
            _divide(),
        ),
        tensors={
            "k": ("B", "Hk", "S", "E"),
            "den": ("B", "H", "L"),
            "out": ("B", "H", "L", "Ev"),
        },
        inputs=_QKV,
        outputs=("out",),
        grad_inputs=_QKV,
        recomputable=("k_heads", "dots", "sim"),
        assumptions=SEQUENCE_ASSUMPTIONS,
        defaults=_SEQUENCE_DEFAULTS,
    )
)

# ---- linearized attention (ops/linear.py), quadratic feature map ---------------------------
_LINEAR_TENSORS = {
    "q": ("B", "H", "L", "E"),
    "k": ("B", "Hk", "S", "E"),
    "S0": ("B", "Hk", "Dp", "Ev"),
    "z0": ("B", "Hk", "Dp"),
    "out": ("B", "H", "L", "Ev"),
}


def _linear(
    name: str,
    summary: str,
    implementation: str,
    steps: tuple[Step, ...],
    tensors: dict[str, tuple[str, ...]],
    recomputable: tuple[str, ...],
) -> Variant:
    return Variant(
        name=name,
        summary=summary,
        implementation=implementation,
        steps=steps,
        tensors={**_LINEAR_TENSORS, **tensors},
        inputs=(*_QKV, "S0", "z0"),
        outputs=("out",),
        grad_inputs=_QKV,
        recomputable=recomputable,
        assumptions=LINEAR_ASSUMPTIONS,
        defaults=_LINEAR_DEFAULTS,
        derived=_QUADRATIC,
    )


register(
    _linear(
        "linear",
        "linear attention, non-causal, quadratic phi (D' = C(D+2, 2))",
        "attnkit.ops.linear.linear_attention(is_causal=False)",
        (
            _phi("q", "fq"),
            _phi("k", "fk"),
            linear.STATE,
            Elementwise("S = S0 + kv", ("S0", "kv"), "S", 1),
            Elementwise("z = z0 + sum_j phi(K_j)", ("z0", "fk"), "z", 1, over="fk"),
            linear.NUMERATOR,
            linear.DENOMINATOR,
            _divide(),
        ),
        {},
        ("fq", "fk"),
    )
)

register(
    _linear(
        "linear_chunked",
        "linear attention, causal, chunked (reference path), quadratic phi",
        'attnkit.ops.linear.linear_attention(is_causal=True, implementation="reference")',
        (
            _phi("q", "fq"),
            _phi("k", "fk"),
            linear.CHUNK_STATES,
            Elementwise("chunk key sums", ("fk",), "kz", 1, over="fk"),
            Elementwise("exclusive prefix of chunk states", ("S0", "kv"), "S_prev", 1),
            Elementwise("exclusive prefix of key sums", ("z0", "kz"), "z_prev", 1),
            Elementwise("final state S", ("S_prev", "kv"), "S_final", 1),
            Elementwise("final state z", ("z_prev", "kz"), "z_final", 1),
            linear.CHUNK_SCORES,
            Elementwise("causal mask", ("A_raw",), "A", 1),
            linear.CHUNK_INTER,
            linear.CHUNK_INTRA,
            Elementwise("inter + intra", ("num_inter", "num_intra"), "num", 1),
            linear.CHUNK_DENOMINATOR,
            Elementwise("den = den_inter + rowsum(A)", ("den_inter", "A"), "den", 1, over="A"),
            _divide(),
        ),
        {
            "kz": ("B", "Hk", "L/C", "Dp"),
            "S_final": ("B", "Hk", "Dp", "Ev"),
            "z_final": ("B", "Hk", "Dp"),
            "num": ("B", "Hk", "H/Hk", "L", "Ev"),
            "den": ("B", "Hk", "H/Hk", "L"),
        },
        # What a recomputing backward (attnkit.ops.linear_chunked) does not keep.
        ("fq", "fk", "kv", "kz", "S_prev", "z_prev", "A_raw", "A"),
    )
)

register(
    Variant(
        name="linear_fast",
        summary="linear attention, causal, the fast chunked path (recomputes), quadratic phi",
        implementation="attnkit.ops.linear.linear_attention(is_causal=True)",
        steps=(
            _phi("q", "fq"),
            _phi("k", "fk"),
            Elementwise("V' = [V, 1] in chunk rows (a copy)", ("v",), "va", 0),
            linear_chunked.CHUNK_STATES,
            Elementwise("inclusive scan of chunk states (+ S0)", ("S0", "kv"), "S_prev", 1),
            linear_chunked.CHUNK_INTER,
            linear_chunked.CHUNK_SCORES,
            Elementwise("causal mask (in place)", ("A_raw",), "A", 1),
            linear_chunked.CHUNK_INTRA,
            Elementwise("inter + intra (baddbmm)", ("o_inter", "o_intra"), "o", 1),
            Elementwise("guard and divide", ("o",), "out", 2, over="out", saves=("out", "den")),
            Elementwise("final state", ("S_prev",), "S_final", 0, over="S_final"),
        ),
        tensors={
            "q": ("B", "H", "L", "E"),
            "k": ("B", "Hk", "S", "E"),
            "v": ("B", "Hk", "S", "Ev"),
            "S0": ("B", "Hk", "Dp", "Ev + 1"),
            "o": ("B", "H", "L", "Ev + 1"),
            "den": ("B", "H", "L"),
            "out": ("B", "H", "L", "Ev"),
            "S_final": ("B", "Hk", "Dp", "Ev + 1"),
        },
        inputs=(*_QKV, "S0"),
        outputs=("out", "S_final"),
        grad_inputs=_QKV,
        # Kept for backward: q, k, v, out and its denominator (and one state per
        # backward tile, which the tile plan sizes: O(D' M) per head and tile).
        recomputable=("fq", "fk", "va", "kv", "S_prev", "A_raw", "A"),
        assumptions=LINEAR_ASSUMPTIONS,
        defaults=_LINEAR_DEFAULTS,
        derived=_QUADRATIC,
        default_activations="recompute",
    )
)

register(
    Variant(
        name="linear_step",
        summary="linear attention, one recurrent decoding step, quadratic phi",
        implementation="attnkit.ops.linear.linear_attention_step",
        steps=(
            _phi("q", "fq"),
            _phi("k", "fk"),
            Elementwise("S = S0 + phi(k)^T v", ("S0", "fk", "v"), "S", 2),
            Elementwise("z = z0 + phi(k)", ("z0", "fk"), "z", 1),
            linear.STEP_NUMERATOR,
            linear.STEP_DENOMINATOR,
            _divide(),
        ),
        tensors={
            "q": ("B", "H", "E"),
            "k": ("B", "Hk", "E"),
            "v": ("B", "Hk", "Ev"),
            "fk": ("B", "Hk", "Dp"),
            "S0": ("B", "Hk", "Dp", "Ev"),
            "z0": ("B", "Hk", "Dp"),
            "out": ("B", "H", "Ev"),
        },
        inputs=(*_QKV, "S0", "z0"),
        outputs=("out", "S", "z"),
        phases=("decode",),
        assumptions=STEP_ASSUMPTIONS,
        defaults={k: v for k, v in _LINEAR_DEFAULTS.items() if k not in ("L", "S", "C")},
        derived=_QUADRATIC,
    )
)


# ---- incremental decoding: MHA, MQA, GQA -------------------------------------------------
def _decode_steps(specs: dict[str, Contraction]) -> tuple[Step, ...]:
    return (
        specs["q"],
        specs["k"],
        specs["v"],
        Elementwise("append k (torch.cat copies the cache)", ("prev_K", "k_new"), "new_K", 0),
        Elementwise("append v (torch.cat copies the cache)", ("prev_V", "v_new"), "new_V", 0),
        specs["logits"],
        Elementwise("softmax(logits / sqrt(k))", ("logits",), "w", 6),
        specs["values"],
        specs["out"],
    )


for _name, _fn, _specs, _cache in (
    ("mha", "mha_step", decoding.MHA_SPECS, ("b", "h", "n")),
    ("mqa", "mqa_step", decoding.MQA_SPECS, ("b", "n")),
    ("gqa", "gqa_step", decoding.GQA_SPECS, ("b", "g", "n")),
):
    register(
        Variant(
            name=_name,
            summary=f"{_name.upper()} decoding step, one new token, n cached",
            implementation=f"attnkit.decoding.{_fn}",
            steps=_decode_steps(_specs),
            tensors={"prev_K": (*_cache, "k"), "prev_V": (*_cache, "v")},
            inputs=("x", "prev_K", "prev_V", "W_q", "W_k", "W_v", "W_o"),
            outputs=("y", "new_K", "new_V"),
            phases=("decode",),
            assumptions=DECODE_ASSUMPTIONS,
            defaults=_DECODE_DEFAULTS,
        )
    )


# ---- decay attention and the delta rule (scalar gate), chunked and one step --------------
#: Per head and sequence; the chunk at most as long as the key and value widths (C = 64
#: against D = M = 128 in Qwen3-Next), so the state work N D M dominates the N C D terms.
GATED_ASSUMPTIONS = "N, D, M >> 1; B = Hv = G = 1; L = N; C <= N; C <= D; C <= M"
GATED_STEP_ASSUMPTIONS = "D, M >> 1; B = Hv = G = 1"
_GATED_DEFAULTS = {"B": 1, "Hv": 16, "G": 1, "L": 4096, "D": 128, "M": 128, "C": 64}
_CHUNK_AXES = ("B", "Hv", "L/C", "C")
_GATED_TENSORS = {
    "q": ("B", "Hv", "G", "L", "D"),
    "k": ("B", "Hv", "L", "D"),
    "v": ("B", "Hv", "L", "M"),
    "g": ("B", "Hv", "L"),
    "beta": ("B", "Hv", "L"),
    "S0": ("B", "Hv", "D", "M"),
    "Gc": _CHUNK_AXES,
    "Gamma": (*_CHUNK_AXES, "C"),
    "A": (*_CHUNK_AXES, "C"),
    "S_final": ("B", "Hv", "D", "M"),
    "out": ("B", "Hv", "G", "L", "M"),
}


def _pad(x: str, out: str) -> Elementwise:
    return Elementwise(f"chunk {x} (pad to whole chunks, a copy)", (x,), out, 0)


def _gated_front(with_beta: bool) -> tuple[Step, ...]:
    steps: list[Step] = [
        _pad("q", "qc"),
        _pad("k", "kc"),
        _pad("v", "vc"),
        Elementwise("cumulative log-gates in each chunk", ("g",), "Gc", 1),
        Elementwise("Gamma = exp(G_i - G_j), masked before the exp", ("Gc",), "Gamma", 3),
        Elementwise("Q exp(G)", ("qc", "Gc"), "q_decayed", 2, over="q_decayed"),
    ]
    if with_beta:
        steps.append(
            Elementwise("copy of kc (the Gram matrix's second operand)", ("kc",), "kc_", 0)
        )
    return tuple(steps)


register(
    Variant(
        name="gla_chunked",
        summary="decay (simple GLA / RetNet / Mamba-2) attention, chunked, scalar gate",
        implementation="attnkit.ops.decay.reference.chunked_decay",
        steps=(
            *_gated_front(False),
            decay_ref.CHUNK_SCORES,
            Elementwise("P = scores * Gamma", ("scores", "Gamma"), "P", 1, over="P"),
            Elementwise("K exp(G_C - G)", ("kc", "Gc"), "k_decayed", 2, over="k_decayed"),
            decay_ref.CHUNK_STATE,
            Elementwise("S_c = a_c S_{c-1} + kv_c (chunk by chunk)", ("S0", "kv"), "S_prev", 2),
            Elementwise("final state", ("S_prev", "kv"), "S_final", 2),
            decay_ref.CHUNK_INTER,
            decay_ref.CHUNK_INTRA,
            Elementwise("inter + intra", ("o_inter", "o_intra"), "out", 1),
        ),
        tensors=_GATED_TENSORS,
        inputs=("q", "k", "v", "g", "S0"),
        outputs=("out", "S_final"),
        grad_inputs=("q", "k", "v", "g"),
        recomputable=(
            "qc",
            "kc",
            "vc",
            "Gc",
            "Gamma",
            "scores",
            "P",
            "q_decayed",
            "k_decayed",
            "kv",
            "S_prev",
            "o_inter",
            "o_intra",
        ),
        assumptions=GATED_ASSUMPTIONS,
        defaults={**_GATED_DEFAULTS, "Hv": 8},
    )
)

register(
    Variant(
        name="gated_delta_chunked",
        summary="gated delta rule (Qwen3-Next), chunked UT/WY form, scalar gate",
        implementation="attnkit.ops.delta.reference.chunked_delta",
        steps=(
            *_gated_front(True),
            delta_ref.CHUNK_GRAM,
            Elementwise(
                "A = StrictTril(beta gram Gamma)", ("gram", "Gamma", "beta"), "A", 2, over="A"
            ),
            Elementwise("T = (I + A)^-1 (triangular solve, not a matmul)", ("A",), "T", 0),
            Elementwise(
                "rhs = [beta K exp(G), beta V]", ("kc", "vc", "Gc", "beta"), "rhs", 2, over="rhs"
            ),
            delta_ref.CHUNK_WU,
            delta_ref.CHUNK_SCORES,
            Elementwise("P = scores * Gamma", ("scores", "Gamma"), "P", 1, over="P"),
            Elementwise("K exp(G_C - G)", ("kc", "Gc"), "k_decayed", 2, over="k_decayed"),
            Elementwise("W, U = split(WU)", ("WU",), "W", 0),
            delta_ref.CHUNK_WS,
            Elementwise("U' = U - W S_{c-1}", ("WU", "WS"), "U_new", 1, over="U_new"),
            delta_ref.CHUNK_STATE,
            Elementwise("S_c = a_c S_{c-1} + kv_c (chunk by chunk)", ("S0", "kv"), "S_final", 2),
            delta_ref.CHUNK_INTER,
            delta_ref.CHUNK_INTRA,
            Elementwise("inter + intra", ("o_inter", "o_intra"), "out", 1),
        ),
        tensors={
            **_GATED_TENSORS,
            "T": (*_CHUNK_AXES, "C"),
            "vc": (*_CHUNK_AXES, "M"),
        },
        inputs=("q", "k", "v", "g", "beta", "S0"),
        outputs=("out", "S_final"),
        grad_inputs=("q", "k", "v", "g", "beta"),
        recomputable=(
            "qc",
            "kc",
            "kc_",
            "vc",
            "Gc",
            "Gamma",
            "gram",
            "A",
            "T",
            "rhs",
            "WU",
            "W",
            "scores",
            "P",
            "q_decayed",
            "k_decayed",
            "WS",
            "U_new",
            "kv",
            "S_prev",
            "o_inter",
            "o_intra",
        ),
        assumptions=GATED_ASSUMPTIONS,
        defaults=_GATED_DEFAULTS,
    )
)


def _gated_step(name: str, summary: str, implementation: str, delta: bool) -> Variant:
    steps: list[Step] = [
        Elementwise("[k; q] (the two rows read from the state)", ("q", "k"), "kq", 0),
        gated_step.STEP_READ,
        Elementwise("reads * a (the decay, on M numbers)", ("reads",), "reads_a", 1),
    ]
    if delta:
        steps.append(Elementwise("u = beta (v - k^T S')", ("reads_a", "v", "beta"), "u", 2))
    u = "u" if delta else "v"
    steps += [
        Elementwise("o = scale (q^T S' + (q . k) u)", ("reads_a", u), "o", 3),
        Elementwise("S' = a S (a fresh state)", ("S0",), "S_decayed", 1),
        Elementwise(
            "S_new = S' + k u^T (in place)", ("S_decayed", "k", u), "S", 2, over="S_decayed"
        ),
    ]
    return Variant(
        name=name,
        summary=summary,
        implementation=implementation,
        steps=tuple(steps),
        tensors={
            "q": ("B", "Hv", "G", "D"),
            "k": ("B", "Hv", "D"),
            "v": ("B", "Hv", "M"),
            "beta": ("B", "Hv"),
            "reads_a": ("B", "Hv", "1 + G", "M"),
            "u": ("B", "Hv", "M"),
            "o": ("B", "Hv", "G", "M"),
            "S0": ("B", "Hv", "D", "M"),
            "S_decayed": ("B", "Hv", "D", "M"),
            "S": ("B", "Hv", "D", "M"),
        },
        inputs=("q", "k", "v", "S0", *(("beta",) if delta else ())),
        outputs=("o", "S"),
        phases=("decode",),
        assumptions=GATED_STEP_ASSUMPTIONS,
        defaults={"B": 8, "Hv": 16, "G": 1, "D": 128, "M": 128},
    )


register(
    _gated_step(
        "gla_step",
        "decay attention, one decoding step from a state, scalar gate",
        "attnkit.gated_linear_attention_step",
        False,
    )
)
register(
    _gated_step(
        "gated_delta_step",
        "gated delta rule, one decoding step from a state (reads the state once)",
        "attnkit.delta_rule_step",
        True,
    )
)
