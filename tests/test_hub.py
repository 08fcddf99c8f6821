"""Model card and Hub push; only the HTTP boundary of huggingface_hub is stubbed (nothing reaches the Hub)."""

from __future__ import annotations

import importlib
import json
import os

import huggingface_hub
import pytest

from hf_minitron import MinitronPruneConfig, prune_model, save_pruned_model
from hf_minitron.cli import run_recipe
from hf_minitron.hub import push_folder_to_hub, render_model_card

from conftest import tiny_llama
from test_recipe import recipe_flags


def _httpx():
    for name in ("httpx2", "httpx"):  # huggingface_hub 2.x ships its own httpx fork
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("no httpx transport available")


@pytest.fixture
def fake_hub():
    """A minimal in-memory Hub: repo creation, pre-upload and commit endpoints."""
    httpx = _httpx()
    hub = {"requests": [], "commits": []}

    def handler(request):
        path = request.url.path
        hub["requests"].append((request.method, path))
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/me/tiny", "name": "me/tiny"})
        if path == "/api/validate-yaml":  # model-card metadata check
            return httpx.Response(200, json={})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            hub["commits"].append(sorted(l["value"]["path"] for l in lines if l["key"] == "file"))
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny/commit/1", "commitOid": "1" * 40})
        return httpx.Response(404, json={"error": f"not stubbed: {path}"})

    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    huggingface_hub.close_session()
    yield hub
    huggingface_hub.set_client_factory(lambda: httpx.Client())
    huggingface_hub.close_session()


EXPECTED_RECIPE_UPLOAD = [
    "README.md", "config.json", "generation_config.json", "importance_scores.safetensors", "minitron_config.json",
    "minitron_results.json", "model.safetensors", "plots/distillation_loss.png", "plots/importance.png", "tokenizer.json",
    "tokenizer_config.json",
]


def test_push_uploads_only_model_files(tmp_path, fake_hub):
    model = prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[0]))
    folder = save_pruned_model(model, tmp_path / "pruned")
    (tmp_path / "pruned" / "README.md").write_text(render_model_card({"base_model": "tiny", **model.minitron_provenance}))
    # What a training run leaves beside a model: none of it may reach the Hub.
    for junk in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json", "notes.txt",
                 "checkpoint-2/model.safetensors", "checkpoint-2/optimizer.pt", "pruned/config.json", "plots/raw.csv"):
        os.makedirs(os.path.dirname(os.path.join(folder, junk)), exist_ok=True)
        with open(os.path.join(folder, junk), "w") as f:
            f.write("x")
    url = push_folder_to_hub(folder, "me/tiny", token="hf_fake_token")
    assert url.endswith("/commit/1")
    assert fake_hub["commits"] == [["README.md", "config.json", "generation_config.json", "minitron_config.json", "model.safetensors"]]
    assert ("POST", "/api/repos/create") in fake_hub["requests"]


def test_recipe_push_uploads_exactly_the_final_model_files(recipe_assets, tmp_path, fake_hub):
    out = str(tmp_path / "run")
    argv = recipe_flags(*recipe_assets, out, max_steps=2, save_steps=1) + [
        "--push_to_hub", "true", "--hub_model_id", "me/tiny", "--hub_token", "hf_fake_token"
    ]
    results = run_recipe(argv)
    assert results["hub_commit"].endswith("/commit/1")
    assert os.path.isdir(os.path.join(out, "distill_checkpoints", "checkpoint-2"))  # exists locally, never pushed
    assert fake_hub["commits"] == [EXPECTED_RECIPE_UPLOAD]
    card = open(os.path.join(out, "final", "README.md")).read()
    assert 'from_pretrained("me/tiny")' in card and "| pruned (zero-shot) |" in card


def test_push_without_credentials_fails_before_any_request(tmp_path, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert huggingface_hub.get_token() is None
    model = prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[0]))
    folder = save_pruned_model(model, tmp_path / "pruned")
    with pytest.raises(ValueError, match=r"needs a token with write access and none was found: run `hf auth login`"):
        push_folder_to_hub(folder, "me/tiny")
    assert fake_hub["requests"] == []


def test_push_without_repo_id_is_a_clear_error(recipe_assets, tmp_path):
    with pytest.raises(ValueError, match="hub_model_id"):
        run_recipe(recipe_flags(*recipe_assets, str(tmp_path / "r"), max_steps=1) + ["--push_to_hub", "true"])
    assert not os.path.exists(tmp_path / "r")  # refused before anything was created


def test_prune_config_from_a_hub_subfolder(tmp_path):
    """`from_pretrained(repo, subfolder=...)` asks for `<repo>/resolve/main/<subfolder>/minitron_prune_config.json`."""
    httpx = _httpx()
    body = json.dumps(MinitronPruneConfig(hidden_size=48).to_dict()).encode()
    asked = []

    def handler(request):
        asked.append((request.method, request.url.path))
        if request.url.path == "/me/tiny/resolve/main/search/minitron_prune_config.json":
            return httpx.Response(200, headers={"x-repo-commit": "a" * 40, "etag": '"1"', "content-length": str(len(body))},
                                  content=body if request.method == "GET" else b"")
        return httpx.Response(404, headers={"x-error-code": "EntryNotFound"}, json={"error": "not found"})

    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    huggingface_hub.close_session()
    try:
        config = MinitronPruneConfig.from_pretrained("me/tiny", subfolder="search", cache_dir=str(tmp_path / "cache"))
        assert config.hidden_size == 48
        assert ("GET", "/me/tiny/resolve/main/search/minitron_prune_config.json") in asked
        with pytest.raises(ValueError, match=r"The Hub repo 'me/tiny' \(subfolder 'other'\) has no minitron_prune_config.json"):
            MinitronPruneConfig.from_pretrained("me/tiny", subfolder="other", cache_dir=str(tmp_path / "cache"))
    finally:
        huggingface_hub.set_client_factory(lambda: httpx.Client())
        huggingface_hub.close_session()
    # The same call on a local folder reads <folder>/<subfolder>/minitron_prune_config.json.
    MinitronPruneConfig(hidden_size=40).save_pretrained(tmp_path / "local" / "search")
    assert MinitronPruneConfig.from_pretrained(tmp_path / "local", subfolder="search").hidden_size == 40
