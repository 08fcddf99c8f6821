"""Hidden-channel importance sources, the calibrated norm correction, BOS handling and non-finite scores."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as T

from hf_minitron import MinitronPruneConfig, estimate_importance, get_layout, prune_model
from hf_minitron.config import HIDDEN_IMPORTANCE_SOURCES, NORM_CORRECTIONS
from hf_minitron.data import expected_bos_token_id, pack_texts
from hf_minitron.pruning.plan import layernorm_correction, rms_correction

from conftest import perturb_, random_batches, tiny_llama, word_tokenizer


CALIB = MinitronPruneConfig(num_calibration_samples=8, calibration_batch_size=4)
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)


def _model(config_cls, model_cls, seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb_(model_cls(config_cls(**{**SIZES, **overrides})), seed).eval()


def gemma2():
    return _model(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8, query_pre_attn_scalar=8, tie_word_embeddings=True)


def olmo2():
    return _model(T.Olmo2Config, T.Olmo2ForCausalLM)


def _hooked_sites(model, batches):
    """Reference per-site activations from hooks: {path: [tokens, hidden]} inputs/outputs, real tokens only."""
    layout = get_layout(model)
    out_of, in_of = {}, {}

    def keep(store, key, tensor, mask):
        store.setdefault(key, []).append(tensor.detach()[mask.bool()].float())

    handles, state = [], {}

    def norm_hook(path):
        def hook(module, args, output):
            keep(out_of, path, output, state["mask"])
            keep(in_of, path, args[0], state["mask"])

        return hook

    for path, module, _ in layout.norm_modules_with_roles(model):
        handles.append(module.register_forward_hook(norm_hook(path)))
    for i, layer in enumerate(layout.decoder_layers(model)):
        for p in (layout.q_proj or layout.qkv_proj, layout.gate_proj or layout.gate_up_proj or layout.up_proj):
            key = f"{layout.layers}.{i}.{p}"
            handles.append(layer.get_submodule(p).register_forward_pre_hook(
                lambda m, a, k=key: keep(in_of, k, a[0], state["mask"])))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, k=f"{layout.layers}.{i}": keep(out_of, k, o[0] if isinstance(o, tuple) else o, state["mask"])
            and None))
    with torch.no_grad():
        for ids in batches:
            mask = torch.ones_like(ids)
            state["mask"] = mask
            model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in out_of.items()}, {k: torch.cat(v) for k, v in in_of.items()}


def _agg(x, seq_len):
    """Default aggregation (mean over a sample's tokens, L2 over samples) of [tokens, hidden] with fixed-length samples."""
    return x.unflatten(0, (-1, seq_len)).abs().mean(1).square().sum(0).sqrt()


@pytest.mark.parametrize("make", [gemma2, olmo2], ids=["gemma2", "olmo2"])
def test_every_hidden_source_matches_hand_computed_sites(make):
    model = make()
    layout = get_layout(model)
    batches = random_batches(num=2, batch=4, seq=16)
    scores = estimate_importance(model, batches, CALIB, show_progress=False)
    outputs, inputs = _hooked_sites(model, batches)
    roles = {p: r for p, _, r in layout.norm_modules_with_roles(model)}
    norm = {p: _agg(outputs[p], 16) for p in roles}
    # matmul_inputs: what q/k/v, gate/up and lm_head read (OLMo2: the residual itself, no pre-norm).
    matmul = sum(_agg(inputs[f"{layout.layers}.{i}.{p}"], 16)
                 for i in range(3) for p in (layout.q_proj, layout.gate_proj)) + norm[layout.final_norm]
    expected = {
        "matmul_inputs": matmul,
        "pre_sublayer": matmul - norm[layout.final_norm],
        "all_norms": sum(norm.values()),
        "all_norms_normalized": sum(v / v.mean() for v in norm.values()),
        "residual": sum(_agg(outputs[f"{layout.layers}.{i}"], 16) for i in range(3)),
    }
    assert set(expected) == set(HIDDEN_IMPORTANCE_SOURCES)
    for source, ref in expected.items():
        torch.testing.assert_close(scores.hidden_scores(source), ref, atol=1e-4, rtol=1e-4, msg=source)
    torch.testing.assert_close(scores.hidden, expected["matmul_inputs"], atol=1e-4, rtol=1e-4)
    # Sandwich norms are not matmul inputs: on Gemma2 the default leaves them out, so it differs from all_norms.
    if layout.attention_output_norm is not None and layout.attention_norm is not None:
        assert not torch.allclose(expected["matmul_inputs"], expected["all_norms"])
    # Norm statistics: the mean over every token of each norm's input squared.
    for k, path in enumerate(scores.metadata["norm_paths"]):
        torch.testing.assert_close(scores.norm_input_sq[k], inputs[path].square().mean(0), atol=1e-5, rtol=1e-4)


def test_pruning_uses_the_configured_source():
    model = gemma2()
    scores = estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)
    for source in HIDDEN_IMPORTANCE_SOURCES:
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48, hidden_importance_source=source), importance=scores)
        kept = pruned.minitron_provenance["kept"]["hidden"]
        assert kept == sorted(torch.topk(scores.hidden_scores(source), 48).indices.tolist()), source


