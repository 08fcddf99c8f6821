"""Activation-based importance from forward passes only (Minitron, arXiv 2407.14679 section 2.2).

One pass over the calibration data with forward hooks gives, with no gradients and no stored activations:

* heads:   ``||attn_output_h||_2`` per head (the input of ``o_proj``),
* neurons: ``|x_i|`` per MLP neuron (the input of ``down_proj``),
* hidden:  ``|y_c|`` per channel of every norm's output (final norm included); aggregated per norm, then summed,
* layers:  Block Importance, ``1 - cos(layer input, layer output)`` averaged over tokens.

Per-token values are first reduced over each sample's (unpadded) tokens with ``sequence_aggregation``, then
over samples with ``batch_aggregation``. Only fp32 running sums per unit are kept, so memory does not grow
with the amount of calibration data, and per-sample reduction makes the scores independent of batching and
of how samples are sharded across processes (sums are all-reduced before the final aggregation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..architectures import ArchitectureLayout
from ..config import MinitronPruneConfig
from ..data import batch_samples, to_samples
from ..evaluation import masked_nll
from ..validation import check_prunable_model, check_token_ids
from .scores import ImportanceScores


logger = logging.get_logger(__name__)


class _Stat:
    """Running per-sample statistics of one score vector: sum and sum of squares over samples (fp32)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, per_sample: torch.Tensor) -> None:
        """``per_sample``: ``[batch, units]`` already reduced over tokens."""
        s, sq = per_sample.sum(0), per_sample.square().sum(0)
        if self.sum is None:
            self.sum, self.sumsq = s, sq
        else:
            self.sum += s
            self.sumsq += sq


