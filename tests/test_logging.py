"""hf-minitron's logger follows transformers' verbosity; library calls leave global state alone."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model, save_pruned_model
from hf_minitron.logging import get_logger, get_verbosity, set_verbosity

from conftest import random_batches, run_python, tiny_llama


@pytest.fixture
def restore_verbosity():
    before_hf, before_ours = transformers.logging.get_verbosity(), logging.getLogger("hf_minitron").level
    yield
    transformers.logging.set_verbosity(before_hf)
    logging.getLogger("hf_minitron").setLevel(before_ours)


def test_transformers_verbosity_reaches_our_loggers(restore_verbosity, capsys):
    set_verbosity(None)
    ours = get_logger("hf_minitron.test")
    # Modules that still call transformers' get_logger(__name__) land in the same hierarchy.
    theirs = transformers.utils.logging.get_logger("hf_minitron.importance.test")
    transformers.logging.set_verbosity_warning()
    ours.info("not shown")
    transformers.logging.set_verbosity_info()
    ours.info("info via transformers")
    theirs.info("module logger via transformers")
    assert get_verbosity() == logging.INFO
    transformers.logging.set_verbosity_error()
    ours.warning("not shown either")
    set_verbosity("info")  # our own level wins over transformers'
    ours.info("own level")
    set_verbosity(None)
    ours.info("following transformers again: not shown")
    err = capsys.readouterr().err.splitlines()
    assert err == ["[hf_minitron] info via transformers", "[hf_minitron] module logger via transformers", "[hf_minitron] own level"]
    assert get_logger("my_script").name == "hf_minitron.my_script"
    with pytest.raises(ValueError, match="Unknown log level"):
        set_verbosity("loud")


def test_importance_leaves_the_callers_gguf_marker_and_threads_alone(tmp_path):
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    torch.set_num_threads(1)
    config = MinitronPruneConfig(intermediate_size=64, num_calibration_samples=4)
    scores = estimate_importance(model, random_batches(num=1), config)
    assert model.config.quantization_config == {"quant_method": "gguf", "gguf_file": "x.gguf"}
    assert torch.get_num_threads() == 1
    pruned = prune_model(model, config, importance=scores)  # prune_model changes its model: the marker goes
    assert getattr(pruned.config, "quantization_config", None) is None
    save_pruned_model(pruned, tmp_path / "out")
    # A dequantized GGUF model that was not pruned still saves, and keeps its marker in memory.
    teacher = tiny_llama()
    teacher.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    save_pruned_model(teacher, tmp_path / "teacher")
    assert "quantization_config" not in (tmp_path / "teacher" / "config.json").read_text()
    assert teacher.config.quantization_config["quant_method"] == "gguf"


def test_plots_do_not_choose_a_matplotlib_backend(tmp_path):
    pytest.importorskip("matplotlib")
    proc = run_python(
        "import sys, torch\n"
        "from hf_minitron.importance import ImportanceScores\n"
        "from hf_minitron.plots import plot_importance, plot_loss_curves\n"
        "s = ImportanceScores(heads=torch.rand(2, 4), neurons=torch.rand(2, 8), hidden=torch.rand(16), block_importance=torch.rand(2))\n"
        f"plot_importance(s, {str(tmp_path / 'i.png')!r})\n"
        f"plot_loss_curves([{{'step': 1, 'kd_loss': 2.0}}, {{'step': 2, 'kd_loss': 1.0}}], {str(tmp_path / 'l.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules, torch.get_num_threads())\n",
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": __import__("conftest").REPO_ROOT},
    )
    assert proc.stdout.split() == ["False", "1"]
    for name in ("i.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
