"""Post-head logit transforms: what a family does between ``lm_head`` and the ``.logits`` it returns.

Most decoder families return ``lm_head(h)`` as is. Some apply elementwise steps read from their config: Granite divides
by ``logits_scaling``, Gemma-2/3 soft-cap with ``final_logit_softcapping``, Cohere multiplies by ``logit_scale``. Code
that rebuilds logits from the head's weights (the fused distillation loss) must apply the same steps, so they are
registry data: :attr:`ArchitectureLayout.logit_transforms` is an ordered tuple of :class:`LogitTransform`.

An ``lm_head`` bias is part of the head (``nn.Linear``), not a transform.

Nothing in this module imports from the rest of ``hf_minitron``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


# Elementwise steps on the head output x, with the config value c:
#   "scale":   x * c                     (Cohere `logit_scale`, Falcon-H1 `lm_head_multiplier`)
#   "divide":  x / c                     (Granite `logits_scaling`)
#   "softcap": c * tanh(x / c)           (Gemma-2/3 `final_logit_softcapping`)
LOGIT_TRANSFORM_KINDS = ("scale", "divide", "softcap")

# A transform resolved against one model's config: `(kind, value)`.
ResolvedTransform = tuple[str, float]


@dataclass(frozen=True)
class LogitTransform:
    """One elementwise step from the ``lm_head`` output to ``.logits``, with its value read from a config field.

    A field that is missing or ``None`` in a model's config (e.g. Gemma-2 with ``final_logit_softcapping=None``) skips
    the step for that model.

    Example:
        >>> from hf_minitron.architectures import LogitTransform
        >>> LogitTransform("divide", "logits_scaling")  # Granite
        LogitTransform(kind='divide', config_field='logits_scaling')
    """

    kind: str
    config_field: str

    def __post_init__(self) -> None:
        if self.kind not in LOGIT_TRANSFORM_KINDS:
            raise ValueError(f"LogitTransform kind must be one of {LOGIT_TRANSFORM_KINDS}, got {self.kind!r}.")

    def resolve(self, config) -> ResolvedTransform | None:
        """``(kind, value)`` for ``config`` (its text config for multimodal ones), ``None`` when the field is unset.

        Raises:
            ValueError: the value is not a finite number, or is 0 for ``divide`` / ``softcap``.
        """
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(config, self.config_field, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`config.{self.config_field}` must be a finite number for a {self.kind!r} logit transform, got {value!r}.")
        if self.kind != "scale" and value == 0:
            raise ValueError(f"`config.{self.config_field}` is 0, which a {self.kind!r} logit transform cannot use.")
        return (self.kind, float(value))


def resolve_logit_transforms(transforms: Sequence[LogitTransform], config) -> tuple[ResolvedTransform, ...]:
    """The ``(kind, value)`` steps of ``transforms`` for one model's ``config``, unset ones dropped, in order."""
    steps = (t.resolve(config) for t in transforms)
    return tuple(s for s in steps if s is not None)


def apply_logit_transforms(logits: torch.Tensor, steps: Sequence[ResolvedTransform]) -> torch.Tensor:
    """Apply resolved ``steps`` to ``logits`` (out of place, differentiable, in the input dtype, the ops transformers uses).

    Example:
        >>> apply_logit_transforms(torch.tensor([8.0, -80.0]), [("divide", 8.0), ("softcap", 3.0)])
        tensor([ 1.0000, -2.9982])
    """
    for kind, value in steps:
        if kind == "scale":
            logits = logits * value
        elif kind == "divide":
            logits = logits / value
        elif kind == "softcap":
            logits = torch.tanh(logits / value) * value
        else:
            raise ValueError(f"Unknown logit transform {kind!r}; expected one of {LOGIT_TRANSFORM_KINDS}.")
    return logits


def candidate_logit_transforms(config) -> list[tuple[LogitTransform, ...]]:
    """Single-step transforms an unregistered family might apply, built from the numeric config fields whose names
    mention logits, scaling or multipliers (``logit_scale``, ``logits_scaling``, ``lm_head_multiplier``, ...); the
    identity ``()`` comes first.

    Used to recognise a post-head transform by probing a model (see the distillation trainer).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    out: list[tuple[LogitTransform, ...]] = [()]
    for name, value in sorted(config.to_dict().items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            continue
        lowered = name.lower()
        if not any(key in lowered for key in ("logit", "scal", "multiplier")) or "attn" in lowered or "rope" in lowered:
            continue
        out += [(LogitTransform(kind, name),) for kind in LOGIT_TRANSFORM_KINDS]
    return out
