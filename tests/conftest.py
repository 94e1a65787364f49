"""Shared test set-up: deterministic seeds and a CI-friendly hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "attnkit",
    deadline=None,
    max_examples=int(os.environ.get("ATTNKIT_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("attnkit")

torch.set_num_threads(1)  # two xdist workers share 2 cores


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
