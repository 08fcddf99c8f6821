"""`DistillationTrainer` end to end on a tiny teacher / pruned-student pair (CPU, offline)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from _distill_utils import VOCAB, make_dataset, make_teacher, make_tokenizer, prune_student
from hf_minitron.distillation import (
    PROJECTION_FILE,
    DistillationConfig,
    DistillationTrainer,
    kd_loss_from_logits,
    resolve_layer_map,
)


HERE = os.path.dirname(os.path.abspath(__file__))


def _args(out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, save_strategy="no", kd_chunk_size=16, dataloader_num_workers=0, bf16=False,
    )
    base.update(kw)
    return DistillationConfig(**base)


def _trainer(out, teacher=None, student=None, n=32, **kw):
    teacher = teacher if teacher is not None else make_teacher()
    student = student if student is not None else prune_student(teacher)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(out, **kw), train_dataset=make_dataset(n=n),
        processing_class=make_tokenizer(),
    )


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_end_to_end_pruned_student_cosine(tmp_path):
    teacher = make_teacher()
    student = prune_student(teacher, keep_layers=(0, 1, 3), hidden=32)  # depth and width pruned
    assert student.config.hidden_size != teacher.config.hidden_size
    trainer = _trainer(tmp_path, teacher, student, max_steps=30, hidden_state_loss="cosine", save_strategy="steps",
                       save_steps=15)
    assert trainer.layer_pairs == [(0, 0), (1, 1), (2, 3)]  # from the pruning provenance
    proj0 = trainer.projection.weight.detach().clone()
    teacher0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()

    kd = _logged(trainer, "kd_loss")
    hs = _logged(trainer, "hidden_state_loss")
    assert len(kd) == 30 and all(k in trainer.state.log_history[0] for k in ("ce_loss", "hidden_state_alpha"))
    assert sum(kd[-5:]) / 5 < 0.6 * sum(kd[:5]) / 5, kd
    assert sum(hs[-5:]) < sum(hs[:5]), hs
    assert not torch.equal(trainer.projection.weight.detach(), proj0)  # the projection is trained
    for k, v in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(v, teacher0[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    # The projection is checkpointed beside the model, never inside it
    ckpt = tmp_path / "checkpoint-15"
    assert (ckpt / PROJECTION_FILE).is_file()
    final = tmp_path / "final"
    trainer.save_model(str(final))
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    stock = LlamaForCausalLM(student.config)
    assert keys == set(stock.state_dict().keys())
    # Stock transformers loads it, with identical outputs
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    assert type(loaded) is LlamaForCausalLM
    x = torch.randint(3, VOCAB, (2, 10))
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    torch.testing.assert_close(loaded(x).logits, trained(x).logits)


def test_loss_equals_naive_full_logits(tmp_path):
    # One compute_loss call vs. a naive reference built from both models' full logits (shift + padding masks)
    trainer = _trainer(tmp_path, max_steps=1, ce_weight=0.25, temperature=2.0, kd_loss="jsd", jsd_beta=0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # ragged lengths: padding is masked
    student, teacher = trainer.model, trainer.teacher_model
    loss = trainer.compute_loss(student, dict(batch))

    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    ref = kd_loss_from_logits(s_logits, t_logits, mask, "jsd", jsd_beta=0.3, temperature=2.0)
    ref = ref + 0.25 * torch.nn.functional.cross_entropy(s_logits[mask], labels[mask])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(loss, [student.lm_head.weight, student.model.layers[0].mlp.up_proj.weight])
    g_ref = torch.autograd.grad(ref, [student.lm_head.weight, student.model.layers[0].mlp.up_proj.weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resume_continues_same_loss_curve(tmp_path):
    kw = dict(max_steps=8, hidden_state_loss="cosine", save_strategy="steps", save_steps=4)
    full = _trainer(tmp_path / "full", **kw)
    full.train()
    resumed = _trainer(tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    def after4(trainer, key):  # the resumed history starts with the checkpoint's steps 1-4
        return [h[key] for h in trainer.state.log_history if key in h and h["step"] > 4]

    for key in ("loss", "kd_loss", "hidden_state_loss"):
        a, b = after4(full, key), after4(resumed, key)
        assert len(a) == len(b) == 4, resumed.state.log_history
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed.projection.weight, full.projection.weight, rtol=1e-5, atol=1e-6)


def test_peft_lora_student_with_gradient_checkpointing(tmp_path):
    from peft import LoraConfig

    teacher = make_teacher()
    student = prune_student(teacher)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher,
        args=_args(tmp_path, max_steps=4, gradient_checkpointing=True, hidden_state_loss="mse", hidden_state_weight=0.5,
                   learning_rate=1e-2),
        train_dataset=make_dataset(n=16), processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    lora0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora0 and all("lora_" in n for n in lora0)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(_logged(trainer, "loss"))))
    assert _logged(trainer, "hidden_state_alpha")[0] == 0.5
    changed = [n for n, p in trainer.model.named_parameters() if n in lora0 and not torch.equal(p, lora0[n])]
    assert changed
    assert not torch.equal(trainer.projection.weight, torch.zeros_like(trainer.projection.weight))
    merged = trainer.model.merge_and_unload() if False else trainer.model.get_base_model()
    assert torch.equal(merged.lm_head.weight, base["lm_head.weight"])  # frozen base


@pytest.mark.distributed
def test_ddp_two_processes_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "_ddp_distill_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2
    assert r0 == r1  # ranks agree on the student, the (all-reduced) projection and the logged losses
    # and equal a single process on the global batch (2 × 4 = 8)
    single = _trainer(tmp_path / "single", n=16, max_steps=4, hidden_state_loss="cosine")
    single.train()
    torch.testing.assert_close(torch.tensor(r0["kd_losses"]), torch.tensor(_logged(single, "kd_loss")), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(r0["projection_sum"], float(single.projection.weight.double().sum()), rtol=1e-4,
                               atol=1e-5)


def test_eval_logs_components(tmp_path):
    teacher = make_teacher()
    trainer = DistillationTrainer(
        model=prune_student(teacher), teacher_model=teacher, args=_args(tmp_path, max_steps=1),
        train_dataset=make_dataset(n=8), eval_dataset=make_dataset(n=8, seed=1), processing_class=make_tokenizer(),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_kd_loss"], rel=1e-4)
    assert "eval_ce_loss" in metrics


def test_padded_vocab_and_true_mismatch(tmp_path):
    teacher = make_teacher()
    student = prune_student(teacher)
    student.resize_token_embeddings(VOCAB + 32)  # padded beyond the tokenizer: compared on the common rows
    trainer = _trainer(tmp_path, teacher, student, max_steps=2)
    assert trainer.kd_vocab_size == VOCAB
    trainer.train()
    with pytest.raises(ValueError, match="Vocabulary mismatch"):
        DistillationTrainer(
            model=prune_student(teacher), teacher_model=make_teacher(vocab=VOCAB + 8),
            args=_args(tmp_path, max_steps=1), train_dataset=make_dataset(n=8),
            processing_class=make_tokenizer(VOCAB + 8),
        )


def test_layer_maps(tmp_path):
    assert resolve_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert resolve_layer_map(4, 4) == [(i, i) for i in range(4)]
    prov = {"kept": {"layers": [0, 2, 3]}, "source_config": {"num_hidden_layers": 4}}
    assert resolve_layer_map(3, 4, "auto", prov) == [(0, 0), (1, 2), (2, 3)]
    assert resolve_layer_map(3, 4, [1, None, 3]) == [(0, 1), (2, 3)]
    assert resolve_layer_map(3, 4, [[2, 3]]) == [(2, 3)]
    with pytest.raises(ValueError, match="entries"):
        resolve_layer_map(3, 4, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer_map(3, 4, [0, 1, 9])
    with pytest.raises(ValueError, match="source model"):
        resolve_layer_map(3, 6, "auto", prov)

    # Provenance read from `minitron_config.json` beside a saved pruned student; no provenance -> even map
    teacher = make_teacher()
    student = prune_student(teacher, keep_layers=(0, 2, 3))
    prov = student.minitron_provenance
    del student.minitron_provenance
    student.save_pretrained(tmp_path / "pruned")
    (tmp_path / "pruned" / "minitron_config.json").write_text(json.dumps(prov))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    tr = _trainer(tmp_path / "a", teacher, loaded, max_steps=1, hidden_state_loss="mse")
    assert tr.layer_pairs == [(0, 0), (1, 2), (2, 3)]
    tr = _trainer(tmp_path / "b", teacher, prune_student(teacher, (0, 1)), max_steps=1, hidden_state_loss="cosine",
                  hidden_state_layer_map="auto")
    assert tr.layer_pairs == [(0, 0), (1, 1)]  # provenance wins over the even map
    del tr.model.minitron_provenance
    student2 = prune_student(teacher, (0, 1))
    del student2.minitron_provenance
    tr = _trainer(tmp_path / "c", teacher, student2, max_steps=1, hidden_state_loss="cosine")
    assert tr.layer_pairs == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="entries"):
        _trainer(tmp_path / "d", teacher, student2, max_steps=1, hidden_state_loss="cosine",
                 hidden_state_layer_map=[0, 1, 2])


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="kd_loss"):
        _args(tmp_path, kd_loss="tvd")
    with pytest.raises(ValueError, match="hidden_state_loss"):
        _args(tmp_path, hidden_state_loss="l1")
    with pytest.raises(ValueError, match="jsd_beta"):
        _args(tmp_path, kd_loss="jsd", jsd_beta=0.0)
    with pytest.raises(ValueError, match="hidden_state_weight"):
        _args(tmp_path, hidden_state_weight="big")
    assert _args(tmp_path, hidden_state_weight="0.3").hidden_state_weight == 0.3
    assert _args(tmp_path, hidden_state_layer_map="0,2,3").hidden_state_layer_map == [0, 2, 3]
    # From the command line (TrlParser, as the recipe parses it), the default layer map stays "auto"
    from trl import TrlParser

    (parsed,) = TrlParser((DistillationConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--hidden_state_loss", "cosine", "--use_cpu", "True"]
    )
    assert parsed.hidden_state_layer_map == "auto"
    with pytest.raises(ValueError, match="teacher_model_init_kwargs"):
        teacher = make_teacher()
        DistillationTrainer(
            model=prune_student(teacher), teacher_model=teacher,
            args=_args(tmp_path, teacher_model_init_kwargs={"dtype": "float32"}), train_dataset=make_dataset(n=8),
            processing_class=make_tokenizer(),
        )


def test_teacher_from_path(tmp_path):
    teacher = make_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=prune_student(teacher), teacher_model=str(tmp_path / "teacher"),
        args=_args(tmp_path / "out", max_steps=2, teacher_model_init_kwargs={"dtype": "float32"}),
        train_dataset=make_dataset(n=8), processing_class=make_tokenizer(),
    )
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    trainer.train()


def test_done_when_snippet_tied_embeddings_and_tokenizer_from_teacher(tmp_path):
    # The acceptance call, without `processing_class`: the tokenizer is found beside the teacher's weights.
    # The student ties its embeddings and is narrower than the teacher.
    teacher = make_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    make_tokenizer().save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(str(tmp_path / "teacher"))
    student = prune_student(teacher, keep_layers=(0, 3), hidden=32)
    student.config.tie_word_embeddings = True
    student.tie_weights()
    student = LlamaForCausalLM(student.config)  # a tied, random-init narrow student
    student.minitron_provenance = {"kept": {"layers": [0, 3]}, "source_config": {"num_hidden_layers": 4}}
    ds = make_dataset(n=16)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher,
        args=_args(tmp_path / "out", max_steps=12, hidden_state_loss="cosine", per_device_train_batch_size=8),
        train_dataset=ds,
    )
    trainer.train()
    loss = _logged(trainer, "loss")
    assert sum(loss[-3:]) < sum(loss[:3])
    trainer.save_model(str(tmp_path / "final"))
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    stock = LlamaForCausalLM(student.config)
    stock.save_pretrained(tmp_path / "stock")
    with safe_open(str(tmp_path / "stock" / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # tied: no separate lm_head.weight
    assert "lm_head.weight" not in keys
    assert set(stock.state_dict().keys()) - keys == {"lm_head.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_term_equals_manual(tmp_path, kind):
    # Post-norm states of mapped layers (final norm applied to intermediate outputs), shared projection, masks
    trainer = _trainer(tmp_path, max_steps=1, hidden_state_loss=kind, hidden_state_weight=0.7)
    batch = next(iter(trainer.get_train_dataloader()))
    student, teacher = trainer.model, trainer.teacher_model
    loss = trainer.compute_loss(student, dict(batch))

    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    s_out = student(**kw)
    with torch.no_grad():
        t_out = teacher(**kw)
    mask = batch["labels"][:, 1:] != -100
    kd = kd_loss_from_logits(s_out.logits[:, :-1], t_out.logits[:, :-1], mask)
    per_layer = []
    for s_idx, t_idx in [(0, 0), (1, 1), (2, 3)]:
        h_s = s_out.hidden_states[s_idx + 1]
        h_s = student.model.norm(h_s) if s_idx < 2 else h_s
        h_t = t_out.hidden_states[t_idx + 1]
        h_t = teacher.model.norm(h_t) if t_idx < 3 else h_t
        p, t = trainer.projection(h_s[:, :-1][mask]), h_t[:, :-1][mask]
        if kind == "cosine":
            per_layer.append((1 - torch.nn.functional.cosine_similarity(p, t, dim=-1)).mean())
        else:
            per_layer.append(((p - t) ** 2).mean())
    ref = kd + 0.7 * torch.stack(per_layer).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(loss, [trainer.projection.weight, student.model.layers[0].self_attn.q_proj.weight])
    g_ref = torch.autograd.grad(ref, [trainer.projection.weight, student.model.layers[0].self_attn.q_proj.weight])
    for a, b in zip(g, g_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
