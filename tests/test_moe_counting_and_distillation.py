"""Exact total / active parameter counts of pruned MoE and hybrid shapes, and distilling pruned MoE / hybrid students."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_minitron import MinitronPruneConfig, estimate_importance, get_layout, prune_model
from hf_minitron.counting import active_params, count_params

from conftest import random_batches, tiny_llama
from test_moe_hybrid import CALIB, FAMILIES, NAMES, _one_thread, make, scores_for  # noqa: F401 (fixture)


def test_counts_equal_the_pruned_models_for_every_family():
    for name in NAMES:
        model = make(name)
        scores = scores_for(model)
        target = MinitronPruneConfig(**FAMILIES[name].done_when)
        expected_total, expected_active = count_params(model, target, importance=scores), active_params(model, target, importance=scores)
        pruned = prune_model(copy.deepcopy(model), target, importance=scores)
        assert expected_total == sum(p.numel() for p in pruned.parameters()) == count_params(pruned), name
        assert expected_active == active_params(pruned), name
        # Kept layers given explicitly (the ones pruning kept) give the same count.
        kept = pruned.minitron_provenance["kept"]["layers"]
        assert count_params(model.config, target, kept_layers=kept) == expected_total, name


def test_active_params_leave_out_the_experts_a_token_does_not_use():
    model = make("mixtral")  # 4 MoE layers of 8 experts, 2 per token
    layout = get_layout(model)
    experts = sum(p.numel() for layer in layout.decoder_layers(model) for p in layer.get_submodule(layout.moe.experts).parameters())
    total = sum(p.numel() for p in model.parameters())
    assert active_params(model) == total - experts * 6 // 8
    assert active_params(model, {"num_experts": 4}) == count_params(model, {"num_experts": 4}) - experts // 2 * 2 // 4
    dense = tiny_llama()
    assert active_params(dense) == count_params(dense) == sum(p.numel() for p in dense.parameters())


def test_counting_a_depth_change_of_mixed_layers_needs_to_know_which_layers_stay():
    model = make("nemotron_h")  # Mamba, MoE, attention, MLP, Mamba, attention
    with pytest.raises(ValueError, match=r"layers hold different blocks.*kept_layers=.*importance="):
        count_params(model, {"num_hidden_layers": 5})
    mamba_dropped = count_params(model, {"num_hidden_layers": 5}, kept_layers=[1, 2, 3, 4, 5])
    moe_dropped = count_params(model, {"num_hidden_layers": 5}, kept_layers=[0, 2, 3, 4, 5])
    assert mamba_dropped != moe_dropped
    assert count_params(model, MinitronPruneConfig(layers_to_drop=[1])) == moe_dropped
    with pytest.raises(ValueError, match="does not apply"):
        count_params(tiny_llama(), {"num_experts": 2})


# ---------------------------------------------------------------------------- distillation
def _student_and_teacher(name: str):
    from _distill_utils import VOCAB

    teacher = make(name, vocab_size=VOCAB)
    with torch.no_grad():  # a peaky teacher: random init is nearly uniform, which leaves little to distill
        teacher.lm_head.weight.mul_(40.0)
    target = MinitronPruneConfig(**{k: v for k, v in FAMILIES[name].done_when.items() if k != "num_hidden_layers"})
    scores = estimate_importance(teacher, random_batches(vocab_size=VOCAB, num=2), CALIB, show_progress=False)
    student = prune_model(copy.deepcopy(teacher), target, importance=scores)
    return teacher, student


@pytest.mark.parametrize("name", ["mixtral", "nemotron_h"])
def test_distillation_trains_a_pruned_moe_or_hybrid_student(name, tmp_path):
    from _distill_utils import make_dataset, make_tokenizer

    from hf_minitron.distillation import DistillationConfig, DistillationTrainer

    teacher, student = _student_and_teacher(name)
    layout = get_layout(student)
    router = next(layer.get_submodule(layout.moe.router) for layer in layout.decoder_layers(student)
                  if "moe" in layout.layer_parts(layer))
    before = router.weight.detach().clone()
    args = DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, save_strategy="no", kd_chunk_size=16, dataloader_num_workers=0, bf16=False, max_steps=8,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_dataset(n=32),
                                  processing_class=make_tokenizer())
    trainer.train()
    kd = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    assert all(torch.isfinite(torch.tensor(kd))) and sum(kd[-3:]) / 3 < sum(kd[:3]) / 3, kd
    assert not torch.equal(router.weight.detach(), before), "the router is trained through the routing weights"


def test_router_auxiliary_loss_is_not_part_of_the_distillation_loss(tmp_path):
    # The student's forward returns the load-balancing loss when `output_router_logits=True`, but the trainer optimises
    # only the distillation (and optional hidden-state) loss: the value is the same with and without it.
    from _distill_utils import make_dataset, make_tokenizer

    from hf_minitron.distillation import DistillationConfig, DistillationTrainer

    teacher, student = _student_and_teacher("mixtral")
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True,
                              save_strategy="no", kd_chunk_size=16, dataloader_num_workers=0, bf16=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=make_dataset(n=8),
                                  processing_class=make_tokenizer())
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    losses = []
    for flag in (False, True):
        student.config.output_router_logits = flag
        with torch.no_grad():
            losses.append(trainer.compute_loss(student, batch).item())
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert losses[0] == losses[1]
