"""The registry of supported model families, keyed by ``config.model_type``.

Adding a family is one :class:`ArchitectureLayout` entry here plus its row in the family test table
(``tests/test_architectures.py``). Each entry was read off the family's ``modeling_*.py`` in transformers 5.
"""

from __future__ import annotations

from torch import nn

from .layout import ArchitectureLayout
from .logits import LogitTransform


# Llama-shaped: pre-norm RMSNorm (`input_layernorm` before attention, `post_attention_layernorm` before the MLP),
# separate q/k/v, gated MLP. Mistral only adds a sliding window (a config scalar, or `layer_types`); Qwen2 adds q/k/v
# biases, which follow their projections' output rows without any layout data, and `max_window_layers`.
LLAMA_LAYOUT = ArchitectureLayout(model_types=("llama",))
MISTRAL_LAYOUT = ArchitectureLayout(model_types=("mistral",))
QWEN2_LAYOUT = ArchitectureLayout(model_types=("qwen2",), layer_prefix_config_fields=("max_window_layers",))
# Granite: Llama plus scalar multipliers (embedding, residual, attention scaling, logits) that do not depend
# on any pruned size; the attention scaling replaces 1/sqrt(head_dim), and head_dim never changes.
# `.logits` are the head output divided by `logits_scaling`.
GRANITE_LAYOUT = ArchitectureLayout(model_types=("granite",), logit_transforms=(LogitTransform("divide", "logits_scaling"),))
# Qwen3: per-head q/k RMSNorm ([head_dim], shared by all heads).
QWEN3_LAYOUT = ArchitectureLayout(
    model_types=("qwen3",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
    layer_prefix_config_fields=("max_window_layers",),
)
# Gemma: (1 + w) RMSNorm and embeddings multiplied by sqrt(hidden_size).
GEMMA_LAYOUT = ArchitectureLayout(model_types=("gemma",), norm_kind="rms_one_plus", embed_scale="sqrt_hidden")
# Gemma2: Gemma plus "sandwich" norms: `post_attention_layernorm` normalises the attention *output* before the
# residual add, `pre_feedforward_layernorm` is the pre-MLP norm and `post_feedforward_layernorm` normalises the MLP
# output. Attention and final-logit softcapping are config scalars (preserved as they are); `.logits` are the
# soft-capped head outputs.
_SANDWICH_NORMS = dict(
    attention_norm="input_layernorm",
    attention_output_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
)
_SOFTCAP = (LogitTransform("softcap", "final_logit_softcapping"),)
GEMMA2_LAYOUT = ArchitectureLayout(
    model_types=("gemma2",), norm_kind="rms_one_plus", embed_scale="sqrt_hidden", logit_transforms=_SOFTCAP,
    **_SANDWICH_NORMS,
)
# Gemma3 (text-only Gemma3ForCausalLM, model_type "gemma3_text"): Gemma2 plus per-head q/k norms.
GEMMA3_LAYOUT = ArchitectureLayout(
    model_types=("gemma3_text",),
    norm_kind="rms_one_plus",
    embed_scale="sqrt_hidden",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    logit_transforms=_SOFTCAP,
    **_SANDWICH_NORMS,
)
# Phi-3: fused qkv_proj ([q; k; v] rows) and fused gate_up_proj ([gate; up] rows).
PHI3_LAYOUT = ArchitectureLayout(
    model_types=("phi3",),
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="self_attn.qkv_proj",
    gate_proj=None,
    up_proj=None,
    gate_up_proj="mlp.gate_up_proj",
)
# OLMo2: no pre-norms (attention and MLP read the raw residual stream); post-norms on the attention and MLP outputs
# (before the residual add), and q/k RMSNorm over the whole projection (num_heads * head_dim), not per head.
OLMO2_LAYOUT = ArchitectureLayout(
    model_types=("olmo2",),
    attention_norm=None,
    mlp_norm=None,
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    qk_norm_scope="projection",
)
# Nemotron: LayerNorm1P (x_hat * (1 + w) + b) and a non-gated relu^2 MLP (up_proj -> act -> down_proj).
NEMOTRON_LAYOUT = ArchitectureLayout(model_types=("nemotron",), norm_kind="layernorm_one_plus", gate_proj=None)

BUILTIN_LAYOUTS: tuple[ArchitectureLayout, ...] = (
    LLAMA_LAYOUT,
    MISTRAL_LAYOUT,
    QWEN2_LAYOUT,
    QWEN3_LAYOUT,
    GEMMA_LAYOUT,
    GEMMA2_LAYOUT,
    GEMMA3_LAYOUT,
    PHI3_LAYOUT,
    OLMO2_LAYOUT,
    GRANITE_LAYOUT,
    NEMOTRON_LAYOUT,
)

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


def _model_type(model_or_type: nn.Module | str) -> str | None:
    if isinstance(model_or_type, str):
        return model_or_type
    return getattr(getattr(model_or_type, "config", None), "model_type", None)


def _unsupported(model_type: str | None, reason: str = "") -> ValueError:
    return ValueError(
        f"Unsupported architecture {model_type!r}{reason}. hf-minitron supports model_type in "
        f"{supported_model_types()}; register a layout for others with "
        "`hf_minitron.architectures.register_layout(ArchitectureLayout(model_types=(...), ...))`."
    )


def get_layout(model_or_type: nn.Module | str, allow_generic: bool = True) -> ArchitectureLayout:
    """Return the layout for a model (or a ``model_type`` string).

    A model whose ``model_type`` is not registered but is Llama-like (``model.layers[i].self_attn.{q,k,v,o}_proj``
    or ``qkv_proj``, ``mlp.{gate,up,down}_proj`` or ``gate_up_proj``, hidden-sized norms) gets a layout inferred
    from its module names and norm behaviour (see :func:`~hf_minitron.architectures.generic.infer_layout`).

    Raises:
        ValueError: the family is not registered and (for a model) its structure does not match a Llama-like
            decoder; the message lists the supported families.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> layout = get_layout(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=100)))
    """
    model_type = _model_type(model_or_type)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if isinstance(model_or_type, str) or not allow_generic:
        raise _unsupported(model_type)
    from .generic import infer_layout

    try:
        return infer_layout(model_or_type)
    except ValueError as err:
        raise _unsupported(model_type, f" (not a registered family, and the generic Llama-like fallback failed: {err})") from None


for _layout in BUILTIN_LAYOUTS:
    register_layout(_layout)