def aggregate_sequence(values: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``values [batch, seq, units]`` (fp32, >= 0) over unmasked tokens -> ``[batch, units]``.

    ``mask`` is ``[batch, seq]`` float (1 = real token). ``"mean"``: mean; ``"l2"``: L2 norm; ``"var"``:
    population variance over the sample's tokens.
    """
    n = mask.sum(1, keepdim=True).clamp_min(1.0)  # [batch, 1]
    if how == "mean":
        return torch.einsum("bt,btu->bu", mask, values) / n
    squares = torch.einsum("bt,btu->bu", mask, values.square())
    if how == "l2":
        return squares.sqrt()
    if how == "var":
        mean = torch.einsum("bt,btu->bu", mask, values) / n
        return (squares / n - mean.square()).clamp_min(0.0)
    raise ValueError(f"Unknown sequence aggregation {how!r}.")


def aggregate_batch(total: torch.Tensor, total_sq: torch.Tensor, count: int, how: str) -> torch.Tensor:
    """Finish the reduction over samples from running sums: ``"l2"`` norm, ``"mean"`` or ``"var"``."""
    if how == "l2":
        return total_sq.sqrt()
    if how == "mean":
        return total / count
    if how == "var":
        return (total_sq / count - (total / count).square()).clamp_min(0.0)
    raise ValueError(f"Unknown batch aggregation {how!r}.")


class ImportanceEstimator:
    """Registers the hooks, runs the calibration forwards and turns the running sums into scores.

    Most users call :func:`estimate_importance`; the class is public for custom loops (e.g. calling
    ``estimator.observe(batch)`` from your own data pipeline) between ``attach()`` and ``finalize()``.
    """

    def __init__(self, model: nn.Module, config: MinitronPruneConfig, layout: ArchitectureLayout) -> None:
        self.model = model
        self.config = config
        self.layout = layout
        self.sizes = layout.read_sizes(model.config)
        num_layers = self.sizes["num_hidden_layers"]
        self.head_stats = [_Stat() for _ in range(num_layers)]
        self.neuron_stats = [_Stat() for _ in range(num_layers)]
        self.norm_names = [name for name, _ in layout.norm_modules(model)]
        self.norm_stats = [_Stat() for _ in self.norm_names]
        self.bi_sum: list[torch.Tensor | None] = [None] * num_layers  # sum over tokens of 1 - cos
        self.num_samples = 0
        self.num_tokens = 0
        self._mask: torch.Tensor | None = None  # [batch, seq] float, set per batch
        self._mask_on: dict[torch.device, torch.Tensor] = {}
        self._layer_inputs: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks
    def _mask_for(self, device: torch.device) -> torch.Tensor:
        if device not in self._mask_on:
            self._mask_on[device] = self._mask.to(device)
        return self._mask_on[device]

    def _units(self, values: torch.Tensor) -> torch.Tensor:
        return aggregate_sequence(values, self._mask_for(values.device), self.config.sequence_aggregation)

    def _head_hook(self, layer_idx: int) -> Callable:
        head_dim = self.sizes["head_dim"]

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # [batch, seq, heads * head_dim]
            per_head = x.unflatten(-1, (-1, head_dim)).float().norm(dim=-1)  # [batch, seq, heads]
            self.head_stats[layer_idx].add(self._units(per_head))

        return hook

    def _neuron_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # [batch, seq, intermediate]
            self.neuron_stats[layer_idx].add(self._units(x.float().abs()))

        return hook

    def _norm_hook(self, norm_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output  # [batch, seq, hidden]
            self.norm_stats[norm_idx].add(self._units(y.float().abs()))

        return hook

    def _layer_pre_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._layer_inputs[layer_idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _layer_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = self._layer_inputs.pop(layer_idx)
            x_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x_in.float(), x_out.float().to(x_in.device), dim=-1)  # [batch, seq]
            mask = self._mask_for(cos.device)
            total = ((1.0 - cos) * mask).sum()
            self.bi_sum[layer_idx] = total if self.bi_sum[layer_idx] is None else self.bi_sum[layer_idx] + total

        return hook

    def attach(self) -> "ImportanceEstimator":
        layout, model = self.layout, self.model
        for i, layer in enumerate(layout.decoder_layers(model)):
            self._handles.append(layer.get_submodule(layout.o_proj).register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(layer.get_submodule(layout.down_proj).register_forward_pre_hook(self._neuron_hook(i)))
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        for j, (_, norm) in enumerate(layout.norm_modules(model)):
            self._handles.append(norm.register_forward_hook(self._norm_hook(j)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layer_inputs.clear()

    # ------------------------------------------------------------------ passes
    @torch.inference_mode()
    def observe(self, batch: dict[str, torch.Tensor]) -> None:
        """Run the decoder body (no ``lm_head``: importance never needs logits) on one batch."""
        mask = batch["attention_mask"]
        self._mask = mask.float()
        self._mask_on = {}
        device = _input_device(self.model, self.layout)
        decoder = self.model.get_submodule(self.layout.decoder)
        decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False)
        self.num_samples += mask.shape[0]
        self.num_tokens += int(mask.sum())

    def _reduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum running statistics over processes (no-op for a single process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return tensors
        if torch.distributed.get_world_size() == 1:
            return tensors
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flat = torch.cat([t.reshape(-1).to(device, torch.float32) for t in tensors])
        torch.distributed.all_reduce(flat)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t).cpu())
            offset += t.numel()
        return out

    def finalize(self) -> ImportanceScores:
        stats = self.head_stats + self.neuron_stats + self.norm_stats
        if any(s.sum is None for s in stats):
            raise RuntimeError("Some hooks never fired: did the model run a forward pass between attach() and finalize()?")
        counts = torch.tensor([float(self.num_samples), float(self.num_tokens)])
        local = [t.float().cpu() for s in stats for t in (s.sum, s.sumsq)]
        local += [torch.stack([b.float().cpu() for b in self.bi_sum]), counts]
        reduced = self._reduce(local)
        counts = reduced.pop()
        bi_sum = reduced.pop()
        num_samples, num_tokens = int(counts[0].item()), int(counts[1].item())
        batch_how = self.config.batch_aggregation
        finals = [
            aggregate_batch(reduced[2 * k], reduced[2 * k + 1], num_samples, batch_how) for k in range(len(stats))
        ]
        num_layers = len(self.head_stats)
        heads = torch.stack(finals[:num_layers])
        neurons = torch.stack(finals[num_layers : 2 * num_layers])
        hidden = torch.stack(finals[2 * num_layers :]).sum(0)
        return ImportanceScores(
            heads=heads,
            neurons=neurons,
            hidden=hidden,
            block_importance=bi_sum / max(num_tokens, 1),
            metadata={
                "batch_aggregation": batch_how,
                "sequence_aggregation": self.config.sequence_aggregation,
                "num_samples": num_samples,
                "num_tokens": num_tokens,
                "model_type": self.model.config.model_type,
                "source_model": getattr(self.model.config, "_name_or_path", "") or "",
                "source_sizes": dict(self.sizes),
            },
        )


def _input_device(model: nn.Module, layout: ArchitectureLayout) -> torch.device:
    return model.get_submodule(layout.embed_tokens).weight.device


def _process_shard(samples: list) -> list:
    """This process's share of the samples under ``accelerate launch`` / ``torchrun`` (all of them otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return samples[rank::world]
    return samples


def _calibration_batches(model, calibration_data, config, tokenizer) -> list[dict[str, torch.Tensor]]:
    samples = to_samples(
        calibration_data,
        tokenizer=tokenizer,
        seq_length=config.calibration_seq_length,
        max_samples=config.num_calibration_samples,
    )
    if all(s.numel() < 2 for s in samples):
        raise ValueError("The calibration data is too short: every sequence has fewer than 2 tokens.")
    check_token_ids(samples, model.config, what="calibration data")
    if len(samples) < config.num_calibration_samples:
        logger.warning(
            f"Using {len(samples)} calibration samples (asked for {config.num_calibration_samples}); "
            "scores get more reliable with more data (the papers use 1024)."
        )
    pad = getattr(model.config, "pad_token_id", None)
    return batch_samples(_process_shard(samples), config.calibration_batch_size, pad_token_id=pad if pad is not None else 0)


@torch.inference_mode()
def layer_perplexities(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], layout: ArchitectureLayout, show_progress: bool = True
) -> torch.Tensor:
    """Calibration perplexity of the model with each single layer removed -> ``[num_layers]``.

    One pass over ``batches`` per layer (costly; the papers' alternative to Block Importance).
    """
    parent_path, _, attr = layout.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    results = []
    try:
        for skip in tqdm(range(len(layers)), desc="Layer perplexity", disable=not show_progress):
            setattr(parent, attr, nn.ModuleList([layer for i, layer in enumerate(layers) if i != skip]))
            nll, count = masked_nll(model, batches)
            totals = torch.tensor([nll, float(count)], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)
            results.append(math.exp(totals[0].item() / max(totals[1].item(), 1.0)))
    finally:
        setattr(parent, attr, layers)
    return torch.tensor(results, dtype=torch.float32)


