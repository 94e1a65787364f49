r"""Capture the attention weights of every attnkit attention layer in a model.

:func:`record_attention` is a context manager over any ``nn.Module`` tree that holds
:class:`attnkit.MultiHeadAttention` layers (a :class:`attnkit.TinyLM`, an encoder built
from the layers, a single layer). Inside it every full forward of such a layer also
records its weights A [B, H, L, S], computed from the very q, k and call (mask,
causality, options, feature map) the layer's backend received:

- ``softmax``: A = softmax(scale q k^T + mask), written out (:func:`softmax_weights`);
- ``argmax`` in a noise-free mode: the one-hot rows (or softmax(scores / tau)) of
  :func:`argmax_weights`;
- every other backend (``kernel``, ``linear`` and any backend registered later, such
  as decay or delta-rule attention): the backend itself run on one-hot values,
  :func:`implicit_weights`, which is exact for any op that is linear in v. Random
  draws (Gumbel argmax) are replayed: the RNG state before the layer's own call is
  restored for the one-hot run and the state after it put back, so the recorded
  weights are the ones the output used and the model's random stream is unchanged.

The layer's output is computed exactly as without recording. Decoding with a cache is
refused (ValueError): capture a full forward pass. Attention dropout must be off (call
``model.eval()``; :func:`capture` does).

:func:`capture` runs one forward under the recorder and returns
:class:`~attnkit.patterns.maps.AttentionMaps` [layers, B, H, L, L].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnkit._registry import Registry
from attnkit._validation import check_choice
from attnkit.layers.attention import AttentionCall, Backend, Cache, MultiHeadAttention
from attnkit.patterns.maps import AttentionMaps
from attnkit.patterns.weights import (
    EXPLICIT_ARGMAX_MODES,
    argmax_weights,
    implicit_weights,
    softmax_weights,
)

__all__ = [
    "EXPLICIT",
    "METHODS",
    "AttentionRecorder",
    "LayerRecord",
    "capture",
    "record_attention",
]

Method = Literal["auto", "implicit"]
#: ``"auto"``: the explicit formula where :data:`EXPLICIT` has one, else one-hot values;
#: ``"implicit"``: one-hot values for every backend (a cross-check of the formulas).
METHODS: tuple[str, ...] = ("auto", "implicit")

#: (q [B, H, L, E], k [B, Hk, S, E], call) -> weights [B, H, L, S], or None to fall
#: back to one-hot values for this call.
ExplicitFn = Callable[[Tensor, Tensor, AttentionCall], "Tensor | None"]

#: backend name -> its explicit weights; backends not listed use one-hot values.
EXPLICIT: Registry[ExplicitFn] = Registry("explicit attention weights")


@EXPLICIT.register("softmax")
def _softmax(q: Tensor, k: Tensor, call: AttentionCall) -> Tensor | None:
    return softmax_weights(
        q,
        k,
        attn_mask=call.attn_mask,
        is_causal=call.is_causal,
        scale=call.options["scale"],
        enable_gqa=True,
        causal_alignment=call.causal_alignment,
    )


@EXPLICIT.register("argmax")
def _argmax(q: Tensor, k: Tensor, call: AttentionCall) -> Tensor | None:
    opts = call.options
    if opts["mode"] not in EXPLICIT_ARGMAX_MODES:
        return None  # Gumbel: replay the draw through the op itself
    return argmax_weights(
        q,
        k,
        attn_mask=call.attn_mask,
        is_causal=call.is_causal,
        mode=opts["mode"],
        tau=opts["tau"],
        scale=opts["scale"],
        enable_gqa=True,
        causal_alignment=call.causal_alignment,
    )


@dataclass(frozen=True)
class LayerRecord:
    """The weights one attention layer applied in one forward call."""

    name: str  # the layer's qualified name in the model (``blocks.0.attn``)
    backend: str  # its backend name
    method: str  # "explicit" or "implicit" (one-hot values)
    weights: Tensor  # [B, H, L, S], float32 (float64 for float64 models), detached, on CPU


@dataclass
class AttentionRecorder:
    """What :func:`record_attention` yields: the records of every layer call, in call order."""

    records: list[LayerRecord] = field(default_factory=list)

    def clear(self) -> None:
        """Forget the records so far (e.g. between two forwards)."""
        self.records.clear()


class _RngState:
    """The CPU RNG, q's CUDA device RNG and any torch.Generator among the options."""

    def __init__(self, device: torch.device, generators: Sequence[torch.Generator]) -> None:
        self.device = device
        self.generators = list(generators)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.gens = [g.get_state() for g in self.generators]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        for g, state in zip(self.generators, self.gens, strict=True):
            g.set_state(state)


