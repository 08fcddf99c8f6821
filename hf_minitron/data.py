"""Calibration / training text -> token batches, and the embedded offline default corpus."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def holdout_every(eval_fraction: float) -> int:
    """Every how many documents one is held out: ``max(2, round(1 / eval_fraction))``.

    Raises:
        ValueError: ``eval_fraction`` is not a number in (0, 0.5] (at most every second document can be held out).
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction <= 0.5:
        raise ValueError(
            f"`eval_fraction` must be in (0, 0.5], got {eval_fraction!r}: it is the share of documents held out for "
            "evaluation (e.g. 0.1 holds out every 10th)."
        )
    return max(2, round(1 / eval_fraction))


def load_default_corpus(split: str = "train", eval_fraction: float = 0.1) -> list[str]:
    """Real English text that ships with CPython (the ``pydoc_data`` reference topics, ~465k characters).

    Needs no download, so the default recipe and examples run offline. Topics are split
    deterministically: every ``round(1 / eval_fraction)``-th topic (sorted by name) is held out.

    Example:
        >>> texts = load_default_corpus("train")
        >>> held_out = load_default_corpus("eval")
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}.")
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distro Pythons strip it
        raise RuntimeError(
            "The embedded default corpus needs CPython's `pydoc_data` module, which this Python lacks; "
            "pass your own text (e.g. `--dataset_path my.txt`)."
        ) from err
    every = holdout_every(eval_fraction)
    names = sorted(topics)
    if split == "all":
        chosen = names
    else:
        chosen = [n for i, n in enumerate(names) if (i % every == every - 1) == (split == "eval")]
    return [topics[n] for n in chosen]


def load_text_file(path: str, split: str = "all", eval_fraction: float = 0.1) -> list[str]:
    """Read a plain-text corpus and split it by article (WikiText-style `` = Title = `` headings).

    Every ``round(1 / eval_fraction)``-th article is held out for ``split="eval"``; the others are ``"train"``.
    Files without headings are split into paragraphs of blank-line-separated text instead.

    Raises:
        ValueError: ``split`` is not ``"train"``, ``"eval"`` or ``"all"``, or ``eval_fraction`` is not in (0, 0.5].
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}.")
    every = holdout_every(eval_fraction) if split != "all" else None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    articles: list[list[str]] = []
    for line in lines:
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title or not articles:
            articles.append([])
        articles[-1].append(line)
    if len(articles) <= 1:  # no headings: paragraphs
        text = "\n".join(lines)
        articles = [[p] for p in text.split("\n\n") if p.strip()]
    docs = ["\n".join(a).strip() for a in articles if "".join(a).strip()]
    if every is None:
        return docs
    return [d for i, d in enumerate(docs) if (i % every == every - 1) == (split == "eval")]


