"""Checks shared by importance estimation and pruning: is this a model we can work on?"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .architectures import ArchitectureLayout, get_layout
from .model_utils import check_no_adapters, strip_instance_patches


logger = logging.get_logger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_prunable_model(model: nn.Module) -> ArchitectureLayout:
    """Validate ``model`` and return its layout; strip a dequantized GGUF's ``quantization_config`` and instance-level
    ``forward`` patches that point at another model (left by a trainer on the object ``model`` was copied from).

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
    quant_method = getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict) else None)
    quant_method = getattr(quant_method, "value", quant_method)
    non_float = sorted({str(p.dtype) for p in model.parameters() if p.dtype not in _FLOAT_DTYPES})
    if quant is not None and quant_method == "gguf" and not non_float:
        # transformers dequantizes GGUF files to float on load; only the leftover config would break saving.
        logger.info("Dropping the `quantization_config` of a dequantized GGUF model so the pruned model saves.")
        del config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass
    elif quant is not None or non_float or getattr(model, "hf_quantizer", None) is not None:
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
