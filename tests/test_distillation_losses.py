"""Exactness of the memory-bounded distillation losses against naive full-logits references."""

import pytest
import torch
import torch.nn.functional as F

from hf_minitron.distillation import (
    fused_linear_kd_loss,
    hidden_state_loss,
    kd_loss_from_logits,
)


def _inputs(N=19, V=37, Hs=8, Ht=12, dtype=torch.float64, seed=0, bias=False, pad_rows=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, Hs, generator=g, dtype=dtype).requires_grad_()
    ws = torch.randn(V + pad_rows, Hs, generator=g, dtype=dtype).requires_grad_()
    bs = torch.randn(V + pad_rows, generator=g, dtype=dtype).requires_grad_() if bias else None
    ht = torch.randn(N, Ht, generator=g, dtype=dtype)
    wt = torch.randn(V, Ht, generator=g, dtype=dtype)
    mask = torch.rand(N, generator=g) > 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    return hs, ws, bs, ht, wt, mask, targets


def _naive(hs, ws, bs, ht, wt, mask, V, kd_loss, tau, cap=None, jsd_beta=0.5):
    sl = hs @ ws[:V].t() + (bs[:V] if bs is not None else 0)
    tl = ht @ wt[:V].t()
    if cap:
        sl, tl = cap * torch.tanh(sl / cap), cap * torch.tanh(tl / cap)
    return kd_loss_from_logits(sl, tl, mask, kd_loss, jsd_beta=jsd_beta, temperature=tau), sl


def _grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("cap", [None, 4.0])
def test_fused_matches_naive_fp64(kd_loss, tau, cap):
    hs, ws, bs, ht, wt, mask, _ = _inputs(bias=True)
    loss = fused_linear_kd_loss(
        hs, ws, ht, wt, mask, student_bias=bs, kd_loss=kd_loss, temperature=tau, chunk_size=4,
        student_softcap=cap, teacher_softcap=cap,
    )
    ref, _ = _naive(hs, ws, bs, ht, wt, mask, 37, kd_loss, tau, cap)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, [hs, ws, bs]), _grads(ref, [hs, ws, bs])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_matches_naive_32k_vocab_fp32():
    # A 32k vocabulary in fp32 against a fp64 naive reference
    hs, ws, _, ht, wt, mask, _ = _inputs(N=48, V=32000, Hs=16, Ht=24, dtype=torch.float32, seed=1)
    loss = fused_linear_kd_loss(hs, ws, ht, wt, mask, chunk_size=16)
    h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    ref, _ = _naive(h64, w64, None, ht.double(), wt.double(), mask, 32000, "forward_kl", 1.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(loss, [hs, ws]), _grads(ref, [h64, w64])):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    # and the fp32 naive loss agrees in value too
    ref32, _ = _naive(hs, ws, None, ht, wt, mask, 32000, "forward_kl", 1.0)
    torch.testing.assert_close(loss, ref32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked(kd_loss):
    hs, ws, bs, ht, wt, mask, tg = _inputs(N=33, bias=True)
    outs = []
    for chunk in (1, 5, 1024):
        loss = fused_linear_kd_loss(
            hs, ws, ht, wt, mask, student_bias=bs, targets=tg, ce_weight=0.3, kd_loss=kd_loss, chunk_size=chunk
        )
        outs.append((loss, _grads(loss, [hs, ws, bs])))
    for loss, grads in outs[:-1]:
        torch.testing.assert_close(loss, outs[-1][0], rtol=1e-12, atol=1e-13)
        for a, b in zip(grads, outs[-1][1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_matches_trl_gkd_loss():
    from trl.experimental.gkd import GKDTrainer

    hs, ws, _, ht, wt, mask, _ = _inputs(N=20, V=50)
    labels = torch.where(mask, torch.zeros(20, dtype=torch.long), torch.full((20,), -100))
    for kd_loss, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)):
        sl, tl = hs @ ws.t(), ht @ wt.t()
        ours = fused_linear_kd_loss(hs, ws, ht, wt, mask, kd_loss=kd_loss, jsd_beta=beta if kd_loss == "jsd" else 0.5)
        trl = GKDTrainer.generalized_jsd_loss(sl[None], tl[None], labels[None], beta=beta)
        torch.testing.assert_close(ours, trl, rtol=1e-10, atol=1e-12)
        for a, b in zip(_grads(ours, [hs, ws]), _grads(trl, [hs, ws])):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_temperature_scaling():
    hs, ws, _, ht, wt, mask, _ = _inputs()
    sl, tl = (hs @ ws.t()).detach(), (ht @ wt.t()).detach()
    tau = 3.0
    loss = fused_linear_kd_loss(hs, ws, ht, wt, mask, temperature=tau)
    p_t = F.softmax(tl[mask] / tau, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(sl[mask] / tau, -1))).sum(-1).mean() * tau**2
    torch.testing.assert_close(loss, manual, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(loss, fused_linear_kd_loss(hs, ws, ht, wt, mask, temperature=1.0))


def test_mask_and_normalizer():
    hs, ws, _, ht, wt, mask, _ = _inputs()
    # Changing masked-out rows changes nothing, and their hidden states get zero gradient
    ht2 = ht.clone()
    ht2[~mask] = 100.0
    loss = fused_linear_kd_loss(hs, ws, ht2, wt, mask)
    torch.testing.assert_close(loss, fused_linear_kd_loss(hs, ws, ht, wt, mask))
    (gh,) = torch.autograd.grad(loss, [hs])
    assert gh[~mask].abs().max() == 0 and gh[mask].abs().max() > 0
    # Sum over tokens / normalizer
    total = fused_linear_kd_loss(hs, ws, ht, wt, mask, normalizer=1.0)
    torch.testing.assert_close(total / mask.sum(), loss)
    # Fully masked: a finite zero with zero gradients
    empty = fused_linear_kd_loss(hs, ws, ht, wt, torch.zeros_like(mask))
    assert empty.item() == 0.0
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(empty, [hs, ws]))


