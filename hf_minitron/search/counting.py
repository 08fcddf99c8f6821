"""Exact parameter counts of pruned shapes without weights: meta-device builds with stock transformers."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..architectures import ArchitectureLayout, get_layout
from ..config import MinitronPruneConfig
from ..pruning import resolve_target_sizes


# ------------------------------------------------------------------------------------------ parameter count
def _shaped_config(model_config, layout: ArchitectureLayout, sizes: Mapping[str, int]):
    """A copy of ``model_config`` with the target ``sizes`` written in (and per-layer lists cut to the depth)."""
    config = copy.deepcopy(model_config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a meta model needs none, and a dequantized GGUF's must not be applied
    source_layers = getattr(config, layout.num_layers_field)
    full = dict(layout.read_sizes(config))
    full.update({k: v for k, v in sizes.items() if k in full})
    layout.write_sizes(config, full)
    for name in layout.per_layer_config_fields:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == source_layers:
            setattr(config, name, list(values)[: full["num_hidden_layers"]])
    return config


def _unique_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields tied tensors once


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def predict_num_params(model_or_config, sizes: Mapping[str, int] | MinitronPruneConfig) -> int:
    """Exact parameter count of ``model_or_config`` pruned to ``sizes``, with no weights in memory.

    Builds the pruned shape on the meta device with stock ``AutoModelForCausalLM.from_config`` and counts its
    unique parameters, so biases, norms and tied (counted once) or untied embeddings are right for every family
    the registry supports.

    Example:
        >>> predict_num_params(model, MinitronPruneConfig(hidden_size=48, num_hidden_layers=3))  # doctest: +SKIP
        61616
    """
    config = getattr(model_or_config, "config", model_or_config)
    layout = get_layout(config.model_type)
    source = layout.read_sizes(config)
    if isinstance(sizes, MinitronPruneConfig):
        sizes = resolve_target_sizes(source, sizes)
    return _unique_numel(_meta_model(_shaped_config(config, layout, sizes)))


class _ParamCounter:
    """Exact counts for many shapes from few 1-layer meta models.

    In every registered family a decoder layer is an attention block whose size depends on (hidden, heads, KV
    heads), an MLP block depending on (hidden, MLP size) and norms depending on hidden, and all layers are alike;
    so the count is ``outside(hidden) + layers * (attention + mlp + norms)``, and one 1-layer build per new
    attention or MLP key fills the caches. The selected candidates are re-counted with a full meta build as a check.
    """

    def __init__(self, model_config, layout: ArchitectureLayout) -> None:
        self.config, self.layout = model_config, layout
        self.attention: dict[tuple[int, int, int], int] = {}
        self.mlp: dict[tuple[int, int], int] = {}
        self.outside: dict[int, tuple[int, int]] = {}  # hidden -> (outside the layers, layer minus attention/MLP)
        self.builds = 0

    def _build(self, sizes: Mapping[str, int]) -> None:
        model = _meta_model(_shaped_config(self.config, self.layout, {**sizes, "num_hidden_layers": 1}))
        self.builds += 1
        layer = self.layout.decoder_layers(model)[0]
        attention = _unique_numel(layer.get_submodule(self.layout.attention))
        mlp = _unique_numel(layer.get_submodule(self.layout.mlp))
        per_layer = _unique_numel(layer)
        hidden = sizes["hidden_size"]
        self.attention[(hidden, sizes["num_attention_heads"], sizes["num_key_value_heads"])] = attention
        self.mlp[(hidden, sizes["intermediate_size"])] = mlp
        self.outside[hidden] = (_unique_numel(model) - per_layer, per_layer - attention - mlp)

    def prepare(self, shapes: Sequence[Mapping[str, int]]) -> None:
        """Fill the caches for ``shapes`` with as few builds as possible (one per new attention / MLP key pair)."""
        needs: dict[int, tuple[list, list]] = {}
        for s in shapes:
            attention, mlp = needs.setdefault(s["hidden_size"], ([], []))
            key = (s["num_attention_heads"], s["num_key_value_heads"])
            if key not in attention and (s["hidden_size"], *key) not in self.attention:
                attention.append(key)
            if s["intermediate_size"] not in mlp and (s["hidden_size"], s["intermediate_size"]) not in self.mlp:
                mlp.append(s["intermediate_size"])
        for hidden, (attention, mlp) in needs.items():
            any_heads = next((s["num_attention_heads"], s["num_key_value_heads"]) for s in shapes if s["hidden_size"] == hidden)
            any_inter = next(s["intermediate_size"] for s in shapes if s["hidden_size"] == hidden)
            for i in range(max(len(attention), len(mlp))):
                heads, kv = attention[i] if i < len(attention) else any_heads
                inter = mlp[i] if i < len(mlp) else any_inter
                self._build({"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
                             "intermediate_size": inter, "num_hidden_layers": 1})

    def __call__(self, sizes: Mapping[str, int]) -> int:
        hidden = sizes["hidden_size"]
        attention_key = (hidden, sizes["num_attention_heads"], sizes["num_key_value_heads"])
        mlp_key = (hidden, sizes["intermediate_size"])
        if attention_key not in self.attention or mlp_key not in self.mlp:
            self._build(sizes)
        outside, norms = self.outside[hidden]
        return outside + sizes["num_hidden_layers"] * (self.attention[attention_key] + self.mlp[mlp_key] + norms)

    def exact(self, sizes: Mapping[str, int]) -> int:
        return _unique_numel(_meta_model(_shaped_config(self.config, self.layout, sizes)))
