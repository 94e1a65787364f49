"""attnkit.lab: experiments that reproduce the theory on this machine, and the report."""

from attnkit.lab.core import (
    EXPERIMENTS,
    PROFILES,
    Claim,
    Context,
    Experiment,
    ExperimentResult,
    Figure,
    Table,
    experiment_names,
    get_experiment,
)

__all__ = [
    "EXPERIMENTS",
    "PROFILES",
    "Claim",
    "Context",
    "Experiment",
    "ExperimentResult",
    "Figure",
    "Table",
    "experiment_names",
    "get_experiment",
]