def test_batched_3d_inputs_and_components():
    hs, ws, _, ht, wt, mask, tg = _inputs(N=24)
    l2d, (kd, ce, n) = fused_linear_kd_loss(hs, ws, ht, wt, mask, targets=tg, return_components=True)
    l3d = fused_linear_kd_loss(hs.view(4, 6, -1), ws, ht.view(4, 6, -1), wt, mask.view(4, 6), targets=tg.view(4, 6))
    torch.testing.assert_close(l2d, l3d)
    assert n == int(mask.sum())
    torch.testing.assert_close(kd / n, l2d)
    sl = hs @ ws.t()
    torch.testing.assert_close(ce / n, F.cross_entropy(sl[mask], tg[mask]))


def test_cross_entropy_term():
    hs, ws, _, ht, wt, mask, tg = _inputs()
    loss = fused_linear_kd_loss(hs, ws, ht, wt, mask, targets=tg, kd_weight=0.7, ce_weight=0.4, chunk_size=3)
    ref_kd, sl = _naive(hs, ws, None, ht, wt, mask, 37, "forward_kl", 1.0)
    ref = 0.7 * ref_kd + 0.4 * F.cross_entropy(sl[mask], tg[mask])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, [hs, ws]), _grads(ref, [hs, ws])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_padded_vocab_rows_are_ignored():
    # The student's lm_head is padded beyond the tokenizer; only the common rows are compared
    hs, ws, _, ht, wt, mask, _ = _inputs(pad_rows=5)
    loss = fused_linear_kd_loss(hs, ws, ht, wt, mask, vocab_size=37)
    ref, _ = _naive(hs, ws, None, ht, wt, mask, 37, "forward_kl", 1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    (gw,) = torch.autograd.grad(loss, [ws])
    assert gw[37:].abs().max() == 0
    with pytest.raises(ValueError, match="exceeds"):
        fused_linear_kd_loss(hs, ws, ht, wt, mask, vocab_size=40)


def test_frozen_head_and_bad_options():
    hs, ws, _, ht, wt, mask, _ = _inputs()
    ws = ws.detach()  # e.g. a LoRA student: no grad for the head
    loss = fused_linear_kd_loss(hs, ws, ht, wt, mask)
    (gh,) = torch.autograd.grad(loss, [hs])
    assert gh.abs().sum() > 0
    with pytest.raises(ValueError, match="kd_loss"):
        fused_linear_kd_loss(hs, ws, ht, wt, mask, kd_loss="tvd")
    with pytest.raises(ValueError, match="jsd_beta"):
        fused_linear_kd_loss(hs, ws, ht, wt, mask, kd_loss="jsd", jsd_beta=1.0)


@pytest.mark.parametrize("loss_type", ["cosine", "mse"])
def test_hidden_state_loss_and_projection_grad(loss_type):
    torch.manual_seed(0)
    h_s = torch.randn(2, 5, 16, requires_grad=True)
    h_t = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    proj = torch.nn.Linear(16, 32, bias=False)
    loss = hidden_state_loss(h_s, h_t, loss_type, proj, mask)
    p, t = proj(h_s[mask]), h_t[mask]
    ref = (1 - F.cosine_similarity(p, t, dim=-1)).mean() if loss_type == "cosine" else ((p - t) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert h_s.grad[~mask].abs().max() == 0
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(h_s, h_t, loss_type, None, mask)
    with pytest.raises(ValueError, match="Unknown"):
        hidden_state_loss(h_s, h_t, "l1", proj)


def test_minus_inf_teacher_logits_are_finite():
    # A teacher logit of -inf (q = 0 exactly) follows the 0 · log 0 = 0 convention
    hs, ws, _, ht, wt, mask, _ = _inputs(N=6, V=10, Hs=4, Ht=4)
    bias = torch.zeros(10, dtype=torch.float64)
    bias[3] = -float("inf")
    loss = fused_linear_kd_loss(hs, ws, ht, wt, teacher_bias=bias)
    # F.kl_div gives nan there; a huge finite negative logit is the same distribution
    ref = kd_loss_from_logits(hs @ ws.t(), ht @ wt.t() + bias.clamp(min=-1e4))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, [hs, ws]), _grads(ref, [hs, ws])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_post_head_transforms_match_naive(kd_loss, ce_weight, tau):
    # Different transform chains per model (Granite-like divide, Cohere-like scale, soft-cap) with a head bias: the
    # loss, the logged CE (also when CE is not trained) and the gradients equal those of the transformed logits.
    from hf_minitron.architectures import apply_logit_transforms

    s_steps, t_steps = (("divide", 8.0), ("softcap", 2.5)), (("scale", 3.0),)
    hs, ws, bs, ht, wt, mask, tg = _inputs(bias=True)
    loss, (kd, ce, n) = fused_linear_kd_loss(
        hs, ws, ht, wt, mask, student_bias=bs, targets=tg, kd_loss=kd_loss, temperature=tau, ce_weight=ce_weight,
        student_logit_transforms=s_steps, teacher_logit_transforms=t_steps, chunk_size=4, return_components=True,
    )
    sl = apply_logit_transforms(hs @ ws.t() + bs, s_steps)
    tl = apply_logit_transforms(ht @ wt.t(), t_steps)
    ref_kd = kd_loss_from_logits(sl, tl, mask, kd_loss, temperature=tau)
    ref_ce = F.cross_entropy(sl[mask], tg[mask])
    ref = ref_kd + ce_weight * ref_ce
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd / n, ref_kd.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce / n, ref_ce.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, [hs, ws, bs]), _grads(ref, [hs, ws, bs])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_logit_transform_validation():
    from hf_minitron.architectures import ArchitectureLayout, LogitTransform

    hs, ws, _, ht, wt, mask, _ = _inputs()
    with pytest.raises(ValueError, match="Unknown logit transform"):
        fused_linear_kd_loss(hs, ws, ht, wt, mask, student_logit_transforms=(("exp", 1.0),))
    with pytest.raises(ValueError, match="non-zero"):
        fused_linear_kd_loss(hs, ws, ht, wt, mask, teacher_logit_transforms=(("divide", 0.0),))
    with pytest.raises(ValueError, match="kind"):
        LogitTransform("shift", "logit_bias")
    with pytest.raises(ValueError, match="LogitTransform"):
        ArchitectureLayout(model_types=("x",), logit_transforms=(("divide", "logits_scaling"),))
