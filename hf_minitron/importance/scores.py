"""`ImportanceScores`: the result of one calibration pass, reusable for many prune targets."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..atomic import atomic_write_bytes


SCORES_NAME = "importance_scores.safetensors"


@dataclass
class ImportanceScores:
    """Activation-based importance of every prunable unit (higher = more important).

    Attributes:
        heads: ``[num_layers, num_attention_heads]`` per-head output norm (input of ``o_proj``).
        neurons: ``[num_layers, intermediate_size]`` per-neuron activation (input of ``down_proj``).
        hidden: ``[hidden_size]`` per-channel activation of every norm's output, aggregated per norm, then summed.
        block_importance: ``[num_layers]`` mean 1 - cos(layer input, layer output) over calibration tokens.
        layer_perplexity: ``[num_layers]`` calibration perplexity with that one layer removed (optional).
        metadata: aggregation settings, sample and token counts, source sizes.

    Example:
        >>> scores = estimate_importance(model, calibration_data, config)  # doctest: +SKIP
        >>> scores.save("scores.safetensors")  # doctest: +SKIP
        >>> scores = ImportanceScores.load("scores.safetensors")  # doctest: +SKIP
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    block_importance: torch.Tensor
    layer_perplexity: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

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
        if self.layer_perplexity is not None:
            out["layer_perplexity"] = self.layer_perplexity
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
            layer_perplexity=tensors.get("layer_perplexity"),
            metadata=metadata,
        )
