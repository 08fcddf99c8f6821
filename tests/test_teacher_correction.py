"""Teacher correction returns a plain model: copies of it (how students are made) run their own weights."""

import copy

import pytest
import torch
from datasets import Dataset

from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model
from hf_minitron.teacher_correction import TeacherCorrectionConfig, correct_teacher

from conftest import random_batches, tiny_llama, word_tokenizer


def test_corrected_teacher_copies_are_independent(tmp_path):
    teacher = tiny_llama()
    data = Dataset.from_dict({"input_ids": [row.tolist() for row in random_batches(num=2, batch=4, seq=16)[0]]})
    args = TeacherCorrectionConfig(
        str(tmp_path / "tc"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to="none",
        save_strategy="no",
    )
    before = copy.deepcopy(teacher.state_dict())
    corrected = correct_teacher(teacher, args, data, processing_class=word_tokenizer())
    assert any(not torch.equal(before[k], v) for k, v in corrected.state_dict().items())  # it trained
    # TRL/accelerate patch `forward` on the instance (closing over the original); it must be gone
    assert "forward" not in corrected.__dict__

    ids = random_batches(num=1)[0]
    scores = estimate_importance(corrected, ids, MinitronPruneConfig(num_calibration_samples=4), show_progress=False)
    student = prune_model(copy.deepcopy(corrected), MinitronPruneConfig(hidden_size=32), importance=scores)
    with torch.no_grad():
        out = student(ids, output_hidden_states=True)
    assert out.hidden_states[-1].shape[-1] == 32  # the copy's own (pruned) forward, not the teacher's
    assert corrected.config.hidden_size == 64 and corrected.model.embed_tokens.weight.shape[1] == 64


def test_teacher_correction_config_learning_rate():
    args = TeacherCorrectionConfig("unused", original_learning_rate=3e-3, report_to="none")
    assert args.learning_rate == pytest.approx(6e-4)  # 1/5 of the original peak by default
    with pytest.raises(ValueError, match="lr_fraction"):
        TeacherCorrectionConfig("unused", lr_fraction=0.0)
