"""Held-out next-token loss: one masked-NLL helper for perplexity, per-layer scoring and the architecture search."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import batch_samples, to_samples
from .validation import check_token_ids


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def masked_nll(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    progress: tqdm | None = None,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``model`` over padded ``batches``, and the token count.

    Each batch is ``{"input_ids": [batch, seq], "attention_mask": [batch, seq]}`` (right padding, as made by
    :func:`~hf_minitron.data.batch_samples`; a missing mask means no padding). Position ``t`` predicts token
    ``t + 1``; a prediction counts when its target token is real (mask 1). Logits are upcast to float32 one
    sequence at a time, so the extra memory is one ``[seq, vocab]`` float32 tensor, not ``[batch, seq, vocab]``.
    The model's train/eval mode is restored afterwards.

    Returns:
        ``(nll, count)``: NLL summed in nats (accumulated in float64) and the number of predicted tokens.
        ``exp(nll / count)`` is the perplexity, ``nll / count`` the mean loss. Under ``torchrun`` the caller
        all-reduces both when batches are sharded.

    Example:
        >>> from hf_minitron.data import batch_samples
        >>> nll, count = masked_nll(model, batch_samples(samples, batch_size=8))  # doctest: +SKIP
        >>> math.exp(nll / count)  # perplexity  # doctest: +SKIP
    """
    device = _input_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, seq, vocab]
            targets = ids[:, 1:].to(logits.device)
            valid = mask[:, 1:].to(logits.device).bool()
            for row in range(ids.shape[0]):  # one [seq - 1, vocab] float32 copy at a time
                nll = nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none")
                total += float(nll[valid[row]].double().sum())
            count += int(valid.sum())
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return total, count


def perplexity(
    model: nn.Module,
    data: Any,
    tokenizer=None,
    seq_length: int = 512,
    batch_size: int = 8,
    max_samples: int | None = None,
    show_progress: bool = True,
) -> float:
    """Token-level perplexity ``exp(mean NLL)`` over ``data`` cut into ``seq_length``-token windows.

    ``data`` takes the same forms as calibration data (texts need ``tokenizer``). Each window is scored on
    its own (no context carried over), the usual "512-token windows" WikiText protocol.

    Raises:
        ValueError: no window has 2 or more tokens, a token id is outside the model's vocabulary, or a window is
            longer than the model's ``max_position_embeddings``.

    Example:
        >>> ppl = perplexity(model, held_out_texts, tokenizer, seq_length=512)  # doctest: +SKIP
    """
    samples = to_samples(data, tokenizer=tokenizer, seq_length=seq_length, max_samples=max_samples)
    samples = [s[:seq_length] for s in samples if s.numel() >= 2]
    if not samples:
        raise ValueError("No evaluation sequence has 2 or more tokens.")
    check_token_ids(samples, model.config, what="evaluation data")
    batches = batch_samples(samples, batch_size)
    with tqdm(total=len(batches), desc="Perplexity", disable=not show_progress) as bar:
        nll, count = masked_nll(model, batches, progress=bar)
    return math.exp(nll / count)


__all__ = ["masked_nll", "perplexity"]
