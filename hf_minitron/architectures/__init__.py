"""Architecture registry: one small data entry per model family, plus a generic Llama-like fallback."""

from .blocks import MambaLayout, MoELayout
from .generic import infer_layout, probe_norm_kind
from .layout import EMBED_SCALES, NORM_KINDS, QK_NORM_SCOPES, ArchitectureLayout
from .logits import (
    LOGIT_TRANSFORM_KINDS,
    LogitTransform,
    apply_logit_transforms,
    candidate_logit_transforms,
    resolve_logit_transforms,
)
from .registry import BUILTIN_LAYOUTS, get_layout, register_layout, supported_model_types


__all__ = [
    "ArchitectureLayout",
    "BUILTIN_LAYOUTS",
    "EMBED_SCALES",
    "LOGIT_TRANSFORM_KINDS",
    "LogitTransform",
    "MambaLayout",
    "MoELayout",
    "NORM_KINDS",
    "QK_NORM_SCOPES",
    "apply_logit_transforms",
    "candidate_logit_transforms",
    "get_layout",
    "infer_layout",
    "probe_norm_kind",
    "register_layout",
    "resolve_logit_transforms",
    "supported_model_types",
]
