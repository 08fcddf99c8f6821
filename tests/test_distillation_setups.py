"""`DistillationTrainer` under ordinary training set-ups: gradient accumulation with the dynamic hidden-state weight,
models that go through trainers and pruning repeatedly, PEFT adapters, and tokenizer identity."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from _distill_utils import VOCAB, make_dataset, make_teacher, make_tokenizer, prune_student
from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model
from hf_minitron.distillation import DistillationConfig, DistillationTrainer, kd_loss_from_logits
from hf_minitron.model_utils import instance_patches, strip_instance_patches

from conftest import random_batches


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", use_cpu=True,
                bf16=False, seed=0, save_strategy="no", kd_chunk_size=16, dataloader_num_workers=0, logging_steps=1)
    base.update(kw)
    return DistillationConfig(**base)


def _own_forward_logits(model, ids):
    """Logits of a fresh model of the same class built from `model`'s config and weights (no instance state)."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        return fresh.eval()(ids).logits


# ------------------------------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("steps", [1, 2])
def test_dynamic_alpha_is_invariant_to_gradient_accumulation(tmp_path, steps):
    # The same optimizer steps on the same samples as batch 4 x accumulation 1 and as batch 1 x accumulation 4:
    # identical student and projection updates (SGD, so updates are proportional to the gradients).
    teacher = make_teacher()
    runs = {}
    for batch, accum in ((4, 1), (1, 4)):
        student = prune_student(teacher)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=make_dataset(n=4 * steps), processing_class=make_tokenizer(),
            args=_args(tmp_path / f"{batch}x{accum}", per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                       max_steps=steps, optim="sgd", hidden_state_loss="cosine"),
        )
        proj0 = trainer.projection.weight.detach().clone()
        trainer.train()
        runs[batch] = {
            "student": torch.cat([(p.detach() - before[n]).flatten() for n, p in student.named_parameters()]),
            "projection": (trainer.projection.weight.detach() - proj0).flatten(),
            "alpha": [h["hidden_state_alpha"] for h in trainer.state.log_history if "hidden_state_alpha" in h],
        }
    for key in ("student", "projection"):
        a, b = runs[4][key], runs[1][key]
        assert a.norm() > 0
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-5, f"{key} updates differ by {rel:.2e}"
    # One α per optimizer step, the same in both set-ups
    assert len(runs[4]["alpha"]) == steps and runs[1]["alpha"] == pytest.approx(runs[4]["alpha"], rel=1e-6)


# ----------------------------------------------------------------------------- prune -> distill -> prune -> distill
def _prune(model, **target):
    config = MinitronPruneConfig(num_calibration_samples=8, calibration_batch_size=4, **target)
    scores = estimate_importance(model, random_batches(VOCAB, num=2, seq=16), config, show_progress=False)
    return prune_model(copy.deepcopy(model), config, importance=scores)


def _distill(tmp_path, student, teacher, **kw):
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=make_dataset(n=8),
                                  processing_class=make_tokenizer(), args=_args(tmp_path, max_steps=2, **kw))
    trainer.train()
    return trainer


def test_prune_distill_prune_distill(tmp_path):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    teacher = make_teacher()
    first = _prune(teacher, hidden_size=48, intermediate_size=96)
    _distill(tmp_path / "d1", first, teacher, hidden_state_loss="cosine")
    assert instance_patches(first) == {} and instance_patches(teacher) == {}

    # A copy of the trained student runs its own weights
    clone = copy.deepcopy(first)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
        torch.testing.assert_close(clone(ids).logits, _own_forward_logits(clone, ids))
        assert not torch.allclose(clone(ids).logits, first(ids).logits)

    # Pruning it again gives a smaller model running its own (pruned) weights, which distils from the first student
    second = _prune(first, hidden_size=32, num_hidden_layers=3)
    with torch.no_grad():
        out = second(ids, output_hidden_states=True)
    assert out.hidden_states[-1].shape[-1] == 32 and len(out.hidden_states) == 4
    torch.testing.assert_close(out.logits, _own_forward_logits(second, ids))
    trainer = _distill(tmp_path / "d2", second, first)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])))
    assert instance_patches(second) == {} and instance_patches(first) == {}


