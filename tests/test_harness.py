"""Task accuracy through lm-evaluation-harness: the offline cloze task, `evaluate_tasks`, the CLI, card sections."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import yaml

from conftest import tiny_llama, word_tokenizer
from hf_minitron import build_cloze_examples, evaluate_tasks, write_cloze_task
from hf_minitron.card_sections import render_gguf_files, render_how_to_run, render_task_table
from hf_minitron.cloze import CLOZE_TASK_NAME
from hf_minitron.harness import LM_EVAL_MISSING, TaskEvaluation


# Short documents (contexts stay under the tiny model's 128 positions) with capitalised sentence starts.
DOCS = [
    "The quick brown fox jumps over the lazy dog. The lazy dog sleeps under the old tree. "
    "The old tree stands near the river. A small bird sings in the tree.",
    "The river runs past the quiet town. People in the town walk to the river. "
    "The town has a small market. The market opens early every day.",
    "A cat sits on the warm wall. The wall is near the market. The cat watches the bird. "
    "The bird flies over the river.",
]


def test_cloze_examples_exact():
    examples = build_cloze_examples(["Intro words here. The cat sat on the mat and looked at the quiet garden outside."])
    assert examples == [{"context": "Intro words here. The cat sat on the mat and looked at the quiet garden", "target": "outside"}]
    # Sentences of fewer than 4 words and contexts under 8 words give no example; abbreviations are no sentence end.
    assert build_cloze_examples(["One two three four five six seven eight nine. Go now. Then we all stop."]) == [
        {"context": "One two three four five six seven eight", "target": "nine"},
        {"context": "One two three four five six seven eight nine. Go now. Then we all", "target": "stop"},
    ]
    wiki = build_cloze_examples([" = Title = \n\n Visit the house of Dr . Smith and stay in the big house near the sea . "])
    assert [e["target"] for e in wiki] == ["sea"]  # "Dr ." is skipped; WikiText's " ." counts
    # Hard-wrapped lines join; the context is cut at a word boundary.
    wrapped = build_cloze_examples(["alpha beta gamma delta\nepsilon zeta eta theta iota kappa lambda mu nu xi omicron."],
                                   max_context_chars=30, min_context_words=3)
    assert wrapped == [{"context": "iota kappa lambda mu nu xi", "target": "omicron"}]


def test_cloze_max_examples_and_errors(tmp_path):
    examples = build_cloze_examples(DOCS)
    assert len(examples) == 10  # 12 sentences; two open a document with under 8 words of context
    assert build_cloze_examples(DOCS, max_examples=3) == [examples[0], examples[3], examples[6]]
    with pytest.raises(ValueError, match="no cloze example"):
        build_cloze_examples(["code_only = 1", ""])
    with pytest.raises(ValueError, match="task_name"):
        write_cloze_task(tmp_path, DOCS, task_name="bad name")


def test_write_cloze_task_is_an_lm_eval_task_folder(tmp_path):
    path = write_cloze_task(tmp_path / "tasks", DOCS, task_name="my_cloze")
    config = yaml.safe_load(open(path))
    assert config["task"] == "my_cloze" and config["output_type"] == "loglikelihood"
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(data_file)
    rows = [json.loads(line) for line in open(data_file)]
    assert rows == build_cloze_examples(DOCS) and config["metadata"]["num_examples"] == len(rows)
    assert not [n for n in os.listdir(tmp_path / "tasks") if ".tmp" in n]  # written atomically
    default = write_cloze_task(tmp_path / "default")  # the embedded corpus's held-out split
    assert os.path.basename(default) == f"{CLOZE_TASK_NAME}.yaml"


def test_missing_lm_eval_names_the_extra(monkeypatch, tiny_model):
    import hf_minitron.harness as harness

    monkeypatch.setattr(harness, "is_lm_eval_available", lambda: False)
    with pytest.raises(ImportError, match=r"hf-minitron\[eval\]"):
        evaluate_tasks(tiny_model, word_tokenizer())
    assert "pip install 'hf-minitron[eval]'" in LM_EVAL_MISSING


def _own_cloze_scores(model, tokenizer, examples) -> tuple[float, float]:
    """Greedy last-word accuracy and word-level perplexity computed directly (what lm-eval must report)."""
    correct, total_ll = 0, 0.0
    with torch.no_grad():
        for e in examples:
            ctx = tokenizer(e["context"], add_special_tokens=False).input_ids
            tgt = tokenizer(" " + e["target"], add_special_tokens=False).input_ids
            logits = model(torch.tensor([ctx + tgt])).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
            target = torch.tensor(tgt)
            correct += int(bool((logits.argmax(-1) == target).all()))
            total_ll += logits.gather(-1, target[:, None]).sum().item()
    return correct / len(examples), math.exp(-total_ll / len(examples))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_evaluate_tasks_matches_direct_computation_offline(no_network):
    pytest.importorskip("lm_eval")
    tokenizer = word_tokenizer(" ".join(DOCS).replace(".", " ."))
    model = tiny_llama(seed=3, vocab_size=len(tokenizer))
    # A few steps on two of the documents, so that some greedy answers are right (accuracy neither 0 nor 1).
    ids = torch.tensor([tokenizer(" ".join(DOCS[:2]), add_special_tokens=False).input_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()  # the mode must be restored afterwards
    for _ in range(40):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pad_before = tokenizer.pad_token
    result = evaluate_tasks(model, tokenizer, cloze_texts=DOCS, batch_size=3)
    assert model.training and tokenizer.pad_token == pad_before

    examples = build_cloze_examples(DOCS)
    acc, ppl = _own_cloze_scores(model.eval(), tokenizer, examples)
    assert 0 < acc < 1
    row = result.get(CLOZE_TASK_NAME, "acc")
    assert row.n == len(examples) == 10 and row.higher_is_better is True and row.num_fewshot == 0
    assert row.value == pytest.approx(acc, abs=1e-9)
    assert row.stderr == pytest.approx(math.sqrt(acc * (1 - acc) / (len(examples) - 1)), abs=1e-9)
    assert result.get(CLOZE_TASK_NAME, "perplexity").value == pytest.approx(ppl, rel=1e-4)
    assert result.lm_eval_version.startswith("0.4")
    assert TaskEvaluation.from_dict(json.loads(json.dumps(result.to_dict()))).to_dict() == result.to_dict()


def test_evaluate_tasks_local_yaml_and_errors(tmp_path, no_network):
    pytest.importorskip("lm_eval")
    tokenizer = word_tokenizer(" ".join(DOCS))
    model = tiny_llama(vocab_size=len(tokenizer))
    folder = tmp_path / "my_tasks"
    write_cloze_task(folder, DOCS[:2], task_name="my_cloze")
    result = evaluate_tasks(model, tokenizer, "my_cloze", include_path=folder, limit=2)
    assert {r.metric for r in result.results} == {"acc", "perplexity"} and result.get("my_cloze", "acc").n == 2
    with pytest.raises(ValueError, match="Unknown lm-eval task"):
        evaluate_tasks(model, tokenizer, ["my_clozee"], include_path=folder)
    with pytest.raises(ValueError, match="not a folder"):
        evaluate_tasks(model, tokenizer, ["my_cloze"], include_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        evaluate_tasks(model, tokenizer, [])


def test_cli_evaluate_with_tasks(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from hf_minitron.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 4))
    tokenizer = word_tokenizer(" ".join(DOCS))
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out_json = tmp_path / "results.json"
    capsys.readouterr()
    main(["evaluate", "--model_name_or_path", str(model_dir), "--dataset_path", str(corpus), "--eval_dataset_path", str(corpus),
          "--seq_length", "32", "--tasks", "minitron_cloze", "--limit", "5", "--output_json", str(out_json)])
    assert '"perplexity"' in capsys.readouterr().out
    saved = json.load(open(out_json))
    assert saved["perplexity"] > 1 and saved["tasks"]["tasks"] == ["minitron_cloze"]
    assert {r["metric"] for r in saved["tasks"]["results"]} == {"acc", "perplexity"}
    assert all(r["n"] == 5 for r in saved["tasks"]["results"])


def test_card_sections():
    evaluations = {
        "teacher": [{"task": "minitron_cloze", "metric": "acc", "value": 0.6, "stderr": 0.05, "n": 75, "num_fewshot": 0,
                     "higher_is_better": True},
                    {"task": "minitron_cloze", "metric": "perplexity", "value": 12.5, "stderr": 1.25, "n": 75,
                     "num_fewshot": 0, "higher_is_better": False}],
        "pruned (zero-shot)": {"results": [{"task": "minitron_cloze", "metric": "acc", "value": 0.1, "stderr": None, "n": 75,
                                            "num_fewshot": 0, "higher_is_better": True}]},
    }
    table = render_task_table(evaluations)
    lines = table.splitlines()
    assert lines[0].startswith("## Task accuracy")
    assert lines[2] == "| task | metric | n | shots | teacher | pruned (zero-shot) |"
    assert lines[4] == "| minitron_cloze | acc ↑ | 75 | 0 | 60.0% ± 5.0 | 10.0% |"
    assert lines[5] == "| minitron_cloze | perplexity ↓ | 75 | 0 | 12.50 ± 1.25 |  |"
    assert render_task_table({}) == "" and render_gguf_files([]) == ""

    files = render_gguf_files([{"path": "/x/m-q8_0.gguf", "outtype": "q8_0", "size_bytes": 3 * 1024**2, "max_abs_dlogit": 0.0123,
                                "max_abs_logit": 21.0, "top1_agreement": 0.99, "tokenizer_matches": True,
                                "tensor_types": {"F16": 151, "F32": 61, "Q8_0": 60}},
                               {"path": "/x/m-f16.gguf", "outtype": "f16", "size_bytes": 5 * 1024**2}])
    assert ("| m-q8_0.gguf | q8_0 | 3.0 MiB | F16 ×151, F32 ×61, Q8_0 ×60 | max \\|Δlogit\\| 0.0123 (largest \\|logit\\| 21.0), same top-1 token at 99.0% "
            "of positions |") in files
    assert "| m-f16.gguf | f16 | 5.0 MiB |  | not checked |" in files

    block = render_how_to_run("me/small", "small-q8_0.gguf", tested={"transformers": "reloaded and evaluated"})
    assert "**transformers** *Tested: reloaded and evaluated.*" in block
    assert "**vLLM** *Not tested by hf-minitron.*" in block and "**llama.cpp** *Not tested by hf-minitron.*" in block
    assert "vllm serve me/small" in block and "--hf-file small-q8_0.gguf" in block and "hf.co/me/small:Q8_0" in block
    assert "llama.cpp" not in render_how_to_run("me/small")  # no GGUF file, no llama.cpp section
    with pytest.raises(ValueError, match="Unknown engine"):
        render_how_to_run("me/small", tested={"ollama": "ran"})
