#!/usr/bin/env python
"""Memory per rank of Minitron distillation under DDP, FSDP2 and DeepSpeed ZeRO-3 (arithmetic, no GPU needed).

For the papers' configs in recipes/configs/ (Llama-3.1-8B -> 4.5B width, Mistral-NeMo-12B -> 8B), the parameter counts
come from the real architectures built on the meta device (shapes of the public configs, targets from the YAML files);
the bytes per parameter per rank are those the engines keep:

    engine                      teacher   student weights + grads   optimizer state
    DDP (bf16 autocast)         2         4 + 4                     8   (AdamW m, v in fp32)
    FSDP2 (bf16 mixed, fp32)    2/N       (4 + 4)/N                 8/N
    ZeRO-3 (bf16)               2/N       (2 + 2)/N                 12/N (fp32 master + m + v)

The 2-process CPU tests (tests/test_distributed.py) measure these per-rank fractions on a tiny model. Transients (not
divided by N) are listed for one micro-batch of the recipe (`per_device_train_batch_size` x `seq_length`, activation
checkpointing, no hidden-state loss): the units FSDP2 gathers, the two `lm_head`s of the fused loss, and activations.

    python benchmarks/memory_per_rank.py                # both configs, N = 1, 2, 4, 8, 16
    python benchmarks/memory_per_rank.py --ranks 2 4 8 16 --markdown   # the tables in docs/scale.md
"""

from __future__ import annotations

import argparse
import os

import torch
import yaml


GB = 1e9
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "recipes", "configs")

# Public configs of the teachers (config.json of meta-llama/Llama-3.1-8B and mistralai/Mistral-Nemo-Base-2407)
SOURCES = {
    "llama3.1-8b-4b-width.yaml": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)),
    "mistral-nemo-12b-8b.yaml": ("mistral", dict(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)),
}
# (teacher, student weights + grads, optimizer state) bytes per parameter, before dividing by N
ENGINES = {
    "DDP": (2, 8, 8),
    "FSDP2": (2, 8, 8),
    "ZeRO-3": (2, 4, 12),
}


def counts(model_type: str, shape: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "head": model.get_output_embeddings().weight.numel(),
        "layer": sum(p.numel() for p in model.model.layers[0].parameters()),
        "shape": shape,
    }


def per_rank(engine: str, teacher: int, student: int, n: int) -> tuple[float, float, float]:
    t, s, o = ENGINES[engine]
    div = 1 if engine == "DDP" else n
    return t * teacher / div / GB, s * student / div / GB, o * student / div / GB


def transients(t: dict, s: dict, tokens: int, chunk: int = 1024) -> dict:
    """Per-rank GB alive at once during an FSDP2 step, not divided by N (ZeRO-3's are of the same order)."""
    v, hs, ht = s["shape"]["vocab_size"], s["shape"]["hidden_size"], t["shape"]["hidden_size"]
    layers = s["shape"]["num_hidden_layers"]
    return {
        "gathered decoder layers (bf16; current + prefetched, student and teacher)": 2 * 2 * (s["layer"] + t["layer"]) / GB,
        "student [final norm, lm_head] unit and its gradient (bf16)": 2 * 2 * s["head"] / GB,
        "teacher lm_head: gathered unit + the loss's copy (bf16)": 2 * 2 * t["head"] / GB,
        "fused loss: fp32 lm_head-gradient accumulator + bf16 copy": (4 + 2) * s["head"] / GB,
        "fused loss: one chunk of fp32 logits, both models": 2 * chunk * v * 4 / GB,
        "checkpointed layer inputs (bf16)": layers * tokens * hs * 2 / GB,
        "teacher final hidden state (bf16)": tokens * ht * 2 / GB,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = p.parse_args()

    for name, (model_type, shape) in SOURCES.items():
        with open(os.path.join(CONFIGS, name)) as f:
            recipe = yaml.safe_load(f)
        target = {k: recipe[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "num_hidden_layers") if recipe.get(k) is not None}
        t, s = counts(model_type, shape), counts(model_type, {**shape, **target})
        tokens = recipe["per_device_train_batch_size"] * recipe["seq_length"]
        print(f"\n## {name}: teacher {t['params'] / 1e9:.3f}B -> student {s['params'] / 1e9:.3f}B parameters "
              f"(target {target})")
        header = ["engine", "N", "teacher GB", "student weights + grads GB", "optimizer GB", "total GB"]
        rows = []
        for engine in ENGINES:
            for n in ([1] if engine == "DDP" else args.ranks):
                a, b, c = per_rank(engine, t["params"], s["params"], n)
                rows.append([engine, str(n) if engine != "DDP" else "any", f"{a:.1f}", f"{b:.1f}", f"{c:.1f}",
                             f"{a + b + c:.1f}"])
        if args.markdown:
            print("| " + " | ".join(header) + " |\n|---|---|" + "---:|" * (len(header) - 2))
            for r in rows:
                print("| " + " | ".join(r) + " |")
        else:
            print("  ".join(f"{h:>26}" if i == 3 else f"{h:>12}" for i, h in enumerate(header)))
            for r in rows:
                print("  ".join(f"{c:>26}" if i == 3 else f"{c:>12}" for i, c in enumerate(r)))
        tr = transients(t, s, tokens)
        print(f"\nTransients per rank, micro-batch {recipe['per_device_train_batch_size']} x {recipe['seq_length']} "
              f"= {tokens:,} tokens (not divided by N):")
        for k, v in tr.items():
            print(f"  {v:6.2f} GB  {k}")
        print(f"  {sum(tr.values()):6.2f} GB  total (plus one layer's recomputed activations)")


if __name__ == "__main__":
    main()