def test_prune_model_entry_strips_patches_pointing_at_another_model(tmp_path):
    # A model given to TRL's SFTTrainer carries a `forward` closing over it; a deepcopy of it used to run the
    # original's weights through `prune_model` / `estimate_importance`.
    teacher = make_teacher()
    SFTTrainer(model=teacher, args=SFTConfig(str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_steps=1),
               train_dataset=make_dataset(n=4), processing_class=make_tokenizer())
    assert "forward" in vars(teacher)
    clone = copy.deepcopy(teacher)
    assert strip_instance_patches(copy.deepcopy(teacher), foreign_only=True) == ["forward"]
    assert strip_instance_patches(teacher, foreign_only=True) == []  # points at itself: kept
    pruned = _prune(clone, hidden_size=32)
    ids = torch.randint(3, VOCAB, (2, 8))
    torch.testing.assert_close(pruned(ids).logits, _own_forward_logits(pruned, ids))
    assert "forward" not in vars(clone)


# --------------------------------------------------------------------------------------------------------- PEFT
def test_peft_model_is_refused_by_importance_and_pruning():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_teacher(), LoraConfig(r=2, target_modules=["q_proj"]))
    config = MinitronPruneConfig(hidden_size=32, num_calibration_samples=4)
    for call in (lambda: estimate_importance(model, random_batches(VOCAB, num=1), config, show_progress=False),
                 lambda: prune_model(model, config, calibration_data=random_batches(VOCAB, num=1))):
        with pytest.raises(ValueError, match="merge_and_unload"):
            call()
    # Injected adapter layers without the PeftModel wrapper are refused too; the merged model prunes
    with pytest.raises(ValueError, match="adapter layers"):
        prune_model(model.get_base_model(), config, calibration_data=random_batches(VOCAB, num=1))
    merged = model.merge_and_unload()
    assert prune_model(merged, config, calibration_data=random_batches(VOCAB, num=1)).config.hidden_size == 32


def test_lora_on_lm_head_is_refused_on_every_path(tmp_path):
    from peft import LoraConfig, get_peft_model

    teacher = make_teacher()
    data = dict(train_dataset=make_dataset(n=8), processing_class=make_tokenizer())
    with pytest.raises(ValueError, match="modules_to_save"):  # via peft_config, before any dataset work
        DistillationTrainer(model=prune_student(teacher), teacher_model=teacher, args=_args(tmp_path, max_steps=1),
                            peft_config=LoraConfig(r=2, target_modules=["q_proj", "lm_head"]), **data)
    lora_head = get_peft_model(prune_student(teacher), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):  # an already-wrapped student
        DistillationTrainer(model=lora_head, teacher_model=teacher, args=_args(tmp_path, max_steps=1), **data)
    lora_teacher = get_peft_model(make_teacher(), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):  # a teacher with an adapter on its head
        DistillationTrainer(model=prune_student(teacher), teacher_model=lora_teacher,
                            args=_args(tmp_path, max_steps=1), **data)


def test_lm_head_in_modules_to_save_trains_through_the_fused_loss(tmp_path):
    from peft import LoraConfig

    teacher = make_teacher()
    student = prune_student(teacher)
    base_head = student.lm_head.weight.detach().clone()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=make_dataset(n=16), processing_class=make_tokenizer(),
        args=_args(tmp_path, max_steps=3, temperature=2.0, ce_weight=0.2),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    model = trainer.model
    head = model.get_base_model().lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(0.5 * torch.randn_like(head.weight))  # the trainable copy differs from the frozen original
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, dict(batch))
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s_logits = model(**kw).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**kw).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    ref = kd_loss_from_logits(s_logits, t_logits, mask, temperature=2.0)
    ref = ref + 0.2 * torch.nn.functional.cross_entropy(s_logits[mask], labels[mask])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (g,), (g_ref,) = torch.autograd.grad(loss, [head.weight]), torch.autograd.grad(ref, [head.weight])
    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)

    trained_from = head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(head.weight, trained_from)  # the copy trains
    torch.testing.assert_close(model.get_base_model().lm_head.original_module.weight, base_head)


