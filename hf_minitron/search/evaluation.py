"""Held-out loss of a candidate (the search's ranking metric), through the package's one masked-NLL helper."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..evaluation import masked_nll


def heldout_loss(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on padded ``batches``.

    ``batches`` are ``{"input_ids", "attention_mask"}`` dicts (see :func:`~hf_minitron.evaluation.masked_nll`).

    Raises:
        ValueError: no batch has a token to predict.

    Example:
        >>> from hf_minitron.data import batch_samples
        >>> heldout_loss(model, batch_samples(samples, batch_size=4))  # doctest: +SKIP
        3.21
    """
    total, count = masked_nll(model, batches)
    if count == 0:
        raise ValueError("The held-out data has no token to predict: give sequences of at least 2 tokens.")
    return total / count
