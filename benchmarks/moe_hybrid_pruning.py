"""Zero-shot expert and Mamba-head pruning on small trained MoE and hybrid models: our ranking vs random.

For each family (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, Nemotron-H, GraniteMoeHybrid, Falcon-H1) a small teacher is
trained from scratch for `--steps` steps on the embedded corpus (`load_default_corpus("train")`, a byte-level BPE of
`--vocab_size` tokens trained on it, MoE load-balancing loss on), so that experts and Mamba heads specialise. Then,
with no retraining, half of the routed experts (and, for hybrids, half of the Mamba heads) are removed:

* by our activation ranking (one calibration pass on the train split; each expert-importance source for experts),
* by weight magnitude,
* at random (mean and spread over `--seeds` seeds),

and the held-out loss (mean next-token NLL on `load_default_corpus("eval")`, never seen in training or calibration)
is printed side by side. Rows are saved to `--output_json` and skipped on rerun (resumable per family).

    flock /tmp/hf_minitron_heavy.lock python benchmarks/moe_hybrid_pruning.py --output_json runs/moe_hybrid.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import transformers as T

from hf_minitron import MinitronPruneConfig, estimate_importance, load_default_corpus, prune_model
from hf_minitron.config import EXPERT_IMPORTANCE_SOURCES
from hf_minitron.counting import active_params
from hf_minitron.data import batch_samples, pack_texts
from hf_minitron.importance.baselines import magnitude_importance, random_importance


# Tiny teachers: hidden 128, 4 heads of 32 (2 KV heads), 8 routed experts of width 128 (top-2), Mamba2 8 heads x 32
# channels in 2 groups. Each entry: (config class, model class, config overrides, pruning targets by axis).
BASE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2, output_router_logits=True)
HALF_EXPERTS = {"experts": {"num_experts": 4}}
FAMILIES = {
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(MOE, head_dim=32, num_hidden_layers=4, intermediate_size=256, moe_intermediate_size=128, num_experts=8),
                  HALF_EXPERTS),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(MOE, num_hidden_layers=4, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                       shared_expert_intermediate_size=128),
                  HALF_EXPERTS),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(MOE, head_dim=32, num_hidden_layers=4, intermediate_size=128, num_local_experts=8), HALF_EXPERTS),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM,
              dict(MOE, num_hidden_layers=4, intermediate_size=128, num_experts=8), HALF_EXPERTS),
    "nemotron_h": (T.NemotronHConfig, T.NemotronHForCausalLM,
                   dict(MOE, head_dim=32, intermediate_size=256, n_routed_experts=8, moe_intermediate_size=128,
                        moe_shared_expert_intermediate_size=128, mamba_num_heads=8, mamba_head_dim=32, n_groups=2,
                        ssm_state_size=16, chunk_size=32,
                        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "moe"]),
                   {**HALF_EXPERTS, "mamba heads": {"mamba_num_heads": 4}}),
    "granitemoehybrid": (T.GraniteMoeHybridConfig, T.GraniteMoeHybridForCausalLM,
                         dict(MOE, num_hidden_layers=4, intermediate_size=128, shared_intermediate_size=128,
                              num_local_experts=8, mamba_n_heads=8, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16,
                              mamba_chunk_size=32, mamba_expand=2,
                              layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"]),
                         # the Mamba width is mamba_expand x hidden: 4 heads x 32 = 1 x 128
                         {**HALF_EXPERTS, "mamba heads": {"mamba_num_heads": 4}}),
    "falcon_h1": (T.FalconH1Config, T.FalconH1ForCausalLM,
                  dict(head_dim=32, num_hidden_layers=4, intermediate_size=256, mamba_d_ssm=256, mamba_n_heads=8,
                       mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=32, mamba_rms_norm=True,
                       mamba_norm_before_gate=False),
                  {"mamba heads": {"mamba_num_heads": 4}}),
}


def _save(path: str | None, state: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, path)


def train_tokenizer(texts: list[str], vocab_size: int) -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token NLL over every held-out token (nats)."""
    model.eval()
    nll, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return nll / count


