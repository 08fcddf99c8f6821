"""Per-sample statistics of routed experts, measured inside the same calibration forward as every other score.

transformers 5 runs all experts of a layer in one module call (``experts(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k])``, dispatched to eager / grouped / batched kernels), so no hook sees one expert's activations.
A forward hook on the experts module reads its inputs and recomputes, for each expert and only the tokens routed to
it, the expert's intermediate activation from the module's own fused weights: one more pass through the routed experts
(what the MoE forward itself costs), on the calibration data only, and independent of which kernel the model used.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import MoELayout


EXPERT_STATISTICS = ("expert_output_norm", "expert_routing_weight", "expert_frequency", "expert_neurons")


def aggregate_sums(s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor, how: str) -> torch.Tensor:
    """Finish a per-sample reduction over tokens from the sums of ``v`` and ``v^2`` over each sample's tokens.

    ``s1``, ``s2``: ``[batch, ...]``; ``count``: ``[batch]`` tokens per sample. Equals
    :func:`~hf_minitron.importance.estimator.aggregate_sequence` over all of the sample's tokens with ``v = 0`` on the
    tokens that did not contribute (not routed to the expert).
    """
    n = count.clamp_min(1.0).view(-1, *([1] * (s1.dim() - 1)))
    if how == "mean":
        return s1 / n
    if how == "l2":
        return s2.sqrt()
    if how == "var":
        return (s2 / n - (s1 / n).square()).clamp_min(0.0)
    raise ValueError(f"Unknown sequence aggregation {how!r}.")


@torch.no_grad()
def expert_sums(
    experts: nn.Module,
    moe: MoELayout,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample sums ``(sum v, sum v^2)`` over tokens of every statistic in ``EXPERT_STATISTICS``.

    Args:
        experts: The fused experts module (parameters named by ``moe``).
        hidden_states: ``[T, H]`` its input, ``T = batch * seq`` tokens in row-major order of ``mask``.
        top_k_index / top_k_weights: ``[T, k]`` the experts each token was routed to and their routing weights.
        mask: ``[batch, seq]`` float, 1 for real tokens (padding contributes nothing).

    Returns:
        ``{name: (s1, s2)}`` with ``[batch, E]`` sums for the output norm ``||w * expert(x)||``, the routing weight
        ``w`` and the routing indicator, and ``[batch, E, I]`` for the neurons ``|w * a|`` (``a``: down_proj input).
    """
    batch, seq = mask.shape
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if x.shape[0] != batch * seq:
        raise ValueError(f"The experts received {x.shape[0]} tokens for a batch of {batch} x {seq}: cannot attribute them.")
    up = getattr(experts, moe.expert_gate_up_proj or moe.expert_up_proj)  # [E, (2)I, H]
    down = getattr(experts, moe.expert_down_proj)  # [E, H, I]
    act = getattr(experts, moe.expert_activation)
    num_experts, inter = down.shape[0], down.shape[2]
    device = x.device
    token_mask = mask.to(device).reshape(-1)
    sample = torch.arange(batch * seq, device=device) // seq  # [T]
    out = {name: (torch.zeros(batch * num_experts, device=device), torch.zeros(batch * num_experts, device=device))
           for name in EXPERT_STATISTICS[:3]}
    n1 = torch.zeros(batch * num_experts, inter, device=device)
    n2 = torch.zeros_like(n1)
    routed = top_k_index.to(device)
    for e in torch.unique(routed[token_mask.bool()]).tolist():
        if not 0 <= e < num_experts:
            continue  # an expert-parallel "not on this rank" sentinel
        tok, pos = torch.where(routed == e)
        keep = token_mask[tok] > 0
        tok, pos = tok[keep], pos[keep]
        h = x[tok].float() @ up[e].float().T  # [n, (2)I]
        if moe.gated:
            gate, value = h.chunk(2, dim=-1)
            a = act(gate) * value
        else:
            a = act(h)
        w = top_k_weights[tok, pos].float()  # [n]
        weighted = a * w[:, None]  # [n, I]: what enters down_proj, routing weight folded in (down is linear)
        norm = (weighted @ down[e].float().T).norm(dim=-1)  # [n]
        slot = sample[tok] * num_experts + e
        for name, v in (("expert_output_norm", norm), ("expert_routing_weight", w), ("expert_frequency", torch.ones_like(w))):
            out[name][0].index_add_(0, slot, v)
            out[name][1].index_add_(0, slot, v.square())
        n1.index_add_(0, slot, weighted.abs())
        n2.index_add_(0, slot, weighted.square())
    result = {name: (s1.view(batch, num_experts), s2.view(batch, num_experts)) for name, (s1, s2) in out.items()}
    result["expert_neurons"] = (n1.view(batch, num_experts, inter), n2.view(batch, num_experts, inter))
    return result
