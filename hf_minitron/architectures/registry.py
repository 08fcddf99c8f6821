"""The registry of supported model families, keyed by ``config.model_type``.

Adding a family is one :class:`ArchitectureLayout` entry here plus its test.
"""

from __future__ import annotations

from torch import nn

from .layout import ArchitectureLayout


LLAMA_LAYOUT = ArchitectureLayout(model_types=("llama",))

_REGISTRY: dict[str, ArchitectureLayout] = {}


def register_layout(layout: ArchitectureLayout, overwrite: bool = False) -> None:
    """Register ``layout`` for each of its ``model_types``.

    Example:
        >>> from hf_minitron.architectures import ArchitectureLayout, register_layout
        >>> register_layout(ArchitectureLayout(model_types=("my_llama",)))
    """
    for model_type in layout.model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(f"A layout for model_type {model_type!r} is already registered; pass overwrite=True.")
        _REGISTRY[model_type] = layout


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values hf-minitron can prune."""
    return sorted(_REGISTRY)


def get_layout(model_or_type: nn.Module | str) -> ArchitectureLayout:
    """Return the layout for a model (or a ``model_type`` string).

    Raises:
        ValueError: the family is not registered; the message lists the supported ones.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> layout = get_layout(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=100)))
    """
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"Unsupported architecture {model_type!r}. hf-minitron supports model_type in "
            f"{supported_model_types()}; register a layout for others with "
            "`hf_minitron.architectures.register_layout(ArchitectureLayout(model_types=(...), ...))`."
        )
    return _REGISTRY[model_type]


register_layout(LLAMA_LAYOUT)
