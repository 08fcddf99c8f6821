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


def test_push_pruned_folder_uploads_everything(tmp_path, fake_hub):
    model = prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[0]))
    folder = save_pruned_model(model, tmp_path / "pruned")
    (tmp_path / "pruned" / "README.md").write_text(render_model_card({"base_model": "tiny", **model.minitron_provenance}))
    url = push_folder_to_hub(folder, "me/tiny", token="hf_fake_token")
    assert url.endswith("/commit/1")
    assert fake_hub["commits"] == [sorted(os.listdir(folder))]
    assert ("POST", "/api/repos/create") in fake_hub["requests"]


def test_recipe_push_to_hub_uploads_final_folder_with_card(recipe_assets, tmp_path, fake_hub):
    out = str(tmp_path / "run")
    argv = recipe_flags(*recipe_assets, out, max_steps=2, save_steps=10) + [
        "--push_to_hub", "true", "--hub_model_id", "me/tiny", "--hub_token", "hf_fake_token"
    ]
    results = run_recipe(argv)
    assert results["hub_commit"].endswith("/commit/1")
    (uploaded,) = fake_hub["commits"]
    for name in ("README.md", "config.json", "model.safetensors", "minitron_config.json", "importance_scores.safetensors", "tokenizer.json"):
        assert name in uploaded
    card = open(os.path.join(out, "README.md")).read()
    assert 'from_pretrained("me/tiny")' in card and "| pruned (zero-shot) |" in card


def test_push_without_repo_id_is_a_clear_error(recipe_assets, tmp_path):
    with pytest.raises(ValueError, match="hub_model_id"):
        run_recipe(recipe_flags(*recipe_assets, str(tmp_path / "r"), max_steps=1) + ["--push_to_hub", "true"])
