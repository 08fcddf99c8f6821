# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Memory-bounded distillation losses.

The logit loss never materializes the `[B, T, V]` logits of either model: teacher and student logits are computed
chunk by chunk (`kd_chunk_size` rows at a time) from the final hidden states and the `lm_head` weights, the divergence
and its analytic gradient are evaluated on that chunk, and the gradients with respect to the student hidden states,
`lm_head` weight and bias are accumulated during the forward pass (the approach of Liger-Kernel's fused linear cross
entropy). The backward pass then only rescales the stored gradients, so at most one `[chunk, V]` fp32 logit block per
model (plus a few chunk-sized temporaries) is alive at any time, in forward *and* backward.

Per-token reduction (all losses in this module):

    loss = τ² · Σ_tokens Σ_vocab d(q_t, p_t) / normalizer

i.e. the divergence is **summed over the vocabulary**, then **summed over the valid (non-masked) tokens** and
divided by `normalizer`, which defaults to the number of valid tokens (a per-token mean). The τ² factor (Hinton et
al., 2015) keeps the gradient magnitude independent of the temperature τ. The trainer passes the global number of label tokens
(`num_items_in_batch`) as `normalizer` so gradient accumulation is exact.

Logits are the `lm_head` output followed by the model family's post-head transforms (registry data, see
`hf_minitron.architectures.logits`: Granite's division by `logits_scaling`, Gemma-2/3 soft-capping, ...), so the
loss is the one computed from the models' own `.logits`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..architectures.logits import LOGIT_TRANSFORM_KINDS


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_STATE_LOSSES = ("none", "cosine", "mse")

__all__ = [
    "KD_LOSSES",
    "HIDDEN_STATE_LOSSES",
    "divergence_and_grad",
    "kd_loss_from_logits",
    "fused_linear_kd_loss",
    "hidden_state_loss",
]


def _check_kd_loss(kd_loss: str, jsd_beta: float) -> None:
    if kd_loss not in KD_LOSSES:
        raise ValueError(f"Unknown `kd_loss={kd_loss!r}`; expected one of {KD_LOSSES}.")
    if kd_loss == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(
            f"`jsd_beta` must be in (0, 1) for `kd_loss='jsd'`, got {jsd_beta}. Use `kd_loss='forward_kl'` for "
            "beta=0 and `kd_loss='reverse_kl'` for beta=1."
        )