# ------------------------------------------------------------------------------------------ norm correction
def test_rms_correction_is_sqrt_ratio_when_dropped_channels_are_silent():
    energy = torch.rand(64) + 0.1
    kept = list(range(0, 64, 4)) + list(range(1, 64, 4))  # 32 of 64
    energy[[c for c in range(64) if c not in kept]] = 0.0
    assert rms_correction(energy, kept) == pytest.approx(math.sqrt(64 / 32), rel=1e-12)


def test_rms_correction_matches_hand_computed_kept_rms_on_random_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 40, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 40, dtype=torch.float64)
    kept = [1, 3, 4, 8, 9, 15, 20, 21, 22, 30, 33, 39]
    factor = rms_correction(x.square().mean(0), kept)
    # Hand-computed: the RMS over the kept channels (pooled over tokens) divided by the RMS over all of them.
    full = math.sqrt(sum(float(x[t, c]) ** 2 for t in range(500) for c in range(40)) / (500 * 40))
    part = math.sqrt(sum(float(x[t, c]) ** 2 for t in range(500) for c in kept) / (500 * len(kept)))
    assert factor == pytest.approx(part / full, rel=1e-9)
    # So the corrected gain makes the kept-channel RMS match the full RMS: part / factor == full.
    assert part / factor == pytest.approx(full, rel=1e-9)


def test_layernorm_correction_matches_hand_computed_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64) * 2 + torch.linspace(-1, 3, 24, dtype=torch.float64)
    kept = [0, 2, 5, 6, 7, 11, 12, 17, 19, 23]
    scale, shift = layernorm_correction(x.square().mean(0), x.mean(0), kept)
    m = x.mean(0)
    mu, mu_k = m.mean().item(), m[kept].mean().item()
    var = x.square().mean(0).mean().item() - mu**2
    var_k = x.square().mean(0)[kept].mean().item() - mu_k**2
    assert scale == pytest.approx(math.sqrt(var_k / var), rel=1e-12)
    assert shift == pytest.approx((mu_k - mu) / math.sqrt(var), rel=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_calibrated_correction_is_exact_on_silent_residual_channels(tied):
    # Dead residual channels carry no energy, so the calibrated factor is exactly sqrt(H / H'): logits unchanged.
    model = tiny_llama(tie_word_embeddings=tied, rms_norm_eps=1e-12)
    channels = [0, 5, 9, 13, 22, 31, 40, 41, 50, 52, 60, 63, 2, 3, 4, 6]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0
    ids = random_batches(num=1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    scores = estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)
    for mode in ("calibrated", "sqrt"):
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48, rescale_norms=mode), importance=scores)
        with torch.no_grad():
            torch.testing.assert_close(pruned(ids).logits, ref, atol=1e-4, rtol=1e-4, msg=mode)
    assert pruned.minitron_provenance["kept"]["norm_correction"] == "sqrt" and "norm_scales" not in pruned.minitron_provenance["kept"]


def test_calibrated_gain_is_the_recorded_energy_share():
    model = gemma2()
    layout = get_layout(model)
    scores = estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=40), importance=scores)
    kept = pruned.minitron_provenance["kept"]["hidden"]
    recorded = pruned.minitron_provenance["kept"]["norm_scales"]
    for k, path in enumerate(scores.metadata["norm_paths"]):
        factor = rms_correction(scores.norm_input_sq[k], kept)
        assert recorded[path][0] == pytest.approx(factor)
        before = 1 + model.get_submodule(path).weight[kept]  # Gemma norms apply (1 + w)
        after = 1 + pruned.get_submodule(path).weight
        if path == layout.final_norm:  # tied Gemma: the final norm also absorbs the embedding-scale compensation
            after = after * math.sqrt(64) / math.sqrt(40)
        torch.testing.assert_close(after, before * factor, atol=1e-5, rtol=1e-5)


