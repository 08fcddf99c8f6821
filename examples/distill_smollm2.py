"""Prune SmolLM2-135M-Instruct and recover it with knowledge distillation, offline, in ~60 lines.

    python examples/distill_smollm2.py --output_dir smollm2-distilled --max_steps 40

The teacher is the unpruned model; the student is the pruned copy; the loss is forward KL on logits (τ = 1),
computed chunk by chunk so the full [batch, seq, vocab] logits of both models never exist at once.
"""

from __future__ import annotations

import argparse
import copy

from datasets import Dataset

from hf_minitron import DistillationConfig, DistillationTrainer, MinitronPruneConfig, load_default_corpus, prune_model, save_pruned_model
from hf_minitron.data import pack_texts
from hf_minitron.embedded import load_smollm2
from hf_minitron.evaluation import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="smollm2-distilled")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--hidden_state_loss", default="none", choices=["none", "cosine", "mse"])
    args = parser.parse_args()

    teacher, tokenizer = load_smollm2()
    train = pack_texts(load_default_corpus("train"), tokenizer, args.seq_length)
    held_out = pack_texts(load_default_corpus("eval"), tokenizer, args.seq_length, 16)

    config = MinitronPruneConfig(hidden_size=432, intermediate_size=1024, num_calibration_samples=64, calibration_seq_length=args.seq_length)
    student = prune_model(copy.deepcopy(teacher), config, calibration_data=train[:64])
    print(f"pruned (zero-shot) perplexity: {perplexity(student, held_out, seq_length=args.seq_length):.1f}")

    training_args = DistillationConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        warmup_steps=4,
        hidden_state_loss=args.hidden_state_loss,  # "cosine" adds post-norm hidden-state losses via a learned projection
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=Dataset.from_dict({"input_ids": [t.tolist() for t in train]}),
        processing_class=tokenizer,
    )
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.model)
    print(f"distilled perplexity: {perplexity(student, held_out, seq_length=args.seq_length):.1f}")
    save_pruned_model(student, f"{args.output_dir}/final", tokenizer=tokenizer, overwrite=True)


if __name__ == "__main__":
    main()
