"""Crash-safe writes: temporary sibling + fsync + rename; overwrite keeps the old copy until the new one is in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from hf_minitron import MinitronPruneConfig, prune_model, save_pruned_model
from hf_minitron.atomic import KILL_ENV, atomic_write_json, clean_stale_temp, staged_dir
from hf_minitron.hub import write_model_card

from conftest import REPO_ROOT, tiny_llama


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staged_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).write("new")
        assert not target.exists()  # nothing visible before the block ends
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError):
        with staged_dir(target, overwrite=True) as tmp:
            (open(os.path.join(tmp, "a.txt"), "w")).write("half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        with staged_dir(target):
            pass


def test_kill_between_the_two_renames_restores_the_old_folder(tmp_path):
    """SIGKILL after the old folder was moved aside, before the new one arrived: the next writer restores it."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    code = (
        "from hf_minitron.atomic import staged_dir\n"
        f"with staged_dir({str(target)!r}, overwrite=True) as tmp:\n"
        "    open(tmp + '/weights', 'w').write('new')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, KILL_ENV: "commit:model", "PYTHONPATH": REPO_ROOT},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["new", "old"]  # .tmp-new-*, .tmp-old-*
    clean_stale_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "weights").read_text() == "old"


def test_stale_temporaries_are_cleaned_but_live_ones_kept(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".tmp-new-{dead}-abcd1234-pruned").mkdir()
    (tmp_path / f".tmp-file-{dead}-abcd1234-x.json").write_text("{")
    (tmp_path / f".tmp-new-{alive}-abcd1234-pruned").mkdir()
    (tmp_path / ".tmp-search-legacy").mkdir()  # an older version's name: only removed in a folder we own
    removed = clean_stale_temp(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == [f".tmp-file-{dead}-abcd1234-x.json", f".tmp-new-{dead}-abcd1234-pruned"]
    clean_stale_temp(tmp_path, all_entries=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-new-{alive}-abcd1234-pruned"]


def test_save_pruned_model_overwrite_keeps_old_model_when_the_new_save_fails(tmp_path, monkeypatch):
    model = prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[0]))
    folder = save_pruned_model(model, tmp_path / "pruned")
    before = sorted(os.listdir(folder))
    (tmp_path / f".tmp-new-{_dead_pid()}-00000000-pruned").mkdir()  # left by a killed save

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_pruned_model(model, folder, overwrite=True)
    assert sorted(os.listdir(folder)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # the stale temporary was cleaned too


def test_small_files_are_written_atomically(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    path = MinitronPruneConfig(hidden_size=48).save_pretrained(tmp_path / "cfg")
    assert MinitronPruneConfig.from_pretrained(os.path.dirname(path)).hidden_size == 48
    write_model_card(tmp_path, {"base_model": "tiny"})
    assert (tmp_path / "README.md").read_text().startswith("---")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "a.json", "cfg"]
