"""Imports every experiment module, which registers it; :data:`ORDER` is the report order."""

from __future__ import annotations

from attnkit.lab import argmax, complexity, decode, linearize, patterns, recall, scaling

__all__ = [
    "ORDER",
    "argmax",
    "complexity",
    "decode",
    "linearize",
    "patterns",
    "recall",
    "scaling",
]

#: The order ``attnkit report`` runs and shows the experiments in: the theory first,
#: then decoding and complexity measurements, then the training experiments.
ORDER: tuple[str, ...] = (
    "scaling",
    "argmax",
    "decode",
    "complexity",
    "recall",
    "patterns",
    "linearize",
)
