"""Layer-streaming importance: score a model larger than the accelerator, one decoder layer at a time.

The calibration set flows through the model *layer by layer* instead of batch by batch: every batch's hidden states
are kept on the device, one decoder layer is moved there (or, for a model built on the meta device, loaded there from
its safetensors checkpoint), every batch runs through it with the importance hooks attached, its outputs become the
next layer's inputs, and the layer goes back (or is freed). The hooks, and therefore the scores, are exactly those of
:func:`~hf_minitron.importance.estimate_importance`; only the order of the work changes.

Peak device memory is one decoder layer plus the hidden states of the calibration set
(``num_samples x seq_length x hidden_size`` in the model dtype, e.g. 1,024 x 4,096 x 8,192 x 2 bytes = 64 GiB for
Llama-3.1-70B) plus one layer's activations for one batch; ``offload_activations=True`` keeps the hidden states in
CPU memory instead and moves one batch at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..architectures import ArchitectureLayout, get_layout
from ..config import MinitronPruneConfig
from .estimator import ImportanceEstimator, _calibration_batches
from .scores import ImportanceScores


logger = logging.get_logger(__name__)


class _LayerInputs(nn.Module):
    """Stands in for a decoder layer while the decoder runs once per batch: records the arguments the layer would get
    (attention mask for its attention or block type, rotary embeddings, position ids) and passes the hidden states
    through. Other attributes read off the layer by the decoder loop (Nemotron-H's ``block_type``) come from the layer."""

    def __init__(self, index: int, calls: list, layer: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.index = index
        self.calls = calls
        self.as_tuple = as_tuple
        self.__dict__["_layer"] = layer  # not registered: its weights stay where they are

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((self.index, hidden_states, args, kwargs))
        return (hidden_states,) if self.as_tuple else hidden_states


def _checkpoint_index(checkpoint: str) -> dict[str, str]:
    """``{tensor name: file}`` of a local safetensors checkpoint (sharded or single-file)."""
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {k: os.path.join(checkpoint, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(
            f"No safetensors checkpoint in {checkpoint!r} (model.safetensors or model.safetensors.index.json): "
            "layer streaming from disk reads weights from safetensors files."
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _materialize(module: nn.Module, prefix: str, weights: dict[str, str], device: torch.device, dtype: torch.dtype) -> None:
    """Load ``module``'s parameters and persistent buffers (on meta) from the checkpoint onto ``device``."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    names = [n for n, _ in module.named_parameters()] + [
        n for n, b in module.named_buffers() if b.device.type == "meta"
    ]
    by_file: dict[str, list[str]] = {}
    for name in names:
        key = f"{prefix}{name}"
        if key not in weights:
            raise ValueError(f"The checkpoint has no tensor `{key}`; layer streaming needs the model's own key names.")
        by_file.setdefault(weights[key], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in file_names:
                tensor = f.get_tensor(f"{prefix}{name}")
                set_module_tensor_to_device(module, name, device, value=tensor, dtype=dtype if tensor.is_floating_point() else None)


def _to_meta(module: nn.Module) -> None:
    """Free a materialized module's parameters (back to the meta device); buffers computed at init stay."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta")


@contextmanager
def _on_device(module: nn.Module, device: torch.device, prefix: str, weights: dict[str, str] | None, dtype) -> Iterator[None]:
    """``module`` on ``device`` for the duration: moved there and back, or loaded from the checkpoint and freed."""
    if weights is not None and any(p.device.type == "meta" for p in module.parameters()):
        _materialize(module, prefix, weights, device, dtype)
        try:
            yield
        finally:
            _to_meta(module)
        return
    tensors = list(module.parameters()) + list(module.buffers())
    home = tensors[0].device if tensors else None
    module.to(device)
    try:
        yield
    finally:
        if home is not None:
            module.to(home)


def _move(value: Any, device: torch.device, cache: dict[int, Any]) -> Any:
    """``value`` with every tensor on ``device`` (each distinct tensor moved once: masks are shared by layers)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in cache:
            cache[id(value)] = value.to(device)
        return cache[id(value)]
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device, cache) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, cache) for k, v in value.items()}
    return value


@torch.inference_mode()
def estimate_importance_streaming(
    model: nn.Module,
    calibration_data: Any,
    config: MinitronPruneConfig | None = None,
    tokenizer=None,
    device: str | torch.device | None = None,
    checkpoint: str | None = None,
    offload_activations: bool = False,
    show_progress: bool = True,
) -> ImportanceScores:
    """:func:`~hf_minitron.estimate_importance` for models larger than the device: one decoder layer at a time.

    Args:
        model: A supported ``*ForCausalLM`` with its weights in CPU memory, or built on the meta device (e.g. with
            ``accelerate.init_empty_weights()``) when ``checkpoint`` is given.
        calibration_data, config, tokenizer: as for :func:`~hf_minitron.estimate_importance`.
        device: Where each layer runs (default: ``cuda`` when available, else ``cpu``).
        checkpoint: A local folder with the model's safetensors weights; layers on the meta device are loaded from
            it one at a time and freed after use, so the model never has to fit in CPU memory either.
        offload_activations: Keep the calibration set's hidden states in CPU memory between layers (one batch on
            the device at a time) instead of on the device.
        show_progress: Show a tqdm bar over layers.

    Returns:
        The same :class:`ImportanceScores` as the in-memory pass (equal up to floating-point summation order on
        other devices; tested equal on CPU). ``depth_criterion="perplexity"`` is not available here (it needs a
        full forward per layer); Block Importance is.

    Raises:
        ValueError: ``depth_criterion="perplexity"``, a meta-device model without ``checkpoint``, a checkpoint that
            lacks one of the model's tensors, or the checks of :func:`~hf_minitron.estimate_importance`.

    Example:
        >>> from accelerate import init_empty_weights
        >>> with init_empty_weights():
        ...     model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("llama-70b"))  # doctest: +SKIP
        >>> scores = estimate_importance_streaming(model, texts, config, tokenizer=tok, checkpoint="llama-70b")  # doctest: +SKIP
    """
    from ..validation import check_prunable_model

    config = config or MinitronPruneConfig()
    if config.depth_criterion == "perplexity":
        raise ValueError(
            "depth_criterion='perplexity' needs a full forward per removed layer, which layer streaming avoids; use "
            "depth_criterion='block_importance' (same pass), or the in-memory estimate_importance."
        )
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if on_meta and checkpoint is None:
        raise ValueError("The model has weights on the meta device: pass `checkpoint=` (a local safetensors folder).")
    layout = get_layout(model) if on_meta else check_prunable_model(model)
    from ..pruning.plan import check_target  # pruning imports this package

    check_target(model, config, layout)  # a target pruning would refuse fails now, before the pass
    weights = _checkpoint_index(checkpoint) if on_meta else None
    dtype = next(iter(model.parameters())).dtype
    batches = _calibration_batches(model, calibration_data, config, tokenizer)
    if not batches:
        raise ValueError("This process received no calibration samples: give at least as many samples as processes.")

    decoder = model.get_submodule(layout.decoder)
    parent_path, _, attr = layout.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    shell = [m for name, m in decoder.named_children() if m is not layers]  # embeddings, rotary, final norm
    was_training = model.training
    model.eval()

    # 1. One cheap decoder pass per batch with recorders in place of the layers: the embeddings (first layer's input)
    #    and each layer's keyword arguments (masks per attention type, rotary embeddings), computed on `device`.
    calls: list = []
    setattr(parent, attr, nn.ModuleList([_LayerInputs(i, calls, layer, layout.layer_output_tuple) for i, layer in enumerate(layers)]))
    states, layer_args = [], []
    try:
        with _modules_on(shell, device, layout, model, weights, dtype):
            for batch in batches:
                calls.clear()
                decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
                h = calls[0][1]
                states.append(h.to("cpu") if offload_activations else h)
                layer_args.append([(args, kwargs) for _, _, args, kwargs in calls])
    finally:
        setattr(parent, attr, layers)

    # 2. Layer by layer, every batch, hooks attached: the estimator sees what the in-memory pass sees.
    estimator = ImportanceEstimator(model, config, layout).attach()
    try:
        for i, layer in enumerate(tqdm(layers, desc="Importance (layer streaming)", disable=not show_progress)):
            with _on_device(layer, device, f"{layout.layers}.{i}.", weights, dtype):
                moved: dict[int, Any] = {}
                for b, batch in enumerate(batches):
                    estimator.begin_batch(batch["attention_mask"], count=(i == 0))
                    args, kwargs = _move(layer_args[b][i], device, moved)
                    out = layer(states[b].to(device), *args, **kwargs)
                    if layout.layer_output_tuple and isinstance(out, tuple):
                        out = out[0]
                    if not isinstance(out, torch.Tensor):
                        raise ValueError(f"{type(layer).__name__} returned {type(out).__name__}; layer streaming expects a tensor.")
                    states[b] = out.to("cpu") if offload_activations else out
        final_norm = model.get_submodule(layout.final_norm)
        with _on_device(final_norm, device, f"{layout.final_norm}.", weights, dtype):
            for b, batch in enumerate(batches):
                estimator.begin_batch(batch["attention_mask"], count=False)
                final_norm(states[b].to(device))
    finally:
        estimator.detach()
    model.train(was_training)
    return estimator.finalize()


@contextmanager
def _modules_on(modules: list[nn.Module], device, layout: ArchitectureLayout, model: nn.Module, weights, dtype) -> Iterator[None]:
    """The decoder's non-layer modules (embeddings, rotary embedding, final norm) on ``device`` for the duration."""
    names = {id(m): n for n, m in model.named_modules()}
    with ExitStack() as stack:
        for module in modules:
            stack.enter_context(_on_device(module, device, f"{names[id(module)]}.", weights, dtype))
        yield
