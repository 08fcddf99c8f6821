"""Teacher-logit cache: the stored top-k + tail equals the teacher's own `.logits`; training from it at k = V (float32)
equals live-teacher forward KL; the loss at k < V equals its naive reference; killed runs resume; two processes write
what one does; caches that do not fit the student, the data or the options are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from _distill_utils import VOCAB, make_dataset, make_teacher, make_tokenizer, prune_student
from conftest import random_batches, tiny_llama
from hf_minitron import TeacherLogitCache, cache_teacher_logits
from hf_minitron.architectures.logits import apply_logit_transforms
from hf_minitron.distillation import (
    DistillationConfig,
    DistillationTrainer,
    cached_teacher_retrain_fn,
    ensure_search_cache,
    fused_linear_topk_kd_loss,
    kd_loss_from_logits,
    topk_kd_loss_from_logits,
)
from hf_minitron.distillation.logit_cache import KILL_ENV, MANIFEST_NAME, SHARD_DIR


HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_cache_teacher_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _args(out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, save_strategy="no", kd_chunk_size=16, dataloader_num_workers=0, bf16=False, max_steps=3,
    )
    base.update(kw)
    return DistillationConfig(**base)


def _cache(path, teacher=None, ds=None, **kw):
    kw = {"top_k": 16, "tokenizer": make_tokenizer(), "show_progress": False, "batch_size": 4, **kw}
    return cache_teacher_logits(teacher if teacher is not None else make_teacher(), ds if ds is not None else make_dataset(n=24),
                                str(path), **kw)


def _shard_tensors(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(os.path.join(folder, SHARD_DIR))):
        with safe_open(os.path.join(folder, SHARD_DIR, name), "pt") as f:
            out[name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def _run_worker(out, *extra, env=None, torchrun=False):
    cmd = [sys.executable, WORKER, str(out), *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One uninterrupted single-process cache of the worker's corpus (top-16, float16, 5 rows per shard)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    proc = _run_worker(out, "16", "float16", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


# ------------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("steps", [(), (("divide", 8.0),), (("softcap", 4.0),)], ids=["plain", "divide", "softcap"])
def test_topk_loss_equals_reference_and_full_kl_at_k_equal_v(steps):
    g = torch.Generator().manual_seed(0)
    N, H, V, k = 13, 8, 50, 7
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True)
    t_logp = (3 * torch.randn(N, V, dtype=torch.float64, generator=g)).log_softmax(-1)
    mask = torch.rand(N, generator=g) > 0.2
    targets = torch.randint(0, V, (N,), generator=g)
    for kk in (k, V):
        logits = apply_logit_transforms(h @ w.t() + b, steps)
        vals, ids = t_logp.topk(kk)
        tail = torch.logsumexp(t_logp.scatter(-1, ids, float("-inf")), -1)
        loss = fused_linear_topk_kd_loss(h, w, ids, vals, tail, mask, student_bias=b, targets=targets, ce_weight=0.3,
                                         student_logit_transforms=steps, chunk_size=5)
        ref = topk_kd_loss_from_logits(logits, ids, vals, tail, mask) + 0.3 * F.cross_entropy(logits[mask], targets[mask])
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        for a, r in zip(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        full = kd_loss_from_logits(logits, t_logp, mask)
        if kk == V:  # the whole vocabulary: the full forward KL
            assert torch.isinf(tail).all()
            torch.testing.assert_close(topk_kd_loss_from_logits(logits, ids, vals, tail, mask), full, rtol=1e-12, atol=1e-12)
        else:  # coarsening to k + 1 buckets never increases a KL divergence
            assert topk_kd_loss_from_logits(logits, ids, vals, tail, mask) <= full


# --------------------------------------------------------------------------------------------------- contents
@pytest.mark.parametrize("family", ["llama", "granite", "gemma3_text"])
def test_cache_holds_the_teachers_own_distribution(tmp_path, family):
    """Top-k ids / log-probs and tail mass equal those of `log_softmax(teacher(ids).logits)`, post-head transform included."""
    from test_architectures import SIZES, make

    overrides = {"granite": dict(logits_scaling=8.0), "gemma3_text": dict(final_logit_softcapping=4.0)}.get(family, {})
    teacher = make(family, **overrides)
    vocab = SIZES["vocab_size"]
    ds = make_dataset(n=6, length=12, vocab=vocab)
    cache = _cache(tmp_path / "c", teacher, ds, top_k=8, dtype="float32", tokenizer=make_tokenizer(vocab))
    expected = {"llama": [], "granite": [["divide", 8.0]], "gemma3_text": [["softcap", 4.0]]}[family]
    assert cache.manifest["teacher"]["logit_transforms"] == expected
    for i, row in enumerate(ds["input_ids"]):
        with torch.no_grad():
            logp = teacher(torch.tensor([row])).logits[0].float().log_softmax(-1)  # [L, V]
        vals, ids = logp.topk(8)
        tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
        got = cache.row(i)
        assert torch.equal(got["input_ids"], torch.tensor(row))
        torch.testing.assert_close(got["topk_logprobs"], vals, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["tail_logprob"], tail, rtol=1e-5, atol=1e-5)
        assert (got["topk_ids"] == ids).float().mean() > 0.99  # (ties may swap)


def test_file_format_and_readers(tmp_path):
    ds = make_dataset(n=11)
    cache = _cache(tmp_path / "c", ds=ds, rows_per_shard=4)
    m = cache.manifest
    assert m["num_rows"] == 11 and m["num_tokens"] == sum(len(r) for r in ds["input_ids"]) and len(m["shards"]) == 3
    assert m["top_k"] == 16 and m["logprob_dtype"] == "float16" and m["temperature"] == 1.0 and m["vocab_size"] == VOCAB
    assert {"fingerprint", "name_or_path"} <= set(m["teacher"]) and {"fingerprint", "size"} <= set(m["tokenizer"])
    assert m["seq_length"] == max(len(r) for r in ds["input_ids"]) and len(m["data_fingerprint"]) == 32
    # Plain safetensors, streamable by range
    with safe_open(os.path.join(cache.path, m["shards"][1]["file"]), "pt") as f:
        assert f.get_slice("topk_ids")[2:5].shape == (3, 16)
        assert f.get_tensor("row_index").tolist() == [4, 5, 6, 7]
    rows = list(cache.iter_rows())
    assert [r["input_ids"].tolist() for r in rows] == ds["input_ids"]
    assert cache.dataset()["input_ids"] == ds["input_ids"]
    streamed = list(cache.to_iterable_dataset())
    assert [r["row_index"] for r in streamed] == list(range(11)) and len(streamed[3]["topk_ids"]) == len(ds[3]["input_ids"])
    assert cache.tokenizer().get_vocab() == make_tokenizer().get_vocab()


def test_16_bit_default_size(tmp_path):
    ds = make_dataset(n=24)
    half = _cache(tmp_path / "half", ds=ds, top_k=32)
    full = _cache(tmp_path / "full", ds=ds, top_k=32, dtype="float32")
    with safe_open(os.path.join(half.path, half.manifest["shards"][0]["file"]), "pt") as f:
        assert f.get_tensor("topk_logprobs").dtype == torch.float16 and f.get_tensor("topk_ids").dtype == torch.uint16
    per_token = {c.logprob_dtype: c.disk_bytes() / c.num_tokens for c in (half, full)}
    # k ids (2 B) + k log-probs (2 B) + tail (4 B) + the token (2 B), plus per-row offsets/digests and the header
    assert 32 * 4 + 6 <= per_token["float16"] <= 32 * 4 + 6 + 8
    assert per_token["float32"] - per_token["float16"] == pytest.approx(32 * 2, abs=0.5)  # 2 more bytes per log-prob
    # ... and 16-bit storage barely moves the loss
    teacher = make_teacher()
    losses = []
    for cache in (half, full):
        torch.manual_seed(0)
        trainer = DistillationTrainer(model=prune_student(teacher), args=_args(tmp_path / cache.logprob_dtype, teacher_logits_cache=cache.path),
                                      train_dataset=ds, processing_class=make_tokenizer())
        batch = next(iter(trainer.get_train_dataloader()))
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)


# ------------------------------------------------------------------------------------------------- exactness
def test_full_vocab_float32_cache_equals_live_teacher(tmp_path):
    """k = V, float32: same logged losses and same weights after 3 steps (gradient accumulation, CE term, ragged rows)."""
    teacher, ds = make_teacher(), make_dataset(n=32)
    cache = _cache(tmp_path / "cache", teacher, ds, top_k=VOCAB, dtype="float32", rows_per_shard=7)
    runs = {}
    for mode in ("live", "cache"):
        torch.manual_seed(0)
        student = prune_student(make_teacher())
        kw = dict(ce_weight=0.2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
        if mode == "cache":
            trainer = DistillationTrainer(model=student, teacher_model=None, args=_args(tmp_path / mode, teacher_logits_cache=cache.path, **kw),
                                          train_dataset=ds, processing_class=make_tokenizer())
            assert trainer.teacher_model is None
        else:
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path / mode, **kw), train_dataset=ds,
                                          processing_class=make_tokenizer())
        trainer.train()
        logs = {key: [h[key] for h in trainer.state.log_history if key in h] for key in ("kd_loss", "ce_loss", "loss")}
        runs[mode] = (logs, {k: v.detach().clone() for k, v in student.state_dict().items()})
    (live_logs, live_w), (cache_logs, cache_w) = runs["live"], runs["cache"]
    assert len(live_logs["kd_loss"]) == 3
    for key in live_logs:
        torch.testing.assert_close(torch.tensor(cache_logs[key]), torch.tensor(live_logs[key]), rtol=1e-5, atol=1e-6)
    for name in live_w:
        assert not torch.equal(live_w[name], prune_student(make_teacher()).state_dict()[name]) or "norm" in name
        torch.testing.assert_close(cache_w[name], live_w[name], rtol=1e-4, atol=1e-5, msg=name)


def test_topk_training_loss_matches_reference_on_shuffled_padded_batches(tmp_path):
    """k < V: the trainer's loss on a collated batch (shuffled rows, right padding) equals the naive top-k loss from
    the student's own `.logits` and the cached rows."""
    teacher, ds = make_teacher(), make_dataset(n=24)
    cache = _cache(tmp_path / "cache", teacher, ds, top_k=8)
    trainer = DistillationTrainer(model=prune_student(teacher), args=_args(tmp_path / "out", teacher_logits_cache=cache.path),
                                  train_dataset=ds.shuffle(seed=3).select(range(20)), processing_class=make_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # ragged rows: padded
    loss = trainer.compute_loss(trainer.model, dict(batch))
    student = trainer.model
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    ids, lp, lt = cache.batch_targets(batch["input_ids"], batch["attention_mask"])
    ref = topk_kd_loss_from_logits(logits, ids[:, :-1], lp[:, :-1], lt[:, :-1], mask)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # and the targets are the cached rows, row by row
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        row = cache.read(*cache.find(batch["input_ids"][b, :n]))
        assert torch.equal(ids[b, :n], row["topk_ids"])


def test_packed_batches_are_split_by_position_ids(tmp_path):
    ds = make_dataset(n=6)
    cache = _cache(tmp_path / "cache", ds=ds, top_k=4)
    r0, r1 = ds["input_ids"][1], ds["input_ids"][4]
    input_ids = torch.tensor([r0 + r1 + [0, 0]])
    position_ids = torch.tensor([list(range(len(r0))) + list(range(len(r1))) + [0, 0]])
    needed = torch.ones_like(input_ids, dtype=torch.bool)
    needed[0, -2:] = False  # padding of a padding-free batch: not trained
    ids, lp, lt = cache.batch_targets(input_ids, position_ids=position_ids, needed=needed)
    assert torch.equal(ids[0, : len(r0)], cache.row(1)["topk_ids"])
    assert torch.equal(lt[0, len(r0) : len(r0) + len(r1)], cache.row(4)["tail_logprob"])
    with pytest.raises(ValueError, match="not in the teacher-logit cache"):
        cache.batch_targets(input_ids, position_ids=position_ids)  # the padding run is needed now


def test_packed_training_equals_live_at_full_vocab(tmp_path):
    """SFT's BFD packing (padding-free rows of several samples): the cached loss equals the live one at k = V."""
    teacher, ds = make_teacher(), make_dataset(n=16)
    cache = _cache(tmp_path / "cache", teacher, ds, top_k=VOCAB, dtype="float32")
    losses = {}
    for mode in ("live", "cache"):
        torch.manual_seed(0)
        kw = dict(packing=True, max_length=64, per_device_train_batch_size=4, max_steps=1)
        if mode == "cache":
            kw["teacher_logits_cache"] = cache.path
        trainer = DistillationTrainer(model=prune_student(make_teacher()), teacher_model=teacher if mode == "live" else None,
                                      args=_args(tmp_path / mode, **kw), train_dataset=ds, processing_class=make_tokenizer())
        batch = next(iter(trainer.get_train_dataloader()))
        assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() > 1  # several samples per row
        losses[mode] = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert losses["cache"] == pytest.approx(losses["live"], rel=1e-5)


# ----------------------------------------------------------------------------------------- resume, processes
def test_killed_run_resumes_from_its_last_complete_shard(tmp_path, reference_cache):
    out = tmp_path / "cache"
    proc = _run_worker(out, "16", "float16", "5", env={**ENV, KILL_ENV: "2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(os.listdir(out / SHARD_DIR))
    complete = [n for n in names if n.endswith(".safetensors")]
    assert complete == ["shard-00000-of-00005.safetensors", "shard-00001-of-00005.safetensors"]
    assert any(".tmp" in n for n in names)  # the third shard died half-written, under a temporary name
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(ValueError, match="incomplete"):
        TeacherLogitCache(out)
    mtimes = {n: os.stat(out / SHARD_DIR / n).st_mtime_ns for n in complete}

    proc = _run_worker(out, "16", "float16", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {n: os.stat(out / SHARD_DIR / n).st_mtime_ns for n in complete} == mtimes  # finished shards were kept
    assert not any(".tmp" in n for n in os.listdir(out / SHARD_DIR))
    resumed, reference = _shard_tensors(out), _shard_tensors(reference_cache)
    assert resumed.keys() == reference.keys()
    for name in reference:
        for key, value in reference[name].items():
            assert torch.equal(resumed[name][key], value), (name, key)
    assert TeacherLogitCache(out).manifest["data_fingerprint"] == TeacherLogitCache(reference_cache).manifest["data_fingerprint"]


def test_two_processes_write_what_one_does(tmp_path, reference_cache):
    out = tmp_path / "cache"
    proc = _run_worker(out, "16", "float16", "5", torchrun=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, one = TeacherLogitCache(out).manifest, TeacherLogitCache(reference_cache).manifest
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert {k: v for k, v in two.items() if k != "num_processes"} == {k: v for k, v in one.items() if k != "num_processes"}
    a, b = _shard_tensors(out), _shard_tensors(reference_cache)
    assert a.keys() == b.keys()
    for name in b:
        for key, value in b[name].items():
            assert torch.equal(a[name][key], value), (name, key)


def test_complete_cache_is_reused_and_other_settings_refused(tmp_path):
    ds = make_dataset(n=12)
    cache = _cache(tmp_path / "c", ds=ds, rows_per_shard=4)
    mtimes = {s["file"]: os.stat(os.path.join(cache.path, s["file"])).st_mtime_ns for s in cache.manifest["shards"]}
    again = _cache(tmp_path / "c", ds=ds, rows_per_shard=4)  # same settings: nothing recomputed
    assert {s["file"]: os.stat(os.path.join(again.path, s["file"])).st_mtime_ns for s in again.manifest["shards"]} == mtimes
    with pytest.raises(ValueError, match="top_k"):
        _cache(tmp_path / "c", ds=ds, rows_per_shard=4, top_k=8)
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        _cache(tmp_path / "c", teacher=make_teacher(seed=1), ds=ds, rows_per_shard=4)
    with pytest.raises(ValueError, match="data_fingerprint"):
        _cache(tmp_path / "c", ds=make_dataset(n=12, seed=5), rows_per_shard=4)
    assert _cache(tmp_path / "c", ds=ds, rows_per_shard=4, top_k=8, overwrite=True).top_k == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a teacher-logit cache"):
        _cache(tmp_path / "other", ds=ds)


# ------------------------------------------------------------------------------------------------ refusals
def test_bad_cache_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        _cache(tmp_path / "a", top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="dtype"):
        _cache(tmp_path / "b", dtype="int8")
    with pytest.raises(ValueError, match="Token ids"):
        _cache(tmp_path / "c", ds=make_dataset(n=2, vocab=VOCAB + 10))
    with pytest.raises(ValueError, match="tokenizer"):
        _cache(tmp_path / "d", tokenizer=None)
    assert not any((tmp_path / n).exists() for n in "abcd")  # refused before anything is written


def test_mismatched_student_tokenizer_or_data_refused(tmp_path):
    teacher, ds = make_teacher(), make_dataset(n=16)
    cache = _cache(tmp_path / "cache", teacher, ds)

    def build(**kw):
        kw = {"train_dataset": ds, "processing_class": make_tokenizer(), **kw}
        args = _args(tmp_path / "out", teacher_logits_cache=cache.path, **kw.pop("args", {}))
        return DistillationTrainer(model=kw.pop("model", prune_student(teacher)), teacher_model=kw.pop("teacher_model", None), args=args, **kw)

    other_tok = make_tokenizer()
    other_tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(ValueError, match="tokenizer"):
        build(processing_class=other_tok)
    with pytest.raises(ValueError, match="not in the teacher-logit cache"):
        build(train_dataset=make_dataset(n=16, seed=1))
    with pytest.raises(ValueError, match="max_length"):  # SFT truncation changes the rows
        build(args={"max_length": 10})
    with pytest.raises(ValueError, match="eval_dataset"):
        build(eval_dataset=make_dataset(n=4, seed=2), args={"eval_strategy": "steps", "eval_steps": 1})
    with pytest.raises(ValueError, match="Vocabulary mismatch"):
        build(model=prune_student(make_teacher(vocab=VOCAB - 16)))  # the cache's tokenizer, a smaller head
    with pytest.raises(ValueError, match="not both"):
        build(teacher_model=teacher)
    # Options a cache cannot serve, refused by the config itself
    for kw, match in ((dict(hidden_state_loss="cosine"), "hidden"), (dict(temperature=2.0), "τ"), (dict(kd_loss="jsd"), "forward_kl")):
        with pytest.raises(ValueError, match=match):
            _args(tmp_path / "x", teacher_logits_cache=cache.path, **kw)
    # Not a cache, or an unfinished one
    with pytest.raises(ValueError, match="not a teacher-logit cache"):
        DistillationTrainer(model=prune_student(teacher), args=_args(tmp_path / "o", teacher_logits_cache=str(tmp_path)),
                            train_dataset=ds, processing_class=make_tokenizer())
    os.remove(os.path.join(cache.path, MANIFEST_NAME))
    with pytest.raises(ValueError, match="incomplete"):
        build()


# ------------------------------------------------------------------------------------------------- search, CLI
def test_search_candidates_retrain_from_one_cache(tmp_path):
    """`cached_teacher_retrain_fn` plugs into `search_architectures`; at k = V (float32) it ranks exactly as live."""
    from hf_minitron import MinitronPruneConfig, estimate_importance, search_architectures

    model = tiny_llama()
    scores = estimate_importance(model, random_batches(num=2), MinitronPruneConfig(batch_aggregation="l2"))
    train, held_out, tok = random_batches(num=4), random_batches(num=1, seed=9), make_tokenizer()
    kw = dict(target_params=0.6, max_candidates=2, retrain_steps=2, train_dataset=train, eval_dataset=held_out, tokenizer=tok, seed=0)
    training = {"use_cpu": True, "learning_rate": 1e-2}
    live = search_architectures(model, scores, training_kwargs=training, **kw)
    cache = ensure_search_cache(model, train, str(tmp_path / "cache"), tok, top_k=model.config.vocab_size, dtype="float32")
    assert cache.num_rows == 16
    cached = search_architectures(model, scores, retrain_fn=cached_teacher_retrain_fn(cache, tok, training_kwargs=training), **kw)
    assert cached.ranked_by == "retrain_loss" and [c.name for c in cached] == [c.name for c in live]
    for a, b in zip(cached, live):
        assert a.retrain_loss == pytest.approx(b.retrain_loss, rel=1e-5) and a.retrain_loss != a.zero_shot_loss


def test_cli_cache_teacher_then_distill(recipe_assets, tmp_path, capsys):
    from hf_minitron.cli import main

    model_dir, corpus = recipe_assets
    common = ["--dataset_path", corpus, "--seq_length", "32", "--max_samples", "12"]
    cache_dir = str(tmp_path / "cache")
    main(["cache-teacher", "--model_name_or_path", model_dir, *common, "--output_dir", cache_dir, "--top_k", "8"])
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 12 and report["top_k"] == 8 and report["bytes_per_token"] < 8 * 4 + 16
    out = str(tmp_path / "distilled")
    main(["distill", *common, "--student", model_dir, "--teacher_logits_cache", cache_dir, "--output_dir", out, "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no"])
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))
