"""Activation-based importance from forward passes only (Minitron, arXiv 2407.14679 section 2.2).

One pass over the calibration data with forward hooks gives, with no gradients and no stored activations:

* heads:   ``||attn_output_h||_2`` per head (the input of ``o_proj``),
* neurons: ``|x_i|`` per MLP neuron (the input of ``down_proj``),
* hidden:  ``|y_c|`` per channel of the activations on the hidden axis, recorded per site: every norm's output (with
  its role, see :data:`~hf_minitron.architectures.layout.NORM_ROLES`), the input of each sublayer that has no
  pre-norm, and each layer's output (the residual stream). Which sites make the hidden score is chosen at pruning
  time (``MinitronPruneConfig.hidden_importance_source``, default ``"matmul_inputs"``: what the hidden-reading matmuls
  see, i.e. the papers' LayerNorm activations on pre-norm models, never Gemma's post-sublayer norms; chosen by
  measurement on SmolLM2-135M and Gemma-3-270M, docs/results.md); see :meth:`ImportanceScores.hidden_scores`.
* experts: per routed expert, the routing-weighted output norm, routing weight and routing frequency, and per expert
  neuron ``|w * a|`` (``a``: the expert's ``down_proj`` input), from the tokens routed to it (see
  :mod:`~hf_minitron.importance.blocks`); shared-expert neurons like MLP neurons,
* Mamba:   per head the norm of its ``out_proj`` input and per head channel its magnitude, plus the gated norm's input
  energy (arXiv 2504.11409),
* layers:  Block Importance, ``1 - cos(layer input, layer output)`` averaged over tokens, for every block type,
* norm statistics for the calibrated norm correction: the per-channel mean of ``x^2`` (and of ``x`` for LayerNorm
  families) over every calibration token, at each norm's input.

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
from transformers.activations import ACT2FN
from transformers.utils import logging

from ..architectures import ArchitectureLayout
from ..architectures.depth import without_layers
from ..config import MinitronPruneConfig
from ..data import batch_samples, to_samples
from ..evaluation import masked_nll
from ..validation import check_prunable_model, check_token_ids
from .blocks import EXPERT_STATISTICS, aggregate_sums, expert_sums
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


class _Moments:
    """Running sums over every real token of ``x`` and ``x^2`` per channel (fp32), for norm statistics."""

    def __init__(self, first: bool) -> None:
        self.first = first
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """``x``: ``[batch, seq, units]``; ``mask``: ``[batch, seq]`` float (1 = real token)."""
        x = x.float()
        sq = torch.einsum("bt,btu->u", mask, x.square())
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        if self.first:
            s = torch.einsum("bt,btu->u", mask, x)
            self.sum = s if self.sum is None else self.sum + s


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

    Each layer gets the hooks of the blocks it holds (:meth:`ArchitectureLayout.layer_parts`): attention heads, dense
    MLP neurons, routed experts and their neurons, shared-expert neurons, Mamba heads and head channels; every layer
    gets Block Importance and the residual-stream statistics whatever its type.
    """

    def __init__(self, model: nn.Module, config: MinitronPruneConfig, layout: ArchitectureLayout) -> None:
        self.model = model
        self.config = config
        self.layout = layout
        self.sizes = s = layout.read_sizes(model.config)
        layers = layout.decoder_layers(model)
        num_layers = len(layers)
        self.parts = [layout.layer_parts(layer) for layer in layers]

        def per_layer(part: str, *units: int) -> tuple[list[_Stat | None], tuple[int, ...]]:
            return [_Stat() if part in p else None for p in self.parts], units

        # Unit scores, one running statistic per layer holding the block (None elsewhere; zeros in the result).
        self.groups: dict[str, tuple[list[_Stat | None], tuple[int, ...]]] = {
            "heads": per_layer("attention", s["num_attention_heads"]),
            "neurons": per_layer("mlp", s.get("intermediate_size", 0)),
        }
        if layout.moe is not None:
            for name in EXPERT_STATISTICS[:3] + ("expert_router_probability",):
                self.groups[name] = per_layer("moe", s["num_experts"])
            self.groups["expert_neurons"] = per_layer("moe", s["num_experts"], s["moe_intermediate_size"])
            if "shared_expert_intermediate_size" in s:
                self.groups["shared_neurons"] = per_layer("shared_expert", s["shared_expert_intermediate_size"])
        if layout.mamba is not None:
            self.groups["mamba_heads"] = per_layer("mamba", s["mamba_num_heads"])
            self.groups["mamba_channels"] = per_layer("mamba", s["mamba_num_heads"], s["mamba_head_dim"])
        norms = layout.norm_modules_with_roles(model)
        self.norm_names = [name for name, _, _ in norms]
        self.norm_roles = [role for _, _, role in norms]
        self.norm_stats = [_Stat() for _ in norms]
        layernorm = layout.norm_kind.startswith("layernorm")  # LayerNorm corrections also need the channel means
        self.norm_moments = [_Moments(first=layernorm) for _ in norms]
        # Sublayers without a pre-norm (OLMo2) read the residual stream directly: record what their first matmul reads.
        self.sublayer_sites = []
        for i, (layer, parts) in enumerate(zip(layers, self.parts)):
            for kind, norm, first in (
                ("attention", layout.attention_norm, self._first_matmul(parts, "mixer")),
                ("mlp", layout.mlp_norm, self._first_matmul(parts, "ffn")),
            ):
                if first is not None and (norm is None or not layout.has(layer, norm)):
                    self.sublayer_sites.append((i, kind, first))
        self.sublayer_stats = [_Stat() for _ in self.sublayer_sites]
        self.residual_stats = [_Stat() for _ in range(num_layers)]
        # q/k norms over the whole projection (OLMo2) are rescaled like hidden norms when heads are dropped.
        self.qk_moments = (
            {name: [_Moments(False) if "attention" in p else None for p in self.parts] for name in ("q_norm", "k_norm")}
            if layout.qk_norm_scope == "projection" and layout.q_norm is not None
            else {}
        )
        # The Mamba gated norm's input energy, for its correction after Mamba heads / channels are dropped.
        self.mamba_moments = [
            _Moments(False) if "mamba" in p and layout.mamba.norm_module(layer) is not None else None
            for layer, p in zip(layers, self.parts)
        ] if layout.mamba is not None else []
        self.bi_sum: list[torch.Tensor | None] = [None] * num_layers  # sum over tokens of 1 - cos
        self.num_samples = 0
        self.num_tokens = 0
        self._mask: torch.Tensor | None = None  # [batch, seq] float, set per batch
        self._mask_on: dict[torch.device, torch.Tensor] = {}
        self._layer_inputs: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _first_matmul(self, parts: frozenset[str], slot: str) -> str | None:
        """The first projection reading the hidden axis in a layer's ``slot`` ("mixer" or "ffn"), if it has one."""
        layout = self.layout
        if slot == "mixer":
            if "attention" in parts:
                return layout.q_proj or layout.qkv_proj
            return layout.mamba.in_proj if "mamba" in parts else None
        if "mlp" in parts:
            return layout.gate_proj or layout.gate_up_proj or layout.up_proj
        if "moe" in parts:
            return layout.moe.router
        return None

    # ------------------------------------------------------------------ hooks
    def _mask_for(self, device: torch.device) -> torch.Tensor:
        if device not in self._mask_on:
            self._mask_on[device] = self._mask.to(device)
        return self._mask_on[device]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[batch, seq, units]`` (MoE blocks flatten tokens to ``[batch * seq, units]``)."""
        return x.view(*self._mask.shape, -1) if x.dim() == 2 else x

    def _units(self, values: torch.Tensor) -> torch.Tensor:
        values = self._tokens(values)
        return aggregate_sequence(values, self._mask_for(values.device), self.config.sequence_aggregation)

    def _head_hook(self, stat: _Stat, head_dim: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = self._tokens(args[0])  # [batch, seq, heads * head_dim]: o_proj (attention) or out_proj (Mamba) input
            per_head = x.unflatten(-1, (-1, head_dim)).float().norm(dim=-1)  # [batch, seq, heads]
            stat.add(self._units(per_head))

        return hook

    def _abs_input_hook(self, *stats: _Stat) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            # [batch, seq, units]: a down_proj input (neurons), Mamba out_proj input (channels) or a first-matmul input
            x = self._units(args[0].float().abs())
            for stat in stats:
                stat.add(x)

        return hook

    def _experts_hook(self, layer_idx: int) -> Callable:
        names = ("hidden_states", "top_k_index", "top_k_weights")

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
            mask = self._mask_for(values[0].device)
            how = self.config.sequence_aggregation
            for name, (s1, s2) in expert_sums(module, self.layout.moe, *values, mask).items():
                self.groups[name][0][layer_idx].add(aggregate_sums(s1, s2, mask.sum(1), how).flatten(1))

        return hook

    def _router_hook(self, stat: _Stat) -> Callable:
        probability = torch.sigmoid if self.layout.moe.router_probability == "sigmoid" else lambda x: x.softmax(-1)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            logits = output[0] if isinstance(output, tuple) else output  # [tokens, experts]
            stat.add(self._units(probability(logits.float())))

        return hook

    def _norm_hook(self, norm_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output  # [batch, seq, hidden]
            self.norm_stats[norm_idx].add(self._units(y.float().abs()))
            x = args[0]  # [batch, seq, hidden]: what the norm normalises
            self.norm_moments[norm_idx].add(x, self._mask_for(x.device))

        return hook

    def _moments_hook(self, moments: _Moments, gate_activation: Callable | None = None, before_gate: str | None = None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0]
            gate = args[1] if len(args) > 1 else kwargs.get("gate")
            gated_input = not (before_gate and getattr(module, before_gate, False))
            if gate_activation is not None and gate is not None and gated_input:
                x = x.float() * gate_activation(gate.float())  # a gated norm normalises y * act(z)
            moments.add(self._tokens(x), self._mask_for(x.device))

        return hook

    def _layer_pre_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._layer_inputs[layer_idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _layer_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = self._layer_inputs.pop(layer_idx)
            x_out = output[0] if isinstance(output, tuple) else output  # [batch, seq, hidden]
            cos = nn.functional.cosine_similarity(x_in.float(), x_out.float().to(x_in.device), dim=-1)  # [batch, seq]
            mask = self._mask_for(cos.device)
            total = ((1.0 - cos) * mask).sum()
            self.bi_sum[layer_idx] = total if self.bi_sum[layer_idx] is None else self.bi_sum[layer_idx] + total
            self.residual_stats[layer_idx].add(self._units(x_out.float().abs()))

        return hook

    def attach(self) -> "ImportanceEstimator":
        layout, model, g = self.layout, self.model, self.groups
        layers = layout.decoder_layers(model)

        def pre(layer: nn.Module, path: str, hook: Callable, **kwargs: Any) -> None:
            self._handles.append(layer.get_submodule(path).register_forward_pre_hook(hook, **kwargs))

        for i, (layer, parts) in enumerate(zip(layers, self.parts)):
            if "attention" in parts:
                pre(layer, layout.o_proj, self._head_hook(g["heads"][0][i], self.sizes["head_dim"]))
                for name, moments in self.qk_moments.items():
                    pre(layer, getattr(layout, name), self._moments_hook(moments[i]), with_kwargs=True)
            if "mlp" in parts:
                pre(layer, layout.down_proj, self._abs_input_hook(g["neurons"][0][i]))
            if "moe" in parts:
                experts = layer.get_submodule(layout.moe.experts)
                self._handles.append(experts.register_forward_hook(self._experts_hook(i), with_kwargs=True))
                router = layer.get_submodule(layout.moe.router)
                self._handles.append(router.register_forward_hook(self._router_hook(g["expert_router_probability"][0][i])))
            if "shared_expert" in parts:
                pre(layer, layout.moe.shared_down_proj, self._abs_input_hook(g["shared_neurons"][0][i]))
            if "mamba" in parts:
                mamba = layout.mamba
                pre(layer, mamba.out_proj, self._head_hook(g["mamba_heads"][0][i], self.sizes["mamba_head_dim"]))
                pre(layer, mamba.out_proj, self._abs_input_hook(g["mamba_channels"][0][i]))
                if self.mamba_moments[i] is not None:
                    act = ACT2FN[mamba.norm_gate_activation]
                    hook = self._moments_hook(self.mamba_moments[i], act, mamba.norm_before_gate_attribute)
                    pre(layer, mamba.norm, hook, with_kwargs=True)
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        for (i, _, path), stat in zip(self.sublayer_sites, self.sublayer_stats):
            pre(layers[i], path, self._abs_input_hook(stat))
        for j, (_, norm) in enumerate(layout.norm_modules(model)):
            self._handles.append(norm.register_forward_hook(self._norm_hook(j)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layer_inputs.clear()

    # ------------------------------------------------------------------ passes
    def begin_batch(self, attention_mask: torch.Tensor, count: bool = True) -> None:
        """Set the token mask ``[batch, seq]`` the hooks use for the next forward (and count its samples and tokens
        once, with ``count=True``). For custom loops that call the model or single layers themselves."""
        self._mask = attention_mask.float()
        self._mask_on = {}
        if count:
            self.num_samples += attention_mask.shape[0]
            self.num_tokens += int(attention_mask.sum())

    @torch.inference_mode()
    def observe(self, batch: dict[str, torch.Tensor]) -> None:
        """Run the decoder body (no ``lm_head``: importance never needs logits) on one batch."""
        mask = batch["attention_mask"]
        self.begin_batch(mask)
        device = _input_device(self.model, self.layout)
        decoder = self.model.get_submodule(self.layout.decoder)
        decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False)

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
        """All-reduce the running sums and aggregate them into :class:`ImportanceScores`.

        Raises:
            RuntimeError: no forward pass ran between ``attach()`` and ``finalize()``.
            ValueError: a score is NaN or infinite (fp16 overflow, bad data); the message names the unit and layer.
        """
        group_stats = [s for stats, _ in self.groups.values() for s in stats if s is not None]
        stats = group_stats + self.norm_stats + self.sublayer_stats + self.residual_stats
        qk = [m for group in self.qk_moments.values() for m in group if m is not None]
        mamba = [m for m in self.mamba_moments if m is not None]
        moments = self.norm_moments + qk + mamba
        if any(s.sum is None for s in stats) or any(m.sumsq is None for m in moments):
            raise RuntimeError("Some hooks never fired: did the model run a forward pass between attach() and finalize()?")
        counts = torch.tensor([float(self.num_samples), float(self.num_tokens)])
        local = [t.float().cpu() for s in stats for t in (s.sum, s.sumsq)]
        local += [m.sumsq.float().cpu() for m in moments] + [m.sum.float().cpu() for m in moments if m.first]
        local += [torch.stack([b.float().cpu() for b in self.bi_sum]), counts]
        reduced = self._reduce(local)
        counts = reduced.pop()
        bi_sum = reduced.pop()
        num_samples, num_tokens = int(counts[0].item()), int(counts[1].item())
        batch_how = self.config.batch_aggregation
        finals = iter([
            aggregate_batch(reduced[2 * k], reduced[2 * k + 1], num_samples, batch_how) for k in range(len(stats))
        ])
        rest = reduced[2 * len(stats) :]
        per_token = max(num_tokens, 1)
        second = iter([t / per_token for t in rest[: len(moments)]])
        first = [t / per_token for t in rest[len(moments) :]]

        def per_layer(slots: list, shape: tuple[int, ...], source: Any) -> torch.Tensor:
            """Stack one value per layer from ``source`` where ``slots`` has an entry, zeros elsewhere."""
            return torch.stack([next(source).reshape(shape) if slot is not None else torch.zeros(shape) for slot in slots])

        blocks = {name: per_layer(slots, units, finals) for name, (slots, units) in self.groups.items()}
        norm_outputs = torch.stack([next(finals) for _ in self.norm_stats])
        hidden_size = norm_outputs.shape[1]
        sublayer = [next(finals) for _ in self.sublayer_stats]
        sublayer_inputs = torch.stack(sublayer) if sublayer else torch.zeros(0, hidden_size)
        residual = torch.stack([next(finals) for _ in self.residual_stats])
        norm_input_sq = torch.stack([next(second) for _ in self.norm_moments])
        extra = {}
        if self.qk_moments:
            hd = self.sizes["head_dim"]
            widths = {"q_norm": self.sizes["num_attention_heads"] * hd, "k_norm": self.sizes["num_key_value_heads"] * hd}
            for name, group in self.qk_moments.items():
                extra[f"{name}_input_sq"] = per_layer(group, (widths[name],), second)
        if self.layout.mamba is not None:
            width = self.sizes["mamba_num_heads"] * self.sizes["mamba_head_dim"]
            extra["mamba_norm_input_sq"] = per_layer(self.mamba_moments, (width,), second)
        scores = ImportanceScores(
            heads=blocks.pop("heads"),
            neurons=blocks.pop("neurons"),
            hidden=torch.zeros(hidden_size),  # set below from the recorded sites
            block_importance=bi_sum / per_token,
            norm_outputs=norm_outputs,
            norm_input_sq=norm_input_sq,
            norm_input_mean=torch.stack(first) if first else None,
            sublayer_inputs=sublayer_inputs,
            residual=residual,
            **blocks,
            **extra,
            metadata={
                "batch_aggregation": batch_how,
                "sequence_aggregation": self.config.sequence_aggregation,
                "num_samples": num_samples,
                "num_tokens": num_tokens,
                "model_type": self.model.config.model_type,
                "source_model": getattr(self.model.config, "_name_or_path", "") or "",
                "source_sizes": dict(self.sizes),
                "norm_kind": self.layout.norm_kind,
                "norm_paths": self.norm_names,
                "norm_roles": self.norm_roles,
                "sublayer_input_sites": [f"{self.layout.layers}.{i}.{path}" for i, _, path in self.sublayer_sites],
                "sublayer_input_roles": [f"pre_{kind}" for _, kind, _ in self.sublayer_sites],
                "hidden_importance_source": self.config.hidden_importance_source,
                "layer_parts": [sorted(p) for p in self.parts],
            },
        )
        scores.check_finite()
        scores.hidden = scores.hidden_scores(self.config.hidden_importance_source)
        return scores


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
    num_layers = len(layout.decoder_layers(model))
    results = []
    for skip in tqdm(range(num_layers), desc="Layer perplexity", disable=not show_progress):
        # Exactly the model depth pruning would give: per-layer config lists (attention types) follow the layers.
        with without_layers(model, layout, [skip]):
            nll, count = masked_nll(model, batches)
            totals = torch.tensor([nll, float(count)], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)
        results.append(math.exp(totals[0].item() / max(totals[1].item(), 1.0)))
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
    from ..pruning.plan import check_target  # pruning imports this package

    check_target(model, config, layout)  # a target pruning would refuse fails now, before the pass
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
