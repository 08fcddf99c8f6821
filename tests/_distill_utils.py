"""Offline helpers for the distillation tests: a word-level tokenizer, a tiny teacher and a pruned student."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


VOCAB = 96


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def llama_config(hidden=64, inter=128, layers=4, heads=8, kv=2, vocab=VOCAB, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False, **kw,
    )


def make_teacher(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(llama_config(**kw))
    with torch.no_grad():  # a peaky teacher: random init is nearly uniform, which leaves little to distill
        teacher.lm_head.weight.mul_(40.0)
    return teacher.eval()


def prune_student(teacher: LlamaForCausalLM, keep_layers=(0, 1, 3), hidden: int = 32) -> LlamaForCausalLM:
    """Depth + width pruning by slicing (first `hidden` channels, kept layers), with Minitron provenance."""
    tc = teacher.config
    cfg = copy.deepcopy(tc)
    cfg.num_hidden_layers, cfg.hidden_size = len(keep_layers), hidden
    student = LlamaForCausalLM(cfg)
    sd_t = teacher.state_dict()
    new = {}
    for k, v in student.state_dict().items():
        src = k
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            src = k.replace(f"model.layers.{i}.", f"model.layers.{keep_layers[i]}.", 1)
        t = sd_t[src]
        new[k] = t[tuple(slice(0, n) for n in v.shape)].clone()
    student.load_state_dict(new)
    student.minitron_provenance = {
        "kept": {"layers": list(keep_layers)},
        "source_config": {"num_hidden_layers": tc.num_hidden_layers},
    }
    return student


def make_dataset(n: int = 32, length: int = 24, vocab: int = VOCAB, seed: int = 0, ragged: bool = True) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        L = length - (i % 5 if ragged else 0)
        rows.append(torch.randint(3, vocab, (L,), generator=g).tolist())
    return Dataset.from_dict({"input_ids": rows})
