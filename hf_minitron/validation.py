"""Checks shared by importance estimation, pruning, evaluation and the recipe: is this a model / data we can use?"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .architectures import ArchitectureLayout, get_layout
from .logging import get_logger
from .model_utils import check_no_adapters, strip_instance_patches


logger = get_logger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _quant_method(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    method = getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict) else None)
    return getattr(method, "value", method)


def is_dequantized_gguf(model: nn.Module) -> bool:
    """A GGUF model that transformers dequantized to float on load: only its ``quantization_config`` is left."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "quantization_config", None) is not None
        and _quant_method(config) == "gguf"
        and all(p.dtype in _FLOAT_DTYPES for p in model.parameters())
    )


def drop_dequantized_gguf_marker(model: nn.Module) -> None:
    """Remove a dequantized GGUF model's ``quantization_config`` (it would make ``save_pretrained`` fail)."""
    if not is_dequantized_gguf(model):
        return
    del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


@contextlib.contextmanager
def without_dequantized_gguf_marker(model: nn.Module) -> Iterator[None]:
    """Hide a dequantized GGUF model's ``quantization_config`` for the block (e.g. a save); restored after."""
    if not is_dequantized_gguf(model):
        yield
        return
    saved = {name: getattr(model, name) for name in ("hf_quantizer", "is_quantized") if hasattr(model, name)}
    quantization_config = model.config.quantization_config
    drop_dequantized_gguf_marker(model)
    try:
        yield
    finally:
        model.config.quantization_config = quantization_config
        for name, value in saved.items():
            with contextlib.suppress(AttributeError):
                setattr(model, name, value)


def check_prunable_model(model: nn.Module) -> ArchitectureLayout:
    """Validate ``model`` and return its layout. Only instance-level ``forward`` patches that point at *another*
    model (left by a trainer on the object ``model`` was copied from) are removed; nothing else about ``model`` changes.

    A dequantized GGUF model (float weights, a leftover ``quantization_config``) is accepted; :func:`prune_model`
    drops that marker from the pruned model and :func:`save_pruned_model` leaves it out of the saved config.

    Raises:
        ValueError: a PEFT model or adapter layers (merge them first), unsupported architecture (or a module layout
            that does not match the registered one), quantized weights, or weights on the meta device.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("Expected a Hugging Face `PreTrainedModel` (with a `.config`), got " f"{type(model).__name__}.")
    check_no_adapters(model, "score or prune")
    strip_instance_patches(model, foreign_only=True)
    layout = get_layout(model)

    quant = getattr(config, "quantization_config", None)
    quant_method = _quant_method(config)
    non_float = sorted({str(p.dtype) for p in model.parameters() if p.dtype not in _FLOAT_DTYPES})
    if not is_dequantized_gguf(model) and (quant is not None or non_float or getattr(model, "hf_quantizer", None) is not None):
        raise ValueError(
            f"The model is quantized ({quant_method or ', '.join(non_float)}); structured pruning needs float "
            "weights. Load it in bf16/fp16/fp32 (without `quantization_config` / `load_in_4bit` / `load_in_8bit`), "
            "prune, then quantize the pruned model."
        )

    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{len(meta)} weights are on the meta device (e.g. {meta[0]}): load the model with real weights "
            "(no `device_map` disk offload, no `init_empty_weights`) before estimating importance or pruning."
        )
    layout.check_model(model)
    return layout


def check_token_ids(samples: Sequence[torch.Tensor], model_config, what: str = "calibration data") -> None:
    """Fail early on token ids the model cannot embed, or sequences longer than it can position.

    Args:
        samples: 1-D token-id tensors (one per sequence).
        model_config: The model's config (``vocab_size``, ``max_position_embeddings``).
        what: How the data is named in the message.

    Raises:
        ValueError: an id outside ``[0, vocab_size)`` (e.g. data tokenized with another tokenizer), or a
            sequence longer than ``max_position_embeddings``.
    """
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text_config, "vocab_size", None)
    max_positions = getattr(text_config, "max_position_embeddings", None)
    for i, sample in enumerate(samples):
        if sample.numel() == 0:
            continue
        low, high = int(sample.min()), int(sample.max())
        if isinstance(vocab, int) and (low < 0 or high >= vocab):
            bad = low if low < 0 else high
            raise ValueError(
                f"The {what} holds token id {bad} (sequence {i}), outside the model's vocabulary [0, {vocab}): "
                "tokenize it with the model's own tokenizer."
            )
        if isinstance(max_positions, int) and sample.numel() > max_positions:
            raise ValueError(
                f"The {what} has a sequence of {sample.numel()} tokens (sequence {i}), longer than the model's "
                f"max_position_embeddings={max_positions}: use sequences of at most {max_positions} tokens "
                "(`seq_length` / `calibration_seq_length`)."
            )