def _row_blocks(x: torch.Tensor, elements: int = 1 << 22) -> list[slice]:
    """Row slices of ``x [N, V]`` holding about ``elements`` values each (~16 MB of fp32 temporaries per block)."""
    step = max(1, elements // max(1, x.shape[-1]))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dim of ``x [N, V]`` in place, block by block: no second ``[N, V]`` buffer."""
    for rows in _row_blocks(x):
        x[rows] -= torch.logsumexp(x[rows], dim=-1, keepdim=True)
    return x


def _divergence(
    s_logp: torch.Tensor, t_logp: torch.Tensor, kd_loss: str, jsd_beta: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence `[N]` and its gradient w.r.t. the (temperature-scaled) student logits `[N, V]`.

    `s_logp`/`t_logp` are log-softmaxes `[N, V]`; q = teacher, p = student. Both may be overwritten.
      - forward_kl: KL(q || p),                     d/ds = p - q
      - reverse_kl: KL(p || q),                     d/ds = p ⊙ (g - <p, g>),  g = log p - log q
      - jsd (β):    β KL(q || m) + (1-β) KL(p || m), m = β q + (1-β) p   (TRL's generalized JSD)
                                                    d/ds = p ⊙ (g - <p, g>),  g = (1-β)(log p - log m)
    """
    if kd_loss == "forward_kl":
        # The Minitron default. Only the two inputs stay [N, V]: the divergence is summed a few rows at a time, then
        # both inputs are consumed in place into the gradient.
        per_row = torch.empty(s_logp.shape[:-1], dtype=s_logp.dtype, device=s_logp.device)
        for rows in _row_blocks(s_logp):
            q = t_logp[rows].exp()
            diff = (t_logp[rows] - s_logp[rows]).mul_(q)  # q (log q - log p)
            block = diff.sum(-1)
            bad = ~torch.isfinite(block)
            if bad.any():  # only -inf teacher logits give 0 · (-inf): use the 0 · log 0 = 0 convention on those rows
                block[bad] = diff[bad].masked_fill_(q[bad] == 0, 0.0).sum(-1)
            per_row[rows] = block
        grad = s_logp.exp_().sub_(t_logp.exp_()) if need_grad else None  # p - q
        return per_row, grad
    p = s_logp.exp()
    if kd_loss == "reverse_kl":
        g = s_logp - t_logp
        per_row = torch.where(p > 0, p * g, torch.zeros_like(p)).sum(-1)
        grad = None
        if need_grad:
            g = torch.where(p > 0, g, torch.zeros_like(g))
            grad = p * (g - per_row.unsqueeze(-1))
        return per_row, grad
    # jsd
    q = t_logp.exp()
    log_m = torch.logaddexp(s_logp + math.log1p(-jsd_beta), t_logp + math.log(jsd_beta))
    kl_q = torch.where(q > 0, q * (t_logp - log_m), torch.zeros_like(q)).sum(-1)
    g = s_logp - log_m
    kl_p = torch.where(p > 0, p * g, torch.zeros_like(p)).sum(-1)
    per_row = jsd_beta * kl_q + (1.0 - jsd_beta) * kl_p
    grad = None
    if need_grad:
        g = (1.0 - jsd_beta) * torch.where(p > 0, g, torch.zeros_like(g))
        grad = p * (g - (p * g).sum(-1, keepdim=True))
    return per_row, grad


def divergence_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_loss: str = "forward_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence `[N]` (times τ²) and its analytic gradient w.r.t. the raw student logits `[N, V]`.

    Mostly useful for testing; the trainer goes through [`fused_linear_kd_loss`].
    """
    _check_kd_loss(kd_loss, jsd_beta)
    s_logp = F.log_softmax(student_logits / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_row, grad = _divergence(s_logp, t_logp, kd_loss, jsd_beta, need_grad=True)
    # d(τ² D(s/τ))/ds = τ · dD/d(s/τ)
    return per_row * temperature**2, grad * temperature


def kd_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive reference: the same loss as [`fused_linear_kd_loss`] from full logits, through plain autograd.

    Materializes `[..., V]` log-probabilities of both models; use it for tests and small vocabularies only.

    Args:
        student_logits (`torch.Tensor`): `[..., V]` student logits.
        teacher_logits (`torch.Tensor`): `[..., V]` teacher logits.
        mask (`torch.Tensor`, *optional*): `[...]` boolean, `True` for the tokens to train on.
        kd_loss, jsd_beta, temperature, normalizer: see [`fused_linear_kd_loss`].

    Example:
    ```python
    >>> s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    >>> kd_loss_from_logits(s, t).backward()
    ```
    """
    _check_kd_loss(kd_loss, jsd_beta)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    s_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if kd_loss == "forward_kl":
        per_tok = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)
    elif kd_loss == "reverse_kl":
        per_tok = F.kl_div(t_logp, s_logp, reduction="none", log_target=True).sum(-1)
    else:
        b = jsd_beta
        log_m = torch.logsumexp(torch.stack([s_logp + math.log1p(-b), t_logp + math.log(b)]), dim=0)
        kl_q = F.kl_div(log_m, t_logp, reduction="none", log_target=True).sum(-1)
        kl_p = F.kl_div(log_m, s_logp, reduction="none", log_target=True).sum(-1)
        per_tok = b * kl_q + (1 - b) * kl_p
    if mask is not None:
        per_tok = per_tok[mask.bool()]
    if normalizer is None:
        normalizer = max(per_tok.numel(), 1)
    return per_tok.sum() * temperature**2 / normalizer


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim of ``x [N, V]``, a few rows at a time (bounded temporaries), ``x`` untouched."""
    return torch.cat([torch.logsumexp(x[rows], dim=-1) for rows in _row_blocks(x)])


def _project(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, steps: tuple, need_deriv: bool
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """fp32 (or fp64) logits `[C, V]` of one chunk after the post-head `steps`, and d(logits)/d(head output) as an
    elementwise tensor (soft-capping; `None` without) times a scalar (scales)."""
    logits = h.to(w.dtype) @ w.t()  # matmul in the weight dtype (bf16 on GPU), then upcast: only [C, V] in fp32
    acc_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(acc_dtype)
    if b is not None:
        logits += b.to(acc_dtype)
    d_tensor, d_scalar = None, 1.0
    for kind, value in steps:  # in place: no extra [C, V] buffer except the soft-cap derivative
        if kind == "scale":
            logits.mul_(value)
            d_scalar *= value
        elif kind == "divide":
            logits.div_(value)
            d_scalar /= value
        elif kind == "softcap":
            logits.div_(value).tanh_()
            if need_deriv:  # d(c · tanh(x / c))/dx = 1 - tanh²
                d = 1.0 - logits * logits
                d_tensor = d if d_tensor is None else d_tensor.mul_(d)
            logits.mul_(value)
        else:
            raise ValueError(f"Unknown logit transform {kind!r}; expected one of {LOGIT_TRANSFORM_KINDS}.")
    return logits, d_tensor, d_scalar



def save_head_grads(ctx, grad_h, grad_w, grad_b, s_w, s_b, normalizer) -> None:
    """Keep the chunk loop's unscaled input/weight/bias gradients (and 1/normalizer) for `scaled_head_grads`."""
    inv = 1.0 / normalizer
    ctx.save_for_backward(
        grad_h,
        grad_w.to(s_w.dtype) if grad_w is not None else None,
        grad_b.to(s_b.dtype) if grad_b is not None else None,
        inv.detach() if torch.is_tensor(inv) else torch.tensor(inv),
    )


def scaled_head_grads(ctx, grad_total) -> tuple:
    """`(grad_h, grad_w, grad_b)` of a fused head loss: the saved gradients times `grad_total / normalizer`."""
    grad_h, grad_w, grad_b, inv = ctx.saved_tensors
    scale = grad_total * inv
    grad_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
    grad_w = grad_w * scale.to(grad_w.dtype) if grad_w is not None else None
    grad_b = grad_b * scale.to(grad_b.dtype) if grad_b is not None else None
    return grad_h, grad_w, grad_b

class _FusedLinearKD(torch.autograd.Function):
    """Chunked fused `lm_head` + divergence (+ optional cross-entropy). Gradients are computed in forward."""

    @staticmethod
    def forward(
        ctx,
        s_h: torch.Tensor,  # [N, Hs] student final hidden states (valid rows only)
        s_w: torch.Tensor,  # [V, Hs]
        s_b: torch.Tensor | None,  # [V]
        t_h: torch.Tensor,  # [N, Ht] teacher final hidden states (no grad)
        t_w: torch.Tensor,  # [V, Ht]
        t_b: torch.Tensor | None,
        targets: torch.Tensor | None,  # [N] next-token ids for the CE term
        kd_loss: str,
        jsd_beta: float,
        temperature: float,
        kd_weight: float,
        ce_weight: float,
        s_steps: tuple,  # post-head transforms ((kind, value), ...) of each model
        t_steps: tuple,
        chunk_size: int,
        normalizer: torch.Tensor,  # scalar
    ):
        n = s_h.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = s_b is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        acc_dtype = torch.promote_types(s_w.dtype, torch.float32)

        grad_h = torch.zeros_like(s_h) if need_h else None
        grad_w = torch.zeros(s_w.shape, dtype=acc_dtype, device=s_w.device) if need_w else None
        grad_b = torch.zeros(s_b.shape, dtype=acc_dtype, device=s_b.device) if need_b else None
        kd_sum = torch.zeros((), dtype=acc_dtype, device=s_h.device)
        ce_sum = torch.zeros((), dtype=acc_dtype, device=s_h.device)
        tau = float(temperature)

        # Autocast off: the chunk matmuls run in the weight dtype and the softmaxes in fp32 by construction.
        with torch.no_grad(), torch.autocast(device_type=s_h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                s_logits, s_dz, s_dz_scale = _project(s_h[start:end], s_w, s_b, s_steps, need_grad)  # [C, V] fp32
                g_ce = None
                if targets is not None:
                    # CE at temperature 1 on the transformed logits. Its gradient (softmax - onehot) needs one more
                    # [C, V] buffer, built only when CE is trained; for logging alone it is logsumexp - target logit,
                    # read off the temperature-1 log-softmax below (τ = 1) or one read-only logsumexp pass.
                    tgt = targets[start:end].unsqueeze(-1)
                    if need_grad and ce_weight != 0.0:
                        s_logp1 = torch.log_softmax(s_logits, dim=-1)
                        ce_sum -= s_logp1.gather(-1, tgt).sum()
                        g_ce = s_logp1.exp_().scatter_add_(-1, tgt, torch.full_like(s_logp1[:, :1], -1.0))
                        del s_logp1
                    elif tau != 1.0:
                        ce_sum += (_logsumexp_rows(s_logits) - s_logits.gather(-1, tgt).squeeze(-1)).sum()
                # In place: with the CE gradient off, at most two [C, V] buffers are ever alive (plus a soft-cap's
                # derivative)
                s_logp = _log_softmax_(s_logits if tau == 1.0 else s_logits.div_(tau))
                del s_logits
                if targets is not None and g_ce is None and tau == 1.0:
                    ce_sum -= s_logp.gather(-1, tgt).sum()
                t_logits, _, _ = _project(t_h[start:end], t_w, t_b, t_steps, False)  # [C, V] fp32
                t_logp = _log_softmax_(t_logits if tau == 1.0 else t_logits.div_(tau))
                del t_logits
                per_row, g = _divergence(s_logp, t_logp, kd_loss, jsd_beta, need_grad)
                del s_logp, t_logp
                kd_sum += per_row.sum()
                if need_grad:
                    # d(τ² D(s/τ))/ds = τ dD/d(s/τ)
                    g.mul_(kd_weight * tau)
                    if g_ce is not None:
                        g.add_(g_ce, alpha=ce_weight)
                del g_ce
                if not need_grad:
                    continue
                if s_dz is not None:
                    g.mul_(s_dz)
                if s_dz_scale != 1.0:
                    g.mul_(s_dz_scale)
                # g is d(sum of this chunk's weighted losses)/d(raw student logits), [C, V]
                if need_h:
                    grad_h[start:end] = (g.to(s_w.dtype) @ s_w).to(s_h.dtype)
                if need_w:
                    grad_w.addmm_(g.t().to(acc_dtype), s_h[start:end].to(acc_dtype))
                if need_b:
                    grad_b += g.sum(0).to(acc_dtype)
                del g

        kd_sum = kd_sum * tau**2
        total = (kd_weight * kd_sum + ce_weight * ce_sum) / normalizer
        save_head_grads(ctx, grad_h, grad_w, grad_b, s_w, s_b, normalizer)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        return scaled_head_grads(ctx, grad_total) + (None,) * 13


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_transforms: Sequence[tuple[str, float]] = (),
    teacher_logit_transforms: Sequence[tuple[str, float]] = (),
    chunk_size: int = 1024,
    normalizer: float | torch.Tensor | None = None,
    return_components: bool = False,
):
    """Memory-bounded logit distillation loss with exact gradients: fused `lm_head` projection + divergence.

    Computes `kd_weight · τ² · Σ_valid Σ_vocab D(q_τ, p_τ) / normalizer + ce_weight · Σ_valid CE / normalizer`, where
    p/q are the student/teacher softmaxes at temperature τ. Logits are built `chunk_size` rows at a time, so peak extra
    memory is `O(chunk_size · V)` instead of `O(N · V)`; gradients w.r.t. `student_hidden`, `student_weight` and
    `student_bias` are accumulated during forward (see the module docstring).

    Args:
        student_hidden (`torch.Tensor`): `[..., Hs]` student final (post-norm) hidden states.
        student_weight (`torch.Tensor`): `[Vs, Hs]` student `lm_head` weight.
        teacher_hidden (`torch.Tensor`): `[..., Ht]` teacher final hidden states (treated as constants).
        teacher_weight (`torch.Tensor`): `[Vt, Ht]` teacher `lm_head` weight (treated as constant).
        mask (`torch.Tensor`, *optional*): `[...]` boolean, `True` on the tokens that count (labels != -100).
        student_bias / teacher_bias (`torch.Tensor`, *optional*): `lm_head` biases `[V]`.
        targets (`torch.Tensor`, *optional*): `[...]` next-token ids; enables the (logged) cross-entropy term.
        kd_loss (`str`): `"forward_kl"` = KL(teacher ‖ student) (Minitron), `"reverse_kl"` = KL(student ‖ teacher),
            `"jsd"` = TRL's generalized JSD with `jsd_beta`.
        temperature (`float`): τ; the divergence is multiplied by τ² (Hinton). The CE term uses τ = 1.
        kd_weight / ce_weight (`float`): weights of the two terms.
        vocab_size (`int`, *optional*): compare only the first `vocab_size` logits (for embeddings padded beyond the
            tokenizer). Defaults to `min(Vs, Vt)`.
        student_softcap / teacher_softcap (`float`, *optional*): `final_logit_softcapping` (Gemma-2 style); a
            shorthand for a last `("softcap", value)` step.
        student_logit_transforms / teacher_logit_transforms (sequence of `(kind, value)`): elementwise steps from
            the head output (bias included) to the model's logits, in order: `("scale", c)` = x·c, `("divide", c)`
            = x/c, `("softcap", c)` = c·tanh(x/c). The trainer reads them from the architecture registry
            (`ArchitectureLayout.logit_transforms`); both the divergence and the CE term see the transformed logits.
        chunk_size (`int`): rows per chunk.
        normalizer (`float` or `torch.Tensor`, *optional*): divisor of the summed loss; defaults to the number of
            valid tokens (clamped to ≥ 1).
        return_components (`bool`): also return the detached sums `(kd_sum, ce_sum, num_valid)` for logging;
            `kd_sum` includes the τ² factor.

    Example:
    ```python
    >>> h_s = torch.randn(2, 8, 16, requires_grad=True); w_s = torch.randn(100, 16, requires_grad=True)
    >>> h_t, w_t = torch.randn(2, 8, 32), torch.randn(100, 32)
    >>> loss = fused_linear_kd_loss(h_s, w_s, h_t, w_t, chunk_size=4)
    >>> loss.backward()
    ```
    """
    _check_kd_loss(kd_loss, jsd_beta)
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    s_steps = _steps(student_logit_transforms, student_softcap)
    t_steps = _steps(teacher_logit_transforms, teacher_softcap)
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    common = min(student_weight.shape[0], teacher_weight.shape[0])
    vocab_size = common if vocab_size is None else vocab_size
    if vocab_size > common:
        raise ValueError(f"`vocab_size={vocab_size}` exceeds the smaller `lm_head` ({common} rows).")
    # Slicing is a differentiable view: rows beyond `vocab_size` get a zero gradient.
    if student_weight.shape[0] != vocab_size:
        student_weight = student_weight[:vocab_size]
        student_bias = student_bias[:vocab_size] if student_bias is not None else None
    if teacher_weight.shape[0] != vocab_size:
        teacher_weight = teacher_weight[:vocab_size]
        teacher_bias = teacher_bias[:vocab_size] if teacher_bias is not None else None

    s_h = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    tg = targets.reshape(-1) if targets is not None else None
    if mask is not None:
        m = mask.reshape(-1).to(torch.bool)
        # Only the valid rows are projected: skips padding / prompt tokens entirely.
        s_h, t_h = s_h[m], t_h[m]
        tg = tg[m] if tg is not None else None
    num_valid = s_h.shape[0]
    if tg is not None and tg.numel() and (tg.min() < 0 or tg.max() >= vocab_size):
        raise ValueError("`targets` contain ids outside the compared vocabulary; mask them out with `mask`.")
    if normalizer is None:
        normalizer = float(max(num_valid, 1))
    if not torch.is_tensor(normalizer):
        normalizer = torch.tensor(float(normalizer), device=s_h.device)
    normalizer = normalizer.to(device=s_h.device, dtype=torch.promote_types(student_weight.dtype, torch.float32))

    total, kd_sum, ce_sum = _FusedLinearKD.apply(
        s_h,
        student_weight,
        student_bias,
        t_h,
        teacher_weight.detach(),
        teacher_bias.detach() if teacher_bias is not None else None,
        tg,
        kd_loss,
        float(jsd_beta),
        float(temperature),
        float(kd_weight),
        float(ce_weight),
        s_steps,
        t_steps,
        int(chunk_size),
        normalizer,
    )
    if return_components:
        return total, (kd_sum, ce_sum, num_valid)
    return total


def _steps(transforms: Sequence[tuple[str, float]], softcap: float | None) -> tuple[tuple[str, float], ...]:
    steps = tuple((str(kind), float(value)) for kind, value in transforms)
    if softcap:
        steps += (("softcap", float(softcap)),)
    for kind, value in steps:
        if kind not in LOGIT_TRANSFORM_KINDS:
            raise ValueError(f"Unknown logit transform {kind!r}; expected one of {LOGIT_TRANSFORM_KINDS}.")
        if kind != "scale" and value == 0:
            raise ValueError(f"A {kind!r} logit transform needs a non-zero value.")
    return steps


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    loss_type: Literal["cosine", "mse"] = "cosine",
    projection: torch.nn.Module | None = None,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Intermediate-state distillation loss for one pair of mapped layers.

    `projection` (e.g. `nn.Linear(Hs, Ht, bias=False)`) maps student states to the teacher's width; it may be
    `None` when the widths match. Per token: `1 - cos(proj(h_s), h_t)` (cosine) or `mean_d (proj(h_s) - h_t)²` (mse);
    summed over valid tokens and divided by `normalizer` (default: number of valid tokens). Computed in fp32.

    Args:
        student_hidden (`torch.Tensor`): `[..., Hs]`.
        teacher_hidden (`torch.Tensor`): `[..., Ht]` (treated as constant).
        loss_type (`str`): `"cosine"` or `"mse"`.
        projection (`nn.Module`, *optional*): student → teacher width map.
        mask (`torch.Tensor`, *optional*): `[...]` boolean, `True` on valid tokens.
        normalizer: see above.

    Example:
    ```python
    >>> proj = torch.nn.Linear(16, 32, bias=False)
    >>> hidden_state_loss(torch.randn(2, 5, 16), torch.randn(2, 5, 32), "cosine", proj).backward()
    ```
    """
    if loss_type not in ("cosine", "mse"):
        raise ValueError(f"Unknown hidden-state loss {loss_type!r}; expected 'cosine' or 'mse'.")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if mask is not None:
        m = mask.reshape(-1).to(torch.bool)
        h_s, h_t = h_s[m], h_t[m]
    if projection is not None:
        p_dtype = next(projection.parameters()).dtype
        h_s = projection(h_s.to(p_dtype))
    if h_s.shape[-1] != h_t.shape[-1]:
        raise ValueError(
            f"Student hidden size {h_s.shape[-1]} != teacher hidden size {h_t.shape[-1]}; pass a `projection`."
        )
    h_s, h_t = h_s.float(), h_t.float()
    if loss_type == "cosine":
        per_tok = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
    else:
        per_tok = (h_s - h_t).pow(2).mean(-1)
    if normalizer is None:
        normalizer = max(per_tok.shape[0], 1)
    return per_tok.sum() / normalizer
