"""hf-minitron: Minitron structured pruning and distillation for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .architectures import ArchitectureLayout, get_layout, register_layout, supported_model_types
from .config import MinitronPruneConfig
from .data import load_default_corpus, load_text_file
from .distillation import DistillationConfig, DistillationTrainer
from .importance import ImportanceScores, estimate_importance
from .pruning import PROVENANCE_NAME, load_provenance, prune_model, save_pruned_model


__all__ = [
    "ArchitectureLayout",
    "DistillationConfig",
    "DistillationTrainer",
    "ImportanceScores",
    "MinitronPruneConfig",
    "PROVENANCE_NAME",
    "estimate_importance",
    "get_layout",
    "load_default_corpus",
    "load_provenance",
    "load_text_file",
    "prune_model",
    "register_layout",
    "save_pruned_model",
    "supported_model_types",
]