def expected_bos_token_id(tokenizer) -> int | None:
    """The BOS id the model expects at the start of every sequence, or ``None``.

    A tokenizer that puts its BOS token first when it adds special tokens (Gemma, Llama-3) was paired with a model
    trained on sequences that start with it; one that does not (SmolLM2, Qwen) was not.

    Example:
        >>> expected_bos_token_id(gemma_tokenizer)  # 2  # doctest: +SKIP
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a probe adds nothing we can detect
        return None
    return bos if len(ids) > 0 and ids[0] == bos else None


def pack_texts(
    texts: Sequence[str], tokenizer, seq_length: int, max_samples: int | None = None, add_bos: bool | None = None
) -> list[torch.Tensor]:
    """Tokenize texts, join them with EOS and cut the stream into ``seq_length``-token samples.

    With ``add_bos`` (default: when :func:`expected_bos_token_id` finds that the model expects one) every sample
    starts with the tokenizer's BOS token followed by ``seq_length - 1`` stream tokens, so calibration, training and
    evaluation windows all look like the sequences the model was trained on. The last partial block is kept only
    when no full block exists (tiny corpora still calibrate).

    Example:
        >>> blocks = pack_texts(texts, tokenizer, seq_length=256, max_samples=64)  # doctest: +SKIP
    """
    eos = tokenizer.eos_token_id
    bos = expected_bos_token_id(tokenizer) if add_bos is None else (tokenizer.bos_token_id if add_bos else None)
    if add_bos and bos is None:
        raise ValueError("`add_bos=True` but the tokenizer has no `bos_token_id`.")
    body = seq_length - (bos is not None)  # stream tokens per sample
    if body < 1:
        raise ValueError(f"`seq_length` must be >= 2 to hold a BOS token and one text token, got {seq_length}.")
    stream: list[int] = []
    needed = None if max_samples is None else max_samples * body
    for text in texts:
        if not text:
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if needed is not None and len(stream) >= needed:
            break
    blocks = [stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]
    if not blocks and stream:
        blocks = [stream]
    if max_samples is not None:
        blocks = blocks[:max_samples]
    prefix = [] if bos is None else [bos]
    return [torch.tensor(prefix + b, dtype=torch.long) for b in blocks]


def _rows_of(input_ids: Any, attention_mask: Any = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a ``[seq]`` or ``[batch, seq]`` tensor (and optional mask) into unpadded 1-D rows."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"Calibration input_ids must be shaped [seq] or [batch, seq], got {tuple(ids.shape)}.")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
    rows = []
    for row, row_mask in zip(ids, mask):
        keep = row_mask.bool()
        rows.append((row[keep], torch.ones(int(keep.sum()), dtype=torch.long)))
    return rows


def to_samples(
    data: Any, tokenizer=None, seq_length: int = 512, max_samples: int | None = None
) -> list[torch.Tensor]:
    """Normalise any supported calibration input into a list of 1-D token-id tensors (one per sample).

    Accepts a ``datasets.Dataset`` with ``input_ids`` or ``text`` (needs ``tokenizer``), an iterable of
    dicts with ``input_ids`` (and ``attention_mask``) such as a ``DataLoader``, a list of token-id tensors
    or lists shaped ``[seq]`` or ``[batch, seq]``, a ``[batch, seq]`` tensor, or a list of strings
    (needs ``tokenizer``). Padding marked by ``attention_mask`` is removed.
    """
    if data is None:
        raise ValueError("Calibration data is required: pass a Dataset, a DataLoader, token tensors or texts.")
    column_names = getattr(data, "column_names", None)
    if column_names is not None and not isinstance(data, dict):  # datasets.Dataset
        if "input_ids" in column_names:
            data = data["input_ids"] if max_samples is None else data.select(range(min(len(data), max_samples)))["input_ids"]
        elif "text" in column_names:
            data = list(data["text"])
        else:
            raise ValueError(f"The calibration Dataset needs an `input_ids` or `text` column; it has {column_names}.")
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        data = [data]

    samples: list[torch.Tensor] = []
    texts: list[str] = []
    for item in data if isinstance(data, Iterable) else [data]:
        if isinstance(item, str):
            texts.append(item)
            continue
        if isinstance(item, dict) or hasattr(item, "keys"):
            if "input_ids" not in item:
                raise ValueError(f"Calibration batches must contain `input_ids`; got keys {list(item.keys())}.")
            rows = _rows_of(item["input_ids"], item.get("attention_mask"))
        else:
            rows = _rows_of(item)
        samples.extend(row for row, _ in rows)
        if max_samples is not None and len(samples) >= max_samples:
            break
    if texts:
        if tokenizer is None:
            raise ValueError("Calibration data is text: pass `tokenizer=` so it can be tokenized.")
        remaining = None if max_samples is None else max_samples - len(samples)
        samples.extend(pack_texts(texts, tokenizer, seq_length, remaining))
    if max_samples is not None:
        samples = samples[:max_samples]
    samples = [s for s in samples if s.numel() > 0]
    if not samples:
        raise ValueError("The calibration data is empty: give at least one non-empty sequence (the papers use 1024).")
    return samples


def batch_samples(samples: Sequence[torch.Tensor], batch_size: int, pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-pad samples into ``{"input_ids", "attention_mask"}`` batches of ``batch_size`` (length-sorted).

    Sorting by length keeps padding (wasted compute) small; per-sample scores do not depend on batching.
    """
    order = sorted(range(len(samples)), key=lambda i: -samples[i].numel())
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        length = max(s.numel() for s in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, s in enumerate(chunk):
            input_ids[row, : s.numel()] = s
            attention_mask[row, : s.numel()] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches
