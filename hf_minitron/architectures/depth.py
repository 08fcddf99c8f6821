"""Removing decoder layers, permanently (depth pruning) or for a while (scoring a layer by leaving it out).

Both go through :func:`keep_layers`, so a layer's perplexity score is measured on exactly the model that depth
pruning would produce: the layer list, every per-layer config list (``layer_types``: which attention each position
runs; Nemotron-H's ``layers_block_type``: which block each position holds), prefix-count fields (Qwen2's
``max_window_layers``), the list of dense layers of MoE families (Qwen-MoE ``mlp_only_layers``), ``num_hidden_layers``
and every ``layer_idx`` (the KV / SSM cache index) follow the kept layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from .layout import ArchitectureLayout


def keep_layers(model: nn.Module, layout: ArchitectureLayout, keep: Sequence[int]) -> dict[str, Any]:
    """Keep only source layers ``keep`` (sorted indices) of ``model``, in place; return what :func:`restore_layers` needs.

    Raises:
        ValueError: ``keep`` is empty, unsorted, repeats an index or is out of range.
    """
    parent_path, _, attr = layout.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    keep = list(keep)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"Layers to keep must be sorted distinct indices in 0..{len(layers) - 1}, got {keep}.")
    config = model.config
    saved: dict[str, Any] = {"layers": layers, "config": {}, "layer_idx": []}
    for layer in layers:
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                saved["layer_idx"].append((module, module.layer_idx))
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    # The KV cache is indexed by `layer_idx`: re-number so generation with a cache works.
    for new_idx, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    for name in layout.per_layer_config_fields:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            saved["config"][name] = values
            setattr(config, name, [values[i] for i in keep])
    for name in layout.layer_prefix_config_fields:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            saved["config"][name] = value
            setattr(config, name, sum(1 for i in keep if i < value))
    moe = layout.moe
    if moe is not None and moe.dense_layers_field is not None:
        # Which layers are sparse is config data (Qwen-MoE: a list of dense layer indices and a step): rewrite it from
        # the kept layers themselves, as an explicit list with step 1, so the config rebuilds each kept layer's block.
        saved["config"][moe.dense_layers_field] = getattr(config, moe.dense_layers_field, None)
        dense = [j for j, i in enumerate(keep) if "moe" not in layout.layer_parts(layers[i])]
        setattr(config, moe.dense_layers_field, dense)
        if moe.sparse_step_field is not None:
            saved["config"][moe.sparse_step_field] = getattr(config, moe.sparse_step_field, None)
            setattr(config, moe.sparse_step_field, 1)
    saved["config"][layout.num_layers_field] = getattr(config, layout.num_layers_field)
    setattr(config, layout.num_layers_field, len(keep))
    return saved


def restore_layers(model: nn.Module, layout: ArchitectureLayout, saved: dict[str, Any]) -> None:
    """Undo :func:`keep_layers` (layers, config fields and ``layer_idx`` as they were)."""
    parent_path, _, attr = layout.layers.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, saved["layers"])
    for name, value in saved["config"].items():
        setattr(model.config, name, value)
    for module, idx in saved["layer_idx"]:
        module.layer_idx = idx


@contextmanager
def without_layers(model: nn.Module, layout: ArchitectureLayout, drop: Sequence[int]) -> Iterator[nn.Module]:
    """Run ``model`` as if layers ``drop`` were pruned away, then put everything back.

    Example:
        >>> with without_layers(model, get_layout(model), [3]):  # doctest: +SKIP
        ...     loss = model(ids, labels=ids).loss
    """
    num_layers = len(layout.decoder_layers(model))
    dropped = set(drop)
    saved = keep_layers(model, layout, [i for i in range(num_layers) if i not in dropped])
    try:
        yield model
    finally:
        restore_layers(model, layout, saved)
