"""MoE and hybrid Mamba families: experts, expert width, shared experts, Mamba heads and channels, hidden and depth.

One table (``FAMILIES``) holds a tiny config per family (hidden 64, 8 heads, 2 KV heads, head_dim 8, 8 experts of
width 32, Mamba 8 heads x 8 channels in 2 groups) with its specifics switched on (dense layers between MoE layers,
shared experts, multipliers, block-type lists). Planting reads the registry layout, so the tests hold no family
``if``-chains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import transformers as T

from hf_minitron import MinitronPruneConfig, estimate_importance, get_layout, prune_model, save_pruned_model
from hf_minitron.importance import ImportanceScores

from conftest import perturb_, random_batches, run_python


@dataclass
class Family:
    config_cls: type
    model_cls: type
    overrides: dict
    done_when: dict  # a target that prunes every axis the family has, depth included
    planted: dict  # the target after planting dead units (see test_planted_dead_units_rank_lowest_and_prune_exactly)
    eps_fields: tuple[str, ...] = ("rms_norm_eps",)
    preserved: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2)
PLANTED_MOE = dict(num_experts=6, moe_intermediate_size=24, hidden_size=48)
MAMBA_NEMO = dict(mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8)
MAMBA_GRANITE = dict(mamba_n_heads=16, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8, mamba_expand=2)
FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family(
        T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
        dict(MOE, head_dim=8, intermediate_size=96, moe_intermediate_size=32, num_experts=8, mlp_only_layers=[1],
             tie_word_embeddings=True),
        dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64, num_experts=4,
             moe_intermediate_size=16, num_hidden_layers=3),
        dict(PLANTED_MOE, intermediate_size=72),
    ),
    "qwen2_moe": Family(
        T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
        dict(MOE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
             decoder_sparse_step=2, use_sliding_window=True, sliding_window=6, max_window_layers=2),
        dict(hidden_size=48, intermediate_size=64, num_experts=4, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, num_hidden_layers=3),
        dict(PLANTED_MOE, intermediate_size=72, shared_expert_intermediate_size=40),
    ),
    "mixtral": Family(
        T.MixtralConfig, T.MixtralForCausalLM,
        dict(MOE, head_dim=8, intermediate_size=32, num_local_experts=8),
        dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, num_experts=4, moe_intermediate_size=16,
             num_hidden_layers=3),
        PLANTED_MOE,
    ),
    "olmoe": Family(  # q_norm is built hidden_size wide: heads x head_dim must stay equal to hidden_size
        T.OlmoeConfig, T.OlmoeForCausalLM,
        dict(MOE, intermediate_size=32, num_experts=8),
        dict(hidden_size=48, num_attention_heads=6, num_experts=4, moe_intermediate_size=16, num_hidden_layers=3),
        dict(num_experts=6, moe_intermediate_size=24),
    ),
    "nemotron_h": Family(
        T.NemotronHConfig, T.NemotronHForCausalLM,
        dict(MOE, **MAMBA_NEMO, head_dim=8, intermediate_size=96, n_routed_experts=8, moe_intermediate_size=32,
             moe_shared_expert_intermediate_size=48,
             layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "full_attention"]),
        dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64, num_experts=4,
             moe_intermediate_size=16, shared_expert_intermediate_size=24, mamba_num_heads=4, mamba_head_dim=6,
             num_hidden_layers=5),
        dict(PLANTED_MOE, intermediate_size=72, shared_expert_intermediate_size=40, mamba_num_heads=6, mamba_head_dim=6),
        eps_fields=("layer_norm_epsilon",),
    ),
    "granitemoehybrid": Family(  # the Mamba width is mamba_expand x hidden_size with an integer expand
        T.GraniteMoeHybridConfig, T.GraniteMoeHybridForCausalLM,
        dict(MOE, **MAMBA_GRANITE, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8,
             layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
             embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
        dict(hidden_size=32, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             mamba_num_heads=8, num_hidden_layers=3),
        dict(PLANTED_MOE, shared_expert_intermediate_size=40, mamba_num_heads=12),
        preserved=("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"),
    ),
    "falcon_h1": Family(  # parallel Mamba + attention in every layer, muP multipliers on the Mamba in_proj rows
        T.FalconH1Config, T.FalconH1ForCausalLM,
        dict(head_dim=8, intermediate_size=96, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
             mamba_d_state=8, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
             ssm_multipliers=[0.5, 1.5, 0.7, 1.2, 0.9], mlp_multipliers=[0.8, 1.3], key_multiplier=0.9,
             attention_in_multiplier=1.1, attention_out_multiplier=0.7, ssm_in_multiplier=1.2, ssm_out_multiplier=0.8,
             embedding_multiplier=2.0, lm_head_multiplier=0.5),
        dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1, mamba_num_heads=4,
             mamba_head_dim=6, num_hidden_layers=3),
        dict(hidden_size=48, intermediate_size=72, mamba_num_heads=6, mamba_head_dim=6),
        preserved=("ssm_multipliers", "mlp_multipliers", "key_multiplier", "embedding_multiplier", "lm_head_multiplier"),
    ),
}
NAMES = list(FAMILIES)
CALIB = MinitronPruneConfig(num_calibration_samples=8, calibration_batch_size=4)
INPUT = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(7))
CONSTANT = 5  # the residual channel planted constant (routes tokens away from dead experts)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning threads slow each
    # millisecond-scale forward down a hundredfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(seed)
    model = family.model_cls(family.config_cls(**{**SIZES, **family.overrides, **overrides}))
    return perturb_(model, seed).eval()


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def scores_for(model):
    return estimate_importance(model, random_batches(num=2), CALIB, show_progress=False)


def parts_of(model):
    layout = get_layout(model)
    return [layout.layer_parts(layer) for layer in layout.decoder_layers(model)]


# ---------------------------------------------------------------------------- planting (layout-driven)
def _zero_rows(linear, rows):
    linear.weight[rows] = 0
    if getattr(linear, "bias", None) is not None:
        linear.bias[rows] = 0


@torch.no_grad()
def _residual_writers(model, layout):
    """(tensor, axis) of every weight that writes the residual stream: its hidden-axis output rows."""
    for layer in layout.decoder_layers(model):
        parts = layout.layer_parts(layer)
        paths = []
        if "attention" in parts:
            paths.append(layout.o_proj)
        if "mlp" in parts:
            paths.append(layout.down_proj)
        if "shared_expert" in parts:
            paths.append(layout.moe.shared_down_proj)
        if "mamba" in parts:
            paths.append(layout.mamba.out_proj)
        for path in paths:
            module = layer.get_submodule(path)
            yield module.weight, 0
            if getattr(module, "bias", None) is not None:
                yield module.bias, 0
        if "moe" in parts:
            yield getattr(layer.get_submodule(layout.moe.experts), layout.moe.expert_down_proj), 1  # [E, H, I]


@torch.no_grad()
def _plant_hidden(model, layout, dead: list[int], constant: int) -> None:
    """Dead residual channels (exactly zero everywhere) and one constant channel (the embedding writes 1, nothing
    else writes it, every norm passes it with gain 1): it gives routers a per-token-constant input."""
    embed = model.get_submodule(layout.embed_tokens).weight
    embed[:, dead] = 0
    embed[:, constant] = 1.0
    for tensor, axis in _residual_writers(model, layout):
        tensor.index_fill_(axis, torch.tensor(dead + [constant]), 0.0)
    for _, norm in layout.norm_modules(model):
        norm.weight[constant] = 0.0 if layout.norm_one_plus else 1.0


@torch.no_grad()
def _plant_experts(layer, layout, dead_experts: list[int], dead_neurons: list[int], constant: int) -> None:
    """Dead experts: a zero output and a router row that only reads the constant channel, strongly negatively, so the
    router never picks them (probability ~e^-40). Dead neurons: zero 'up' rows in every expert."""
    moe = layout.moe
    router = layer.get_submodule(moe.router).weight  # [E, H]
    router[:, constant] = 0.0
    router[dead_experts] = 0.0
    router[dead_experts, constant] = -CONSTANT
    experts = layer.get_submodule(moe.experts)
    getattr(experts, moe.expert_down_proj)[dead_experts] = 0.0
    up = getattr(experts, moe.expert_gate_up_proj or moe.expert_up_proj)  # [E, (2)I, H]: zero the 'up' half rows
    width = getattr(experts, moe.expert_down_proj).shape[2]
    up[:, [r + (width if moe.gated else 0) for r in dead_neurons]] = 0.0


@torch.no_grad()
def _balance_routers(model, layout, dead_experts: list[int], constant: int) -> None:
    """Make every live expert win tokens: a random-init router's logits are dominated by a per-expert offset (its
    row times the mean input), so the same two experts take every token. Remove each live row's component along the
    mean router input (measured on the calibration data, layer by layer) and scale the rows up."""
    layers = layout.decoder_layers(model)
    for i, parts in enumerate(parts_of(model)):
        if "moe" not in parts:
            continue
        seen = []
        router = layers[i].get_submodule(layout.moe.router)
        handle = router.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        for batch in random_batches(num=2):
            model(batch, use_cache=False)
        handle.remove()
        mean = torch.cat(seen).float().mean(0)
        mean[constant] = 0.0
        live = [e for e in range(router.weight.shape[0]) if e not in dead_experts]
        rows = router.weight[live].float()
        rows -= (rows @ mean)[:, None] * mean / mean.square().sum()
        router.weight[live] = (rows * 30.0).to(router.weight.dtype)


@torch.no_grad()
def _plant_mlp_neurons(layer, paths: dict, dead: list[int], width: int) -> None:
    """act(gate) * 0 = 0 (gated, fused or not), relu2(0) = 0 (non-gated)."""
    if paths["gate_up_proj"] is not None:
        _zero_rows(layer.get_submodule(paths["gate_up_proj"]), [width + n for n in dead])
    else:
        _zero_rows(layer.get_submodule(paths["up_proj"]), dead)


@torch.no_grad()
def _plant_mamba(layer, layout, sizes, dead_heads: list[int], dead_channels: list[int]) -> None:
    """Dead Mamba heads / head channels: zero gate (z) rows, so y * silu(z) = 0 enters the gated norm and out_proj,
    and zero out_proj columns."""
    head_dim = sizes["mamba_head_dim"]
    rows = sorted({h * head_dim + d for h in dead_heads for d in range(head_dim)}
                  | {h * head_dim + d for h in range(sizes["mamba_num_heads"]) for d in dead_channels})
    _zero_rows(layer.get_submodule(layout.mamba.in_proj), rows)  # z rows come first
    layer.get_submodule(layout.mamba.out_proj).weight[:, rows] = 0.0


DEAD_HIDDEN = [0, 5, 9, 13, 22, 31, 40, 41, 50, 52, 60, 63, 2, 3, 4, 6]  # 16 of 64
DEAD_EXPERTS = [2, 5]
DEAD_EXPERT_NEURONS = [1, 7, 8, 15, 20, 21, 30, 31]  # 8 of 32
DEAD_NEURONS = list(range(10, 34))  # 24 of 96 (dense MLP), 8 of 48 (shared experts: the first 8 of these below 48)
DEAD_MAMBA_CHANNELS = [0, 5]  # 2 of 8 per head


def _dead_mamba_heads(sizes) -> list[int]:
    # the first head of each group (and the second too when the target keeps fewer than heads - groups)
    per_group = sizes["mamba_num_heads"] // sizes["mamba_n_groups"]
    return [g * per_group + j for g in range(sizes["mamba_n_groups"]) for j in range(per_group // 4)]


# ---------------------------------------------------------------------------- tests
def test_every_family_is_registered_and_matches_its_modules():
    expected = {
        "qwen3_moe": ["attention+moe", "attention+mlp", "attention+moe", "attention+moe"],
        "qwen2_moe": ["attention+mlp", "attention+moe+shared_expert"] * 2,
        "mixtral": ["attention+moe"] * 4,
        "olmoe": ["attention+moe"] * 4,
        "nemotron_h": ["mamba", "moe+shared_expert", "attention", "mlp", "mamba", "attention"],
        "granitemoehybrid": ["mamba+moe+shared_expert", "attention+moe+shared_expert"] * 2,
        "falcon_h1": ["attention+mamba+mlp"] * 4,
    }
    for name in NAMES:
        model = make(name)
        layout = get_layout(model)
        assert name in layout.model_types
        layout.check_model(model)
        assert ["+".join(sorted(p)) for p in parts_of(model)] == expected[name], name


@pytest.mark.parametrize("name", NAMES)
def test_every_per_layer_config_list_is_registry_data(name):
    model = make(name)
    layout = get_layout(model)
    num_layers = len(layout.decoder_layers(model))
    per_layer = {k for k, v in model.config.to_dict().items() if isinstance(v, list) and len(v) == num_layers}
    assert per_layer <= set(layout.per_layer_config_fields), per_layer - set(layout.per_layer_config_fields)


@pytest.mark.parametrize("name", NAMES)
def test_pre_norms_feed_the_blocks_the_registry_says(name):
    # A "pre_attention" norm's output is what the token mixer's first matmul reads (q/k/v or the Mamba in_proj), a
    # "pre_mlp" norm's what the MLP / router reads, up to a config multiplier (Falcon-H1 scales them).
    model = make(name)
    layout = get_layout(model)
    seen = {}

    def record(key):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output  # routers return (logits, weights, indices)
            seen[key] = (x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1]))
        return hook

    for i, layer in enumerate(layout.decoder_layers(model)):
        parts = layout.layer_parts(layer)
        readers = {"pre_attention": [], "pre_mlp": []}
        if "attention" in parts:
            readers["pre_attention"].append(layout.q_proj or layout.qkv_proj)
        if "mamba" in parts:
            readers["pre_attention"].append(layout.mamba.in_proj)
        if "mlp" in parts:
            readers["pre_mlp"].append(layout.gate_proj or layout.gate_up_proj or layout.up_proj)
        if "moe" in parts:
            readers["pre_mlp"].append(layout.moe.router)
        if "shared_expert" in parts:
            readers["pre_mlp"].append(layout.moe.shared_gate_proj or layout.moe.shared_gate_up_proj or layout.moe.shared_up_proj)
        roles = layout.layer_norm_roles_of(layer)
        paths = set(roles) | {p for group in readers.values() for p in group}
        handles = [layer.get_submodule(p).register_forward_hook(record(p), with_kwargs=True) for p in paths]
        logits(model)
        for handle in handles:
            handle.remove()
        for norm, role in roles.items():
            assert readers[role], (name, i, norm, role)
            for reader in readers[role]:
                out, read = seen[norm][1], seen[reader][0]
                torch.testing.assert_close(read / read.norm(), out / out.norm(), msg=f"{name} layer {i}: {norm} -> {reader}")
        assert {r for r, group in readers.items() if group} == set(roles.values()), (name, i)


@pytest.mark.parametrize("name", NAMES)
def test_pruning_nothing_is_exact(name):
    model = make(name)
    ref = logits(model)
    scores = scores_for(model)
    assert torch.equal(logits(prune_model(copy.deepcopy(model), MinitronPruneConfig(), importance=scores)), ref)
    sizes = get_layout(model).read_sizes(model.config)
    same = MinitronPruneConfig(**{k: sizes[k] for k in FAMILIES[name].done_when})
    assert torch.equal(logits(prune_model(copy.deepcopy(model), same, importance=scores)), ref)


@pytest.mark.parametrize("name", NAMES)
def test_planted_dead_units_rank_lowest_and_prune_exactly(name):
    # Dead experts (zero output, never routed), dead expert / shared-expert / dense neurons, dead Mamba heads and
    # head channels and dead residual channels, found by the importance pass and pruned at once: logits do not move.
    family = FAMILIES[name]
    model = make(name, **{f: 1e-12 for f in family.eps_fields})
    layout = get_layout(model)
    sizes = layout.read_sizes(model.config)
    constant = 7
    _plant_hidden(model, layout, DEAD_HIDDEN if "hidden_size" in family.planted else [], constant)
    dead_heads = _dead_mamba_heads(sizes) if layout.mamba is not None else []
    for layer, parts in zip(layout.decoder_layers(model), parts_of(model)):
        if "moe" in parts:
            _plant_experts(layer, layout, DEAD_EXPERTS, DEAD_EXPERT_NEURONS, constant)
        if "mlp" in parts:
            dense = {k: getattr(layout, k) for k in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")}
            _plant_mlp_neurons(layer, dense, DEAD_NEURONS, sizes["intermediate_size"])
        if "shared_expert" in parts:
            _plant_mlp_neurons(layer, layout.moe.shared_paths, DEAD_NEURONS[:8], sizes["shared_expert_intermediate_size"])
        if "mamba" in parts:
            channels = DEAD_MAMBA_CHANNELS if "mamba_head_dim" in family.planted else []
            _plant_mamba(layer, layout, sizes, dead_heads, channels)
    if layout.moe is not None:
        _balance_routers(model, layout, DEAD_EXPERTS, constant)
    ref = logits(model)
    scores = scores_for(model)
    for source in ("output_norm", "routing_weight", "router_probability", "frequency") if layout.moe is not None else ():
        experts = scores.expert_scores(source)
        for i, parts in enumerate(parts_of(model)):
            if "moe" in parts:  # the dead experts rank lowest under every expert importance source
                assert set(experts[i].argsort()[:2].tolist()) == set(DEAD_EXPERTS), (source, i)
    pruned = prune_model(model, MinitronPruneConfig(**family.planted), importance=scores)
    kept = pruned.minitron_provenance["kept"]
    for i, parts in enumerate(kept.get("layer_parts", [])):
        if "moe" in parts:
            assert not set(kept["experts"][i]) & set(DEAD_EXPERTS)
            src = kept["layers"][i]
            for e, neurons in zip(kept["experts"][i], kept["expert_neurons"][i]):
                score = scores.expert_neurons[src, e]
                assert (score[DEAD_EXPERT_NEURONS] == 0).all()
                # Dead neurons are dropped, unless a live neuron is just as silent (relu^2 experts: never positive).
                assert not set(neurons) & set(DEAD_EXPERT_NEURONS) or score[neurons].min() == 0
        if "mamba" in parts and "mamba_num_heads" in family.planted:
            assert not set(kept["mamba_heads"][i]) & set(dead_heads)
        if "mamba" in parts and "mamba_head_dim" in family.planted:
            assert all(not set(c) & set(DEAD_MAMBA_CHANNELS) for c in kept["mamba_channels"][i])
    if "hidden_size" in family.planted:
        assert not set(kept["hidden"]) & set(DEAD_HIDDEN)
    get_layout(pruned).check_model(pruned)
    torch.testing.assert_close(logits(pruned), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_depth_pruning_each_block_type_equals_an_identity_block(name):
    # Removing layer k (whatever it holds: attention, Mamba, MLP, MoE) must give exactly the model whose layer k
    # returns its input: block-type lists, dense-layer lists and cache indices follow the kept layers.
    model = make(name)
    layout = get_layout(model)
    num_layers = len(layout.decoder_layers(model))
    seen = set()
    for k, parts in enumerate(parts_of(model)):
        if parts in seen:
            continue
        seen.add(parts)

        def identity(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            return (x,) if layout.layer_output_tuple else x

        handle = layout.decoder_layers(model)[k].register_forward_hook(identity, with_kwargs=True)
        ref = logits(model)
        handle.remove()
        if any("mamba" in p for p in parts_of(model)) and all(
            "attention" not in p for i, p in enumerate(parts_of(model)) if i != k
        ):
            continue  # the only attention layer: covered by test_hybrid_keeps_an_attention_layer
        pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(layers_to_drop=[k]))
        assert len(layout.decoder_layers(pruned)) == num_layers - 1
        torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=1e-5, msg=f"{name} layer {k} ({sorted(parts)})")


FRESH_ALL = """
import sys, torch
from transformers import AutoModelForCausalLM
jobs = torch.load({jobs!r})
ids = torch.load({ids!r})
out = {{}}
for name, folder in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[name] = (type(model).__name__, model(ids, use_cache=False).logits)
torch.save(out, {out!r})
assert not any(m.startswith("hf_minitron") for m in sys.modules), "hf_minitron was imported"
"""


def test_every_family_prunes_every_axis_and_reloads_in_a_fresh_stock_process(tmp_path):
    # Experts + expert width + shared expert + hidden + heads + depth (+ Mamba heads and channels for hybrids): the
    # config holds the new sizes, every module matches them, per-layer lists follow the kept layers, family scalars
    # survive, generation with a cache equals generation without, and a stock process reloads identical logits.
    jobs, expected = {}, {}
    for name in NAMES:
        family = FAMILIES[name]
        model = make(name)
        source = copy.deepcopy(model.config)
        pruned = prune_model(model, MinitronPruneConfig(**family.done_when), importance=scores_for(model))
        layout = get_layout(pruned)
        layout.check_model(pruned)
        sizes = layout.read_sizes(pruned.config)
        assert {k: sizes[k] for k in family.done_when} == family.done_when, name
        kept = pruned.minitron_provenance["kept"]["layers"]
        for field_name in layout.per_layer_config_fields:
            values = getattr(source, field_name, None)
            if isinstance(values, list):
                assert getattr(pruned.config, field_name) == [values[i] for i in kept], (name, field_name)
        for field_name in family.preserved:
            assert getattr(pruned.config, field_name) == getattr(source, field_name), (name, field_name)
        if isinstance(getattr(pruned, "num_experts", None), int):  # cached on the *ForCausalLM for its balancing loss
            assert pruned.num_experts == family.done_when["num_experts"]
        ids = INPUT[:1, :8]
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            assert torch.equal(pruned.generate(ids, use_cache=True, **kwargs), pruned.generate(ids, use_cache=False, **kwargs)), name
        save_pruned_model(pruned, tmp_path / name)
        jobs[name] = str(tmp_path / name)
        expected[name] = (type(pruned).__name__, logits(pruned))
    torch.save(jobs, tmp_path / "jobs.pt")
    torch.save(INPUT, tmp_path / "ids.pt")
    run_python(FRESH_ALL.format(jobs=str(tmp_path / "jobs.pt"), ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.pt")))
    reloaded = torch.load(tmp_path / "out.pt")
    for name in NAMES:
        assert reloaded[name][0] == expected[name][0]
        torch.testing.assert_close(reloaded[name][1], expected[name][1], atol=1e-6, rtol=0, msg=name)


def test_qwen_moe_dense_layer_list_follows_depth_pruning():
    # Qwen2-MoE with decoder_sparse_step=2: layers 1 and 3 are sparse. Dropping layer 0 makes the kept layers
    # [sparse, dense, sparse] at new indices 0..2: the config says so explicitly (step 1 + dense-layer list).
    model = make("qwen2_moe")
    pruned = prune_model(model, MinitronPruneConfig(layers_to_drop=[0]))
    assert pruned.config.decoder_sparse_step == 1 and pruned.config.mlp_only_layers == [1]
    assert [sorted(p) for p in parts_of(pruned)] == [["attention", "moe", "shared_expert"], ["attention", "mlp"],
                                                     ["attention", "moe", "shared_expert"]]
    rebuilt = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**pruned.config.to_dict()))
    assert parts_of(rebuilt) == parts_of(pruned)


# ---------------------------------------------------------------------------- variants and bad inputs
@pytest.mark.parametrize("overrides", [
    dict(mamba_rms_norm=False),  # no gated norm (nn.Identity), the gate applies inside the scan
    dict(mamba_norm_before_gate=True),  # the norm's RMS is taken before the gate
    dict(mamba_d_ssm=None, mamba_expand=1),  # the Mamba width is mamba_expand x hidden_size
])
def test_falcon_h1_mamba_variants_prune_and_reload(overrides, tmp_path):
    model = make("falcon_h1", **overrides)
    target = dict(mamba_num_heads=4, num_hidden_layers=3) | (
        dict(hidden_size=32) if overrides.get("mamba_d_ssm", 1) is None else dict(mamba_head_dim=6, hidden_size=48)
    )
    pruned = prune_model(model, MinitronPruneConfig(**target), importance=scores_for(model))
    get_layout(pruned).check_model(pruned)
    pruned.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, target, match", [
    ("mixtral", dict(num_experts=1), r"num_experts=1 is below num_experts_per_tok=2.*Choose num_experts >= 2"),
    ("nemotron_h", dict(mamba_num_heads=7), r"mamba_num_heads=7 is not divisible by the 2 SSM groups.*e\.g\. mamba_num_heads=6"),
    ("mixtral", dict(intermediate_size=16), r"`intermediate_size=16` does not apply.*no dense MLP.*moe_intermediate_size"),
    ("granitemoehybrid", dict(hidden_size=48), r"mamba_expand.*128 is not a multiple of hidden_size=48"),
    ("granitemoehybrid", dict(layers_to_drop=[1, 3]), r"drops every attention layer \(layers \[1, 3\]\).*layers_to_drop"),
    ("nemotron_h", dict(num_experts=16), r"larger than the source"),
])
def test_bad_targets_say_what_to_change(name, target, match):
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_model(model, MinitronPruneConfig(**target), calibration_data=random_batches(num=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field_name", ["num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                                        "mamba_num_heads", "mamba_head_dim"])
def test_block_field_on_a_dense_model_says_what_to_change(field_name):
    from conftest import tiny_llama

    with pytest.raises(ValueError, match=rf"`{field_name}=4` does not apply to this model: it has no .*Remove `{field_name}`"):
        prune_model(tiny_llama(), MinitronPruneConfig(**{field_name: 4}), calibration_data=random_batches(num=1))


def test_expert_groups_and_latent_experts_are_checked():
    # Group-limited routing (Nemotron-H n_group): experts are pruned evenly within groups, at least 2 per group.
    model = make("nemotron_h", n_group=2, topk_group=1)
    with pytest.raises(ValueError, match=r"num_experts=5 must be a multiple of the 2 expert groups.*at least 2 per group"):
        prune_model(model, MinitronPruneConfig(num_experts=5), calibration_data=random_batches(num=1))
    pruned = prune_model(model, MinitronPruneConfig(num_experts=4), importance=scores_for(model))
    kept = [e for e in pruned.minitron_provenance["kept"]["experts"] if e]
    assert all(sum(e < 4 for e in experts) == 2 for experts in kept)  # two per group of four
    latent = make("nemotron_h", moe_latent_size=32)
    with pytest.raises(ValueError, match=r"latent projections \(`moe_latent_size`=32\).*moe_latent_size=None"):
        estimate_importance(latent, random_batches(num=1), CALIB, show_progress=False)


# ---------------------------------------------------------------------------- importance pass
@pytest.mark.parametrize("name", ["qwen2_moe", "nemotron_h", "granitemoehybrid", "falcon_h1"])
def test_layer_streaming_equals_the_in_memory_pass(name):
    from hf_minitron import estimate_importance_streaming

    model = make(name)
    batches = random_batches(num=2, batch=4, seq=12)
    ref = estimate_importance(model, batches, CALIB, show_progress=False)
    got = estimate_importance_streaming(model, batches, CALIB, device="cpu", show_progress=False)
    assert set(ref.tensors()) == set(got.tensors())
    for key, value in ref.tensors().items():
        torch.testing.assert_close(got.tensors()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert got.metadata == ref.metadata


def test_expert_scores_match_a_direct_per_expert_computation():
    # The hook recomputes each expert from the fused weights for the tokens routed to it: compare with a loop over
    # tokens that calls the expert by hand (mean over tokens, L2 over samples; padding excluded).
    model = make("mixtral")
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    scores = estimate_importance(model, [{"input_ids": ids, "attention_mask": mask}], CALIB, show_progress=False)
    layer = model.model.layers[2]
    captured = {}
    handle = layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.setdefault("x", o))
    model(ids, attention_mask=mask, use_cache=False)
    handle.remove()
    x = captured["x"].reshape(-1, 64)
    _, weights, index = layer.mlp.gate(x)
    experts = layer.mlp.experts
    per_sample = torch.zeros(3, 8)
    per_neuron = torch.zeros(3, 8, 32)
    for t in range(x.shape[0]):
        b = t // 10
        if not mask[b, t % 10]:
            continue
        for slot in range(2):
            e = int(index[t, slot])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            a = experts.act_fn(gate) * up * weights[t, slot]
            per_sample[b, e] += (experts.down_proj[e] @ a).norm() / mask[b].sum()
            per_neuron[b, e] += a.abs() / mask[b].sum()
    torch.testing.assert_close(scores.expert_output_norm[2], per_sample.norm(dim=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.expert_neurons[2], per_neuron.norm(dim=0), atol=1e-5, rtol=1e-4)


def test_scores_with_block_tensors_save_and_load(tmp_path):
    model = make("nemotron_h")
    scores = scores_for(model)
    assert scores.expert_neurons.shape == (6, 8, 32) and scores.mamba_channels.shape == (6, 8, 8)
    assert scores.heads[0].abs().sum() == 0 and scores.heads[2].abs().sum() > 0  # no attention in Mamba layer 0
    scores.save(tmp_path / "s.safetensors")
    loaded = ImportanceScores.load(tmp_path / "s.safetensors")
    for key, value in scores.tensors().items():
        assert torch.equal(loaded.tensors()[key], value), key
    assert loaded.layer_parts == parts_of(model)
    pruned = prune_model(model, MinitronPruneConfig(**FAMILIES["nemotron_h"].done_when), importance=loaded)
    get_layout(pruned).check_model(pruned)


def test_random_and_magnitude_baselines_cover_the_block_axes():
    from hf_minitron.importance.baselines import magnitude_importance, random_importance

    for name in ("qwen2_moe", "granitemoehybrid"):
        model = make(name)
        target = MinitronPruneConfig(**FAMILIES[name].done_when)
        for scores in (random_importance(model, seed=1), magnitude_importance(model)):
            pruned = prune_model(copy.deepcopy(model), target, importance=scores)
            get_layout(pruned).check_model(pruned)
            assert logits(pruned).isfinite().all()
