"""Architecture search: every pruned shape within ±tolerance of a parameter target, ranked by held-out loss.

Follows the first Minitron paper (Muralidharan et al., 2024, §3): enumerate every shape (layers, hidden size,
attention heads, KV heads, MLP size; for MoE / hybrid models also routed experts, expert width, shared-expert width,
Mamba heads and head dim) whose parameter count (total, and/or active per token) lies within ±5% of a target, prune each one from a
single importance pass, and keep the best by validation loss, optionally after a short distillation of every
candidate (the paper finds rankings settle after ~300 steps; LoRA can stand in for full training to save memory).

Example:
    >>> from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model
    >>> from hf_minitron.search import search_architectures
    >>> scores = estimate_importance(model, calibration_data)  # doctest: +SKIP
    >>> result = search_architectures(model, scores, target_params=0.6, eval_dataset=held_out)  # doctest: +SKIP
    >>> print(result.to_table())  # doctest: +SKIP
    >>> small = prune_model(model, result.best.config, importance=scores)  # doctest: +SKIP
"""

from .counting import predict_num_params
from .evaluation import heldout_loss
from .orchestrate import SELECTIONS, search_architectures
from .results import RESULTS_NAME, Candidate, SearchResult, spearman_rho
from .retraining import distill_candidate, lora_target_modules
from .space import BLOCK_SEARCH_AXES, SEARCH_AXES, SEARCH_PRESETS, default_search_space, enumerate_shapes, search_axes


__all__ = [
    "BLOCK_SEARCH_AXES",
    "Candidate",
    "RESULTS_NAME",
    "SEARCH_AXES",
    "SEARCH_PRESETS",
    "SELECTIONS",
    "SearchResult",
    "default_search_space",
    "distill_candidate",
    "enumerate_shapes",
    "heldout_loss",
    "lora_target_modules",
    "predict_num_params",
    "search_architectures",
    "search_axes",
    "spearman_rho",
]
