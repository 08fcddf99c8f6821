# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Teacher-logit cache: one teacher pass over a tokenized corpus, stored as top-k log-probabilities + tail mass.

Minitron distils many students (the search candidates, the final student, re-runs) from one teacher on one corpus.
:func:`cache_teacher_logits` runs the teacher once and stores, for every position of every row, its k most likely next
tokens with their log-probabilities and the log of the probability mass of all other tokens (after the family's
post-head transform, at temperature 1); `DistillationConfig(teacher_logits_cache=path)` then trains without the
teacher in memory (see :mod:`hf_minitron.distillation.topk_loss` for the loss).

On-disk format (``output_dir``)::

    teacher_logits_manifest.json        written last: its presence means the cache is complete
    cache_settings.json                 the settings of the run (a resumed run must match them)
    tokenizer/                          the teacher's tokenizer (`save_pretrained`)
    shards/shard-00000-of-00008.safetensors, ...

Each shard holds a contiguous block of rows (``rows_per_shard``), concatenated position by position (ragged rows):

    input_ids      [n_tokens]         uint16 (V <= 65,536) or int32   the row's tokens
    row_offsets    [n_rows + 1]       int64    row r is positions row_offsets[r] : row_offsets[r + 1]
    row_index      [n_rows]           int64    the row's index in the corpus
    row_digest     [n_rows, 16]       uint8    BLAKE2b-128 of the row's tokens (little-endian int32)
    topk_ids       [n_tokens, k]      uint16 or int32   teacher top-k next-token ids, most likely first
    topk_logprobs  [n_tokens, k]      float16 (default), bfloat16 or float32
    tail_logprob   [n_tokens]         float32  log Σ_{j ∉ top-k} q_j (-inf when k = V)

Position t of a row is the teacher's distribution over the token after ``input_ids[: t + 1]``. Shards are written to a
temporary file and renamed into place, so a killed run leaves only complete shards and continues from them; under
`torchrun` / `accelerate launch` shard s is written by rank ``s % world_size`` and rank 0 writes the manifest.
Shards are plain safetensors: ``safe_open(file, "pt").get_slice("topk_ids")[a:b]`` streams any range without reading
the rest, and :meth:`TeacherLogitCache.to_iterable_dataset` gives a streaming `datasets.IterableDataset`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .checks import (
    _special_tokens,
    base_model,
    check_same_tokenizer,
    checkpoint_dir,
    describe_transforms,
    load_local_tokenizer,
    output_head,
    resolve_logit_transforms_checked,
)
from .losses import _log_softmax_, _logsumexp_rows, _project


logger = logging.get_logger(__name__)

FORMAT = "hf-minitron-teacher-logits"
FORMAT_VERSION = 1
MANIFEST_NAME = "teacher_logits_manifest.json"
SETTINGS_NAME = "cache_settings.json"
TOKENIZER_DIR = "tokenizer"
SHARD_DIR = "shards"
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Test hook (deterministic kill point): after this many shards are complete in this process, the next shard is written
# to its temporary file and the process kills itself (SIGKILL) before renaming it into place.
KILL_ENV = "HF_MINITRON_CACHE_KILL_AFTER_SHARDS"
_SAMPLE = 4096  # values per tensor in a model fingerprint

__all__ = [
    "TeacherLogitCache",
    "cache_teacher_logits",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "row_digest",
    "CacheTeacherArguments",
]


# ------------------------------------------------------------------------------------------------ fingerprints
def _hex(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def row_digest(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """BLAKE2b-128 of a row of token ids (as little-endian int32): the key a cached row is found by."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    return hashlib.blake2b(np.asarray(tokens, dtype="<i4").tobytes(), digest_size=16).digest()


def model_fingerprint(model: nn.Module) -> str:
    """A content fingerprint of a model: its config and, for every parameter, name, shape, dtype and up to 4,096
    evenly spaced values. Any training step or pruning changes it; reading 4,096 values per tensor keeps it cheap for
    8B-parameter teachers.

    Raises:
        ValueError: a parameter on the meta device (nothing to fingerprint).
    """
    base = base_model(model)
    config = base.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
        config.pop(key, None)
    parts: list[bytes | str] = [json.dumps(config, sort_keys=True, default=str)]
    with torch.no_grad():
        for name, p in sorted(base.named_parameters(), key=lambda kv: kv[0]):
            if p.device.type == "meta":
                raise ValueError(f"Parameter {name!r} is on the meta device; load the teacher's weights first.")
            flat = p.detach()
            flat = flat.full_tensor() if hasattr(flat, "full_tensor") else flat
            flat = flat.reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].float().cpu().numpy()
            parts += [f"{name}:{tuple(p.shape)}:{p.dtype}", sample.tobytes()]
    return _hex(*parts)


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary (token -> id) and special tokens: what decides whether two tokenizers
    map text to the same ids."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return _hex(json.dumps(vocab, ensure_ascii=False), json.dumps(sorted(_special_tokens(tok).items())))


# ------------------------------------------------------------------------------------------------------ corpus
class _Rows:
    """A corpus of token-id rows as one flat int64 array + offsets (no Python list per row for Arrow datasets)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> _Rows:
        arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.size for a in arrays]) if arrays else []
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(values, offsets)

    @classmethod
    def from_arrow(cls, column) -> _Rows:
        column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
        offsets = np.asarray(column.offsets, dtype=np.int64)
        return cls(np.asarray(column.values, dtype=np.int64), offsets)


