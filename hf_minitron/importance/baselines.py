"""Baseline importance scores for comparisons: weight magnitude and random (no calibration data)."""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_prunable_model
from .scores import ImportanceScores


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> ImportanceScores:
    """Weight-magnitude scores in the same shapes as activation scores.

    heads: Frobenius norm of the head's ``o_proj`` columns; neurons: L2 norm of the ``down_proj`` column
    times that of the ``up_proj`` row; hidden: L2 norm of the embedding column plus the summed |gain| of
    every hidden-axis norm; layers: Frobenius norm of what the layer writes (``o_proj`` + ``down_proj``).
    """
    layout = check_prunable_model(model)
    sizes = layout.read_sizes(model.config)
    head_dim = sizes["head_dim"]
    heads, neurons, layers = [], [], []
    for layer in layout.decoder_layers(model):
        o = layer.get_submodule(layout.o_proj).weight.float()  # [hidden, heads * head_dim]
        heads.append(o.unflatten(1, (-1, head_dim)).square().sum((0, 2)).sqrt())
        down = layer.get_submodule(layout.down_proj).weight.float()  # [hidden, intermediate]
        up = layout.up_weight(layer).float()  # [intermediate, hidden] (fused gate_up_proj: its up half)
        neurons.append(down.norm(dim=0) * up.norm(dim=1))
        layers.append(torch.sqrt(o.square().sum() + down.square().sum()))
    hidden = model.get_submodule(layout.embed_tokens).weight.float().norm(dim=0)
    for _, norm in layout.norm_modules(model):
        hidden = hidden + layout.norm_gain(norm).float().abs()  # (1 + w) for Gemma / Nemotron norms
    return ImportanceScores(
        heads=torch.stack(heads).cpu(),
        neurons=torch.stack(neurons).cpu(),
        hidden=hidden.cpu(),
        block_importance=torch.stack(layers).cpu(),
        metadata={"method": "magnitude", "model_type": model.config.model_type, "source_sizes": sizes},
    )


def random_importance(model: nn.Module, seed: int = 0) -> ImportanceScores:
    """Uniformly random scores (a floor for any importance method)."""
    layout = check_prunable_model(model)
    sizes = layout.read_sizes(model.config)
    gen = torch.Generator().manual_seed(seed)
    num_layers = sizes["num_hidden_layers"]
    return ImportanceScores(
        heads=torch.rand(num_layers, sizes["num_attention_heads"], generator=gen),
        neurons=torch.rand(num_layers, sizes["intermediate_size"], generator=gen),
        hidden=torch.rand(sizes["hidden_size"], generator=gen),
        block_importance=torch.rand(num_layers, generator=gen),
        metadata={"method": "random", "seed": seed, "model_type": model.config.model_type, "source_sizes": sizes},
    )
