"""`ImportanceScores`: the result of one calibration pass, reusable for many prune targets."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..atomic import atomic_write_bytes

from ..config import EXPERT_IMPORTANCE_SOURCES, HIDDEN_IMPORTANCE_SOURCES


SCORES_NAME = "importance_scores.safetensors"

_MATMUL_INPUT_ROLES = ("pre_attention", "pre_mlp", "final")
_PRE_SUBLAYER_ROLES = ("pre_attention", "pre_mlp")
_OPTIONAL = ("layer_perplexity", "norm_outputs", "norm_input_sq", "norm_input_mean", "sublayer_inputs", "residual",
             "q_norm_input_sq", "k_norm_input_sq")
# Scores of MoE and Mamba blocks, rows per layer (zeros in layers without that block).
_BLOCK = ("expert_output_norm", "expert_routing_weight", "expert_router_probability", "expert_frequency", "expert_neurons",
          "shared_neurons",
          "mamba_heads", "mamba_channels", "mamba_norm_input_sq")


@dataclass
class ImportanceScores:
    """Activation-based importance of every prunable unit (higher = more important).

    Attributes:
        heads: ``[num_layers, num_attention_heads]`` per-head output norm (input of ``o_proj``).
        neurons: ``[num_layers, intermediate_size]`` per-neuron activation (input of ``down_proj``).
        hidden: ``[hidden_size]`` per-channel score from the source named in ``metadata["hidden_importance_source"]``
            (see :meth:`hidden_scores`; pruning recomputes it for the source it is asked for).
        block_importance: ``[num_layers]`` mean 1 - cos(layer input, layer output) over calibration tokens.
        layer_perplexity: ``[num_layers]`` calibration perplexity with that one layer removed (optional).
        norm_outputs: ``[num_norms, hidden_size]`` aggregated ``|output|`` of every hidden-axis norm, in the order of
            ``metadata["norm_paths"]`` (roles in ``metadata["norm_roles"]``).
        norm_input_sq: ``[num_norms, hidden_size]`` mean over calibration tokens of each norm's input squared, per
            channel: the energy the calibrated norm correction is computed from.
        norm_input_mean: ``[num_norms, hidden_size]`` mean of each norm's input (LayerNorm families only).
        sublayer_inputs: ``[num_sites, hidden_size]`` aggregated ``|input|`` of each sublayer without a pre-norm
            (``metadata["sublayer_input_sites"]``; empty for pre-norm families).
        residual: ``[num_layers, hidden_size]`` aggregated ``|output|`` of each decoder layer (the residual stream).
        q_norm_input_sq / k_norm_input_sq: ``[num_layers, heads * head_dim]`` / ``[num_layers, kv_heads * head_dim]``
            input energy of q/k norms that span the whole projection (OLMo2), for head-pruning corrections.
        expert_output_norm / expert_routing_weight / expert_frequency: ``[num_layers, num_experts]`` per routed expert:
            the aggregated norm of its routing-weighted output ``||w_t * expert(x_t)||``, its routing weight ``w_t``,
            and whether it was routed to (1/0), each 0 on tokens not routed to it (see :meth:`expert_scores`).
        expert_router_probability: ``[num_layers, num_experts]`` the aggregated router probability of each expert on
            every token (softmax or sigmoid of the router logits), whether or not the token was routed to it.
        expert_neurons: ``[num_layers, num_experts, moe_intermediate_size]`` aggregated ``|w_t * a_t|`` per expert
            neuron, where ``a_t`` is the input of the expert's ``down_proj`` (the routing weight folded in).
        shared_neurons: ``[num_layers, shared_expert_intermediate_size]`` per shared-expert neuron (``down_proj`` input).
        mamba_heads: ``[num_layers, mamba_num_heads]`` per-head norm of the Mamba ``out_proj`` input.
        mamba_channels: ``[num_layers, mamba_num_heads, mamba_head_dim]`` per-channel ``|out_proj input|``.
        mamba_norm_input_sq: ``[num_layers, mamba_num_heads * mamba_head_dim]`` mean over tokens of the gated norm's
            (gated) input squared, for the norm correction after Mamba heads / channels are dropped.
        metadata: aggregation settings, sample and token counts, source sizes, norm paths and roles, and the blocks each
            layer holds (``"layer_parts"``).

    The block tensors are ``None`` for families without that block; rows of layers without it are zeros.

    The optional per-site tensors are ``None`` for scores that do not come from activations (magnitude, random) or
    were saved by hf-minitron 0.1; ``hidden`` is then used as it is.

    Example:
        >>> scores = estimate_importance(model, calibration_data, config)  # doctest: +SKIP
        >>> scores.save("scores.safetensors")  # doctest: +SKIP
        >>> scores = ImportanceScores.load("scores.safetensors")  # doctest: +SKIP
        >>> scores.hidden_scores("all_norms").shape  # [hidden_size]  # doctest: +SKIP
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    block_importance: torch.Tensor
    layer_perplexity: torch.Tensor | None = None
    norm_outputs: torch.Tensor | None = None
    norm_input_sq: torch.Tensor | None = None
    norm_input_mean: torch.Tensor | None = None
    sublayer_inputs: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    q_norm_input_sq: torch.Tensor | None = None
    k_norm_input_sq: torch.Tensor | None = None
    expert_output_norm: torch.Tensor | None = None
    expert_routing_weight: torch.Tensor | None = None
    expert_frequency: torch.Tensor | None = None
    expert_router_probability: torch.Tensor | None = None
    expert_neurons: torch.Tensor | None = None
    shared_neurons: torch.Tensor | None = None
    mamba_heads: torch.Tensor | None = None
    mamba_channels: torch.Tensor | None = None
    mamba_norm_input_sq: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def has_sites(self) -> bool:
        """Whether per-site activations were recorded (so any ``hidden_importance_source`` can be used)."""
        return self.norm_outputs is not None

    def hidden_scores(self, source: str = "matmul_inputs") -> torch.Tensor:
        """Per-channel hidden importance ``[hidden_size]`` from the recorded activations named by ``source``.

        Each site's scores are already aggregated over tokens and samples; sites are summed. Without recorded sites
        (magnitude / random scores, files from hf-minitron 0.1) ``hidden`` is returned whatever ``source`` is.

        Raises:
            ValueError: ``source`` is not one of ``HIDDEN_IMPORTANCE_SOURCES``.
        """
        if source not in HIDDEN_IMPORTANCE_SOURCES:
            raise ValueError(f"`hidden_importance_source` must be one of {HIDDEN_IMPORTANCE_SOURCES}, got {source!r}.")
        if not self.has_sites:
            return self.hidden
        norms = self.norm_outputs.float()
        if source == "all_norms":
            return norms.sum(0)
        if source == "all_norms_normalized":
            return (norms / norms.mean(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).sum(0)
        if source == "residual":
            return self.residual.float().sum(0)
        roles = self.metadata.get("norm_roles") or []
        wanted = _MATMUL_INPUT_ROLES if source == "matmul_inputs" else _PRE_SUBLAYER_ROLES
        keep = [i for i, role in enumerate(roles) if role in wanted]
        total = norms[keep].sum(0)
        if self.sublayer_inputs is not None and self.sublayer_inputs.numel():
            total = total + self.sublayer_inputs.float().sum(0)
        return total

    def expert_scores(self, source: str = "output_norm") -> torch.Tensor:
        """Per-expert importance ``[num_layers, num_experts]`` for ``source`` (one of ``EXPERT_IMPORTANCE_SOURCES``).

        Raises:
            ValueError: unknown ``source``, or scores without expert statistics (a model without MoE layers).
        """
        if source not in EXPERT_IMPORTANCE_SOURCES:
            raise ValueError(f"`expert_importance` must be one of {EXPERT_IMPORTANCE_SOURCES}, got {source!r}.")
        value = getattr(self, f"expert_{source}")
        if value is None:
            raise ValueError("These importance scores have no expert statistics: estimate them on the MoE model you prune.")
        return value

    @property
    def layer_parts(self) -> list[frozenset[str]] | None:
        """The blocks each source layer holds (``metadata["layer_parts"]``), or ``None`` for scores without them."""
        parts = self.metadata.get("layer_parts")
        return None if parts is None else [frozenset(p) for p in parts]

    def check_finite(self) -> None:
        """Raise a ``ValueError`` naming the unit types and layers whose scores are NaN or infinite.

        NaN sorts as the most important value, so non-finite scores would silently keep the wrong units. The message
        starts with the earliest layer: a NaN or overflow there spreads to every later layer through the residual.
        """
        import re

        paths = self.metadata.get("norm_paths") or []
        sites = self.metadata.get("sublayer_input_sites") or []

        def layer_of(path: str) -> int:
            found = re.search(r"\.(\d+)\.", f".{path}.")
            return int(found.group(1)) if found else self.num_layers  # the final norm comes after every layer

        per_row = {  # tensor -> (unit type, layer of row r)
            "heads": ("attention heads", lambda r: r),
            "neurons": ("MLP neurons", lambda r: r),
            "norm_outputs": ("hidden channels (norm outputs)", lambda r: layer_of(paths[r]) if r < len(paths) else r),
            "norm_input_sq": ("norm input statistics", lambda r: layer_of(paths[r]) if r < len(paths) else r),
            "norm_input_mean": ("norm input statistics", lambda r: layer_of(paths[r]) if r < len(paths) else r),
            "sublayer_inputs": ("hidden channels (sublayer inputs)", lambda r: layer_of(sites[r]) if r < len(sites) else r),
            "residual": ("hidden channels (layer outputs)", lambda r: r),
            "q_norm_input_sq": ("q_norm input statistics", lambda r: r),
            "k_norm_input_sq": ("k_norm input statistics", lambda r: r),
            "expert_output_norm": ("experts", lambda r: r),
            "expert_routing_weight": ("experts", lambda r: r),
            "expert_frequency": ("experts", lambda r: r),
            "expert_router_probability": ("experts", lambda r: r),
            "expert_neurons": ("expert neurons", lambda r: r),
            "shared_neurons": ("shared-expert neurons", lambda r: r),
            "mamba_heads": ("Mamba heads", lambda r: r),
            "mamba_channels": ("Mamba head channels", lambda r: r),
            "mamba_norm_input_sq": ("Mamba norm input statistics", lambda r: r),
            "block_importance": ("Block Importance", lambda r: r),
            "layer_perplexity": ("layer perplexity", lambda r: r),
        }
        problems: dict[str, set[int]] = {}
        for name, (unit, layer) in per_row.items():
            value = getattr(self, name)
            if value is None or value.numel() == 0:
                continue
            bad = ~torch.isfinite(value.reshape(value.shape[0], -1).float()).all(-1)
            for row in bad.nonzero().flatten().tolist():
                problems.setdefault(unit, set()).add(layer(row))
        if not torch.isfinite(self.hidden).all():
            problems.setdefault("hidden channels", set())
        if problems:
            ordered = sorted(problems.items(), key=lambda kv: min(kv[1], default=self.num_layers))
            listed = "; ".join(f"{unit} of layers {sorted(layers)}" if layers else unit for unit, layers in ordered)
            first_unit, first_layers = ordered[0]
            where = f"layer {min(first_layers)}" if first_layers else "the hidden channels"
            raise ValueError(
                f"Non-finite importance scores (NaN/inf), first in {first_unit} of {where} (all: {listed}). The "
                "calibration forward overflowed or the data holds NaN/inf; estimate in float32 or bfloat16 (float16 "
                "activations overflow easily) and check the calibration data and the model's weights."
            )

    @property
    def num_layers(self) -> int:
        return self.heads.shape[0]

    def layer_scores(self, criterion: str) -> torch.Tensor:
        """Per-layer importance for ``criterion`` (``"block_importance"`` or ``"perplexity"``)."""
        if criterion == "block_importance":
            return self.block_importance
        if criterion == "perplexity":
            if self.layer_perplexity is None:
                raise ValueError(
                    "These scores have no layer perplexities: estimate them with "
                    "MinitronPruneConfig(depth_criterion='perplexity')."
                )
            return self.layer_perplexity
        raise ValueError(f"Unknown depth criterion {criterion!r}.")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "heads": self.heads,
            "neurons": self.neurons,
            "hidden": self.hidden,
            "block_importance": self.block_importance,
        }
        for name in _OPTIONAL + _BLOCK:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Save as safetensors (a directory gets ``importance_scores.safetensors``); written atomically."""
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, SCORES_NAME)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors().items()}
        atomic_write_bytes(path, save(tensors, metadata={"hf_minitron": json.dumps(self.metadata, sort_keys=True)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceScores":
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, SCORES_NAME)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("hf_minitron", "{}"))
        tensors = load_file(path)
        return cls(
            heads=tensors["heads"],
            neurons=tensors["neurons"],
            hidden=tensors["hidden"],
            block_importance=tensors["block_importance"],
            **{name: tensors.get(name) for name in _OPTIONAL + _BLOCK},
            metadata=metadata,
        )