def _recording_backend(
    spec: Backend, name: str, backend: str, method: str, recorder: AttentionRecorder
) -> Backend:
    original = spec.attend

    def attend(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        if call.dropout_p > 0:
            raise ValueError(
                f"record_attention: layer {name!r} applies attention dropout "
                f"(dropout_p={call.dropout_p}); call model.eval() so that the recorded "
                "weights are the ones the output used"
            )
        generators = [g for g in call.options.values() if isinstance(g, torch.Generator)]
        before = _RngState(q.device, generators)
        out = original(q, k, v, call)
        with torch.no_grad():
            weights = None
            if method == "auto" and backend in EXPLICIT:
                weights = EXPLICIT.get(backend)(q.detach(), k.detach(), call)
            kind = "explicit"
            if weights is None:
                kind = "implicit"
                after = _RngState(q.device, generators)
                before.restore()  # the same draws as the call above
                try:
                    weights = implicit_weights(
                        lambda eye: original(q.detach(), k.detach(), eye, call), k
                    )
                finally:
                    after.restore()
        recorder.records.append(
            LayerRecord(
                name,
                backend,
                kind,
                weights.detach().to("cpu", torch.promote_types(weights.dtype, torch.float32)),
            )
        )
        return out

    def decode(cache: Cache, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        raise ValueError(
            f"record_attention captures full forward passes; layer {name!r} was called "
            "with a decoding cache: run the whole sequence without cache="
        )

    return replace(spec, attend=attend, decode=decode)


@contextlib.contextmanager
def record_attention(model: nn.Module, method: str = "auto") -> Iterator[AttentionRecorder]:
    """Record the weights of every :class:`~attnkit.MultiHeadAttention` forward in ``model``.

    ``method``: ``"auto"`` (explicit formulas for softmax and noise-free argmax,
    one-hot values for the rest) or ``"implicit"`` (one-hot values everywhere). The
    layers are restored when the block exits, also after an exception.

    Example::

        with record_attention(model) as rec:
            model(tokens)
        [r.weights.shape for r in rec.records]   # one [B, H, L, S] per layer call
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("method", method, METHODS)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) holds no attnkit.MultiHeadAttention layer; for a "
            "Hugging Face model use attnkit.patterns.capture_hf"
        )
    recorder = AttentionRecorder()
    saved: list[tuple[MultiHeadAttention, Backend]] = []
    try:
        for name, layer in layers:
            spec = layer._spec
            saved.append((layer, spec))
            layer._spec = _recording_backend(spec, name or "attn", layer.backend, method, recorder)
        yield recorder
    finally:
        for layer, spec in saved:
            layer._spec = spec


def capture(
    model: nn.Module,
    *inputs: Any,
    tokens: Tensor | None = None,
    token_text: Sequence[Sequence[str]] | None = None,
    delimiters: Tensor | None = None,
    method: str = "auto",
    source: str | None = None,
    **kwargs: Any,
) -> AttentionMaps:
    """Run ``model(*inputs, **kwargs)`` once in eval mode and return its attention maps.

    ``tokens`` [B, L] (integer ids) defaults to ``inputs[0]`` when that is an integer
    tensor (a TinyLM's input); it lets the induction score find repeated tokens.
    ``token_text`` labels the axes of the plots (``str(id)`` by default);
    ``delimiters`` [B, L] bool marks [CLS]/[SEP]-like positions for the delimiter
    score. The model's training flag is restored afterwards; no gradients are taken.

    Every layer must be self-attention with the same [B, H, L, L] weights (stacked
    into [layers, B, H, L, L]); ValueError otherwise.
    """
    if tokens is None and inputs and isinstance(inputs[0], Tensor):
        first = inputs[0]
        if not (first.dtype.is_floating_point or first.dtype.is_complex) and first.dim() == 2:
            tokens = first
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_attention(model, method) as rec:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
    if not rec.records:
        raise ValueError("the forward pass called no attention layer: nothing was recorded")
    shapes = {tuple(r.weights.shape) for r in rec.records}
    if len(shapes) != 1:
        raise ValueError(
            "every recorded layer must have weights of one shape [B, H, L, L] to be stacked; "
            f"got {[(r.name, tuple(r.weights.shape)) for r in rec.records]}"
        )
    backends = sorted({r.backend for r in rec.records})
    return AttentionMaps(
        weights=torch.stack([r.weights for r in rec.records]),
        layers=tuple(r.name for r in rec.records),
        tokens=None if tokens is None else tokens.detach().cpu(),
        token_text=None if token_text is None else tuple(tuple(row) for row in token_text),
        delimiters=None if delimiters is None else delimiters.detach().cpu(),
        source=source or f"{type(model).__name__} ({', '.join(backends)} attention)",
    )
