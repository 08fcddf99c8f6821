"""The trainer's distillation loss equals the one computed from the models' own `.logits`, for every registered family
(post-head transforms such as Granite's `logits_scaling` and Gemma's soft-capping included), and for unregistered
causal LMs whose transform can be recognised; anything else is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from _distill_utils import make_dataset, make_tokenizer
from hf_minitron import MinitronPruneConfig, prune_model
from hf_minitron.architectures import supported_model_types
from hf_minitron.distillation import DistillationConfig, DistillationTrainer, kd_loss_from_logits
from hf_minitron.distillation.checks import output_head

from conftest import perturb_
from test_architectures import DONE_WHEN, FAMILIES, SIZES, make, scores_for
from test_moe_hybrid import FAMILIES as BLOCK_FAMILIES, make as make_block, scores_for as block_scores_for


VOCAB = SIZES["vocab_size"]
# Family scalars at values real checkpoints ship (Granite: 8 or 16), and a soft-cap for Gemma-3 (off by default)
OVERRIDES = {"granite": dict(logits_scaling=8.0), "gemma3_text": dict(final_logit_softcapping=4.0)}


def _trainer(tmp_path, student, teacher, **kw):
    args = DistillationConfig(
        str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        max_steps=1, kd_chunk_size=7, dataloader_num_workers=0, seed=0, **kw,
    )
    return DistillationTrainer(model=student, teacher_model=teacher, args=args,
                               train_dataset=make_dataset(n=8, vocab=VOCAB), processing_class=make_tokenizer(VOCAB))


def _check_against_own_logits(trainer, kd_losses=("forward_kl", "reverse_kl", "jsd"), tau=2.0):
    """For each divergence: the trainer's loss and logged kd_loss / ce_loss vs. those from `.logits`; gradients once."""
    batch = next(iter(trainer.get_train_dataloader()))
    student, teacher = trainer.model, trainer.teacher_model
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        t_logits = teacher(**kw).logits[:, :-1]
    for kd_loss in kd_losses:
        trainer.args.kd_loss, trainer.args.ce_weight = kd_loss, 0.0
        loss = trainer.compute_loss(student, dict(batch))
        s_logits = student(**kw).logits[:, :-1]
        ref = kd_loss_from_logits(s_logits, t_logits, mask, kd_loss, temperature=tau)  # τ² included
        ce = F.cross_entropy(s_logits[mask], labels[mask])
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        metrics = trainer._metrics["train"]
        assert metrics["kd_loss"][-1] == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), kd_loss
        assert metrics["ce_loss"][-1] == pytest.approx(ce.item(), rel=1e-5, abs=1e-6), kd_loss
    # With a trained CE term, the gradient of the head and of a decoder weight match the naive ones
    trainer.args.kd_loss, trainer.args.ce_weight = "forward_kl", 0.3
    params = [output_head(student, "student").weight, next(p for n, p in student.named_parameters() if "layers.0." in n)]
    loss = trainer.compute_loss(student, dict(batch))
    s_logits = student(**kw).logits[:, :-1]
    ref = kd_loss_from_logits(s_logits, t_logits, mask, temperature=tau) + 0.3 * F.cross_entropy(s_logits[mask], labels[mask])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_every_registered_family_is_covered():
    assert set(FAMILIES) | set(BLOCK_FAMILIES) == set(supported_model_types())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_kd_loss_equals_own_logits(tmp_path, name):
    extra = OVERRIDES.get(name, {})
    teacher = make(name, seed=0, **extra)
    # A width- and depth-pruned student, moved away from its teacher so the divergences are not ~0
    student = prune_model(copy.deepcopy(teacher), MinitronPruneConfig(**DONE_WHEN), importance=scores_for(teacher))
    perturb_(student, seed=1, scale=0.3).train()
    trainer = _trainer(tmp_path, student, teacher, temperature=2.0)
    if name == "granite":
        assert trainer.student_logit_transforms == trainer.teacher_logit_transforms == (("divide", 8.0),)
    if name in ("gemma2", "gemma3_text"):
        assert trainer.student_logit_transforms[0][0] == "softcap"
    _check_against_own_logits(trainer)


# Post-head transforms of the MoE / hybrid families at the values of their test configs (test_moe_hybrid.FAMILIES)
BLOCK_TRANSFORMS = {"granitemoehybrid": (("divide", 4.0),), "falcon_h1": (("scale", 0.5),)}


@pytest.mark.parametrize("name", list(BLOCK_FAMILIES))
def test_every_moe_and_hybrid_family_kd_loss_equals_own_logits(tmp_path, name):
    teacher = make_block(name, seed=0)
    target = MinitronPruneConfig(**BLOCK_FAMILIES[name].done_when)  # experts, expert width, hidden, depth, Mamba heads
    student = prune_model(copy.deepcopy(teacher), target, importance=block_scores_for(teacher))
    perturb_(student, seed=1, scale=0.3).train()
    trainer = _trainer(tmp_path, student, teacher, temperature=2.0)
    assert trainer.student_logit_transforms == trainer.teacher_logit_transforms == BLOCK_TRANSFORMS.get(name, ())
    _check_against_own_logits(trainer)


def _cohere(seed, layers=2):
    torch.manual_seed(seed)
    config = T.CohereConfig(**{**SIZES, "num_hidden_layers": layers}, logit_scale=0.25)
    return perturb_(T.CohereForCausalLM(config), seed).eval()


def test_unregistered_family_transform_is_found_by_probing(tmp_path):
    # Cohere multiplies its logits by `logit_scale`; it is not a registered family
    assert "cohere" not in supported_model_types()
    trainer = _trainer(tmp_path, _cohere(1).train(), _cohere(0, layers=3), temperature=2.0)
    assert trainer.student_logit_transforms == trainer.teacher_logit_transforms == (("scale", 0.25),)
    _check_against_own_logits(trainer, kd_losses=("forward_kl", "jsd"))


class _OddConfig(T.LlamaConfig):
    model_type = "odd_llama"


class _OddLlama(T.LlamaForCausalLM):
    """`.logits` = head output with its vocabulary order reversed: a transform no registry entry or probe knows."""

    config_class = _OddConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.flip(-1)
        return out


def test_unknown_post_head_transform_is_refused(tmp_path):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0)
    teacher = _OddLlama(_OddConfig(**kw)).eval()
    student = _OddLlama(_OddConfig(**kw))
    with pytest.raises(ValueError, match="does not recognise"):
        _trainer(tmp_path, student, teacher)
