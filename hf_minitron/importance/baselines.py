"""Baseline importance scores for comparisons: weight magnitude and random (no calibration data)."""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_prunable_model
from .scores import ImportanceScores


def _zeros_where_absent(rows: list[torch.Tensor | None], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([r.cpu() if r is not None else torch.zeros(shape) for r in rows])


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> ImportanceScores:
    """Weight-magnitude scores in the same shapes as activation scores.

    heads: Frobenius norm of the head's ``o_proj`` columns; neurons: L2 norm of the ``down_proj`` column
    times that of the ``up_proj`` row (likewise per expert neuron and shared-expert neuron); experts: Frobenius norm of
    the expert's ``down_proj``; Mamba heads / channels: norm of their ``out_proj`` columns; hidden: L2 norm of the
    embedding column plus the summed |gain| of every hidden-axis norm; layers: Frobenius norm of what the layer writes
    (``o_proj``, ``down_proj``, experts, shared expert, Mamba ``out_proj``).
    """
    layout = check_prunable_model(model)
    s = layout.read_sizes(model.config)
    rows: dict[str, list] = {k: [] for k in ("heads", "neurons", "experts", "expert_neurons", "shared", "mamba_heads", "mamba_channels")}
    layers, parts_of = [], []
    for layer in layout.decoder_layers(model):
        parts = layout.layer_parts(layer)
        parts_of.append(sorted(parts))
        written = torch.zeros(())
        o = layer.get_submodule(layout.o_proj).weight.float() if "attention" in parts else None  # [hidden, heads * hd]
        rows["heads"].append(o.unflatten(1, (-1, s["head_dim"])).square().sum((0, 2)).sqrt() if o is not None else None)
        if "mlp" in parts:
            down = layer.get_submodule(layout.down_proj).weight.float()  # [hidden, intermediate]
            up = layout.up_weight(layer).float()  # [intermediate, hidden] (fused gate_up_proj: its up half)
            rows["neurons"].append(down.norm(dim=0) * up.norm(dim=1))
            written = written + down.square().sum()
        else:
            rows["neurons"].append(None)
        if "moe" in parts:
            experts = layer.get_submodule(layout.moe.experts)
            down = getattr(experts, layout.moe.expert_down_proj).float()  # [E, H, I]
            up = getattr(experts, layout.moe.expert_gate_up_proj or layout.moe.expert_up_proj).float()[:, -down.shape[2]:]
            rows["experts"].append(down.square().sum((1, 2)).sqrt())
            rows["expert_neurons"].append(down.norm(dim=1) * up.norm(dim=2))
            written = written + down.square().sum()
        else:
            rows["experts"].append(None)
            rows["expert_neurons"].append(None)
        if "shared_expert" in parts:
            paths = layout.moe.shared_paths
            down = layer.get_submodule(paths["down_proj"]).weight.float()
            up = layer.get_submodule(paths["gate_up_proj"] or paths["up_proj"]).weight.float()[-down.shape[1]:]
            rows["shared"].append(down.norm(dim=0) * up.norm(dim=1))
            written = written + down.square().sum()
        else:
            rows["shared"].append(None)
        if "mamba" in parts:
            out = layer.get_submodule(layout.mamba.out_proj).weight.float()  # [hidden, heads * head_dim]
            channels = out.norm(dim=0).unflatten(0, (-1, s["mamba_head_dim"]))
            rows["mamba_heads"].append(channels.square().sum(1).sqrt())
            rows["mamba_channels"].append(channels)
            written = written + out.square().sum()
        else:
            rows["mamba_heads"].append(None)
            rows["mamba_channels"].append(None)
        layers.append(torch.sqrt(written + (o.square().sum() if o is not None else 0.0)))
    hidden = model.get_submodule(layout.embed_tokens).weight.float().norm(dim=0)
    for _, norm in layout.norm_modules(model):
        hidden = hidden + layout.norm_gain(norm).float().abs()  # (1 + w) for Gemma / Nemotron norms
    blocks = {}
    if layout.moe is not None:
        experts = _zeros_where_absent(rows["experts"], (s["num_experts"],))
        blocks.update(expert_output_norm=experts, expert_routing_weight=experts.clone(), expert_frequency=experts.clone(),
                      expert_router_probability=experts.clone(),
                      expert_neurons=_zeros_where_absent(rows["expert_neurons"], (s["num_experts"], s["moe_intermediate_size"])))
        if "shared_expert_intermediate_size" in s:
            blocks["shared_neurons"] = _zeros_where_absent(rows["shared"], (s["shared_expert_intermediate_size"],))
    if layout.mamba is not None:
        blocks["mamba_heads"] = _zeros_where_absent(rows["mamba_heads"], (s["mamba_num_heads"],))
        blocks["mamba_channels"] = _zeros_where_absent(rows["mamba_channels"], (s["mamba_num_heads"], s["mamba_head_dim"]))
    return ImportanceScores(
        heads=_zeros_where_absent(rows["heads"], (s["num_attention_heads"],)),
        neurons=_zeros_where_absent(rows["neurons"], (s.get("intermediate_size", 0),)),
        hidden=hidden.cpu(),
        block_importance=torch.stack(layers).cpu(),
        **blocks,
        metadata={"method": "magnitude", "model_type": model.config.model_type, "source_sizes": s, "layer_parts": parts_of},
    )


def random_importance(model: nn.Module, seed: int = 0) -> ImportanceScores:
    """Uniformly random scores (a floor for any importance method), for every block the family has."""
    layout = check_prunable_model(model)
    s = layout.read_sizes(model.config)
    gen = torch.Generator().manual_seed(seed)
    num_layers = s["num_hidden_layers"]
    parts = [sorted(layout.layer_parts(layer)) for layer in layout.decoder_layers(model)]
    scores = ImportanceScores(
        heads=torch.rand(num_layers, s["num_attention_heads"], generator=gen),
        neurons=torch.rand(num_layers, s.get("intermediate_size", 0), generator=gen),
        hidden=torch.rand(s["hidden_size"], generator=gen),
        block_importance=torch.rand(num_layers, generator=gen),
        metadata={"method": "random", "seed": seed, "model_type": model.config.model_type, "source_sizes": s,
                  "layer_parts": parts},
    )
    if layout.moe is not None:
        experts = torch.rand(num_layers, s["num_experts"], generator=gen)
        scores.expert_output_norm = scores.expert_routing_weight = scores.expert_frequency = experts
        scores.expert_router_probability = experts
        scores.expert_neurons = torch.rand(num_layers, s["num_experts"], s["moe_intermediate_size"], generator=gen)
        if "shared_expert_intermediate_size" in s:
            scores.shared_neurons = torch.rand(num_layers, s["shared_expert_intermediate_size"], generator=gen)
    if layout.mamba is not None:
        scores.mamba_heads = torch.rand(num_layers, s["mamba_num_heads"], generator=gen)
        scores.mamba_channels = torch.rand(num_layers, s["mamba_num_heads"], s["mamba_head_dim"], generator=gen)
    return scores
