# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Forward KL against a *stored* teacher: its top-k log-probabilities plus one tail bucket.

A teacher-logit cache (:mod:`hf_minitron.distillation.logit_cache`) keeps, for every position, the teacher's k most
likely next tokens `S` with their log-probabilities `log q_i` and the log of the remaining mass
`log q_T = log Σ_{j∉S} q_j`, all at temperature 1. The student is compared on the same k + 1 buckets:

    KL = Σ_{i∈S} q_i (log q_i − log p_i)  +  q_T (log q_T − log p_T),    p_T = Σ_{j∉S} p_j

This is the exact KL divergence between the two distributions *coarsened* to k + 1 outcomes (the k tokens and "any
other token"); it never exceeds the full-vocabulary forward KL, and equals it when k = V (then q_T = p_T = 0). Its
gradient with respect to the student logits z is, for q summing to one over the buckets,

    ∂KL/∂z_j = p_j − q_j                 (j ∈ S)
    ∂KL/∂z_j = p_j · (1 − q_T / p_T)     (j ∉ S)

so the student keeps the teacher's tail mass without being told how the teacher spreads it.

The stored buckets are renormalized to sum to one (in fp32) before use: 16-bit log-probabilities are rounded
independently of the (fp32) tail, and the renormalization keeps the loss a proper divergence (≥ 0). For an fp32 cache
the correction is at the level of fp32 rounding.

Like [`fused_linear_kd_loss`], the loss is fused with the student's `lm_head`: logits are built `chunk_size` rows at a
time, the gradient with respect to the hidden states, `lm_head` weight and bias is accumulated during forward, and only
one `[chunk, V]` fp32 buffer is alive (the teacher side is `[chunk, k]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .losses import _log_softmax_, _logsumexp_rows, _project, _steps, save_head_grads, scaled_head_grads


__all__ = ["fused_linear_topk_kd_loss", "topk_kd_loss_from_logits", "renormalize_topk"]


def renormalize_topk(logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (fp64 for fp64 inputs) copies of stored top-k log-probabilities `[..., k]` and tail log-mass `[...]`,
    shifted so that the k + 1 buckets sum to one."""
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, tail_logprob.dtype), torch.float32)
    lp = logprobs.to(dtype)
    lt = tail_logprob.to(dtype)
    lse = torch.logsumexp(torch.cat([lp, lt.unsqueeze(-1)], dim=-1), dim=-1)  # [...]
    return lp - lse.unsqueeze(-1), lt - lse


def _xlogy_diff(q: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """q · (log q − log p) with the 0 · log 0 = 0 convention (an absent teacher bucket contributes nothing)."""
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))


def topk_kd_loss_from_logits(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive reference of [`fused_linear_topk_kd_loss`] from full student logits `[..., V]`, through autograd.

    Args:
        student_logits (`torch.Tensor`): `[..., V]`.
        topk_ids (`torch.Tensor`): `[..., k]` teacher top-k token ids.
        topk_logprobs (`torch.Tensor`): `[..., k]` their teacher log-probabilities (τ = 1).
        tail_logprob (`torch.Tensor`): `[...]` log of the teacher's mass outside the top-k (`-inf` when k = V).
        mask (`torch.Tensor`, *optional*): `[...]` boolean, `True` on the tokens that count.
        normalizer: divisor of the summed loss (default: the number of valid tokens).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s_logp = F.log_softmax(student_logits.to(dtype), dim=-1)
    ids = topk_ids.long()
    q_lp, q_lt = renormalize_topk(topk_logprobs, tail_logprob)
    q_lp, q_lt = q_lp.to(dtype), q_lt.to(dtype)
    p_lp = s_logp.gather(-1, ids)
    p_lt = torch.logsumexp(s_logp.scatter(-1, ids, float("-inf")), dim=-1)
    per_tok = _xlogy_diff(q_lp.exp(), q_lp, p_lp).sum(-1) + _xlogy_diff(q_lt.exp(), q_lt, p_lt)
    if mask is not None:
        per_tok = per_tok[mask.bool()]
    if normalizer is None:
        normalizer = max(per_tok.numel(), 1)
    return per_tok.sum() / normalizer


class _FusedLinearTopKKD(torch.autograd.Function):
    """Chunked fused student `lm_head` + top-k/tail forward KL (+ optional CE). Gradients are computed in forward."""

    @staticmethod
    def forward(
        ctx,
        s_h: torch.Tensor,  # [N, Hs] student final hidden states (valid rows only)
        s_w: torch.Tensor,  # [V, Hs]
        s_b: torch.Tensor | None,  # [V]
        t_ids: torch.Tensor,  # [N, k] long
        t_lp: torch.Tensor,  # [N, k] fp32, renormalized with the tail
        t_lt: torch.Tensor,  # [N] fp32
        targets: torch.Tensor | None,  # [N] next-token ids for the CE term
        kd_weight: float,
        ce_weight: float,
        s_steps: tuple,
        chunk_size: int,
        normalizer: torch.Tensor,
    ):
        n = s_h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = s_b is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        acc_dtype = torch.promote_types(s_w.dtype, torch.float32)

        grad_h = torch.zeros_like(s_h) if need_h else None
        grad_w = torch.zeros(s_w.shape, dtype=acc_dtype, device=s_w.device) if need_w else None
        grad_b = torch.zeros(s_b.shape, dtype=acc_dtype, device=s_b.device) if need_b else None
        kd_sum = torch.zeros((), dtype=acc_dtype, device=s_h.device)
        ce_sum = torch.zeros((), dtype=acc_dtype, device=s_h.device)

        with torch.no_grad(), torch.autocast(device_type=s_h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                s_logits, s_dz, s_dz_scale = _project(s_h[start:end], s_w, s_b, s_steps, need_grad)  # [C, V]
                g_ce = None
                if targets is not None:
                    tgt = targets[start:end].unsqueeze(-1)
                    if need_grad and ce_weight != 0.0:
                        s_logp1 = torch.log_softmax(s_logits, dim=-1)
                        ce_sum -= s_logp1.gather(-1, tgt).sum()
                        g_ce = s_logp1.exp_().scatter_add_(-1, tgt, torch.full_like(s_logp1[:, :1], -1.0))
                        del s_logp1
                s_logp = _log_softmax_(s_logits)  # in place: the one [C, V] buffer
                del s_logits
                if targets is not None and g_ce is None:
                    ce_sum -= s_logp.gather(-1, tgt).sum()

                ids = t_ids[start:end]  # [C, k]
                q_lp, q_lt = t_lp[start:end].to(acc_dtype), t_lt[start:end].to(acc_dtype)
                q, q_t = q_lp.exp(), q_lt.exp()
                p_lp = s_logp.gather(-1, ids)  # [C, k] student log-probs of the teacher's top-k
                s_logp.scatter_(-1, ids, float("-inf"))  # the buffer now holds the complement of the top-k set
                p_lt = _logsumexp_rows(s_logp)  # [C] log p_T (-inf when the top-k set is the whole vocabulary)
                kd_sum += (_xlogy_diff(q, q_lp, p_lp).sum(-1) + _xlogy_diff(q_t, q_lt, p_lt)).sum()
                if not need_grad:
                    del s_logp, g_ce
                    continue
                # j ∉ S: p_j (1 − q_T / p_T); j ∈ S: p_j − q_j
                factor = torch.where(q_t > 0, 1.0 - torch.exp(q_lt - p_lt), torch.ones_like(q_t))
                g = s_logp.exp_().mul_(factor.unsqueeze(-1))
                g.scatter_(-1, ids, p_lp.exp() - q)
                del s_logp
                g.mul_(kd_weight)
                if g_ce is not None:
                    g.add_(g_ce, alpha=ce_weight)
                del g_ce
                if s_dz is not None:
                    g.mul_(s_dz)
                if s_dz_scale != 1.0:
                    g.mul_(s_dz_scale)
                if need_h:
                    grad_h[start:end] = (g.to(s_w.dtype) @ s_w).to(s_h.dtype)
                if need_w:
                    grad_w.addmm_(g.t().to(acc_dtype), s_h[start:end].to(acc_dtype))
                if need_b:
                    grad_b += g.sum(0).to(acc_dtype)
                del g

        total = (kd_weight * kd_sum + ce_weight * ce_sum) / normalizer
        save_head_grads(ctx, grad_h, grad_w, grad_b, s_w, s_b, normalizer)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        return scaled_head_grads(ctx, grad_total) + (None,) * 9


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    student_logit_transforms: Sequence[tuple[str, float]] = (),
    chunk_size: int = 1024,
    normalizer: float | torch.Tensor | None = None,
    return_components: bool = False,
):
    """Memory-bounded forward KL of the student against stored teacher top-k log-probabilities plus a tail bucket.

    Computes `kd_weight · Σ_valid KL_{k+1}(q ‖ p) / normalizer + ce_weight · Σ_valid CE / normalizer`, where
    `KL_{k+1}` is the KL divergence over the teacher's top-k tokens and one bucket for every other token (see the
    module docstring), at temperature 1. Student logits are built `chunk_size` rows at a time from `student_hidden`
    and `student_weight` (plus the family's post-head transforms), so peak extra memory is one `[chunk, V]` fp32
    buffer; gradients are exact and accumulated in forward. With k = V and an fp32 cache it equals
    [`fused_linear_kd_loss`] at τ = 1 (forward KL).

    Args:
        student_hidden (`torch.Tensor`): `[..., Hs]` student final (post-norm) hidden states.
        student_weight (`torch.Tensor`): `[Vs, Hs]` student `lm_head` weight.
        topk_ids (`torch.Tensor`): `[..., k]` teacher top-k token ids (any integer dtype), each `< vocab_size`.
        topk_logprobs (`torch.Tensor`): `[..., k]` teacher log-probabilities of those tokens (any float dtype).
        tail_logprob (`torch.Tensor`): `[...]` log of the teacher's probability mass outside the top-k.
        mask (`torch.Tensor`, *optional*): `[...]` boolean, `True` on the tokens that count.
        student_bias (`torch.Tensor`, *optional*): `[Vs]` `lm_head` bias.
        targets (`torch.Tensor`, *optional*): `[...]` next-token ids; enables the (logged) cross-entropy term.
        kd_weight / ce_weight (`float`): weights of the two terms.
        vocab_size (`int`, *optional*): the cached vocabulary; the student's logits beyond it are ignored (padded
            heads). Defaults to `Vs`.
        student_logit_transforms (sequence of `(kind, value)`): the student's post-head steps (registry data).
        chunk_size (`int`): rows per chunk.
        normalizer (*optional*): divisor of the summed loss; defaults to the number of valid tokens.
        return_components (`bool`): also return the detached sums `(kd_sum, ce_sum, num_valid)`.

    Raises:
        ValueError: mismatched shapes, ids outside the vocabulary, or invalid options.

    Example:
    ```python
    >>> h = torch.randn(2, 8, 16, requires_grad=True); w = torch.randn(100, 16, requires_grad=True)
    >>> t_lp, t_ids = torch.randn(2, 8, 100).log_softmax(-1).topk(5)
    >>> tail = torch.log1p(-t_lp.exp().sum(-1))
    >>> fused_linear_topk_kd_loss(h, w, t_ids, t_lp, tail, chunk_size=4).backward()
    ```
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    s_steps = _steps(student_logit_transforms, None)
    vocab_size = student_weight.shape[0] if vocab_size is None else vocab_size
    if vocab_size > student_weight.shape[0]:
        raise ValueError(f"`vocab_size={vocab_size}` exceeds the student's `lm_head` ({student_weight.shape[0]} rows).")
    if student_weight.shape[0] != vocab_size:
        student_weight = student_weight[:vocab_size]
        student_bias = student_bias[:vocab_size] if student_bias is not None else None
    k = topk_ids.shape[-1]
    lead = student_hidden.shape[:-1]
    if topk_ids.shape != (*lead, k) or topk_logprobs.shape != topk_ids.shape or tail_logprob.shape != lead:
        raise ValueError(
            f"Teacher top-k tensors must be shaped [..., k] / [..., k] / [...] matching the hidden states {tuple(lead)}; "
            f"got {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, {tuple(tail_logprob.shape)}."
        )
    s_h = student_hidden.reshape(-1, student_hidden.shape[-1])
    ids = topk_ids.reshape(-1, k)
    lp, lt = topk_logprobs.reshape(-1, k), tail_logprob.reshape(-1)
    tg = targets.reshape(-1) if targets is not None else None
    if mask is not None:
        m = mask.reshape(-1).to(torch.bool)
        s_h, ids, lp, lt = s_h[m], ids[m], lp[m], lt[m]
        tg = tg[m] if tg is not None else None
    num_valid = s_h.shape[0]
    ids = ids.to(device=s_h.device, dtype=torch.long)
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"Teacher top-k ids must be in [0, {vocab_size}); got ids in [{int(ids.min())}, {int(ids.max())}].")
    if tg is not None and tg.numel() and (tg.min() < 0 or tg.max() >= vocab_size):
        raise ValueError("`targets` contain ids outside the compared vocabulary; mask them out with `mask`.")
    lp, lt = renormalize_topk(lp.to(s_h.device), lt.to(s_h.device))
    if normalizer is None:
        normalizer = float(max(num_valid, 1))
    if not torch.is_tensor(normalizer):
        normalizer = torch.tensor(float(normalizer), device=s_h.device)
    normalizer = normalizer.to(device=s_h.device, dtype=torch.promote_types(student_weight.dtype, torch.float32))

    total, kd_sum, ce_sum = _FusedLinearTopKKD.apply(
        s_h, student_weight, student_bias, ids, lp, lt, tg, float(kd_weight), float(ce_weight), s_steps,
        int(chunk_size), normalizer,
    )
    if return_components:
        return total, (kd_sum, ce_sum, num_valid)
    return total
