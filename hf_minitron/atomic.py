"""Crash-safe writes: a temporary sibling, fsync, then a rename, so a reader never sees a half-written output.

- Files: :func:`atomic_write_text` / :func:`atomic_write_json` write ``.tmp-file-*`` beside the target, fsync it
  and ``os.replace`` it over the target.
- Folders: :func:`staged_dir` yields a fresh ``.tmp-new-*`` sibling; on success every file in it is fsynced and it
  is renamed into place. When the target exists (``overwrite=True``) the old folder is first renamed aside to
  ``.tmp-old-*`` and deleted only after the new one is in place.
- :func:`clean_stale_temp` removes ``.tmp-*`` siblings left by killed processes (their pid is gone); a
  ``.tmp-old-*`` folder whose target is missing (killed between the two renames) is renamed back instead.

Temporary names are ``.tmp-<kind>-<pid>-<token>-<name>`` so a live writer's files are never touched.

Example:
    >>> from hf_minitron.atomic import atomic_write_json, staged_dir
    >>> with staged_dir("out/pruned", overwrite=True) as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

from .logging import get_logger


logger = get_logger(__name__)

TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------------- names
def _temp_name(kind: str, name: str) -> str:
    return f"{TMP_PREFIX}{kind}-{os.getpid()}-{secrets.token_hex(4)}-{name}"


def _parse_temp_name(entry: str) -> tuple[str, int, str] | None:
    """``(kind, pid, target name)`` of a name made by :func:`_temp_name`, or ``None`` for any other ``.tmp-*``."""
    parts = entry[len(TMP_PREFIX) :].split("-", 3)
    if len(parts) != 4 or parts[0] not in ("new", "old", "file") or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[3]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ---------------------------------------------------------------------------------------------- crash tests
KILL_ENV = "HF_MINITRON_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$HF_MINITRON_KILL_AT`` names ``name`` (a comma-separated list is allowed).

    A deterministic crash hook for tests: the recipe calls it at named points (``<stage>:running``,
    ``<stage>:saved``, ``commit:<folder>``, ``distill:checkpoint``); unset, it does nothing.
    """
    wanted = os.environ.get(KILL_ENV)
    if wanted and name in {w.strip() for w in wanted.split(",")}:
        import signal
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- fsync
def fsync_path(path: str) -> None:
    """fsync a file or a directory (the directory's entries: a rename is durable once its folder is synced)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files were synced
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every file below ``folder``, then every directory (deepest first)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


# ---------------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename; returns ``path``."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _temp_name("file", os.path.basename(path)))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> str:
    """:func:`atomic_write_bytes` for JSON (indent 2, non-JSON values as ``str``) with a final newline."""
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("default", str)
    return atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n")


# ---------------------------------------------------------------------------------------------- folders
def check_writable_dir(path: str | os.PathLike, what: str = "output_dir") -> str:
    """Create ``path`` if needed and check a file can be written in it; returns the absolute path.

    Raises:
        ValueError: ``path`` is a file, cannot be created, or is not writable (the message names ``what``).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{what}` {path!r} is a file, not a folder; choose a folder path (it is created if missing).")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"`{what}` {path!r} cannot be created: {err.strerror}; choose a writable location.") from None
    probe = os.path.join(path, _temp_name("file", "write-check"))
    try:
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"`{what}` {path!r} is not writable: {err.strerror}; choose a writable folder or fix its permissions.") from None
    return path


def clean_stale_temp(parent: str | os.PathLike, all_entries: bool = False) -> list[str]:
    """Remove ``.tmp-*`` entries in ``parent`` left by processes that no longer run; returns what was removed.

    A ``.tmp-old-<pid>-<token>-<name>`` folder whose ``<name>`` no longer exists was moved aside by an overwrite
    that was killed before the new folder arrived: it is renamed back to ``<name>`` rather than deleted. Other
    ``.tmp-*`` names (not made here) are only removed with ``all_entries=True``, for a folder hf-minitron owns
    (the recipe's ``output_dir``).
    """
    parent = os.fspath(parent)
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in sorted(os.listdir(parent)):
        if not entry.startswith(TMP_PREFIX):
            continue
        parsed = _parse_temp_name(entry)
        if (parsed is None and not all_entries) or (parsed is not None and _pid_alive(parsed[1])):
            continue
        path = os.path.join(parent, entry)
        if parsed is not None and parsed[0] == "old" and not os.path.lexists(os.path.join(parent, parsed[2])):
            os.rename(path, os.path.join(parent, parsed[2]))
            logger.info(f"Restored {parsed[2]!r} in {parent} (an overwrite was interrupted before the new copy arrived).")
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
        removed.append(path)
    if removed:
        logger.info(f"Removed {len(removed)} temporary entr{'y' if len(removed) == 1 else 'ies'} left by an interrupted run in {parent}.")
    return removed


def commit_dir(tmp: str, target: str) -> str:
    """Move the finished folder ``tmp`` to ``target`` (fsynced first); an existing ``target`` is replaced.

    The old ``target`` is renamed aside and deleted only after the new folder is in place, so at every instant
    either the old or the new complete folder exists under one of the two names.
    """
    fsync_tree(tmp)
    parent, name = os.path.split(target)
    aside = None
    if os.path.lexists(target):
        aside = os.path.join(parent, _temp_name("old", name))
        os.rename(target, aside)
    kill_point(f"commit:{name}")
    os.rename(tmp, target)
    fsync_path(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, overwrite: bool = False, what: str = "save_directory") -> Iterator[str]:
    """Yield a temporary sibling of ``target`` to write into; it replaces ``target`` when the block succeeds.

    On an exception (or a kill) the temporary folder is removed (or cleaned by the next :func:`clean_stale_temp`)
    and ``target`` is untouched.

    Raises:
        ValueError: ``target`` is a file, or a non-empty folder and ``overwrite`` is false.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"`{what}` {target!r} is a file, not a folder; choose a folder path.")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ValueError(f"{target} exists and is not empty; pass overwrite=True or choose another folder.")
    parent = os.path.dirname(target)
    check_writable_dir(parent, what=f"parent folder of {what}")
    clean_stale_temp(parent)
    tmp = os.path.join(parent, _temp_name("new", os.path.basename(target)))
    os.makedirs(tmp)
    try:
        yield tmp
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway never leaves a partial copy under its name (rename, then delete)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    aside = os.path.join(parent, _temp_name("file", name))  # "file" kind: never restored, always cleaned
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def run_on_main_process(fn, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on the main process only and make every process wait for it (``accelerate`` / ``torchrun``).

    Returns ``fn``'s result on the main process and ``None`` on the others.
    """
    from accelerate import PartialState

    state = PartialState()
    result = fn(*args, **kwargs) if state.is_main_process else None
    state.wait_for_everyone()
    return result


__all__ = [
    "KILL_ENV",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable_dir",
    "clean_stale_temp",
    "commit_dir",
    "fsync_path",
    "fsync_tree",
    "kill_point",
    "remove_dir",
    "run_on_main_process",
    "staged_dir",
]
