"""Architecture registry: one small data entry per model family."""

from .layout import NORM_KINDS, ArchitectureLayout
from .registry import get_layout, register_layout, supported_model_types


__all__ = ["ArchitectureLayout", "NORM_KINDS", "get_layout", "register_layout", "supported_model_types"]
