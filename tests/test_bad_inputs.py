"""One test per row of docs/bad_inputs.md: each bad input gives exactly the documented error.

The table is the source of truth: rows are read from the markdown file, every row needs a trigger below and every
trigger a row, and the error a trigger raises must match the row's text (``<...>`` stands for a run-specific part
such as a temporary path).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, random_batches, tiny_llama, word_tokenizer


TABLE = os.path.join(REPO_ROOT, "docs", "bad_inputs.md")


def read_table(path: str = TABLE) -> dict[str, str]:
    """``{id: documented error}`` from the rows of the markdown table (``| `id` | where | input | ``error`` |``)."""
    rows = {}
    for line in open(path, encoding="utf-8"):
        match = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*``\s?(.*?)\s?``\s*\|\s*$", line)
        if match:
            assert match.group(1) not in rows, f"duplicate row {match.group(1)}"
            rows[match.group(1)] = match.group(2).replace("\\|", "|")
    return rows


def matches(documented: str, actual: str) -> bool:
    pattern = "".join(".+?" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^<>]+>)", documented))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


class Env:
    """What triggers need: a fresh temporary folder and the tiny recipe assets."""

    def __init__(self, tmp_path, assets, capsys):
        self.tmp, (self.model_dir, self.corpus), self.capsys = tmp_path, assets, capsys

    def path(self, *parts: str) -> str:
        return str(self.tmp.joinpath(*parts))

    def write(self, name: str, text: str) -> str:
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def recipe(self, *flags: str, output_dir: str | None = None, **overrides) -> None:
        from hf_minitron.cli import run_recipe

        from test_recipe import recipe_flags

        run_recipe(recipe_flags(self.model_dir, self.corpus, output_dir or self.path("out"), **overrides) + list(flags))

    def cli(self, *argv: str) -> None:
        from hf_minitron.cli import main

        main(list(argv))


TRIGGERS = {}


def trigger(row_id: str):
    def register(fn):
        TRIGGERS[row_id] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------------------ Python API
@trigger("config-size-zero")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(hidden_size=0)


@trigger("config-bool-layers")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(layers_to_drop=[True, 3])


@trigger("config-duplicate-layers")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(layers_to_drop=[1, 1])


@trigger("config-aggregation")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(batch_aggregation="max")


@trigger("config-depth-criterion")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(depth_criterion="random")


@trigger("config-calibration-samples-text")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(num_calibration_samples="64")


@trigger("config-unknown-field")
def _(env):
    from hf_minitron import MinitronPruneConfig

    os.makedirs(env.path("cfg"))
    env.write("cfg/minitron_prune_config.json", json.dumps({"hidden_sise": 48}))
    MinitronPruneConfig.from_pretrained(env.path("cfg"))


@trigger("config-subfolder-missing")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(hidden_size=48).save_pretrained(env.path("run"))
    MinitronPruneConfig.from_pretrained(env.path("run"), subfolder="search")


@trigger("config-not-a-repo")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig.from_pretrained("no such folder/")


@trigger("config-save-into-file")
def _(env):
    from hf_minitron import MinitronPruneConfig

    MinitronPruneConfig(hidden_size=48).save_pretrained(env.write("taken", "x"))


@trigger("prune-larger-than-source")
def _(env):
    from hf_minitron import MinitronPruneConfig, prune_model

    prune_model(tiny_llama(), MinitronPruneConfig(hidden_size=80, num_calibration_samples=4), calibration_data=random_batches(num=1))


@trigger("prune-heads-not-multiple")
def _(env):
    from hf_minitron import MinitronPruneConfig, prune_model

    prune_model(tiny_llama(), MinitronPruneConfig(num_attention_heads=3), calibration_data=random_batches(num=1))


@trigger("prune-config-dict")
def _(env):
    from hf_minitron import prune_model

    prune_model(tiny_llama(), {"hidden_size": 32})


@trigger("prune-without-scores")
def _(env):
    from hf_minitron import MinitronPruneConfig, prune_model

    prune_model(tiny_llama(), MinitronPruneConfig(hidden_size=32))


@trigger("importance-token-id-too-large")
def _(env):
    from hf_minitron import estimate_importance

    estimate_importance(tiny_llama(), [torch.tensor([5, 200, 7, 9])])  # vocab_size is 128


@trigger("importance-longer-than-positions")
def _(env):
    from hf_minitron import estimate_importance

    estimate_importance(tiny_llama(), [torch.randint(3, 128, (200,))])  # max_position_embeddings is 128


@trigger("importance-quantized")
def _(env):
    from hf_minitron import estimate_importance

    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    estimate_importance(model, random_batches(num=1))


@trigger("importance-unsupported-family")
def _(env):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_minitron import estimate_importance

    estimate_importance(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)), random_batches(num=1))


@trigger("importance-no-data")
def _(env):
    from hf_minitron import estimate_importance

    estimate_importance(tiny_llama(), [])


@trigger("perplexity-token-id-too-large")
def _(env):
    from hf_minitron.evaluation import perplexity

    perplexity(tiny_llama(), [torch.tensor([5, 6, 500])])


@trigger("save-into-file")
def _(env):
    from hf_minitron import MinitronPruneConfig, prune_model, save_pruned_model

    save_pruned_model(prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[0])), env.write("taken", "x"))


@trigger("save-non-empty")
def _(env):
    from hf_minitron import MinitronPruneConfig, prune_model, save_pruned_model

    os.makedirs(env.path("pruned"))
    env.write("pruned/notes.txt", "mine")
    save_pruned_model(prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[0])), env.path("pruned"))


@trigger("texts-eval-fraction-zero")
def _(env):
    from hf_minitron import load_text_file

    load_text_file(env.corpus, "eval", eval_fraction=0)


@trigger("texts-corpus-too-small")
def _(env):
    from hf_minitron.pipeline import load_texts

    load_texts(env.write("small.txt", "one paragraph\n\nanother paragraph\n"))


@trigger("search-target-above-source")
def _(env):
    from hf_minitron.search import search_architectures

    search_architectures(tiny_llama(), None, target_params=1.5)


@trigger("search-no-target")
def _(env):
    from hf_minitron.search import search_architectures

    search_architectures(tiny_llama(), None, target_params=None)


@trigger("search-expert-axis-dense")
def _(env):
    from hf_minitron.search import search_architectures

    search_architectures(tiny_llama(), None, 0.6, search_space={"num_experts": [4]})


@trigger("search-mixed-depth-without-scores")
def _(env):
    from hf_minitron.search import search_architectures

    from test_moe_hybrid import make

    search_architectures(make("nemotron_h"), None, 0.7, search_space={"num_hidden_layers": [6, 5]})


@trigger("push-no-token")
def _(env):
    import huggingface_hub

    from hf_minitron.hub import push_folder_to_hub

    env.monkeypatch.delenv("HF_TOKEN", raising=False)
    env.monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", env.path("no-token"))
    push_folder_to_hub(env.path(), "me/tiny")


@trigger("push-bad-repo-id")
def _(env):
    from hf_minitron.hub import push_folder_to_hub

    push_folder_to_hub(env.path(), "my model", token="hf_x")


# ------------------------------------------------------------------------------------------------ command line
@trigger("cli-unknown-option")
def _(env):
    env.recipe("--hiden_size", "32")


@trigger("cli-not-a-number")
def _(env):
    env.recipe("--hidden_size", "abc")


@trigger("cli-eval-fraction-zero")
def _(env):
    env.recipe(eval_fraction=0)


@trigger("cli-dataset-missing")
def _(env):
    env.recipe(dataset_path=env.path("missing.txt"))


@trigger("cli-corpus-too-small")
def _(env):
    env.recipe(dataset_path=env.write("small.txt", "one paragraph\n\nanother paragraph\n"))


@trigger("cli-seq-length-above-positions")
def _(env):
    env.recipe(seq_length=4096)


@trigger("cli-output-dir-is-a-file")
def _(env):
    env.recipe(output_dir=env.write("taken", "x"))


@trigger("cli-output-dir-read-only")
def _(env):
    env.recipe(output_dir=env.read_only_dir())


@trigger("cli-push-without-repo-id")
def _(env):
    env.recipe("--push_to_hub", "true")


@trigger("cli-push-without-token")
def _(env):
    import huggingface_hub

    env.monkeypatch.delenv("HF_TOKEN", raising=False)
    env.monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", env.path("no-token"))
    env.recipe("--push_to_hub", "true", "--hub_model_id", "me/tiny")


@trigger("cli-target-above-source")
def _(env):
    env.recipe(hidden_size=128)


@trigger("cli-nothing-to-prune")
def _(env):
    from hf_minitron.cli import run_recipe

    run_recipe(["--model_name_or_path", env.model_dir, "--dataset_path", env.corpus, "--output_dir", env.path("out"),
                "--config", env.write("empty.yaml", "max_steps: 1\n")])


@trigger("cli-search-without-target")
def _(env):
    env.recipe("--search", "true")


@trigger("cli-search-retrain-sharded")
def _(env):
    env.monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with fsdp2.yaml exports
    env.recipe("--search", "true", "--target_params", "0.6", "--search_retrain_steps", "4")


@trigger("teacher-correction-sharded-no-folder")
def _(env):
    from hf_minitron.teacher_correction import TeacherCorrectionConfig, correct_teacher

    env.monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = TeacherCorrectionConfig(output_dir=env.path("tc"), original_learning_rate=1e-4, max_steps=1, use_cpu=True, report_to="none")
    correct_teacher(tiny_llama(), args, [], processing_class=word_tokenizer())


@trigger("cli-final-subdir-empty")
def _(env):
    env.recipe("--final_subdir", "")


@trigger("cli-final-subdir-not-ours")
def _(env):
    os.makedirs(env.path("out", "mine"))
    env.write("out/mine/notes.txt", "keep me")
    env.recipe("--final_subdir", "mine")


@trigger("cli-eval-tasks-without-lm-eval")
def _(env):
    env.monkeypatch.setattr("hf_minitron.harness.is_lm_eval_available", lambda: False)
    env.recipe(eval_tasks="minitron_cloze")


@trigger("cli-eval-cloze-without-sentences")
def _(env):
    env.recipe(eval_tasks="minitron_cloze")  # the tiny corpus is `w0 w1 ...` lines: no sentence ends


@trigger("cli-eval-include-path-missing")
def _(env):
    env.recipe(eval_tasks="my_task", eval_include_path=env.path("missing"))


@trigger("cli-eval-include-path-without-tasks")
def _(env):
    os.makedirs(env.path("my_tasks"))
    env.recipe(eval_include_path=env.path("my_tasks"))


@trigger("cli-eval-limit-not-whole")
def _(env):
    env.recipe(eval_limit=2.5)


@trigger("cli-gguf-outtype-unknown")
def _(env):
    env.recipe(gguf_outtypes="f16,q4_k_m")


@trigger("cli-gguf-verify-without-gguf")
def _(env):
    import importlib.util

    find_spec = importlib.util.find_spec
    env.monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    env.recipe(gguf_outtypes="f16")


@trigger("cli-resume-unknown")
def _(env):
    env.recipe("--resume", "sometimes")


@trigger("cli-resume-strict-changed")
def _(env):
    env.recipe("--skip_distillation", "true")
    env.recipe("--skip_distillation", "true", "--resume", "strict", hidden_size=48)


@trigger("cli-gguf-file-missing")
def _(env):
    os.makedirs(env.path("gguf"))
    env.write("gguf/model-Q4_K_M.gguf", "")
    env.cli("evaluate", "--model_name_or_path", env.path("gguf"), "--gguf_file", "model-Q8_0.gguf", "--dataset_path", env.corpus)


@trigger("cli-gguf-file-not-given")
def _(env):
    os.makedirs(env.path("gguf"))
    env.write("gguf/model-Q4_K_M.gguf", "")
    env.cli("evaluate", "--model_name_or_path", env.path("gguf"), "--dataset_path", env.corpus)


@trigger("cli-remote-code-not-trusted")
def _(env):
    env.cli("evaluate", "--model_name_or_path", make_remote_code_model(env.path("remote")), "--dataset_path", env.corpus)


@trigger("cli-config-missing")
def _(env):
    env.cli("prune", "--config", env.path("missing.yaml"))


@trigger("cli-config-without-path")
def _(env):
    env.cli("prune", "--hidden_size", "32", "--config")


@trigger("cli-importance-output-is-a-folder")
def _(env):
    os.makedirs(env.path("scores"))
    env.cli("importance", "--model_name_or_path", env.model_dir, "--dataset_path", env.corpus, "--seq_length", "32",
            "--num_calibration_samples", "4", "--output", env.path("scores"))


@trigger("cli-unknown-command")
def _(env):
    env.cli("frobnicate")


def _cache_on_corpus(env, seq_length: int = 32, max_samples: int = 8) -> str:
    """`hf-minitron cache-teacher` on the tiny recipe teacher and corpus; returns the cache folder."""
    folder = env.path("cache")
    env.cli("cache-teacher", "--model_name_or_path", env.model_dir, "--dataset_path", env.corpus, "--seq_length", str(seq_length),
            "--max_samples", str(max_samples), "--top_k", "4", "--output_dir", folder)
    return folder


def _cache_trainer(env, cache: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_minitron import DistillationConfig, DistillationTrainer, TeacherLogitCache

    student = AutoModelForCausalLM.from_pretrained(env.model_dir)
    tokenizer = kwargs.pop("processing_class", None) or AutoTokenizer.from_pretrained(env.model_dir)
    train = kwargs.pop("train_dataset", None) or TeacherLogitCache(cache).dataset()
    args = DistillationConfig(env.path("run"), teacher_logits_cache=cache, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                              **kwargs)
    return DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=train, processing_class=tokenizer)


@trigger("cache-other-tokenizer")
def _(env):
    _cache_trainer(env, _cache_on_corpus(env), processing_class=word_tokenizer("alpha beta gamma"))


@trigger("cache-other-data")
def _(env):
    from datasets import Dataset

    _cache_trainer(env, _cache_on_corpus(env), train_dataset=Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9, 10]] * 4}))


@trigger("cache-temperature")
def _(env):
    from hf_minitron import DistillationConfig

    DistillationConfig(env.path("run"), teacher_logits_cache=env.path("cache"), temperature=2.0)


@trigger("cache-and-teacher")
def _(env):
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationConfig, DistillationTrainer

    cache = _cache_on_corpus(env)
    model = AutoModelForCausalLM.from_pretrained(env.model_dir)
    DistillationTrainer(model=model, teacher_model=model, args=DistillationConfig(env.path("run"), teacher_logits_cache=cache))


@trigger("cache-incomplete")
def _(env):
    from hf_minitron import TeacherLogitCache

    env.monkeypatch.setenv("HF_MINITRON_CACHE_KILL_AFTER_SHARDS", "1")
    folder = env.path("cache")
    code = (
        "from hf_minitron.cli import main\n"
        f"main(['cache-teacher', '--model_name_or_path', {env.model_dir!r}, '--dataset_path', {env.corpus!r}, '--seq_length', '32', "
        f"'--max_samples', '8', '--rows_per_shard', '2', '--top_k', '4', '--output_dir', {folder!r}])\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    TeacherLogitCache(folder)


@trigger("cli-distill-cache-other-data")
def _(env):
    cache = _cache_on_corpus(env, seq_length=32)
    student = env.path("student")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(env.model_dir).save_pretrained(student)
    AutoTokenizer.from_pretrained(env.model_dir).save_pretrained(student)
    env.cli("distill", "--student", student, "--teacher_logits_cache", cache, "--dataset_path", env.corpus, "--seq_length", "16",
            "--max_samples", "8", "--max_steps", "1", "--output_dir", env.path("distilled"), "--use_cpu", "true", "--bf16", "false",
            "--report_to", "none")


@trigger("cli-recipe-teacher-logits-cache")
def _(env):
    env.recipe("--teacher_logits_cache", env.path("cache"))


@trigger("cli-teacher-cache-temperature")
def _(env):
    env.recipe("--teacher_cache", "true", "--temperature", "2.0")


# ------------------------------------------------------------------------------------------------ YAML
@trigger("yaml-unknown-field")
def _(env):
    env.recipe("--config", env.write("bad.yaml", "hidden_size: 32\nkd_los: forward_kl\n"))


@trigger("yaml-bool-layers")
def _(env):
    env.recipe("--config", env.write("bad.yaml", "layers_to_drop: [true]\n"))


@trigger("yaml-not-a-mapping")
def _(env):
    env.recipe("--config", env.write("bad.yaml", "- hidden_size: 32\n"))


@trigger("yaml-invalid")
def _(env):
    env.recipe("--config", env.write("bad.yaml", "hidden_size: [32\n"))


@trigger("yaml-eval-fraction")
def _(env):
    env.recipe("--config", env.write("bad.yaml", "hidden_size: 32\neval_fraction: 0.0\n"))


@trigger("yaml-depth-criterion")
def _(env):
    env.recipe("--config", env.write("bad.yaml", "hidden_size: 32\ndepth_criterion: cosine\n"))


# ------------------------------------------------------------------------------------------------ helpers
def make_remote_code_model(folder: str) -> str:
    """A tiny local model whose class lives in its own folder (``auto_map``), like a `trust_remote_code` Hub repo."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "configuration_tiny.py"), "w") as f:
        f.write("from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n")
    with open(os.path.join(folder, "modeling_tiny.py"), "w") as f:
        f.write(
            "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyCustomConfig\n\n\n"
            "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
        )
    text = " ".join(f"w{i}" for i in range(100))
    tok = word_tokenizer(text)
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig", "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    json.dump(config, open(path, "w"))
    return folder


