"""Worker of the 2-process CPU DDP distillation test: `torchrun --nproc_per_node 2 _ddp_distill_worker.py OUT`."""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))

from _distill_utils import make_dataset, make_teacher, make_tokenizer, prune_student  # noqa: E402

from hf_minitron.distillation import DistillationConfig, DistillationTrainer  # noqa: E402


def main(out: str) -> None:
    teacher = make_teacher()
    student = prune_student(teacher)
    args = DistillationConfig(
        out, max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, hidden_state_loss="cosine", kd_chunk_size=16,
        ddp_backend="gloo", bf16=False,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=make_dataset(n=16), processing_class=make_tokenizer()
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "world": trainer.accelerator.num_processes,
        "student_sum": float(sum(p.double().sum() for p in model.parameters())),
        "projection_sum": float(trainer.projection.weight.double().sum()),
        "kd_losses": [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
