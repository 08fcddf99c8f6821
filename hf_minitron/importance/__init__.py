"""Activation-based importance: hooks + aggregation -> `ImportanceScores`."""

from .estimator import (
    ImportanceEstimator,
    aggregate_batch,
    aggregate_sequence,
    estimate_importance,
    layer_perplexities,
)
from .scores import SCORES_NAME, ImportanceScores


__all__ = [
    "ImportanceEstimator",
    "ImportanceScores",
    "SCORES_NAME",
    "aggregate_batch",
    "aggregate_sequence",
    "estimate_importance",
    "layer_perplexities",
]