def corpus_rows(dataset: Any, tokenizer=None, seq_length: int | None = None) -> _Rows:
    """The rows a cache is taken on: a `datasets.Dataset` / `IterableDataset` with `input_ids` (padding removed by
    `attention_mask` when present), or anything :func:`hf_minitron.data.to_samples` reads (token-id sequences or
    tensors shaped `[seq]` or `[batch, seq]`, DataLoader batches, texts with `tokenizer` and `seq_length`)."""
    if dataset is None:
        raise ValueError("`dataset` is required: the tokenized corpus to run the teacher on.")
    columns = getattr(dataset, "column_names", None)
    if columns is not None and not isinstance(dataset, dict):
        if "input_ids" not in columns:
            if "text" in columns:
                return corpus_rows(list(dataset["text"]), tokenizer, seq_length)
            raise ValueError(f"The dataset needs an `input_ids` column (or `text` with `tokenizer=`); it has {columns}.")
        if hasattr(dataset, "with_format") and hasattr(dataset, "__len__") and "attention_mask" not in columns:
            table = dataset.with_format("arrow")[:]
            return _Rows.from_arrow(table.column("input_ids"))
        rows = []
        for ex in dataset:
            ids = np.asarray(ex["input_ids"], dtype=np.int64)
            if "attention_mask" in ex and ex["attention_mask"] is not None:
                ids = ids[np.asarray(ex["attention_mask"], dtype=bool)]
            rows.append(ids)
        return _Rows.from_lists(rows)
    if isinstance(dataset, str):
        dataset = [dataset]
    items = list(dataset) if not isinstance(dataset, torch.Tensor) else [dataset]
    if any(isinstance(x, str) for x in items) and (tokenizer is None or seq_length is None):
        raise ValueError("Text input needs `tokenizer=` and `seq_length=` (it is packed with `pack_texts`).")
    from ..data import to_samples  # token lists / tensors shaped [seq] or [batch, seq], DataLoader dicts, texts

    return _Rows.from_lists([s.tolist() for s in to_samples(items, tokenizer, seq_length or 1)])


def _segments(dataset) -> Iterator[tuple[int, np.ndarray]]:
    """`(dataset row, tokens)` of every sample of a prepared (SFT) dataset; packed rows (`seq_lengths`) are split."""
    columns = getattr(dataset, "column_names", None) or []
    if "seq_lengths" not in columns:
        rows = corpus_rows(dataset)
        for i in range(len(rows)):
            yield i, rows[i]
        return
    for i, ex in enumerate(dataset):
        ids = np.asarray(ex["input_ids"], dtype=np.int64)
        start = 0
        for n in ex["seq_lengths"]:
            yield i, ids[start : start + n]
            start += n


