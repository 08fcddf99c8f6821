"""hf-minitron: Minitron structured pruning and distillation for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .architectures import ArchitectureLayout, LogitTransform, get_layout, register_layout, supported_model_types
from .config import MinitronPruneConfig
from .counting import active_params, count_params
from .data import load_default_corpus, load_text_file
from .cloze import build_cloze_examples, write_cloze_task
from .distillation import DistillationConfig, DistillationTrainer
from .gguf_export import GGUFExport, export_gguf, gguf_round_trip
from .harness import TaskEvaluation, TaskResult, evaluate_tasks
from .importance import ImportanceScores, estimate_importance, estimate_importance_streaming
from .pruning import PROVENANCE_NAME, load_provenance, prune_model, save_pruned_model
from .search import Candidate, SearchResult, predict_num_params, search_architectures


__all__ = [
    "ArchitectureLayout",
    "Candidate",
    "DistillationConfig",
    "DistillationTrainer",
    "GGUFExport",
    "ImportanceScores",
    "LogitTransform",
    "MinitronPruneConfig",
    "PROVENANCE_NAME",
    "active_params",
    "count_params",
    "estimate_importance",
    "estimate_importance_streaming",
    "get_layout",
    "load_default_corpus",
    "load_provenance",
    "load_text_file",
    "prune_model",
    "register_layout",
    "predict_num_params",
    "save_pruned_model",
    "search_architectures",
    "SearchResult",
    "supported_model_types",
    "TaskEvaluation",
    "TaskResult",
    "build_cloze_examples",
    "evaluate_tasks",
    "export_gguf",
    "gguf_round_trip",
    "write_cloze_task",
]