def _read_only_dir(env) -> str:
    """A folder this process cannot write to: chmod for a normal user; as root (chmod does not bind root) the
    immutable attribute if this machine allows setting it; otherwise the row cannot be exercised here."""
    path = env.path("read-only")
    os.makedirs(path)
    os.chmod(path, 0o555)
    env.cleanups.append(lambda: os.chmod(path, 0o755))
    if os.access(path, os.W_OK):
        proc = subprocess.run(["chattr", "+i", path], capture_output=True, text=True) if os.path.exists("/usr/bin/chattr") else None
        if proc is not None and proc.returncode == 0:
            env.cleanups.insert(0, lambda: subprocess.run(["chattr", "-i", path], check=True))
        if os.access(path, os.W_OK):
            pytest.skip("running as root, and this filesystem / container cannot make a read-only folder (chmod does not "
                        "bind root; `chattr +i` is not permitted): the read-only row cannot be exercised here")
    return path


ROWS = read_table()


def test_table_and_triggers_agree():
    assert len(ROWS) >= 30
    assert sorted(ROWS) == sorted(TRIGGERS), (sorted(set(ROWS) - set(TRIGGERS)), sorted(set(TRIGGERS) - set(ROWS)))


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_bad_input_gives_the_documented_error(row_id, recipe_assets, tmp_path, capsys, monkeypatch):
    env = Env(tmp_path, recipe_assets, capsys)
    env.monkeypatch, env.cleanups = monkeypatch, []
    env.read_only_dir = lambda: _read_only_dir(env)
    threads = torch.get_num_threads()
    try:
        with pytest.raises((Exception, SystemExit)) as err:
            TRIGGERS[row_id](env)
    finally:
        torch.set_num_threads(threads)
        for cleanup in env.cleanups:
            cleanup()
    if isinstance(err.value, SystemExit):
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()] or ["<no output>"]
        actual = f"exit {err.value.code}: {lines[-1]}"
    else:
        actual = f"{type(err.value).__name__}: {err.value}"
    assert matches(ROWS[row_id], actual), f"\ndocumented: {ROWS[row_id]}\nactual:     {actual}"


