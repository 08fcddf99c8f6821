"""Width slicing and depth removal, driven by the architecture registry and importance scores."""

from .plan import PrunePlan, make_plan, resolve_target_sizes
from .prune import PROVENANCE_NAME, apply_plan, load_provenance, prune_model, save_pruned_model


__all__ = [
    "PROVENANCE_NAME",
    "PrunePlan",
    "apply_plan",
    "load_provenance",
    "make_plan",
    "prune_model",
    "resolve_target_sizes",
    "save_pruned_model",
]
