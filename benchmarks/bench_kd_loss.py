#!/usr/bin/env python
"""Peak memory and time of the memory-bounded KD loss vs. full-logits losses, and of one training step vs. GKD.

Part 1 (loss, forward + backward) at `V = 128,256` on `N = B·T` tokens, from final hidden states and `lm_head`s:

- `ours`  : `hf_minitron.distillation.fused_linear_kd_loss` (chunked fused linear + forward KL, exact gradients);
- `trl`   : `trl.kernels.chunked_divergence.ChunkedDivergenceFunction(beta=0)` (TRL 1.16's chunked divergence, also
  fused with both heads: 4096-token x 32768-vocab fp32 tiles, online logsumexp; Triton on CUDA, PyTorch elsewhere),
  averaged over tokens like ours;
- `naive` : full fp32 logits of both models + `kd_loss_from_logits` (log-softmax + `F.kl_div`) through autograd;
- `gkd`   : full logits + `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(beta=0)` (the loss `GKDTrainer`
  computes; beta = 0 is forward KL, the same quantity as ours).

Part 2 (training step): one optimizer step of `DistillationTrainer` vs. `GKDTrainer(lmbda=0, beta=0)` (off-policy,
forward KL) on the same tiny Llama student/teacher pair with `V = 128,256` and the same batch.

How memory is measured: every method runs in a **fresh subprocess**. After the inputs (and, for part 2, the trainer)
are built, the process resets the kernel's peak-RSS mark (`/proc/self/clear_refs`, Linux) and records its resident
set size; it then runs the measured work and reads the peak (`VmHWM`). The difference is the *extra peak memory* of
the work: every byte torch allocates on CPU is resident once written, and the high-water mark sees allocations that
`tracemalloc` cannot and that a sampled RSS could miss. Resetting the mark first matters: setup temporaries freed
before the work would otherwise hide part of a small peak (without `/proc`, `ru_maxrss` deltas are used instead).
A fresh process per method keeps
allocator caches of one method from hiding another's peak. Times are wall-clock, best of `--repeats` runs after
the memory run (the first run also pays one-off costs). Gradients of each method are saved and compared with those
of `ours` (`torch.allclose`, rtol 1e-4 / atol 1e-6 in fp32).

Usage:
    python benchmarks/bench_kd_loss.py                       # defaults: N = 4096, V = 128256, H = 256
    python benchmarks/bench_kd_loss.py --tokens 2048 --skip-step --methods ours,trl,naive,gkd
    python benchmarks/bench_kd_loss.py --tokens 1024 --skip-step   # quicker
    python benchmarks/bench_kd_loss.py --methods ours,gkd --step-tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import shutil
import tempfile
import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_peak() -> int:
    """Resets the peak-RSS mark (Linux) and returns the baseline to subtract from `_peak_bytes()`.

    Without the reset, setup temporaries freed before the run (e.g. the `randn(V, H) * s` intermediates) already
    sit in `ru_maxrss` and hide part of the run's own peak, so small peaks were under-reported by a varying amount.
    """
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status_kib("VmRSS") * 1024
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; macOS: no reset


def _peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(fn, repeats: int, after_first=None) -> tuple[object, int, float]:
    """``(result of the first call, its extra peak bytes, best wall time over it and `repeats` more calls)``."""
    base = _start_peak()
    t0 = time.perf_counter()
    result = fn()
    times = [time.perf_counter() - t0]
    peak = _peak_bytes() - base
    if after_first is not None:
        after_first(result)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return result, peak, min(times)


# ---------------------------------------------------------------------------------------------- part 1: loss only
def _loss_worker(method: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int, out: str) -> dict:
    import torch

    from hf_minitron.distillation import fused_linear_kd_loss, kd_loss_from_logits

    torch.manual_seed(0)
    h_s = torch.randn(tokens, hidden).requires_grad_()
    w_s = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    h_t = torch.randn(tokens, hidden)
    w_t = torch.randn(vocab, hidden) * 2 * hidden**-0.5

    def run():
        h_s.grad = w_s.grad = None
        if method == "ours":
            loss = fused_linear_kd_loss(h_s, w_s, h_t, w_t, chunk_size=chunk)
        elif method == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            # (student hidden, weight, bias, teacher hidden, weight, bias, beta=0: forward KL, temperature 1)
            per_token, _entropy = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 0.0, 1.0)
            loss = per_token.mean()
        else:
            s_logits = h_s @ w_s.t()  # [N, V] fp32
            with torch.no_grad():
                t_logits = h_t @ w_t.t()
            if method == "naive":
                loss = kd_loss_from_logits(s_logits, t_logits)
            else:
                from trl.experimental.gkd import GKDTrainer

                labels = torch.zeros(1, tokens, dtype=torch.long)  # all valid: per-token mean, like ours
                loss = GKDTrainer.generalized_jsd_loss(s_logits[None], t_logits[None], labels=labels, beta=0.0)
        loss.backward()
        return loss

    def save(loss):  # the first run's gradients, before the timed repeats overwrite them
        torch.save({"loss": loss.detach(), "h": h_s.grad, "w": w_s.grad}, out)

    loss, peak, best = _measure(run, repeats, after_first=save)
    return {"loss": float(loss), "peak_bytes": peak, "time_s": best}


# ---------------------------------------------------------------------------------------- part 2: training step
def _step_worker(method: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int, out: str) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    seq = min(tokens, 512)
    batch = max(tokens // seq, 1)

    def cfg(h, layers):
        return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4,
                           max_position_embeddings=seq, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg(hidden, 2)).eval()
    student = LlamaForCausalLM(cfg(hidden, 1))  # same width: the GKD loss has no hidden-state term
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    )
    tok.add_tokens([f"w{i}" for i in range(3, vocab)])  # len(tokenizer) == V
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).tolist()
    ds = Dataset.from_dict({"input_ids": ids})

    def collate(rows):
        x = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=repeats + 1,
                  report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1,
                  save_strategy="no", seed=0, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    if method == "ours":
        from hf_minitron.distillation import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, kd_chunk_size=chunk)
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args,
                                      train_dataset=ds, processing_class=tok, data_collator=collate)
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=0.0, beta=0.0, max_new_tokens=1)
        trainer = GKDTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=ds,
                             processing_class=tok, data_collator=collate)
    trainer.create_optimizer_and_scheduler(num_training_steps=repeats + 1)
    trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    inputs = collate([ds[i] for i in range(batch)])
    model = trainer.model
    model.train()

    def step():
        loss = trainer.training_step(model, dict(inputs), num_items_in_batch=None)
        trainer.optimizer.step()
        model.zero_grad()
        return loss

    loss, peak, best = _measure(step, repeats)
    return {"loss": float(loss), "peak_bytes": peak, "time_s": best, "tokens": batch * seq}


# --------------------------------------------------------------------------------------------------------- driver
def _spawn(kind: str, method: str, a: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_method", method, "--_out", out,
           "--tokens", str(a.tokens if kind == "loss" else a.step_tokens), "--vocab", str(a.vocab),
           "--hidden", str(a.hidden), "--chunk", str(a.chunk), "--repeats", str(a.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?); try a smaller --tokens"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(b: float) -> str:
    return f"{b / 2**30:7.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="B·T of the loss benchmark")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=512, help="kd_chunk_size of ours")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the first (memory) run")
    p.add_argument("--methods", default="ours,trl,naive,gkd")
    p.add_argument("--step-tokens", type=int, default=1024, help="B·T of the training-step comparison")
    p.add_argument("--skip-step", action="store_true", help="skip the training-step comparison")
    p.add_argument("--skip-loss", action="store_true", help="skip the loss benchmark")
    p.add_argument("--_worker"), p.add_argument("--_method"), p.add_argument("--_out")
    a = p.parse_args()

    if a._worker:
        fn = _loss_worker if a._worker == "loss" else _step_worker
        tokens = a.tokens
        print(json.dumps(fn(a._method, tokens, a.vocab, a.hidden, a.chunk, a.repeats, a._out)))
        return

    import torch

    tmp = tempfile.mkdtemp(prefix="bench_kd_loss-")  # gradients of each method, compared then deleted
    try:
        methods = a.methods.split(",")
        if not a.skip_loss:
            print(f"## KD loss fwd+bwd: N = B·T = {a.tokens}, V = {a.vocab}, H = {a.hidden}, chunk = {a.chunk}, "
                  f"{torch.get_num_threads()} threads")
            res = {}
            for m in methods:
                res[m] = _spawn("loss", m, a, os.path.join(tmp, f"{m}.pt"))
            ref = torch.load(os.path.join(tmp, "ours.pt")) if "error" not in res.get("ours", {"error": 1}) else None
            print(f"{'method':8} {'loss':>12} {'extra peak':>11} {'time':>8} {'mem/ours':>9} {'time/ours':>9}  grads==ours")
            for m, r in res.items():
                if "error" in r:
                    print(f"{m:8} FAILED: {r['error']}")
                    continue
                same = "-"
                if ref is not None and m != "ours":
                    g = torch.load(os.path.join(tmp, f"{m}.pt"))
                    same = all(torch.allclose(g[k], ref[k], rtol=1e-4, atol=1e-6) for k in ("loss", "h", "w"))
                o = res.get("ours", {})
                mr = r["peak_bytes"] / o["peak_bytes"] if o.get("peak_bytes") else float("nan")
                tr = r["time_s"] / o["time_s"] if o.get("time_s") else float("nan")
                print(f"{m:8} {r['loss']:12.6f} {_gb(r['peak_bytes']):>11} {r['time_s']:7.2f}s {mr:9.3f} {tr:9.3f}  {same}")
            for other, targets in (("trl", ""), ("gkd", " (targets: <= 0.10x, <= 0.5x)")):
                if other in res and "ours" in res and "error" not in res[other] and "error" not in res["ours"]:
                    print(f"ours / {other}: peak memory {res['ours']['peak_bytes'] / res[other]['peak_bytes']:.3f}x, "
                          f"time {res['ours']['time_s'] / res[other]['time_s']:.3f}x{targets}")

        if not a.skip_step:
            print(f"\n## One training step: DistillationTrainer vs GKDTrainer(lmbda=0, beta=0), B·T = {a.step_tokens}, "
                  f"V = {a.vocab}, H = {a.hidden}")
            res = {m: _spawn("step", m, a, os.path.join(tmp, f"step_{m}.pt")) for m in ("ours", "gkd")}
            print(f"{'trainer':8} {'loss':>12} {'extra peak':>11} {'time':>8}")
            for m, r in res.items():
                if "error" in r:
                    print(f"{m:8} FAILED: {r['error']}")
                    continue
                print(f"{m:8} {r['loss']:12.6f} {_gb(r['peak_bytes']):>11} {r['time_s']:7.2f}s")
            if all("error" not in r for r in res.values()):
                print(f"ours / gkd: peak memory {res['ours']['peak_bytes'] / res['gkd']['peak_bytes']:.3f}x, "
                      f"time {res['ours']['time_s'] / res['gkd']['time_s']:.3f}x")

    finally:
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
