"""Activation-based importance: hooks + aggregation -> `ImportanceScores`."""

from .estimator import (
    ImportanceEstimator,
    aggregate_batch,
    aggregate_sequence,
    estimate_importance,
    layer_perplexities,
)
from .streaming import estimate_importance_streaming
from .scores import HIDDEN_IMPORTANCE_SOURCES, SCORES_NAME, ImportanceScores


__all__ = [
    "HIDDEN_IMPORTANCE_SOURCES",
    "ImportanceEstimator",
    "ImportanceScores",
    "SCORES_NAME",
    "aggregate_batch",
    "aggregate_sequence",
    "estimate_importance",
    "estimate_importance_streaming",
    "layer_perplexities",
]
