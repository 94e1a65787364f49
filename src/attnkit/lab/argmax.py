r"""Experiment ``argmax``: what hard attention does to gradients, and to learning.

Part 1, gradient flow. One head, a few queries and keys; loss = sum(out * w) for a
fixed random w. Argmax ("hard") attention's output is piecewise constant in q and k,
so their gradients are exactly zero and only the selected value rows get gradient
(onehot^T w). Straight-through (hard forward, softmax(scores / tau) backward),
Gumbel-softmax and softmax pass gradient to q, k and (softmax) every value row.

Part 2, learning to retrieve. A one-layer retriever: N (key, value) token pairs
and a query token equal to one of the keys; predict the paired value::

    q = W_q E_k[query],  k_j = W_k E_k[key_j],  v_j = W_v E_v[value_j]
    logits = W_out attention(q, k, v)            attention = argmax_attention(mode=...)

trained with Adam (no weight decay, so a zero gradient means no update) under each
mode. Softmax learns to route. Hard argmax cannot: W_q, W_k and E_k (the only
parameters that decide which key is selected) receive exactly-zero gradients, so
they never change and the routing accuracy (how often the argmax key is the
query's key) stays at its initial value, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.lab import plotting
from attnkit.lab.core import EXPERIMENTS, Context, Experiment, ExperimentResult
from attnkit.lab.measure import central_differences
from attnkit.ops.argmax import argmax_attention

__all__ = ["MODES", "SETTINGS", "ArgmaxSettings", "Retriever", "run"]

SEED = 1234
#: The modes compared, in plot order, with the tau each uses.
MODES: tuple[tuple[str, float], ...] = (
    ("softmax", 1.0),
    ("hard", 1.0),
    ("straight_through", 1.0),
    ("gumbel", 1.0),
)
_LABELS = {
    "softmax": "softmax",
    "hard": "hard argmax",
    "straight_through": "straight-through",
    "gumbel": "Gumbel-softmax",
}


@dataclass(frozen=True)
class ArgmaxSettings:
    steps: int  # optimiser steps of the retrieval task
    batch: int
    pairs: int  # N (key, value) pairs per example
    keys: int  # key vocabulary
    values: int  # value vocabulary
    width: int  # model width d
    lr: float
    eval_examples: int
    eval_every: int


SETTINGS: dict[str, ArgmaxSettings] = {
    "test": ArgmaxSettings(40, 32, 4, 16, 16, 16, 1e-2, 256, 10),
    # Softmax, straight-through and Gumbel reach 1.0 held-out accuracy within ~50 steps
    # (measured); 200 leave a margin and keep the training curves readable.
    "quick": ArgmaxSettings(200, 64, 8, 32, 32, 32, 5e-3, 2048, 10),
    "full": ArgmaxSettings(2000, 64, 8, 32, 32, 32, 5e-3, 4096, 50),
}


#: Central-difference step for the gradient probes (float64): far below the smallest
#: score gap of the draw below, so no move crosses a tie, and large enough that
#: rounding stays ~1e-10 relative.
FD_STEP = 1e-6


def _loss(mode: str, tau: float, w: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """(q, k, v) -> sum(argmax_attention(q, k, v, mode) * w), Gumbel noise fixed."""

    def loss(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(SEED + 1)
        return (argmax_attention(q, k, v, mode=mode, tau=tau, generator=gen) * w).sum()

    return loss


def _finite_differences(
    loss: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor
) -> dict[str, Tensor]:
    """Central differences of ``loss`` in every coordinate of q, k and v."""
    return {
        "q": central_differences(lambda x: loss(x, k, v), q, FD_STEP),
        "k": central_differences(lambda x: loss(q, x, v), k, FD_STEP),
        "v": central_differences(lambda x: loss(q, k, x), v, FD_STEP),
    }


def _gradients(result: ExperimentResult) -> dict[str, Any]:
    """Part 1: gradients to q, k, v under each mode, against finite differences."""
    gen = torch.Generator().manual_seed(SEED)
    L, S, E, Ev = 3, 6, 4, 3
    q0 = torch.randn(1, 1, L, E, generator=gen, dtype=torch.float64)
    k0 = torch.randn(1, 1, S, E, generator=gen, dtype=torch.float64)
    v0 = torch.randn(1, 1, S, Ev, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 1, L, Ev, generator=gen, dtype=torch.float64)
    scores = (q0 @ k0.transpose(-1, -2))[0, 0]  # [L, S], computed here, not by the op
    top2 = scores.topk(2, dim=-1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())  # the nearest tie, in score units
    # A move of one coordinate by FD_STEP changes a score by at most FD_STEP * max|x|.
    reach = FD_STEP * float(torch.cat([q0.abs().flatten(), k0.abs().flatten()]).max())
    selected = sorted({int(j) for j in scores.argmax(-1)})
    per_mode: dict[str, Any] = {}
    for mode, tau in MODES:
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        loss = _loss(mode, tau, w)
        torch.autograd.backward(loss(q, k, v))
        # No gradient at all (a tensor left out of the graph) reads as zeros: the
        # finite differences below then decide whether that is right.
        dq, dk, dv = (torch.zeros_like(t) if t.grad is None else t.grad for t in (q, k, v))
        row_norms = dv[0, 0].norm(dim=-1)  # [S]
        per_mode[mode] = {
            "tau": tau,
            "grad_q_norm": float(dq.norm()),
            "grad_k_norm": float(dk.norm()),
            "grad_v_norm": float(dv.norm()),
            "grad_q_max_abs": float(dq.abs().max()),
            "grad_k_max_abs": float(dk.abs().max()),
            "grad_v_row_norms": [float(x) for x in row_norms],
            "v_rows_with_gradient": [j for j in range(S) if float(row_norms[j]) != 0.0],
        }
        if mode in ("hard", "softmax"):  # the finite-difference probe (deterministic modes)
            fd = _finite_differences(loss, q0, k0, v0)
            auto = {"q": dq, "k": dk, "v": dv}
            per_mode[mode]["fd_max_abs"] = {x: float(fd[x].abs().max()) for x in fd}
            per_mode[mode]["autograd_minus_fd_max_abs"] = {
                x: float((auto[x] - fd[x]).abs().max()) for x in fd
            }
            per_mode[mode]["fd_v_rows"] = [
                j for j in range(S) if float(fd["v"][0, 0, j].abs().max()) > 1e-9
            ]
    hard, soft = per_mode["hard"], per_mode["softmax"]

    # Piecewise constant, not constant: move query 0 across its tie with the runner-up
    # key and the output jumps from one value row to the other.
    a, b = (int(j) for j in scores[0].topk(2).indices)
    direction = (k0[0, 0, b] - k0[0, 0, a]) / float((k0[0, 0, b] - k0[0, 0, a]).norm() ** 2)
    jump = {}
    for label, t in (("before", 0.99), ("after", 1.01)):
        q_moved = q0.clone()
        q_moved[0, 0, 0] += t * float(scores[0, a] - scores[0, b]) * direction
        out = argmax_attention(q_moved, k0, v0)[0, 0, 0]
        jump[label] = int(min(range(S), key=lambda j: float((v0[0, 0, j] - out).abs().max())))

    # The worked example of attnkit.ops.argmax's docstring.
    keys = torch.tensor([[1.0, 2, 0], [0, 3, 4], [5, 0, 0], [0, 0, 1]])
    values = torch.tensor([[2.0, 0, 1], [1, 4, 3], [0, -1, 4], [1, 0, -1]])
    query = torch.tensor([[1.0, 1, 2]])
    example = argmax_attention(query[None, None], keys[None, None], values[None, None])
    got = [float(x) for x in example[0, 0, 0]]
    result.claim(
        "worked_example",
        "Argmax attention returns the value of the best-matching key (the worked example)",
        theory="scores (3, 11, 5, 2) -> output (1, 4, 3)",
        measured=f"output {tuple(got)}",
        passed=got == [1.0, 4.0, 3.0],
        tolerance="exact",
        could_fail_if="the op picked the smallest score, the wrong axis (a key per value "
        "column), a softmax blend, or returned the key instead of its value",
    )
    fd_qk = max(hard["fd_max_abs"]["q"], hard["fd_max_abs"]["k"])
    diff_qk = max(hard["autograd_minus_fd_max_abs"]["q"], hard["autograd_minus_fd_max_abs"]["k"])
    result.claim(
        "hard_zero_qk_grad",
        "Hard argmax: the output is piecewise constant in q and k, so their gradient is "
        "zero almost everywhere, and autograd returns that zero",
        theory="central differences of the output in every coordinate of q and k are "
        "exactly 0 away from ties; autograd's dL/dq, dL/dk equal them; crossing a tie "
        "makes the output jump",
        measured=(
            f"max |finite difference| = {fd_qk:.1g} (step {FD_STEP:g}; the nearest tie is "
            f"{gap:.3f} away in score, a step moves a score by <= {reach:.1g}); max "
            f"|autograd - finite difference| = {diff_qk:.1g}; moving query 0 just across its "
            f"tie switches the output from v_{jump['before']} to v_{jump['after']}"
        ),
        passed=fd_qk == 0.0
        and diff_qk == 0.0
        and reach < gap / 2
        and (jump["before"], jump["after"]) == (a, b),
        tolerance="exactly 0.0 (float64), with no tie within reach of a step",
        could_fail_if="the forward blended values (a soft or interpolated selection moves "
        "under a 1e-6 step), or the backward passed a surrogate gradient such as "
        "straight-through's softmax gradient (autograd would then differ from the "
        "finite differences), or the selection did not switch at the tie",
        value=fd_qk,
    )
    v_err = hard["autograd_minus_fd_max_abs"]["v"]
    result.claim(
        "hard_selected_v_only",
        "Hard argmax: only the selected value rows receive gradient",
        theory=f"rows {selected} (the argmax keys of the {L} queries, from q k^T computed "
        "directly); autograd's dL/dv equal to its central differences",
        measured=(
            f"autograd: rows {hard['v_rows_with_gradient']}; finite differences: rows "
            f"{hard['fd_v_rows']}; max |autograd - finite difference| = {v_err:.1g}"
        ),
        passed=hard["v_rows_with_gradient"] == selected
        and hard["fd_v_rows"] == selected
        and v_err <= 1e-8,
        tolerance="same rows; |autograd - finite difference| <= 1e-8 (the loss is linear "
        "in v: central differences are exact up to rounding)",
        could_fail_if="the value gradient went to another row than the selected one (an "
        "off-by-one or transposed one-hot), was spread over all rows (a soft backward), or "
        "was scaled (e.g. by tau)",
        value=v_err,
    )
    relaxed = [m for m, _ in MODES if m != "hard"]
    flows = {m: min(per_mode[m]["grad_q_norm"], per_mode[m]["grad_k_norm"]) for m in relaxed}
    soft_err = max(soft["autograd_minus_fd_max_abs"][x] for x in ("q", "k"))
    soft_size = max(soft["fd_max_abs"][x] for x in ("q", "k"))
    result.claim(
        "relaxations_pass_gradient",
        "Straight-through, Gumbel-softmax and softmax give queries and keys a gradient",
        theory="dL/dq != 0 and dL/dk != 0; for softmax it equals the central differences "
        "(the probe that reads 0 for hard argmax sees this gradient)",
        measured=", ".join(f"{_LABELS[m]}: min(||dq||, ||dk||) = {g:.3g}" for m, g in flows.items())
        + f"; softmax: max |autograd - finite difference| = {soft_err:.1g} "
        f"(largest entry {soft_size:.3g})",
        passed=all(g > 0 for g in flows.values()) and soft_err <= 1e-6 * soft_size,
        tolerance="> 0; softmax within 1e-6 relative of the finite differences",
        could_fail_if="a relaxation detached its scores (zero gradient like hard argmax), "
        "or softmax's backward were wrong (e.g. missing the -p p^T term)",
    )
    return {
        "shape": {"L": L, "S": S, "E": E, "Ev": Ev},
        "selected_rows": selected,
        "nearest_tie": gap,
        "fd_step": FD_STEP,
        "tie_crossing": {"from": a, "to": b, "observed": jump},
        "modes": per_mode,
    }


class Retriever(nn.Module):
    """One attention layer that must route a query token to its paired value.

    Shapes: keys, values [B, N] (token ids), query [B] -> logits [B, n_values].
    """

    def __init__(self, n_keys: int, n_values: int, width: int, mode: str, tau: float) -> None:
        super().__init__()
        self.mode, self.tau = mode, tau
        self.key_emb = nn.Embedding(n_keys, width)
        self.value_emb = nn.Embedding(n_values, width)
        self.W_q = nn.Linear(width, width, bias=False)
        self.W_k = nn.Linear(width, width, bias=False)
        self.W_v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, n_values)

    def scores(self, keys: Tensor, query: Tensor) -> Tensor:
        """q.k_j for each example: [B, N]."""
        q = self.W_q(self.key_emb(query))  # [B, d]
        k = self.W_k(self.key_emb(keys))  # [B, N, d]
        return torch.einsum("bd,bnd->bn", q, k)

    def forward(
        self, keys: Tensor, values: Tensor, query: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        q = self.W_q(self.key_emb(query))[:, None, None, :]  # [B, 1, 1, d]
        k = self.W_k(self.key_emb(keys))[:, None]  # [B, 1, N, d]
        v = self.W_v(self.value_emb(values))[:, None]  # [B, 1, N, d]
        o = argmax_attention(q, k, v, mode=self.mode, tau=self.tau, generator=generator)
        logits: Tensor = self.out(o[:, 0, 0])  # [B, n_values]
        return logits

    def routing_parameters(self) -> dict[str, Tensor]:
        """The parameters that decide which key a query selects."""
        return {"W_q": self.W_q.weight, "W_k": self.W_k.weight, "E_k": self.key_emb.weight}


def _batch(
    s: ArgmaxSettings, n: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """n examples: keys, values [n, N] (distinct within a row), the query key and its value."""
    keys = torch.rand(n, s.keys, generator=gen).argsort(-1)[:, : s.pairs]
    values = torch.rand(n, s.values, generator=gen).argsort(-1)[:, : s.pairs]
    slot = torch.randint(s.pairs, (n,), generator=gen)
    rows = torch.arange(n)
    return keys, values, keys[rows, slot], values[rows, slot]


def _train(
    s: ArgmaxSettings, mode: str, tau: float, advance: Any
) -> tuple[dict[str, Any], Retriever]:
    torch.manual_seed(SEED)  # identical initial weights for every mode
    model = Retriever(s.keys, s.values, s.width, mode, tau)
    start = {k: p.detach().clone() for k, p in model.routing_parameters().items()}
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(SEED + 10)
    noise = torch.Generator().manual_seed(SEED + 11)
    eval_set = _batch(s, s.eval_examples, torch.Generator().manual_seed(SEED + 12))
    losses: list[float] = []
    evals: list[dict[str, float]] = []
    max_qk_grad = 0.0

    def evaluate(step: int) -> None:
        keys, values, query, target = eval_set
        with torch.no_grad():
            model.eval()
            logits = model(keys, values, query, torch.Generator().manual_seed(SEED + 13))
            routed = model.scores(keys, query).argmax(-1)  # which key the argmax selects
            correct_slot = (keys == query[:, None]).float().argmax(-1)
            change = sum(
                float((p.detach() - start[n]).norm()) for n, p in model.routing_parameters().items()
            )
            evals.append(
                {
                    "step": step,
                    "accuracy": float((logits.argmax(-1) == target).float().mean()),
                    "routing_accuracy": float((routed == correct_slot).float().mean()),
                    "routing_weight_change": change,
                }
            )
            model.train()

    evaluate(0)
    for step in range(1, s.steps + 1):
        keys, values, query, target = _batch(s, s.batch, data)
        loss = F.cross_entropy(model(keys, values, query, noise), target)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        for p in model.routing_parameters().values():
            if p.grad is not None:
                max_qk_grad = max(max_qk_grad, float(p.grad.abs().max()))
        opt.step()
        losses.append(float(loss.detach()))
        if step % s.eval_every == 0 or step == s.steps:
            evaluate(step)
        advance(1)
    unchanged = all(
        torch.equal(p.detach(), start[n]) for n, p in model.routing_parameters().items()
    )
    return {
        "mode": mode,
        "tau": tau,
        "loss": losses,
        "evals": evals,
        "final_accuracy": evals[-1]["accuracy"],
        "initial_routing_accuracy": evals[0]["routing_accuracy"],
        "final_routing_accuracy": evals[-1]["routing_accuracy"],
        "routing_weight_change": evals[-1]["routing_weight_change"],
        "routing_weights_bitwise_unchanged": unchanged,
        "max_abs_routing_grad": max_qk_grad,
    }, model


def run(ctx: Context) -> ExperimentResult:
    s = SETTINGS[ctx.profile]
    result = ExperimentResult(
        name="argmax",
        title="Argmax attention: zero gradients, and what that does to learning",
        profile=ctx.profile,
        seed=SEED,
        summary=(
            "Gradients of sum(out * w) under hard argmax, straight-through, Gumbel-softmax "
            f"and softmax attention; then a retrieval task ({s.pairs} key-value pairs from "
            f"{s.keys} keys and {s.values} values, predict the value of the queried key) "
            f"trained with each, {s.steps} Adam steps of batch {s.batch}, lr {s.lr:g}, "
            f"width {s.width}, same initial weights and data for every mode."
        ),
    )
    result.numbers["gradients"] = _gradients(result)
    _gradient_figure(ctx, result)

    advance = ctx.task("argmax: retrieval training", s.steps * len(MODES))
    runs = {mode: _train(s, mode, tau, advance)[0] for mode, tau in MODES}
    result.numbers["training"] = {"settings": s.__dict__, "runs": runs}
    chance = 1.0 / s.pairs
    soft, hard = runs["softmax"], runs["hard"]
    result.claim(
        "softmax_learns",
        "Softmax attention learns to retrieve (gradients reach W_q, W_k)",
        theory="accuracy -> 1",
        measured=f"held-out accuracy {soft['final_accuracy']:.3f} after {s.steps} steps",
        passed=soft["final_accuracy"] >= 0.9,
        tolerance=">= 0.9",
        could_fail_if="softmax attention's gradient did not reach W_q, W_k (e.g. detached "
        "scores), or the retrieval data paired keys with the wrong values",
        value=soft["final_accuracy"],
    )
    result.claim(
        "hard_routing_frozen",
        "Hard argmax never changes its query/key path: W_q, W_k and E_k stay bit-for-bit "
        "equal to their initial values",
        theory="zero gradient at every step -> no Adam update",
        measured=(
            f"max |grad| over all steps = {hard['max_abs_routing_grad']:.1g}; bitwise "
            f"unchanged: {hard['routing_weights_bitwise_unchanged']}"
        ),
        passed=hard["routing_weights_bitwise_unchanged"] and hard["max_abs_routing_grad"] == 0.0,
        tolerance="exact",
        could_fail_if="hard argmax passed any gradient to the scores (a surrogate in its "
        "backward) or the optimiser moved parameters without gradient (weight decay): "
        "W_q, W_k or E_k would change",
    )
    result.claim(
        "hard_cannot_route",
        "Hard argmax cannot learn to route: its routing accuracy stays at its random "
        "initial value and its accuracy is capped by it",
        theory=(
            f"routing accuracy constant (about 1/N = {chance:.3f} for random weights); "
            "accuracy <= routing accuracy"
        ),
        measured=(
            f"routing {hard['initial_routing_accuracy']:.3f} -> "
            f"{hard['final_routing_accuracy']:.3f}; accuracy {hard['final_accuracy']:.3f}"
        ),
        passed=hard["initial_routing_accuracy"] == hard["final_routing_accuracy"]
        and hard["final_accuracy"] <= hard["final_routing_accuracy"] + 1e-12,
        tolerance="routing accuracy equal before and after; accuracy <= routing accuracy",
        could_fail_if="the routing weights moved, or the hard forward were soft (the "
        "output would blend values and beat the routing accuracy)",
        value=hard["final_accuracy"],
    )
    moved = {m: runs[m]["routing_weight_change"] for m in ("straight_through", "gumbel")}
    result.claim(
        "relaxations_train_routing",
        "Straight-through and Gumbel-softmax do train the query/key path",
        theory="||W - W_0|| > 0 for W_q, W_k, E_k; routing accuracy rises above hard's",
        measured=", ".join(
            f"{_LABELS[m]}: ||dW|| = {moved[m]:.3g}, routing "
            f"{runs[m]['final_routing_accuracy']:.3f}, accuracy {runs[m]['final_accuracy']:.3f}"
            for m in moved
        ),
        passed=all(
            moved[m] > 0 and runs[m]["final_routing_accuracy"] > hard["final_routing_accuracy"]
            for m in moved
        ),
        tolerance="weight change > 0 and routing accuracy > hard argmax's",
        could_fail_if="straight-through or Gumbel-softmax lost their surrogate gradient "
        "(they would freeze like hard argmax)",
    )
    _training_figure(ctx, result, s, runs, chance)
    return result


def _gradient_figure(ctx: Context, result: ExperimentResult) -> None:
    g = result.numbers["gradients"]
    modes = [m for m, _ in MODES]
    fig, (ax_bar, ax_rows) = plotting.new_figure(2, width=6.0, height=4.2)
    width = 0.25
    for i, (tensor, col) in enumerate((("q", "#1f77b4"), ("k", "#ff7f0e"), ("v", "#2ca02c"))):
        xs = [j + (i - 1) * width for j in range(len(modes))]
        ys = [g["modes"][m][f"grad_{tensor}_norm"] for m in modes]
        ax_bar.bar(xs, ys, width, color=col, label=f"||dL/d{tensor}||")
    for j, m in enumerate(modes):
        if g["modes"][m]["grad_q_norm"] == 0.0 and g["modes"][m]["grad_k_norm"] == 0.0:
            ax_bar.annotate(
                "dq = dk = 0\n(exactly)",
                (j - width / 2, 0.02),
                ha="center",
                va="bottom",
                fontsize="small",
            )
    ax_bar.set_xticks(
        range(len(modes)), [_LABELS[m].replace(" ", "\n").replace("-", "-\n") for m in modes]
    )
    ax_bar.set_ylabel("gradient norm (Frobenius; dimensionless)")
    ax_bar.set_xlabel("attention mode")
    ax_bar.set_title("Gradients of sum(out * w) (theory: hard -> dq = dk = 0)")
    plotting.legend(ax_bar)
    rows = [g["modes"][m]["grad_v_row_norms"] for m in modes]
    im = ax_rows.imshow(rows, aspect="auto", cmap="viridis")
    S = g["shape"]["S"]
    ax_rows.set_xticks(range(S), [f"{j}{'*' if j in g['selected_rows'] else ''}" for j in range(S)])
    ax_rows.set_yticks(range(len(modes)), [_LABELS[m] for m in modes])
    ax_rows.set_xlabel("value row j (* = selected by some query's argmax; 0 = exactly zero)")
    ax_rows.set_title("||dL/dv_j|| per value row (theory: hard -> * rows only)")
    ax_rows.grid(False)
    for i, row in enumerate(rows):
        for j, val in enumerate(row):
            ax_rows.text(
                j,
                i,
                "0" if val == 0.0 else f"{val:.2f}",
                ha="center",
                va="center",
                fontsize="x-small",
                color="white" if val < 0.5 * max(max(r) for r in rows) else "black",
            )
    fig.colorbar(im, ax=ax_rows, label="gradient norm (dimensionless)")
    hard = g["modes"]["hard"]
    result.figures.append(
        plotting.save(
            fig,
            ctx,
            "argmax_gradients",
            "Gradient flow through argmax attention and its relaxations",
            f"Theory: the argmax output is piecewise constant in q and k, so their gradient "
            f"is exactly zero and only the selected value rows get gradient; the "
            f"relaxations pass gradient to q and k. Measured ({g['shape']['L']} queries, "
            f"{S} keys): hard gives ||dq|| = {hard['grad_q_norm']:g} and ||dk|| = "
            f"{hard['grad_k_norm']:g}, gradient only on rows {hard['v_rows_with_gradient']} "
            f"(the argmax rows are {g['selected_rows']}); softmax spreads it over all rows.",
        )
    )


def _training_figure(
    ctx: Context,
    result: ExperimentResult,
    s: ArgmaxSettings,
    runs: dict[str, dict[str, Any]],
    chance: float,
) -> None:
    fig, (ax_loss, ax_route, ax_w) = plotting.new_figure(3, width=5.2, height=4.4)
    window = max(1, s.steps // 50)
    for mode, _ in MODES:
        r = runs[mode]
        col = plotting.color(mode)
        loss = torch.tensor(r["loss"])
        smooth = F.avg_pool1d(loss[None, None], window, stride=1)[0, 0] if window > 1 else loss
        steps = list(range(window, s.steps + 1))
        ax_loss.plot(steps, smooth.tolist(), color=col, label=_LABELS[mode])
        ev_steps = [e["step"] for e in r["evals"]]
        ax_route.plot(
            ev_steps, [e["routing_accuracy"] for e in r["evals"]], color=col, label=_LABELS[mode]
        )
        ax_w.plot(
            ev_steps,
            [e["routing_weight_change"] for e in r["evals"]],
            color=col,
            label=_LABELS[mode],
        )
    r0 = runs["hard"]["final_routing_accuracy"]
    V = s.values
    floor = -(r0 * math.log(r0) if r0 > 0 else 0.0) - (1 - r0) * math.log((1 - r0) / (V - 1))
    ax_loss.axhline(
        math.log(V),
        color="gray",
        ls=":",
        label=f"uniform over the {V} values: ln {V} = {math.log(V):.2f}",
    )
    ax_loss.axhline(
        floor,
        color=plotting.color("hard"),
        ls="--",
        lw=1,
        label=f"best possible with frozen routing r = {r0:.3f}: {floor:.2f}",
    )
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training cross-entropy (nats; log scale)")
    ax_loss.set_title(f"Loss (moving average over {window} steps)")
    ax_route.axhline(chance, color="gray", ls=":", label=f"random routing: 1/N = {chance:.3f}")
    ax_route.set_ylabel("routing accuracy (fraction of held-out queries)")
    ax_route.set_ylim(-0.02, 1.02)
    ax_route.set_title("Is the argmax key the queried key?")
    ax_w.set_yscale("symlog", linthresh=1e-3)
    ax_w.set_ylabel("||ΔW_q|| + ||ΔW_k|| + ||ΔE_k||  (Frobenius; symlog)")
    ax_w.set_title("Query/key weights moved (theory: hard = 0)")
    for ax in (ax_loss, ax_route, ax_w):
        ax.set_xlabel("optimiser step")
        plotting.legend(ax)
    hard, soft = runs["hard"], runs["softmax"]
    st, gum = runs["straight_through"], runs["gumbel"]
    result.figures.append(
        plotting.save(
            fig,
            ctx,
            "argmax_training",
            "Training a retriever with softmax, hard, straight-through and Gumbel attention",
            f"Theory: softmax passes gradient to the query/key projections and learns to "
            f"route; hard argmax gives them exactly zero gradient, so they never move and "
            f"the routing stays as initialised; straight-through and Gumbel-softmax "
            f"replace the zero by a softmax gradient. Measured after {s.steps} steps "
            f"(held-out accuracy / routing accuracy): softmax {soft['final_accuracy']:.3f} / "
            f"{soft['final_routing_accuracy']:.3f}; hard {hard['final_accuracy']:.3f} / "
            f"{hard['final_routing_accuracy']:.3f} (weight change exactly "
            f"{hard['routing_weight_change']:g}); straight-through "
            f"{st['final_accuracy']:.3f} / {st['final_routing_accuracy']:.3f}; Gumbel "
            f"{gum['final_accuracy']:.3f} / {gum['final_routing_accuracy']:.3f}.",
        )
    )


EXPERIMENTS.register("argmax")(
    Experiment("argmax", "Argmax attention: zero gradients, and what that does to learning", run)
)