# ------------------------------------------------------------------------------------------------------ reader
class TeacherLogitCache:
    """A complete teacher-logit cache written by :func:`cache_teacher_logits` (read-only, memory-mapped shards).

    Rows are found by their tokens (BLAKE2b digest, then an exact comparison with the stored tokens), so a training
    set may be shuffled, sub-sampled or batched in any way: each batch row (or packed sample) reads its own cached row.

    Args:
        path (`str`): the cache folder.

    Raises:
        ValueError: not a cache, an incomplete one (rerun `cache_teacher_logits` with the same arguments to finish
            it), or an unknown format version.

    Example:
    ```python
    >>> cache = TeacherLogitCache("teacher-cache")
    >>> cache.top_k, cache.num_tokens
    (64, 81920)
    >>> train_ds = cache.dataset()          # the cached rows, as a `datasets.Dataset` with `input_ids`
    ```
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        manifest = os.path.join(self.path, MANIFEST_NAME)
        if not os.path.isfile(manifest):
            if os.path.isfile(os.path.join(self.path, SETTINGS_NAME)):
                raise ValueError(
                    f"The teacher-logit cache in {self.path} is incomplete (no {MANIFEST_NAME}): the run that writes it "
                    "was interrupted. Rerun `cache_teacher_logits` / `hf-minitron cache-teacher` with the same "
                    "arguments to finish it (finished shards are kept)."
                )
            raise ValueError(f"{self.path} is not a teacher-logit cache (no {MANIFEST_NAME}); create one with `cache_teacher_logits`.")
        with open(manifest, encoding="utf-8") as f:
            self.manifest: dict[str, Any] = json.load(f)
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest} is format {self.manifest.get('format')!r} v{self.manifest.get('format_version')}; this "
                f"hf-minitron reads {FORMAT!r} v{FORMAT_VERSION}. Re-create the cache."
            )
        self._handles: dict[int, Any] = {}
        self._keys: np.ndarray | None = None  # sorted first 8 bytes of every row digest
        self._where: np.ndarray | None = None  # [rows, 2] (shard, local row), in key order

    # -------------------------------------------------------------------------------------------- properties
    top_k = property(lambda self: int(self.manifest["top_k"]))
    vocab_size = property(lambda self: int(self.manifest["vocab_size"]))
    num_rows = property(lambda self: int(self.manifest["num_rows"]))
    num_tokens = property(lambda self: int(self.manifest["num_tokens"]))
    seq_length = property(lambda self: int(self.manifest["seq_length"]))
    logprob_dtype = property(lambda self: self.manifest["logprob_dtype"])

    def __getstate__(self) -> dict:  # picklable (datasets fingerprints, DataLoader workers): shards reopen lazily
        return {"path": self.path, "manifest": self.manifest, "_handles": {}, "_keys": None, "_where": None}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherLogitCache({self.path!r}, teacher={m['teacher']['name_or_path']!r}, top_k={self.top_k}, "
                f"dtype={self.logprob_dtype}, rows={self.num_rows}, tokens={self.num_tokens})")

    def disk_bytes(self) -> int:
        """Bytes of the shard files (what grows with the corpus; the tokenizer and manifest are a fixed few MB)."""
        return sum(os.path.getsize(os.path.join(self.path, s["file"])) for s in self.manifest["shards"])

    def tokenizer(self):
        """The teacher's tokenizer saved with the cache."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.join(self.path, TOKENIZER_DIR))

    # -------------------------------------------------------------------------------------------------- rows
    def _shard(self, s: int):
        if s not in self._handles:
            from safetensors import safe_open

            self._handles[s] = safe_open(os.path.join(self.path, self.manifest["shards"][s]["file"]), "pt")
        return self._handles[s]

    def _build_index(self) -> None:
        keys, where = [], []
        for s in range(len(self.manifest["shards"])):
            digests = self._shard(s).get_tensor("row_digest").numpy()  # [rows, 16]
            keys.append(digests[:, :8].copy().view("<u8").reshape(-1))
            where.append(np.stack([np.full(len(digests), s), np.arange(len(digests))], axis=1))
        keys_all, where_all = np.concatenate(keys), np.concatenate(where)
        order = np.argsort(keys_all, kind="stable")
        self._keys, self._where = keys_all[order], where_all[order]

    def find(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, verify: bool = True) -> tuple[int, int] | None:
        """`(shard, local row)` of the cached row with exactly these tokens, or `None`. `verify=False` trusts the
        64-bit digest key without comparing the stored tokens (the up-front dataset check; batches always verify)."""
        if self._keys is None:
            self._build_index()
        tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
        key = np.frombuffer(row_digest(tokens)[:8], dtype="<u8")[0]
        lo, hi = np.searchsorted(self._keys, key, "left"), np.searchsorted(self._keys, key, "right")
        for s, r in self._where[lo:hi]:
            if not verify or np.array_equal(self._row_tokens(int(s), int(r)), tokens):
                return int(s), int(r)
        return None

    def _bounds(self, s: int, r: int) -> tuple[int, int]:
        offsets = self._shard(s).get_slice("row_offsets")[r : r + 2]
        return int(offsets[0]), int(offsets[1])

    def _row_tokens(self, s: int, r: int) -> np.ndarray:
        a, b = self._bounds(s, r)
        return self._shard(s).get_slice("input_ids")[a:b].to(torch.int64).numpy()

    def read(self, s: int, r: int) -> dict[str, torch.Tensor]:
        """Row `r` of shard `s`: `input_ids [L]`, `topk_ids [L, k]` (int64), `topk_logprobs [L, k]` (stored dtype),
        `tail_logprob [L]` (fp32)."""
        a, b = self._bounds(s, r)
        f = self._shard(s)
        return {
            "input_ids": f.get_slice("input_ids")[a:b].to(torch.int64),
            "topk_ids": f.get_slice("topk_ids")[a:b].to(torch.int64),
            "topk_logprobs": f.get_slice("topk_logprobs")[a:b],
            "tail_logprob": f.get_slice("tail_logprob")[a:b],
        }

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index` of the corpus (its position in the dataset the cache was taken on)."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"Row {index} is outside the cache's {self.num_rows} rows.")
        per = int(self.manifest["rows_per_shard"])
        return self.read(index // per, index % per)

    def iter_rows(self) -> Iterator[dict[str, np.ndarray]]:
        """Every row in corpus order, as numpy arrays (`row_index`, `input_ids`, `topk_ids`, `topk_logprobs` as fp32,
        `tail_logprob`); shard by shard, so memory stays at one row."""
        for s, shard in enumerate(self.manifest["shards"]):
            for r in range(shard["row_end"] - shard["row_start"]):
                row = self.read(s, r)
                yield {"row_index": shard["row_start"] + r, **{k: v.float().numpy() if k == "topk_logprobs" else v.numpy() for k, v in row.items()}}

    def to_iterable_dataset(self):
        """A streaming `datasets.IterableDataset` of :meth:`iter_rows`."""
        from datasets import IterableDataset

        return IterableDataset.from_generator(_iter_cache_rows, gen_kwargs={"path": self.path})

    def dataset(self, max_rows: int | None = None):
        """The cached rows as a `datasets.Dataset` with an `input_ids` column, in corpus order: training data that
        matches the cache by construction."""
        from datasets import Dataset

        rows = []
        for s, shard in enumerate(self.manifest["shards"]):
            f = self._shard(s)
            ids, offsets = f.get_tensor("input_ids").to(torch.int64), f.get_tensor("row_offsets")
            rows += [ids[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
            if max_rows is not None and len(rows) >= max_rows:
                break
        return Dataset.from_dict({"input_ids": rows[:max_rows] if max_rows is not None else rows})

    # ------------------------------------------------------------------------------------------------ checks
    def check_tokenizers(self, known: list[tuple[str, Any]]) -> None:
        """Raise a `ValueError` unless every `(source, tokenizer)` in `known` is the cache's tokenizer."""
        expected = self.manifest["tokenizer"]["fingerprint"]
        for source, tok in known:
            if tokenizer_fingerprint(tok) == expected:
                continue
            check_same_tokenizer([(f"the teacher-logit cache ({self.path})", self.tokenizer()), (source, tok)])
            raise ValueError(
                f"The tokenizer of {source} is not the one the teacher-logit cache {self.path} was taken with (special "
                "tokens or vocabulary differ); distil with the teacher's tokenizer, or re-create the cache."
            )

    def check_vocab(self, student_rows: int, tokenizer_len: int | None) -> int:
        """The vocabulary size the loss compares on; raises if the student's `lm_head` cannot be compared."""
        v = self.vocab_size
        if student_rows == v or (student_rows > v and tokenizer_len is not None and tokenizer_len <= v):
            return v
        raise ValueError(
            f"Vocabulary mismatch: the student's `lm_head` has {student_rows} rows and the teacher-logit cache covers "
            f"{v} tokens (tokenizer: {tokenizer_len}). Student and teacher must share a tokenizer; re-create the cache "
            f"with `vocab_size={min(student_rows, v)}` if one head is only padded."
        )

    def missing(self, dataset, limit: int = 3) -> tuple[int, list[tuple[int, int]]]:
        """`(count, [(dataset row, tokens), ...])` of the samples of a (prepared) dataset that are not in the cache."""
        count, examples = 0, []
        for i, tokens in _segments(dataset):
            if tokens.size and self.find(tokens, verify=False) is None:
                count += 1
                if len(examples) < limit:
                    examples.append((i, int(tokens.size)))
        return count, examples

    def check_dataset(self, dataset, name: str = "train_dataset") -> None:
        """Raise a `ValueError` naming the first missing rows if any sample of `dataset` is not in the cache. An
        `IterableDataset` is checked batch by batch during training instead."""
        if dataset is None:
            return
        if isinstance(dataset, dict):
            for key, ds in dataset.items():
                self.check_dataset(ds, f"{name}[{key!r}]")
            return
        if not hasattr(dataset, "__len__"):
            logger.info(f"{name} is iterable: its rows are matched to the teacher-logit cache batch by batch.")
            return
        count, examples = self.missing(dataset)
        if count:
            where = ", ".join(f"row {i} ({n} tokens)" for i, n in examples)
            raise ValueError(
                f"{count} sample(s) of {name} are not in the teacher-logit cache {self.path} ({self.num_rows} rows of up "
                f"to {self.seq_length} tokens), e.g. {where}. Train on the rows the cache was taken on "
                "(`TeacherLogitCache(path).dataset()` gives them), untruncated (SFT `max_length` >= the longest "
                "cached row) and unpacked or packed with `packing_strategy='bfd'` (command line: the same `--dataset_path`, "
                "`--seq_length` and `--max_samples` as `hf-minitron cache-teacher`); or cache this data too."
            )

    # ---------------------------------------------------------------------------------------- batch targets
    def batch_targets(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        needed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached teacher targets of a collated batch, aligned with its positions.

        Each row is split into samples (the `attention_mask == 1` positions, or, for padding-free / packed batches
        without a mask, the runs that start where `position_ids == 0`), and each sample is looked up by its tokens.

        Args:
            input_ids (`torch.Tensor`): `[B, T]`.
            attention_mask / position_ids (`torch.Tensor`, *optional*): `[B, T]`, as the collator made them.
            needed (`torch.Tensor`, *optional*): `[B, T]` boolean, the positions the loss reads; a sample not in the
                cache is an error only if it has one (padding runs of packed batches have none).

        Returns:
            `(topk_ids [B, T, k] int64, topk_logprobs [B, T, k] fp32, tail_logprob [B, T] fp32)` on CPU; positions
            without a cached sample hold id 0, log-prob `-inf` and tail log-mass 0.

        Raises:
            ValueError: a needed sample is not in the cache.
        """
        ids = input_ids.detach().cpu()
        B, T = ids.shape
        k = self.top_k
        out_ids = torch.zeros(B, T, k, dtype=torch.int64)
        out_lp = torch.full((B, T, k), float("-inf"), dtype=torch.float32)
        out_lt = torch.zeros(B, T, dtype=torch.float32)
        need = needed.detach().cpu().bool() if needed is not None else torch.ones(B, T, dtype=torch.bool)
        for b in range(B):
            for pos in self._sample_positions(b, T, attention_mask, position_ids):
                tokens = ids[b, pos]
                loc = self.find(tokens.numpy()) if tokens.numel() else None
                if loc is None:
                    if tokens.numel() and need[b, pos].any():
                        head = tokens[:8].tolist()
                        raise ValueError(
                            f"A batch sample ({tokens.numel()} tokens, starting {head}) is not in the teacher-logit cache "
                            f"{self.path}: train on the rows the cache was taken on (`TeacherLogitCache(path).dataset()`), "
                            "untruncated and unpacked (or packed with `packing_strategy='bfd'`)."
                        )
                    continue
                row = self.read(*loc)
                out_ids[b, pos] = row["topk_ids"]
                out_lp[b, pos] = row["topk_logprobs"].float()
                out_lt[b, pos] = row["tail_logprob"].float()
        return out_ids, out_lp, out_lt

    @staticmethod
    def _sample_positions(b: int, T: int, attention_mask, position_ids) -> list[torch.Tensor]:
        if attention_mask is not None:
            return [attention_mask[b].detach().cpu().bool().nonzero().flatten()]
        if position_ids is not None:
            starts = (position_ids[b].detach().cpu() == 0).nonzero().flatten().tolist() + [T]
            return [torch.arange(a, z) for a, z in zip(starts[:-1], starts[1:]) if z > a]
        return [torch.arange(T)]


def _iter_cache_rows(path: str) -> Iterator[dict[str, np.ndarray]]:
    yield from TeacherLogitCache(path).iter_rows()


# ------------------------------------------------------------------------------------------------------ writer
def _dist_info() -> tuple[int, int, Any]:
    """`(rank, world_size, state)`; under torchrun / accelerate launch the process group is initialized (by accelerate,
    gloo on a machine without GPU) if nobody did yet."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state
    return 0, 1, None


def _barrier(state) -> None:
    if state is torch.distributed:
        state.barrier()
    elif state is not None:
        state.wait_for_everyone()


def _atomic_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _shard_name(s: int, n: int) -> str:
    return os.path.join(SHARD_DIR, f"shard-{s:05d}-of-{n:05d}.safetensors")


def _shard_fingerprint(path: str) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("config_fingerprint")
    except Exception:  # noqa: BLE001 - an unreadable shard is not a finished one
        return None


def _settings_diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} there vs {b.get(k)!r} now" for k in keys[:4])


@torch.inference_mode()
def _teacher_shard(teacher, head_w, head_b, steps, rows: list[np.ndarray], top_k: int, batch_size: int, chunk_size: int,
                   progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids `[n, k]`, log-probs `[n, k]` (fp32) and tail log-mass `[n]` of every position of `rows`, in order.
    Only `[chunk_size, V]` logits exist at a time."""
    base = base_model(teacher)
    device = base.get_input_embeddings().weight.device
    n_total = int(sum(r.size for r in rows))
    out_ids = torch.empty(n_total, top_k, dtype=torch.int64)
    out_lp = torch.empty(n_total, top_k, dtype=torch.float32)
    out_lt = torch.empty(n_total, dtype=torch.float32)
    starts = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    order = sorted((i for i in range(len(rows)) if rows[i].size), key=lambda i: -rows[i].size)  # less padding
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        length = max(rows[i].size for i in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for j, i in enumerate(batch):
            ids[j, : rows[i].size] = torch.from_numpy(rows[i])
            mask[j, : rows[i].size] = 1
        hidden = base.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        h = hidden[mask.to(hidden.device).bool()]  # [n, H], row-major: row j's positions are contiguous
        ids_b = torch.empty(h.shape[0], top_k, dtype=torch.int64)
        lp_b = torch.empty(h.shape[0], top_k, dtype=torch.float32)
        lt_b = torch.empty(h.shape[0], dtype=torch.float32)
        for c0 in range(0, h.shape[0], chunk_size):
            logits, _, _ = _project(h[c0 : c0 + chunk_size].to(head_w.device), head_w, head_b, steps, False)  # [C, V]
            logp = _log_softmax_(logits)
            vals, idx = logp.topk(top_k, dim=-1)
            logp.scatter_(-1, idx, float("-inf"))  # the complement of the top-k set
            lt_b[c0 : c0 + chunk_size] = _logsumexp_rows(logp).float().cpu()
            ids_b[c0 : c0 + chunk_size], lp_b[c0 : c0 + chunk_size] = idx.cpu(), vals.float().cpu()
            del logits, logp
        at = 0
        for i in batch:
            n = rows[i].size
            out_ids[starts[i] : starts[i] + n] = ids_b[at : at + n]
            out_lp[starts[i] : starts[i] + n] = lp_b[at : at + n]
            out_lt[starts[i] : starts[i] + n] = lt_b[at : at + n]
            at += n
        if progress is not None:
            progress.update(int(mask.sum()))
    return out_ids, out_lp, out_lt


def cache_teacher_logits(
    teacher: nn.Module | str,
    dataset: Any,
    output_dir: str | os.PathLike,
    top_k: int = 64,
    dtype: str | torch.dtype = "float16",
    *,
    tokenizer=None,
    seq_length: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 1024,
    rows_per_shard: int | None = None,
    vocab_size: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TeacherLogitCache:
    """Run the teacher once over a tokenized corpus and store its top-k next-token log-probabilities + tail mass.

    For every position of every row: the `top_k` most likely next tokens (ids and log-probabilities, most likely
    first) and the log of the probability of all other tokens, computed from the teacher's logits *after its family's
    post-head transform* (Granite's `logits_scaling`, Gemma soft-capping, ...; verified against its own `.logits`) at
    temperature 1. Logits are built `chunk_size` positions at a time (`[chunk_size, V]` fp32 at most, never
    `[B, T, V]`). See the module docstring for the file format. `DistillationConfig(teacher_logits_cache=output_dir)`
    trains from it.

    Resumable and idempotent: shards are written atomically, a rerun with the same arguments skips the finished ones
    (and returns at once if the cache is complete). Under `torchrun` / `accelerate launch` every rank writes its own
    shards (shard `s` on rank `s % world_size`; the result equals a single process's) and every rank returns the cache.

    Args:
        teacher (`nn.Module` or `str`): the teacher causal LM (or a path / Hub id, loaded with `AutoModelForCausalLM`).
            Kept where it is; inputs go to its embedding's device.
        dataset: the corpus: a `datasets.Dataset` with `input_ids` (in the order training will not need to follow), a
            list of token-id sequences or tensors, or texts (with `tokenizer` and `seq_length`, packed by
            `pack_texts`).
        output_dir (`str`): the cache folder.
        top_k (`int`, defaults to 64): tokens stored per position, 1 <= top_k <= vocab_size. `top_k = vocab_size` with
            `dtype="float32"` makes cached training equal live-teacher forward KL.
        dtype (`str` or `torch.dtype`, defaults to `"float16"`): stored log-probability dtype: `"float16"`,
            `"bfloat16"` or `"float32"` (exact). Ids are uint16 when the vocabulary fits, else int32; the tail is fp32.
        tokenizer: the teacher's tokenizer (saved with the cache and checked against the student's). Default: the one
            saved beside the teacher's weights.
        seq_length (`int`, *optional*): tokens per row when `dataset` is text.
        batch_size (`int`, defaults to 8): rows per teacher forward.
        chunk_size (`int`, defaults to 1024): positions per logits chunk.
        rows_per_shard (`int`, *optional*): rows per shard file; default about 2^20 tokens per shard.
        vocab_size (`int`, *optional*): the first `vocab_size` logits only (a head padded beyond the tokenizer);
            default: the teacher's `lm_head` rows.
        overwrite (`bool`): replace an existing cache of other settings in `output_dir` (else that is an error).
        show_progress (`bool`): a progress bar on rank 0.

    Returns:
        [`TeacherLogitCache`] of the complete cache.

    Raises:
        ValueError: invalid options, token ids outside the vocabulary, an empty corpus, no tokenizer, or `output_dir`
            holding a cache of other settings (teacher, tokenizer, data, k, dtype) without `overwrite=True`.

    Example:
    ```python
    >>> cache = cache_teacher_logits(teacher, train_ds, "teacher-cache", top_k=64, tokenizer=tokenizer)
    >>> args = DistillationConfig("out", teacher_logits_cache="teacher-cache", max_steps=100)
    >>> DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=cache.dataset()).train()
    ```
    """
    dtype_name = {v: k for k, v in LOGPROB_DTYPES.items()}.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if dtype_name not in LOGPROB_DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(LOGPROB_DTYPES)} (the stored log-probability dtype), got {dtype!r}.")
    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if rows_per_shard is not None and (not isinstance(rows_per_shard, int) or rows_per_shard < 1):
        raise ValueError(f"`rows_per_shard` must be a positive integer, got {rows_per_shard!r}.")
    if isinstance(teacher, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(teacher)
        teacher = AutoModelForCausalLM.from_pretrained(teacher).eval()
    if tokenizer is None:
        tokenizer = load_local_tokenizer(checkpoint_dir(teacher))
        if tokenizer is None:
            raise ValueError("Pass `tokenizer=` (the teacher's tokenizer): it is saved with the cache and checked against the student's.")
    head = output_head(teacher, "teacher")
    head_rows = head.weight.shape[0]
    vocab = head_rows if vocab_size is None else vocab_size
    if not 0 < vocab <= head_rows:
        raise ValueError(f"`vocab_size` must be in [1, {head_rows}] (the teacher's `lm_head` rows), got {vocab_size}.")
    tok_len = len(getattr(tokenizer, "tokenizer", tokenizer))
    if tok_len > vocab:
        raise ValueError(f"The tokenizer has {tok_len} tokens but only {vocab} logits would be cached; raise `vocab_size`.")
    if top_k > vocab:
        raise ValueError(f"`top_k={top_k}` exceeds the vocabulary ({vocab}); use top_k <= {vocab}.")
    rows = corpus_rows(dataset, tokenizer, seq_length)
    if len(rows) == 0 or rows.values.size == 0:
        raise ValueError("The corpus is empty: give at least one non-empty row of token ids.")
    if rows.values.min() < 0 or rows.values.max() >= vocab:
        raise ValueError(f"Token ids must be in [0, {vocab}); the corpus has ids in [{rows.values.min()}, {rows.values.max()}].")
    max_len = int(rows.lengths.max())
    max_pos = getattr(base_model(teacher).config.get_text_config(), "max_position_embeddings", None)
    if max_pos is not None and max_len > max_pos:
        logger.warning(f"The longest row ({max_len} tokens) exceeds the teacher's max_position_embeddings ({max_pos}).")
    steps = resolve_logit_transforms_checked(teacher, "teacher", check_backbone=True)
    per_shard = rows_per_shard or max(1, (1 << 20) // max_len)
    num_shards = math.ceil(len(rows) / per_shard)
    id_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    digests = [row_digest(rows[i]) for i in range(len(rows))]

    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": model_fingerprint(teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data_fingerprint": _hex(str(len(rows)), *digests),
        "top_k": top_k,
        "logprob_dtype": dtype_name,
        "vocab_size": vocab,
        "rows_per_shard": per_shard,
        "logit_transforms": [list(s) for s in steps],
    }
    config_fp = _hex(json.dumps(settings, sort_keys=True))
    out = os.path.abspath(os.fspath(output_dir))
    rank, world, state = _dist_info()

    # Folder: reuse a complete cache of the same settings, resume an unfinished one, refuse anything else
    if rank == 0:
        _prepare_output(out, settings, config_fp, overwrite)
    _barrier(state)
    manifest_path = os.path.join(out, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        logger.info(f"The teacher-logit cache in {out} is complete for these settings; reusing it.")
        return TeacherLogitCache(out)

    teacher_was_training = teacher.training
    teacher.eval()
    head_w = head.weight.detach()[:vocab]
    head_b = head.bias.detach()[:vocab] if getattr(head, "bias", None) is not None else None
    mine = [s for s in range(num_shards) if s % world == rank]
    kill_after = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    done_here = 0
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    logger.info(
        f"Caching teacher logits: {len(rows)} rows, {int(rows.values.size):,} tokens, top-{top_k} {dtype_name}, "
        f"{num_shards} shard(s) of {per_shard} rows, {world} process(es); post-head transforms: {describe_transforms(steps)}"
    )
    todo = [s for s in mine if _shard_fingerprint(os.path.join(out, _shard_name(s, num_shards))) != config_fp]
    if len(todo) < len(mine):
        logger.warning(f"Resuming the teacher-logit cache in {out}: {len(mine) - len(todo)} of this process's {len(mine)} shards are done.")
    bounds = [(s * per_shard, min(len(rows), (s + 1) * per_shard)) for s in todo]
    progress = tqdm(total=int(sum(rows.offsets[b] - rows.offsets[a] for a, b in bounds)), unit="tok",
                    desc="Caching teacher logits", disable=not show_progress or rank != 0)
    try:
        for s, (r0, r1) in zip(todo, bounds):
            path = os.path.join(out, _shard_name(s, num_shards))
            shard_rows = [rows[i] for i in range(r0, r1)]
            t_ids, t_lp, t_lt = _teacher_shard(teacher, head_w, head_b, steps, shard_rows, top_k, batch_size, chunk_size, progress)
            offsets = np.concatenate([[0], np.cumsum([r.size for r in shard_rows])]).astype(np.int64)
            tensors = {
                "input_ids": torch.from_numpy(np.concatenate(shard_rows)).to(id_dtype),
                "row_offsets": torch.from_numpy(offsets),
                "row_index": torch.arange(r0, r1, dtype=torch.int64),
                "row_digest": torch.frombuffer(bytearray(b"".join(digests[r0:r1])), dtype=torch.uint8).reshape(-1, 16),
                "topk_ids": t_ids.to(id_dtype),
                "topk_logprobs": t_lp.to(LOGPROB_DTYPES[dtype_name]),
                "tail_logprob": t_lt,
            }
            metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config_fingerprint": config_fp,
                        "shard": str(s), "num_shards": str(num_shards), "row_start": str(r0), "row_end": str(r1)}
            tmp = f"{path}.tmp{os.getpid()}"
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            if kill_after is not None and done_here >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a half-finished shard on disk
            os.replace(tmp, path)
            done_here += 1
    finally:
        progress.close()
        teacher.train(teacher_was_training)
    _barrier(state)

    if rank == 0:
        missing = [s for s in range(num_shards) if _shard_fingerprint(os.path.join(out, _shard_name(s, num_shards))) != config_fp]
        if missing:
            raise RuntimeError(f"Shards {missing[:5]} of the teacher-logit cache in {out} are missing after the pass; rerun to finish them.")
        tok_dir = os.path.join(out, TOKENIZER_DIR)
        tmp_dir = f"{tok_dir}.tmp{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        getattr(tokenizer, "tokenizer", tokenizer).save_pretrained(tmp_dir)
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tmp_dir, tok_dir)
        base = base_model(teacher)
        shards = []
        for s in range(num_shards):
            r0, r1 = s * per_shard, min(len(rows), (s + 1) * per_shard)
            name = _shard_name(s, num_shards)
            shards.append({"file": name, "row_start": r0, "row_end": r1,
                           "num_tokens": int(rows.offsets[r1] - rows.offsets[r0]), "bytes": os.path.getsize(os.path.join(out, name))})
        from .. import __version__

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config_fingerprint": config_fp,
            "teacher": {"name_or_path": getattr(base, "name_or_path", "") or "", "fingerprint": settings["teacher_fingerprint"],
                        "model_type": base.config.model_type, "dtype": str(head.weight.dtype).replace("torch.", ""),
                        "logit_transforms": settings["logit_transforms"]},
            "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", "") or "", "fingerprint": settings["tokenizer_fingerprint"],
                          "size": tok_len, "dir": TOKENIZER_DIR},
            "top_k": top_k,
            "temperature": 1.0,
            "vocab_size": vocab,
            "logprob_dtype": dtype_name,
            "id_dtype": str(id_dtype).replace("torch.", ""),
            "seq_length": max_len,
            "min_seq_length": int(rows.lengths.min()),
            "num_rows": len(rows),
            "num_tokens": int(rows.values.size),
            "data_fingerprint": settings["data_fingerprint"],
            "rows_per_shard": per_shard,
            "shards": shards,
            "num_processes": world,
            "created_by": f"hf-minitron {__version__}",
        }
        _atomic_json(manifest_path, manifest)
        logger.info(f"Teacher-logit cache complete: {out} ({sum(s['bytes'] for s in shards) / max(1, manifest['num_tokens']):.1f} bytes/token)")
    _barrier(state)
    return TeacherLogitCache(out)


def _prepare_output(out: str, settings: dict, config_fp: str, overwrite: bool) -> None:
    """Create `out`, or check that what it holds is this run's (complete or unfinished) cache; clear it on `overwrite`."""
    settings_path = os.path.join(out, SETTINGS_NAME)
    if os.path.isdir(out) and os.listdir(out):
        previous = None
        if os.path.isfile(settings_path):
            with open(settings_path, encoding="utf-8") as f:
                previous = json.load(f)
        if previous != {**settings, "config_fingerprint": config_fp}:
            if not overwrite:
                why = f"settings differ ({_settings_diff(previous or {}, settings)})" if previous else "it is not a teacher-logit cache"
                raise ValueError(f"{out} is not empty and {why}; choose another `output_dir` or pass `overwrite=True`.")
            logger.warning(f"Replacing the contents of {out} (overwrite=True).")
            shutil.rmtree(out)
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    for name in os.listdir(os.path.join(out, SHARD_DIR)):  # half-written shards of a killed run
        if ".tmp" in name:
            os.remove(os.path.join(out, SHARD_DIR, name))
    if not os.path.isfile(settings_path):
        _atomic_json(settings_path, {**settings, "config_fingerprint": config_fp})


# --------------------------------------------------------------------------------------------------------- CLI
@dataclass
class CacheTeacherArguments:
    """Options of `hf-minitron cache-teacher` (the data options are those of every subcommand)."""

    output_dir: str = field(default="teacher_logits", metadata={"help": "Cache folder."})
    top_k: int = field(default=64, metadata={"help": "Teacher tokens stored per position."})
    logprob_dtype: str = field(default="float16", metadata={"help": "float16, bfloat16 or float32 (exact)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward."})
    chunk_size: int = field(default=1024, metadata={"help": "Positions per logits chunk."})
    rows_per_shard: int | None = field(default=None, metadata={"help": "Rows per shard file (default ~1M tokens)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a cache of other settings in output_dir."})


def cache_teacher_main(argv: list[str]) -> TeacherLogitCache:
    """`hf-minitron cache-teacher`: cache the teacher's top-k logits on the training rows `hf-minitron distill` uses
    (the same `--dataset_path`, `--seq_length`, `--max_samples`). Multi-process under `torchrun`/`accelerate launch`.

        hf-minitron cache-teacher --output_dir teacher-cache --top_k 64
        hf-minitron distill --student pruned --teacher_logits_cache teacher-cache --output_dir distilled
    """
    from ..cli import CommandDataArguments, RemoteCodeArguments, _parse, _setup, _texts_and_model
    from ..data import pack_texts

    data, args, remote = _parse((CommandDataArguments, CacheTeacherArguments, RemoteCodeArguments), argv)
    _setup()
    teacher, tokenizer, train, _ = _texts_and_model(data, remote.trust_remote_code)
    rank, world, state = _dist_info()
    if getattr(state, "device", None) is not None:
        teacher.to(state.device)
    blocks = pack_texts(train, tokenizer, data.seq_length, data.max_samples)
    cache = cache_teacher_logits(
        teacher, [b.tolist() for b in blocks], args.output_dir, top_k=args.top_k, dtype=args.logprob_dtype,
        tokenizer=tokenizer, batch_size=args.batch_size, chunk_size=args.chunk_size, rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
    )
    if rank == 0:
        print(json.dumps({"output_dir": cache.path, "rows": cache.num_rows, "tokens": cache.num_tokens, "top_k": cache.top_k,
                          "logprob_dtype": cache.logprob_dtype, "bytes_per_token": round(cache.disk_bytes() / cache.num_tokens, 1)}, indent=2))
    return cache