def train_teacher(name: str, vocab_size: int, train: list[torch.Tensor], args) -> torch.nn.Module:
    config_cls, model_cls, overrides, _ = FAMILIES[name]
    torch.manual_seed(args.teacher_seed)
    model = model_cls(config_cls(**BASE, **overrides, vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = T.get_cosine_schedule_with_warmup(optimizer, args.steps // 20, args.steps)
    gen = torch.Generator().manual_seed(args.teacher_seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(len(train), (args.batch_size,), generator=gen)
        ids = torch.stack([train[i] for i in idx])
        loss = model(input_ids=ids, labels=ids).loss  # LM loss + the router load-balancing loss where the family has one
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  {name} step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    model.config.output_router_logits = False
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--calib_samples", type=int, default=64)
    parser.add_argument("--eval_samples", type=int, default=96)
    parser.add_argument("--seeds", type=int, default=3, help="random-ranking seeds")
    parser.add_argument("--teacher_seed", type=int, default=0, help="initialisation and batch order of the teacher")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: tiny models gain nothing from more)")
    parser.add_argument("--output_json", default=None, help="rows are saved here and skipped on rerun")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = {"args": vars(args), "families": {}}
    if args.output_json and os.path.isfile(args.output_json):
        with open(args.output_json, encoding="utf-8") as f:
            state["families"] = json.load(f).get("families", {})

    train_texts, eval_texts = load_default_corpus("train"), load_default_corpus("eval")
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train = pack_texts(train_texts, tokenizer, args.seq_length, add_bos=False)
    calib = train[-args.calib_samples:]  # calibration reuses training text (as in the papers), never held-out text
    held_out = batch_samples(pack_texts(eval_texts, tokenizer, args.seq_length, args.eval_samples, add_bos=False), 16)
    print(f"tokenizer: {len(tokenizer)} tokens; train {len(train)} x {args.seq_length}; held-out "
          f"{sum(b['input_ids'].shape[0] for b in held_out)} x {args.seq_length}", flush=True)
    prune_settings = dict(num_calibration_samples=args.calib_samples, calibration_seq_length=args.seq_length,
                          calibration_batch_size=8)

    for name in args.families.split(","):
        if name in state["families"]:
            rows = state["families"][name]
        else:
            start = time.perf_counter()
            teacher = train_teacher(name, len(tokenizer), train, args)
            train_seconds = time.perf_counter() - start
            scores = estimate_importance(teacher, calib, MinitronPruneConfig(**prune_settings), show_progress=False)
            rows = {"teacher": {"loss": heldout_loss(teacher, held_out), "active_params": active_params(teacher),
                                "params": sum(p.numel() for p in teacher.parameters()), "train_seconds": round(train_seconds)}}
            magnitude = magnitude_importance(teacher)
            for axis, target in FAMILIES[name][3].items():

                def loss_of(scores_, **extra) -> tuple[float, int]:
                    pruned = prune_model(copy.deepcopy(teacher), MinitronPruneConfig(**target, **prune_settings, **extra),
                                         importance=scores_)
                    return heldout_loss(pruned, held_out), active_params(pruned)

                ours = {}
                for source in EXPERT_IMPORTANCE_SOURCES if axis == "experts" else ("activation",):
                    extra = {"expert_importance": source} if axis == "experts" else {}
                    ours[source], active = loss_of(scores, **extra)
                random = [loss_of(random_importance(teacher, seed=s))[0] for s in range(args.seeds)]
                rows[axis] = {"target": target, "ours": ours, "magnitude": loss_of(magnitude)[0], "random": random,
                              "active_params": active}
            rows["seconds"] = round(time.perf_counter() - start)
            state["families"][name] = rows
            _save(args.output_json, state)
        teacher_row = rows["teacher"]
        print(f"\n{name}: teacher held-out loss {teacher_row['loss']:.3f} ({teacher_row['params'] / 1e6:.2f}M params, "
              f"{teacher_row['active_params'] / 1e6:.2f}M active; trained {teacher_row['train_seconds']}s)", flush=True)
        for axis, r in rows.items():
            if axis in ("teacher", "seconds"):
                continue
            rand = r["random"]
            ours = ", ".join(f"{k} {v:.3f}" for k, v in r["ours"].items())
            print(f"  {axis} {r['target']}: ours [{ours}] | magnitude {r['magnitude']:.3f} | random "
                  f"{statistics.mean(rand):.3f} ± {statistics.pstdev(rand):.3f} (seeds {', '.join(f'{x:.3f}' for x in rand)})",
                  flush=True)

    columns = ["family", "axis", "teacher", "ours (default)", *EXPERT_IMPORTANCE_SOURCES[1:], "magnitude",
               "random (mean of seeds ± sd)"]
    print("\n| " + " | ".join(columns) + " |\n|---|---|" + "---:|" * (len(columns) - 2))
    for name, rows in state["families"].items():
        for axis, r in rows.items():
            if axis in ("teacher", "seconds"):
                continue
            ours = list(r["ours"].values())
            alternatives = [f"{v:.3f}" for v in ours[1:]] + ["–"] * (len(EXPERT_IMPORTANCE_SOURCES) - len(ours))
            rand = r["random"]
            print(f"| {name} | {axis} | {rows['teacher']['loss']:.3f} | {ours[0]:.3f} | {' | '.join(alternatives)} | "
                  f"{r['magnitude']:.3f} | {statistics.mean(rand):.3f} ± {statistics.pstdev(rand):.3f} |")


if __name__ == "__main__":
    main()