def test_layernorm_family_applies_scale_and_bias_shift():
    model = _model(T.NemotronConfig, T.NemotronForCausalLM, head_dim=8)
    scores = estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)
    assert scores.norm_input_mean is not None
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48), importance=scores)
    kept = pruned.minitron_provenance["kept"]["hidden"]
    path = "model.layers.1.input_layernorm"
    k = scores.metadata["norm_paths"].index(path)
    scale, shift = layernorm_correction(scores.norm_input_sq[k], scores.norm_input_mean[k], kept)
    src, dst = model.get_submodule(path), pruned.get_submodule(path)
    gain = 1 + src.weight[kept]  # LayerNorm1P
    torch.testing.assert_close(1 + dst.weight, gain * scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dst.bias, src.bias[kept] + gain * shift, atol=1e-5, rtol=1e-5)


def test_named_corrections_and_legacy_booleans():
    assert MinitronPruneConfig().rescale_norms == "calibrated"
    assert MinitronPruneConfig(rescale_norms=True).rescale_norms == "sqrt"
    assert MinitronPruneConfig(rescale_norms=False).rescale_norms == "none"
    assert MinitronPruneConfig(rescale_norms="false").rescale_norms == "none"
    assert set(NORM_CORRECTIONS) == {"calibrated", "sqrt", "none"}
    with pytest.raises(ValueError, match=r"rescale_norms.*calibrated.*sqrt.*none"):
        MinitronPruneConfig(rescale_norms="always")
    with pytest.raises(ValueError, match=r"hidden_importance_source.*matmul_inputs"):
        MinitronPruneConfig(hidden_importance_source="norms")


def test_scores_without_norm_statistics_fall_back_to_sqrt():
    from hf_minitron.importance.baselines import magnitude_importance

    model = tiny_llama()
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48), importance=magnitude_importance(model))
    assert pruned.minitron_provenance["kept"]["norm_correction"] == "sqrt"


def test_scores_roundtrip_keeps_every_site(tmp_path):
    model = olmo2()
    scores = estimate_importance(model, random_batches(num=1), CALIB, show_progress=False)
    scores.save(tmp_path / "s.safetensors")
    from hf_minitron import ImportanceScores

    loaded = ImportanceScores.load(tmp_path / "s.safetensors")
    for source in HIDDEN_IMPORTANCE_SOURCES:
        torch.testing.assert_close(loaded.hidden_scores(source), scores.hidden_scores(source))
    assert loaded.q_norm_input_sq.shape == (3, 64) and loaded.k_norm_input_sq.shape == (3, 16)
    assert loaded.metadata["norm_roles"] == scores.metadata["norm_roles"]


def test_olmo2_head_pruning_uses_calibrated_projection_norm_scale():
    model = olmo2()
    scores = estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(num_attention_heads=4), importance=scores)
    heads = pruned.minitron_provenance["kept"]["heads"][0]
    rows = [h * 8 + d for h in heads for d in range(8)]
    factor = rms_correction(scores.q_norm_input_sq[0], rows)
    torch.testing.assert_close(
        pruned.model.layers[0].self_attn.q_norm.weight, model.model.layers[0].self_attn.q_norm.weight[rows] * factor
    )


# ------------------------------------------------------------------------------------------ non-finite scores
def test_non_finite_scores_name_the_unit_and_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[5] = float("nan")
    with pytest.raises(ValueError, match=r"Non-finite importance scores.*MLP neurons of layer 2.*float32 or bfloat16"):
        estimate_importance(model, random_batches(num=1), CALIB, show_progress=False)


def test_loaded_non_finite_scores_are_refused_before_pruning():
    model = tiny_llama()
    scores = estimate_importance(model, random_batches(num=1), CALIB, show_progress=False)
    scores.heads[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"attention heads of layer 1"):
        prune_model(copy.deepcopy(model), MinitronPruneConfig(num_attention_heads=4), importance=scores)


# ------------------------------------------------------------------------------------------ BOS
def _bos_tokenizer(text):
    from tokenizers import processors

    tok = word_tokenizer(text)
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok, bos


def test_pack_texts_starts_every_sample_with_bos_when_the_model_expects_one():
    text = " ".join(f"w{i % 50}" for i in range(300))
    tok, bos = _bos_tokenizer(text)
    assert expected_bos_token_id(tok) == bos
    blocks = pack_texts([text], tok, seq_length=32)
    assert all(b[0] == bos and b.numel() == 32 and (b[1:] != bos).all() for b in blocks)
    # Every text token appears once, in order, after the BOS tokens are removed.
    stream = torch.cat([b[1:] for b in blocks]).tolist()
    assert stream == tok(text, add_special_tokens=False)["input_ids"][: len(stream)]
    assert len(stream) == 31 * len(blocks)
    plain = word_tokenizer(text)  # adds no BOS: samples are the raw stream
    assert expected_bos_token_id(plain) is None
    assert all(b.numel() == 32 for b in pack_texts([text], plain, 32))
    no_bos = pack_texts([text], tok, seq_length=32, add_bos=False)
    assert no_bos[0][0] != bos
