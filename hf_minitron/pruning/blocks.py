"""Slicing routed experts, shared experts and Mamba2 mixers (layouts in :mod:`hf_minitron.architectures.blocks`).

Like :mod:`~hf_minitron.pruning.slicing`, every helper replaces one tensor at a time; fused expert tensors are
filled expert by expert into the new tensor, so the peak is the model plus one new tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import MambaLayout, MoELayout
from .slicing import _index, _replace, slice_linear, slice_norm


def _fused_rows(blocks: list[tuple[list[int] | None, int]]) -> list[int] | None:
    """Kept rows of a projection made of consecutive blocks ``(kept rows within the block, block size)``.

    ``None`` for a block keeps all of its rows; the result is ``None`` when every block is kept whole.
    """
    if all(kept is None for kept, _ in blocks):
        return None
    rows, offset = [], 0
    for kept, size in blocks:
        rows.extend(offset + r for r in (range(size) if kept is None else kept))
        offset += size
    return rows


@torch.no_grad()
def prune_mlp(layer: nn.Module, paths: dict[str, str | None], neurons: list[int] | None, hidden: list[int] | None, width: int) -> None:
    """Slice one MLP (dense or shared expert): gate/up rows and down columns to ``neurons``, hidden to ``hidden``.

    ``paths`` maps ``gate_proj``/``up_proj``/``gate_up_proj``/``down_proj`` to module paths (None when absent);
    ``width`` is the source width (a fused ``gate_up_proj`` holds ``[gate (width); up (width)]`` rows).
    """
    if paths["gate_up_proj"] is not None:
        rows = _fused_rows([(neurons, width), (neurons, width)])
        slice_linear(layer.get_submodule(paths["gate_up_proj"]), out_idx=rows, in_idx=hidden)
    for name in ("gate_proj", "up_proj"):
        if paths[name] is not None:
            slice_linear(layer.get_submodule(paths[name]), out_idx=neurons, in_idx=hidden)
    slice_linear(layer.get_submodule(paths["down_proj"]), out_idx=hidden, in_idx=neurons)


@torch.no_grad()
def prune_experts(
    layer: nn.Module,
    moe: MoELayout,
    experts: list[int],
    neurons: list[list[int]],
    hidden: list[int] | None,
    width: int,
) -> None:
    """Keep routed ``experts`` (router rows, per-expert router tensors, expert slices), ``neurons[k]`` of the ``k``-th
    kept expert, and ``hidden`` channels (``None``: all).

    Fused tensors: ``gate_up_proj [E, 2I, H] -> [E', 2I', H']`` (rows ``[gate; up]`` follow each expert's neurons),
    ``up_proj [E, I, H] -> [E', I', H']``, ``down_proj [E, H, I] -> [E', H', I']``; router ``weight [E, H] -> [E', H']``.
    """
    router = layer.get_submodule(moe.router)
    slice_linear(router, out_idx=experts, in_idx=hidden)  # `weight [E, H]` (and a bias [E] if any) like a linear
    for name in moe.router_expert_tensors:
        tensor = getattr(router, name)
        value = tensor.index_select(0, _index(experts, tensor.device))
        if isinstance(tensor, nn.Parameter):
            _replace(router, name, value)
        else:
            setattr(router, name, value)  # a registered buffer stays a buffer
    module = layer.get_submodule(moe.experts)
    new_width = len(neurons[0])
    up_name = moe.expert_gate_up_proj or moe.expert_up_proj
    up = getattr(module, up_name)  # [E, (2)I, H]
    new_hidden = up.shape[2] if hidden is None else len(hidden)
    new_up = up.new_empty(len(experts), (2 if moe.gated else 1) * new_width, new_hidden)
    for k, (e, kept) in enumerate(zip(experts, neurons)):
        rows = kept + [width + r for r in kept] if moe.gated else kept
        weight = up[e].index_select(0, _index(rows, up.device))
        new_up[k] = weight if hidden is None else weight.index_select(1, _index(hidden, up.device))
    _replace(module, up_name, new_up)
    down = getattr(module, moe.expert_down_proj)  # [E, H, I]
    new_down = down.new_empty(len(experts), new_hidden, new_width)
    for k, (e, kept) in enumerate(zip(experts, neurons)):
        weight = down[e] if hidden is None else down[e].index_select(0, _index(hidden, down.device))
        new_down[k] = weight.index_select(1, _index(kept, down.device))
    _replace(module, moe.expert_down_proj, new_down)


@torch.no_grad()
def prune_mamba(
    layer: nn.Module,
    mamba: MambaLayout,
    sizes: dict[str, int],
    heads: list[int],
    channels: list[list[int]],
    hidden: list[int] | None,
    norm_scales: list[float],
) -> None:
    """Keep Mamba ``heads`` (``channels[k]`` of the ``k``-th) and ``hidden`` channels in one Mamba2 mixer.

    ``in_proj`` rows ``[z; x; B; C; dt]``: z and x follow the kept channels, B and C (per SSM group) are kept whole,
    dt follows the kept heads; ``conv1d`` channels ``[x; B; C]`` likewise; ``A_log``, ``D``, ``dt_bias`` follow the
    heads; the gated norm's weight follows the channels and each group's gain is multiplied by ``norm_scales[g]``;
    ``out_proj`` columns follow the channels and its rows ``hidden``.
    """
    num_heads, head_dim = sizes["mamba_num_heads"], sizes["mamba_head_dim"]
    state = 2 * sizes["mamba_n_groups"] * sizes["mamba_state_size"]
    width = num_heads * head_dim
    full = heads == list(range(num_heads)) and all(c == list(range(head_dim)) for c in channels)
    kept = None if full else [h * head_dim + d for h, ds in zip(heads, channels) for d in ds]
    rows = _fused_rows([(kept, width), (kept, width), (None, state), (None if full else heads, num_heads)])
    slice_linear(layer.get_submodule(mamba.in_proj), out_idx=rows, in_idx=hidden)
    slice_linear(layer.get_submodule(mamba.out_proj), out_idx=hidden, in_idx=kept)
    if full:
        return
    mixer = layer.get_submodule(mamba.mixer)
    for name in mamba.in_proj_buffers:
        buffer = getattr(mixer, name)  # [..., in_proj rows]
        setattr(mixer, name, buffer.index_select(-1, _index(rows, buffer.device)))
    conv = layer.get_submodule(mamba.conv1d)
    channels_kept = _fused_rows([(kept, width), (None, state)])
    _replace(conv, "weight", conv.weight.index_select(0, _index(channels_kept, conv.weight.device)))
    if conv.bias is not None:
        _replace(conv, "bias", conv.bias.index_select(0, _index(channels_kept, conv.bias.device)))
    conv.in_channels = conv.out_channels = conv.groups = len(channels_kept)
    for name in mamba.head_tensors:
        tensor = getattr(mixer, name)
        _replace(mixer, name, tensor.index_select(0, _index(heads, tensor.device)))
    norm = mamba.norm_module(layer)
    if norm is not None:
        slice_norm(norm, kept)
        groups = len(norm_scales)
        factors = torch.tensor(norm_scales, dtype=norm.weight.dtype, device=norm.weight.device)
        norm.weight.view(groups, -1).mul_(factors[:, None])
