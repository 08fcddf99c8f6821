"""In-place weight slicing.

Every helper replaces one parameter at a time with the kept rows/columns, so the old tensor is freed as
soon as it is replaced: peak memory is the model plus its single largest sliced tensor, never a 2x copy.
"""

from __future__ import annotations

import torch
from torch import nn


def _index(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long, device=device)


def _replace(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def slice_linear(linear: nn.Linear, out_idx: list[int] | None = None, in_idx: list[int] | None = None) -> None:
    """Keep output rows ``out_idx`` and input columns ``in_idx`` of ``linear`` (``None`` keeps all).

    Any module with a 2-D ``weight [out, in]`` (and optional ``bias [out]``) works, e.g. an MoE router.
    """
    weight = linear.weight  # [out_features, in_features]
    bias = getattr(linear, "bias", None)
    if out_idx is not None:
        weight = weight.index_select(0, _index(out_idx, weight.device))
        if isinstance(bias, torch.Tensor):
            _replace(linear, "bias", bias.index_select(0, _index(out_idx, bias.device)))
        if hasattr(linear, "out_features"):
            linear.out_features = len(out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, _index(in_idx, weight.device))
        if hasattr(linear, "in_features"):
            linear.in_features = len(in_idx)
    if weight is not linear.weight:
        _replace(linear, "weight", weight)


@torch.no_grad()
def slice_embedding(embedding: nn.Embedding, hidden_idx: list[int]) -> None:
    """Keep embedding channels ``hidden_idx`` (weight ``[vocab, hidden]``)."""
    _replace(embedding, "weight", embedding.weight.index_select(1, _index(hidden_idx, embedding.weight.device)))
    embedding.embedding_dim = len(hidden_idx)


@torch.no_grad()
def slice_norm(norm: nn.Module, hidden_idx: list[int]) -> None:
    """Keep channels ``hidden_idx`` of an RMSNorm / LayerNorm (weight and bias)."""
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, torch.Tensor):
            _replace(norm, name, param.index_select(0, _index(hidden_idx, param.device)))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(hidden_idx),)
    if hasattr(norm, "hidden_size") and isinstance(norm.hidden_size, int):
        norm.hidden_size = len(hidden_idx)


def expand_heads(heads: list[int], head_dim: int) -> list[int]:
    """Row indices of the given heads in a ``[heads * head_dim, ...]`` projection."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]