def test_remote_code_model_loads_with_the_flag(tmp_path, recipe_assets, capsys):
    """The hint of `cli-remote-code-not-trusted` works: with --trust_remote_code the same model evaluates and prunes."""
    from hf_minitron.cli import main

    folder = make_remote_code_model(str(tmp_path / "remote"))
    common = ["--model_name_or_path", folder, "--dataset_path", recipe_assets[1], "--seq_length", "32", "--trust_remote_code", "true"]
    main(["evaluate", *common, "--max_samples", "2"])
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    main(["prune", *common, "--num_calibration_samples", "4", "--hidden_size", "32", "--output_dir", str(tmp_path / "pruned")])
    pruned = json.load(open(tmp_path / "pruned" / "config.json"))
    assert pruned["hidden_size"] == 32 and pruned["auto_map"]["AutoModelForCausalLM"] == "modeling_tiny.TinyCustomForCausalLM"
    assert os.path.isfile(tmp_path / "pruned" / "modeling_tiny.py")  # the pruned model still loads with its code
    proc = subprocess.run(
        [sys.executable, "-c", "from transformers import AutoModelForCausalLM as A; import sys;"
         f"m = A.from_pretrained({str(tmp_path / 'pruned')!r}, trust_remote_code=True); print(type(m).__name__, m.config.hidden_size)"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.split() == ["TinyCustomForCausalLM", "32"], proc.stderr[-2000:]
