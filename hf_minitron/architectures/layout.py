"""Per-family model layouts: where every prunable piece of a decoder-only LM lives.

A layout is plain data. Importance hooks and weight slicing read it and contain no family-specific
``if`` chains; supporting a new family means adding one :class:`ArchitectureLayout` entry to the
registry (see :mod:`hf_minitron.architectures.registry`).

Nothing in this sub-package imports from the rest of ``hf_minitron``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


# How a norm layer applies its weight. Rescaling after hidden pruning multiplies the *effective* scale.
NORM_KINDS = ("rms", "rms_one_plus", "layernorm")


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where the parts of one model family live, as dotted module paths.

    Paths under ``layers`` are relative to one decoder layer; the others are relative to the
    ``*ForCausalLM`` model. Optional pieces are ``None`` when the family does not have them.

    Example:
        >>> from hf_minitron.architectures import get_layout
        >>> get_layout("llama").o_proj
        'self_attn.o_proj'
    """

    model_types: tuple[str, ...]
    # Top level (relative to the *ForCausalLM model).
    decoder: str = "model"
    embed_tokens: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Attention (relative to one decoder layer).
    attention: str = "self_attn"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    # MLP (relative to one decoder layer). ``gate_proj`` is None for a non-gated MLP.
    mlp: str = "mlp"
    gate_proj: str | None = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    # Norms whose output feeds attention/MLP or the residual stream (relative to one decoder layer).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    norm_kind: str = "rms"
    # Config field names.
    hidden_size_field: str = "hidden_size"
    intermediate_size_field: str = "intermediate_size"
    num_heads_field: str = "num_attention_heads"
    num_kv_heads_field: str = "num_key_value_heads"
    num_layers_field: str = "num_hidden_layers"
    head_dim_field: str = "head_dim"
    # Config lists with one entry per layer, re-indexed on depth pruning.
    per_layer_config_fields: tuple[str, ...] = ("layer_types",)
    # Module attributes that cache sizes and must follow the new shapes. Each maps an attribute name
    # to the size it mirrors ("hidden", "intermediate", "heads", "kv_heads", "kv_groups").
    attention_attributes: dict[str, str] = field(
        default_factory=lambda: {"num_key_value_groups": "kv_groups", "num_heads": "heads", "num_key_value_heads": "kv_heads"}
    )
    mlp_attributes: dict[str, str] = field(
        default_factory=lambda: {"hidden_size": "hidden", "intermediate_size": "intermediate"}
    )

    def __post_init__(self) -> None:
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind must be one of {NORM_KINDS}, got {self.norm_kind!r}.")

    # ------------------------------------------------------------------ access helpers
    def get(self, root: nn.Module, path: str | None) -> nn.Module | None:
        """Return the sub-module at dotted ``path`` of ``root`` (``None`` if ``path`` is ``None``)."""
        if path is None:
            return None
        return root.get_submodule(path)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def norm_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every norm whose output lives on the hidden axis: per-layer norms, then the final norm."""
        norms = []
        for i, layer in enumerate(self.decoder_layers(model)):
            for name in self.layer_norms:
                norms.append((f"{self.layers}.{i}.{name}", layer.get_submodule(name)))
        norms.append((self.final_norm, model.get_submodule(self.final_norm)))
        return norms

    def read_sizes(self, config) -> dict[str, int]:
        """The prunable sizes of a model config, with ``head_dim`` made explicit."""
        hidden = getattr(config, self.hidden_size_field)
        heads = getattr(config, self.num_heads_field)
        kv_heads = getattr(config, self.num_kv_heads_field, None) or heads
        head_dim = getattr(config, self.head_dim_field, None) or hidden // heads
        return {
            "hidden_size": hidden,
            "intermediate_size": getattr(config, self.intermediate_size_field),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "num_hidden_layers": getattr(config, self.num_layers_field),
            "head_dim": head_dim,
        }

    def write_sizes(self, config, sizes: dict[str, int]) -> None:
        setattr(config, self.hidden_size_field, sizes["hidden_size"])
        setattr(config, self.intermediate_size_field, sizes["intermediate_size"])
        setattr(config, self.num_heads_field, sizes["num_attention_heads"])
        setattr(config, self.num_kv_heads_field, sizes["num_key_value_heads"])
        setattr(config, self.num_layers_field, sizes["num_hidden_layers"])
        setattr(config, self.head_dim_field, sizes["head_dim"])

    # ------------------------------------------------------------------ norm math
    @torch.no_grad()
    def scale_norm(self, norm: nn.Module, factor: float) -> None:
        """Multiply a norm's effective gain by ``factor`` (bias untouched: it is added after the gain)."""
        if self.norm_kind == "rms_one_plus":
            # y = x_hat * (1 + w)  ->  (1 + w') = factor * (1 + w)
            norm.weight.mul_(factor).add_(factor - 1.0)
        else:
            norm.weight.mul_(factor)
