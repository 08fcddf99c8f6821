"""Every registered family: width + depth pruning is exact where it should be and reloads with stock transformers.

One table (``FAMILIES``) holds a tiny config per family (hidden 64, MLP 128, 8 heads, 2 KV heads, head_dim 8,
4 layers) with each family's specifics switched on (biases, sliding windows + ``layer_types``, softcapping,
multipliers, tied embeddings). Planting reads the registry layout, so the tests contain no family ``if``-chains.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
import transformers as T

from hf_minitron import MinitronPruneConfig, estimate_importance, get_layout, prune_model, save_pruned_model, supported_model_types
from hf_minitron.architectures import infer_layout, probe_norm_kind

from conftest import perturb_, random_batches, run_python


@dataclass
class Family:
    config_cls: type
    model_cls: type
    overrides: dict = field(default_factory=dict)
    eps_field: str = "rms_norm_eps"
    # Config values that must survive pruning unchanged (family scalars).
    preserved: tuple[str, ...] = ()


SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
FAMILIES: dict[str, Family] = {
    "llama": Family(T.LlamaConfig, T.LlamaForCausalLM, dict(head_dim=8)),
    "mistral": Family(T.MistralConfig, T.MistralForCausalLM, dict(head_dim=8, sliding_window=6), preserved=("sliding_window",)),
    "qwen2": Family(T.Qwen2Config, T.Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=6, layer_types=SLIDING)),
    "qwen3": Family(T.Qwen3Config, T.Qwen3ForCausalLM, dict(head_dim=8, attention_bias=True, tie_word_embeddings=True)),
    "gemma": Family(T.GemmaConfig, T.GemmaForCausalLM, dict(head_dim=8, tie_word_embeddings=True)),
    "gemma2": Family(
        T.Gemma2Config, T.Gemma2ForCausalLM,
        dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=6, layer_types=SLIDING, attn_logit_softcapping=5.0,
             final_logit_softcapping=3.0, tie_word_embeddings=True),
        preserved=("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"),
    ),
    "gemma3_text": Family(
        T.Gemma3TextConfig, T.Gemma3ForCausalLM,
        dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=6, layer_types=SLIDING, tie_word_embeddings=False),
    ),
    "phi3": Family(T.Phi3Config, T.Phi3ForCausalLM),
    "olmo2": Family(T.Olmo2Config, T.Olmo2ForCausalLM),
    "granite": Family(
        T.GraniteConfig, T.GraniteForCausalLM,
        dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
        preserved=("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"),
    ),
    "nemotron": Family(T.NemotronConfig, T.NemotronForCausalLM, dict(head_dim=8), eps_field="norm_eps"),
}
NAMES = list(FAMILIES)
DONE_WHEN = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3)
CALIB = MinitronPruneConfig(num_calibration_samples=8, calibration_batch_size=4)
INPUT = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(7))
HD = 8


def make(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(seed)
    model = family.model_cls(family.config_cls(**{**SIZES, **family.overrides, **overrides}))
    return perturb_(model, seed).eval()


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(ids).logits


def scores_for(model):
    return estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)


# ---------------------------------------------------------------------------- planting (layout-driven)
def _rows(linear, rows, value=0.0):
    linear.weight[rows] = value
    if linear.bias is not None:
        linear.bias[rows] = value


@torch.no_grad()
def _silence_heads(layer, layout, heads, kv_heads=()):
    """Zero the q rows (and k/v rows of whole KV groups) and o_proj columns of heads: their output is exactly 0,
    and a whole-projection q/k norm (OLMo2) sees exact zeros there."""
    q = [h * HD + d for h in heads for d in range(HD)]
    kv = [g * HD + d for g in kv_heads for d in range(HD)]
    if layout.qkv_proj is not None:
        fused = layer.get_submodule(layout.qkv_proj)
        q_width, kv_width = 8 * HD, 2 * HD
        _rows(fused, q + [q_width + r for r in kv] + [q_width + kv_width + r for r in kv])
    else:
        _rows(layer.get_submodule(layout.q_proj), q)
        if kv:
            _rows(layer.get_submodule(layout.k_proj), kv)
            _rows(layer.get_submodule(layout.v_proj), kv)
    layer.get_submodule(layout.o_proj).weight[:, q] = 0


@torch.no_grad()
def _silence_neurons(layer, layout, neurons):
    """Zero the 'up' rows: act(gate) * 0 = 0 (gated), relu2(0) = 0 (Nemotron)."""
    if layout.gate_up_proj is not None:
        _rows(layer.get_submodule(layout.gate_up_proj), [128 + n for n in neurons])
    else:
        _rows(layer.get_submodule(layout.up_proj), neurons)


@torch.no_grad()
def _silence_hidden(model, layout, channels):
    """Residual channels that are exactly zero everywhere: embedding columns and o/down output rows."""
    model.get_submodule(layout.embed_tokens).weight[:, channels] = 0
    for layer in layout.decoder_layers(model):
        _rows(layer.get_submodule(layout.o_proj), channels)
        _rows(layer.get_submodule(layout.down_proj), channels)


@torch.no_grad()
def _silence_layer(layer, layout):
    for path in (layout.o_proj, layout.down_proj):
        _rows(layer.get_submodule(path), slice(None))


# ---------------------------------------------------------------------------- tests
def test_every_family_is_registered_and_matches_its_modules():
    assert set(NAMES) <= set(supported_model_types())
    for name in NAMES:
        model = make(name)
        layout = get_layout(model)
        assert name in layout.model_types
        layout.check_model(model)


@pytest.mark.parametrize("name", NAMES)
def test_generic_inference_agrees_with_the_registry(name):
    # The fallback re-derives each entry from module names, shapes and probed norm formulas: the registry's
    # data (fused projections, norm kind and list, q/k norm scope, embedding scale) must agree with it.
    model = make(name)
    registered, inferred = get_layout(model), infer_layout(model)
    for attr in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj",
                 "q_norm", "k_norm", "norm_kind", "embed_scale"):
        assert getattr(inferred, attr) == getattr(registered, attr), attr
    assert inferred.layer_norm_roles == registered.layer_norm_roles
    if registered.q_norm is not None:
        assert inferred.qk_norm_scope == registered.qk_norm_scope
    assert probe_norm_kind(model.get_submodule(registered.final_norm)) == registered.norm_kind


@pytest.mark.parametrize("name", NAMES)
def test_norm_roles_feed_the_projections_the_registry_says(name):
    # Pre-sublayer norms: their output is exactly what q/k/v (gate/up) read. Post-sublayer norms: their input is
    # exactly what o_proj (down_proj) wrote. No pre-norm (OLMo2): the attention reads the layer's input itself.
    model = make(name)
    layout = get_layout(model)
    layer = layout.decoder_layers(model)[1]
    seen = {}

    def record(key):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen[key] = (x.detach(), (output[0] if isinstance(output, tuple) else output).detach())
        return hook

    attn_in = layout.q_proj or layout.qkv_proj
    mlp_in = layout.gate_proj or layout.gate_up_proj or layout.up_proj
    paths = {*layout.layer_norms, attn_in, mlp_in, layout.o_proj, layout.down_proj}
    handles = [layer.get_submodule(p).register_forward_hook(record(p), with_kwargs=True) for p in paths]
    handles.append(layer.register_forward_hook(record("layer"), with_kwargs=True))
    logits(model)
    for h in handles:
        h.remove()
    expected = {  # role -> (tensor the norm touches, tensor it must equal)
        "pre_attention": lambda n: (seen[n][1], seen[attn_in][0]),
        "pre_mlp": lambda n: (seen[n][1], seen[mlp_in][0]),
        "post_attention": lambda n: (seen[n][0], seen[layout.o_proj][1]),
        "post_mlp": lambda n: (seen[n][0], seen[layout.down_proj][1]),
    }
    for norm, role in layout.layer_norm_roles.items():
        torch.testing.assert_close(*expected[role](norm), atol=0, rtol=0, msg=f"{name}: {norm} is not {role}")
    if layout.attention_norm is None:
        torch.testing.assert_close(seen[attn_in][0], seen["layer"][0], atol=0, rtol=0)
    assert set(layout.layer_norms) == {
        n for n, child in layer.named_children() if n not in (layout.attention, layout.mlp) and hasattr(child, "weight")
    }, "every norm of the layer has a role"


@pytest.mark.parametrize("name", NAMES)
def test_pruning_nothing_is_exact(name):
    model = make(name)
    ref = logits(model)
    scores = scores_for(model)
    assert torch.equal(logits(prune_model(copy.deepcopy(model), MinitronPruneConfig(), importance=scores)), ref)
    same = MinitronPruneConfig(**{k: SIZES[k] for k in DONE_WHEN})
    assert torch.equal(logits(prune_model(copy.deepcopy(model), same, importance=scores)), ref)


@pytest.mark.parametrize("name", NAMES)
def test_done_when_target_shapes_and_config(name):
    model = make(name)
    source_config = copy.deepcopy(model.config)
    pruned = prune_model(model, MinitronPruneConfig(**DONE_WHEN), importance=scores_for(model))
    layout = get_layout(pruned)
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers, c.head_dim) == (48, 96, 4, 1, 3, 8)
    layout.check_model(pruned)  # every module's shape follows the new config
    layers = layout.decoder_layers(pruned)
    assert [l.get_submodule(layout.attention).layer_idx for l in layers] == [0, 1, 2]
    assert all(l.get_submodule(layout.attention).num_key_value_groups == 4 for l in layers)
    kept = pruned.minitron_provenance["kept"]["layers"]
    for field_name in layout.per_layer_config_fields:
        values = getattr(source_config, field_name, None)
        if isinstance(values, list):
            assert getattr(c, field_name) == [values[i] for i in kept]
    for field_name in FAMILIES[name].preserved:
        assert getattr(c, field_name) == getattr(source_config, field_name)
    scale = layout.embed_scale_value(48)
    if scale is not None:  # Gemma: the cached embedding scale follows the new hidden size, as a reload computes it
        assert float(pruned.get_submodule(layout.embed_tokens).embed_scale) == pytest.approx(scale)
    assert logits(pruned).shape == (2, 12, 128) and logits(pruned).isfinite().all()


@pytest.mark.parametrize("name", NAMES)
def test_planted_units_prune_with_unchanged_logits(name):
    # Dead MLP neurons, a dead KV group (with its 4 query heads), dead residual channels and a dead layer, all
    # found by the importance scores and pruned at once to the done-when target: the logits must not move.
    # A negligible epsilon: it is the one term of a norm that sees the channel count change.
    family = FAMILIES[name]
    model = make(name, **{family.eps_field: 1e-12})
    layout = get_layout(model)
    # LayerNorm centres by the mean, so a zero residual channel is not dead after a LayerNorm (Nemotron): there,
    # hidden pruning is never exact and only the other units are planted.
    plant_hidden = not layout.norm_kind.startswith("layernorm")
    dead_neurons = [3, 17, 40, 41, 90, 127, 5, 64] + list(range(100, 124))  # 32 of 128
    dead_channels = [0, 5, 9, 13, 22, 31, 40, 41, 50, 52, 60, 63, 2, 3, 4, 6]  # 16 of 64
    for layer in layout.decoder_layers(model):
        _silence_neurons(layer, layout, dead_neurons)
        _silence_heads(layer, layout, heads=[4, 5, 6, 7], kv_heads=[1])
    if plant_hidden:
        _silence_hidden(model, layout, dead_channels)
    _silence_layer(layout.decoder_layers(model)[2], layout)
    ref = logits(model)

    scores = scores_for(model)
    target = dict(DONE_WHEN, hidden_size=48 if plant_hidden else None)
    pruned = prune_model(model, MinitronPruneConfig(**target), importance=scores)
    kept = pruned.minitron_provenance["kept"]
    assert kept["layers"] == [0, 1, 3]
    assert kept["kv_heads"] == [[0]] * 3 and all(set(h) <= {0, 1, 2, 3} for h in kept["heads"])
    assert all(not set(n) & set(dead_neurons) for n in kept["neurons"])
    if plant_hidden:
        assert not set(kept["hidden"]) & set(dead_channels)
    torch.testing.assert_close(logits(pruned), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_query_heads_pruned_within_kv_groups(name):
    # Two query heads per KV group are dead (zero q rows and o_proj columns); their scores are planted (a head
    # with zero q still attends uniformly, so its o_proj input is not zero). 8 -> 4 heads keeps both KV groups.
    model = make(name, **{FAMILIES[name].eps_field: 1e-12})
    layout = get_layout(model)
    dead = [1, 2, 5, 7]
    for layer in layout.decoder_layers(model):
        _silence_heads(layer, layout, heads=dead)
    ref = logits(model)
    scores = scores_for(model)
    scores.heads[:, dead] = -1.0
    pruned = prune_model(model, MinitronPruneConfig(num_attention_heads=4), importance=scores)
    assert pruned.minitron_provenance["kept"]["heads"] == [[0, 3, 4, 6]] * 4
    assert pruned.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(pruned), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_generation_with_cache_matches_without_after_depth_pruning(name):
    # Prompt + new tokens (8 + 8) exceed the sliding window (6) of the sliding-window families, whose re-indexed
    # `layer_types` decide which cache layers slide.
    model = make(name)
    pruned = prune_model(model, MinitronPruneConfig(layers_to_drop=[0, 2]))
    ids = INPUT[:1, :8]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        with_cache = pruned.generate(ids, use_cache=True, **kwargs)
        without = pruned.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape[1] == 16
    assert torch.equal(with_cache, without)


FRESH_ALL = """
import sys, torch
from transformers import AutoModelForCausalLM
jobs = torch.load({jobs!r})
ids = torch.load({ids!r})
out = {{}}
for name, folder in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[name] = (type(model).__name__, model(ids).logits)
torch.save(out, {out!r})
assert not any(m.startswith("hf_minitron") for m in sys.modules), "hf_minitron was imported"
"""


def test_every_family_reloads_in_a_fresh_process_with_identical_logits(tmp_path):
    # The done-when target on each family -> save_pretrained -> stock AutoModelForCausalLM in ONE fresh process.
    expected, jobs = {}, {}
    for name in NAMES:
        model = make(name)
        pruned = prune_model(model, MinitronPruneConfig(**DONE_WHEN), importance=scores_for(model))
        expected[name] = (type(pruned).__name__, logits(pruned))
        jobs[name] = save_pruned_model(pruned, tmp_path / name)
    torch.save(jobs, tmp_path / "jobs.pt")
    torch.save(INPUT, tmp_path / "ids.pt")
    run_python(FRESH_ALL.format(jobs=str(tmp_path / "jobs.pt"), ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.pt")))
    reloaded = torch.load(tmp_path / "out.pt")
    for name in NAMES:
        assert reloaded[name][0] == expected[name][0]
        torch.testing.assert_close(reloaded[name][1], expected[name][1], atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------- Gemma embedding scale
@pytest.mark.parametrize("tied", [True, False])
def test_gemma_embedding_scale_is_compensated(tied):
    # Gemma multiplies embeddings by sqrt(hidden_size); pruning hidden changes that factor. The kept embedding
    # rows absorb sqrt(H_old / H_new) (and, when tied, the final norm gives it back) so dead-channel pruning is
    # exact; without the compensation the logits would move.
    model = make("gemma", tie_word_embeddings=tied, rms_norm_eps=1e-12)
    layout = get_layout(model)
    _silence_hidden(model, layout, list(range(16)))
    ref = logits(model)
    scores = scores_for(model)
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48), importance=scores)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    assert float(pruned.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(48))
    torch.testing.assert_close(logits(pruned), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- generic fallback
def _tiny(config_cls, model_cls, **overrides):
    torch.manual_seed(0)
    return perturb_(model_cls(config_cls(**{**SIZES, "head_dim": 8, **overrides}))).eval()


def test_generic_fallback_prunes_an_unregistered_llama_like_family(tmp_path):
    # SmolLM3 is not registered; its per-layer NoPE list must be found and re-indexed like `layer_types`.
    model = _tiny(T.SmolLM3Config, T.SmolLM3ForCausalLM, no_rope_layers=[1, 0, 1, 1])
    assert "smollm3" not in supported_model_types()
    layout = get_layout(model)
    assert set(layout.per_layer_config_fields) == {"no_rope_layers", "layer_types"}
    ref = logits(model)
    assert torch.equal(logits(prune_model(copy.deepcopy(model), MinitronPruneConfig(), importance=scores_for(model))), ref)
    pruned = prune_model(model, MinitronPruneConfig(hidden_size=48, num_attention_heads=4, layers_to_drop=[1]), importance=scores_for(model))
    assert pruned.config.no_rope_layers == [1, 1, 1]
    pruned.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), atol=1e-6, rtol=0)


def test_generic_fallback_non_gated_mlp():
    model = _tiny(T.ArceeConfig, T.ArceeForCausalLM)  # up_proj -> relu2 -> down_proj, like Nemotron
    layout = get_layout(model)
    assert layout.gate_proj is None and layout.up_proj == "mlp.up_proj"
    pruned = prune_model(model, MinitronPruneConfig(intermediate_size=64), importance=scores_for(model))
    assert pruned.model.layers[0].mlp.up_proj.weight.shape == (64, 64)


def test_unmatched_structure_error_lists_registered_families():
    # Cohere runs attention and MLP in parallel from one norm (and its q_norm has a weight per head and channel):
    # not a structure the registry knows.
    model = _tiny(T.CohereConfig, T.CohereForCausalLM, use_qk_norm=True)
    with pytest.raises(ValueError, match=r"Unsupported architecture 'cohere'.*parallel block.*supports model_type in \[.*'gemma2'.*'nemotron'.*'qwen3'"):
        prune_model(model, MinitronPruneConfig(hidden_size=48), calibration_data=random_batches(num=1))


def test_target_that_stock_transformers_cannot_rebuild_is_refused_before_any_change():
    # Helium builds o_proj as hidden x hidden, so heads * head_dim must stay == hidden_size: a dry run on the meta
    # device catches it before any weight is touched.
    model = _tiny(T.HeliumConfig, T.HeliumForCausalLM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"would not reload with stock transformers.*o_proj.*not modified"):
        prune_model(model, MinitronPruneConfig(hidden_size=48, num_attention_heads=4), importance=scores_for(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.hidden_size == 64


def test_phi3_longrope_config_that_would_not_reload_is_refused():
    # Phi-3's config validates longrope factors against hidden_size // num_attention_heads (not head_dim): a target
    # that changes that ratio cannot be reloaded, and the dry run's config round trip says so up front.
    factors = dict(short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[1.0, 1.5, 2.0, 2.5])
    model = make("phi3", max_position_embeddings=256, original_max_position_embeddings=64,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, **factors})
    scores = scores_for(model)
    with pytest.raises(ValueError, match=r"(?s)pruned config fails to load.*short_factor.*not modified"):
        prune_model(model, MinitronPruneConfig(hidden_size=48, num_attention_heads=4), importance=scores)
    pruned = prune_model(model, MinitronPruneConfig(hidden_size=32, num_attention_heads=4), importance=scores)  # ratio kept
    assert pruned.config.hidden_size // pruned.config.num_attention_heads == pruned.config.head_dim


# ---------------------------------------------------------------------------- depth: per-layer config fields
@pytest.mark.parametrize("name", NAMES)
def test_every_per_layer_config_list_is_registry_data(name):
    # A config list with one entry per layer must be re-indexed when layers go: the registry has to name it.
    model = make(name)
    layout = get_layout(model)
    per_layer = {k for k, v in model.config.to_dict().items() if isinstance(v, list) and len(v) == SIZES["num_hidden_layers"]}
    assert per_layer <= set(layout.per_layer_config_fields), per_layer - set(layout.per_layer_config_fields)


LAYER_SCORED = {
    "gemma2": {},
    "gemma3_text": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None),
}


@pytest.mark.parametrize("name", list(LAYER_SCORED))
def test_layer_perplexity_scores_the_model_depth_pruning_produces(name):
    # Sliding-window families: without re-indexing `layer_types`, a layer's score would come from a model whose later
    # layers run their neighbour's attention type. Windows (4-6 tokens) shorter than the 16-token samples make it count.
    from hf_minitron.evaluation import perplexity

    model = make(name, **LAYER_SCORED[name])
    types = model.config.layer_types
    assert len(set(types)) == 2, types
    batches = random_batches(num=2, batch=4, seq=16)
    config = MinitronPruneConfig(num_calibration_samples=8, calibration_batch_size=4, depth_criterion="perplexity")
    scores = estimate_importance(model, batches, config, show_progress=False)
    samples = [row for b in batches for row in b]
    for k in range(SIZES["num_hidden_layers"]):
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(layers_to_drop=[k]))
        expected = perplexity(pruned, samples, seq_length=16, batch_size=4, show_progress=False)
        assert scores.layer_perplexity[k].item() == pytest.approx(expected, rel=1e-4), k
    assert model.config.layer_types == types and len(model.model.layers) == SIZES["num_hidden_layers"]  # restored


def test_qwen2_max_window_layers_follows_depth_pruning(tmp_path):
    # Layers below max_window_layers use full attention: after pruning it counts the kept layers below it, so a config
    # rebuilt from it (as vLLM or an older transformers would, from max_window_layers) gives the same attention types.
    model = make("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2, layer_types=None)
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    pruned = prune_model(model, MinitronPruneConfig(layers_to_drop=[0, 3]))
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 1
    derived = T.Qwen2Config(**{**pruned.config.to_dict(), "layer_types": None})
    assert derived.layer_types == pruned.config.layer_types
    pruned.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- layer-streaming importance
@pytest.mark.parametrize("name", NAMES)
def test_layer_streaming_importance_equals_the_in_memory_pass(name):
    from hf_minitron import estimate_importance_streaming

    model = make(name)
    batches = random_batches(num=2, batch=4, seq=12)
    ref = estimate_importance(model, batches, CALIB, show_progress=False)
    got = estimate_importance_streaming(model, batches, CALIB, device="cpu", offload_activations=(name == "llama"), show_progress=False)
    ref_t, got_t = ref.tensors(), got.tensors()
    assert set(ref_t) == set(got_t)
    for key, value in ref_t.items():
        torch.testing.assert_close(got_t[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert got.metadata == ref.metadata
    torch.testing.assert_close(logits(model), logits(make(name)), atol=0, rtol=0)  # model untouched, hooks gone


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_layer_streaming_from_a_checkpoint_on_the_meta_device(name, tmp_path):
    from accelerate import init_empty_weights

    from hf_minitron import estimate_importance_streaming

    model = make(name)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: exercises the safetensors index
    batches = random_batches(num=2, batch=4, seq=12)
    ref = estimate_importance(model, batches, CALIB, show_progress=False)
    with init_empty_weights():
        empty = T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(tmp_path))
    got = estimate_importance_streaming(empty, batches, CALIB, device="cpu", checkpoint=str(tmp_path), show_progress=False)
    for key, value in ref.tensors().items():
        torch.testing.assert_close(got.tensors()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert all(p.device.type == "meta" for p in empty.parameters())  # every layer freed again
    with pytest.raises(ValueError, match="checkpoint="):
        estimate_importance_streaming(empty, batches, CALIB, device="cpu", show_progress=False)