def estimate_importance(
    model: nn.Module,
    calibration_data: Any,
    config: MinitronPruneConfig | None = None,
    tokenizer=None,
    show_progress: bool = True,
) -> ImportanceScores:
    """Score heads, MLP neurons, hidden channels and layers from forward passes over calibration data.

    Args:
        model: A supported ``*ForCausalLM`` (any device placement, ``device_map="auto"`` included).
        calibration_data: A ``datasets.Dataset`` with ``input_ids`` or ``text``, a DataLoader / iterable of
            dicts with ``input_ids``, a list of token-id tensors shaped ``[seq]`` or ``[batch, seq]``, or texts.
        config: Aggregation and calibration settings (defaults: L2 over samples, mean over tokens, 1024 samples).
        tokenizer: Needed when ``calibration_data`` is text.
        show_progress: Show a tqdm bar.

    Under ``accelerate launch`` / ``torchrun`` each process scores its own shard of the samples and the
    running sums are all-reduced, giving the single-process result.

    Example:
        >>> from hf_minitron import MinitronPruneConfig, estimate_importance
        >>> scores = estimate_importance(model, texts, MinitronPruneConfig(), tokenizer=tokenizer)  # doctest: +SKIP
        >>> scores.heads.shape  # [num_layers, num_attention_heads]  # doctest: +SKIP
    """
    config = config or MinitronPruneConfig()
    layout = check_prunable_model(model)
    batches = _calibration_batches(model, calibration_data, config, tokenizer)
    if not batches:
        raise ValueError(
            "This process received no calibration samples: give at least as many samples as processes."
        )
    was_training = model.training
    model.eval()
    estimator = ImportanceEstimator(model, config, layout).attach()
    try:
        for batch in tqdm(batches, desc="Importance", disable=not show_progress):
            estimator.observe(batch)
    finally:
        estimator.detach()
    scores = estimator.finalize()
    if config.depth_criterion == "perplexity":
        scores.layer_perplexity = layer_perplexities(model, batches, layout, show_progress)
    model.train(was_training)
    return scores
