"""Perplexity on held-out text (sliding, non-overlapping windows)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import batch_samples, to_samples


@torch.inference_mode()
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

    Example:
        >>> ppl = perplexity(model, held_out_texts, tokenizer, seq_length=512)  # doctest: +SKIP
    """
    samples = to_samples(data, tokenizer=tokenizer, seq_length=seq_length, max_samples=max_samples)
    samples = [s[:seq_length] for s in samples if s.numel() >= 2]
    if not samples:
        raise ValueError("No evaluation sequence has 2 or more tokens.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in tqdm(batch_samples(samples, batch_size), desc="Perplexity", disable=not show_progress):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        nll += loss.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return math.exp(nll / count)