# --------------------------------------------------------------------------------------------------- tokenizers
def _permuted_tokenizer():
    """Same size and special tokens as `make_tokenizer()`, other words at the ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": VOCAB + 2 - i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_tokenizers_are_compared_not_just_counted(tmp_path):
    teacher = make_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    make_tokenizer().save_pretrained(tmp_path / "teacher")
    data = dict(train_dataset=make_dataset(n=8), args=_args(tmp_path / "out", max_steps=1))

    # Same vocabulary size, different tokenizer: refused, naming both sources
    with pytest.raises(ValueError, match="share a tokenizer.*processing_class.*teacher's checkpoint"):
        DistillationTrainer(model=prune_student(teacher), teacher_model=str(tmp_path / "teacher"),
                            processing_class=_permuted_tokenizer(), **data)
    # Same vocabulary, different special tokens
    special = make_tokenizer()
    special.add_special_tokens({"additional_special_tokens": ["w5"]})
    with pytest.raises(ValueError, match="special tokens differ"):
        DistillationTrainer(model=prune_student(teacher), teacher_model=str(tmp_path / "teacher"),
                            processing_class=special, **data)
    # A saved student whose tokenizer differs from the teacher's (no processing_class given)
    student = prune_student(teacher)
    student.save_pretrained(tmp_path / "student")
    _permuted_tokenizer().save_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="student's checkpoint"):
        DistillationTrainer(model=str(tmp_path / "student"), teacher_model=str(tmp_path / "teacher"), **data)

    # One tokenizer, student lm_head padded beyond it (like 151,936 vs 152,064 rows): allowed, tokenizer found
    padded = prune_student(teacher)
    padded.resize_token_embeddings(VOCAB + 32)
    padded.save_pretrained(tmp_path / "padded")
    make_tokenizer().save_pretrained(tmp_path / "padded")
    trainer = DistillationTrainer(model=str(tmp_path / "padded"), teacher_model=str(tmp_path / "teacher"), **data)
    assert trainer.kd_vocab_size == VOCAB and len(trainer.processing_class) == VOCAB
    trainer.train()


def test_teacher_head_is_copied_to_the_student_device_once(tmp_path):
    import contextlib

    teacher = make_teacher()
    trainer = DistillationTrainer(model=prune_student(teacher), teacher_model=teacher, train_dataset=make_dataset(n=8),
                                  processing_class=make_tokenizer(), args=_args(tmp_path, max_steps=1))
    with contextlib.ExitStack() as stack:
        w, _ = trainer._teacher_head(torch.device("cpu"), stack)
        assert w.data_ptr() == teacher.lm_head.weight.data_ptr()  # same device: the weight itself, no copy
        assert trainer._teacher_head_cache is None
        # Another device (the meta device stands in for a second GPU): copied on first use, then reused
        w1, _ = trainer._teacher_head(torch.device("meta"), stack)
        w2, _ = trainer._teacher_head(torch.device("meta"), stack)
    assert w1.device.type == "meta" and w2 is w1


def test_strip_instance_patches_rules():
    import functools
    import types

    from accelerate.hooks import ModelHook, add_hook_to_module

    model = make_teacher()
    model.forward = types.MethodType(type(model).forward, model)  # the user's own patch, bound to the model
    snapshot = instance_patches(model)
    layers = model.model.layers
    layers[0].forward = functools.partial(type(layers[0]).forward, layers[0])  # added later, e.g. by a trainer
    add_hook_to_module(layers[1], ModelHook())  # a `device_map` dispatch hook: needed to run
    assert strip_instance_patches(model, keep=snapshot) == ["model.layers.0.forward"]
    assert "forward" in vars(model) and "forward" in vars(layers[1])

    # A closure over the model (TRL-style) survives a deepcopy pointing at the original: foreign in the copy only
    original_forward = model.forward
    model.forward = types.MethodType(lambda self, *a, **k: original_forward(*a, **k), model)
    clone = copy.deepcopy(model)
    assert strip_instance_patches(model, foreign_only=True) == []
    assert strip_instance_patches(clone, foreign_only=True) == ["forward"]
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        clone.lm_head.weight.zero_()
        assert clone(ids).logits.abs().max() == 0  # the copy now runs its own (zeroed) head
