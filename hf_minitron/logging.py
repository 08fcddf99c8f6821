"""hf-minitron's loggers: one library logger, ``hf_minitron``, that follows transformers' verbosity.

Every module logs through ``get_logger(__name__)`` (a standard :class:`logging.Logger` named ``hf_minitron.*``).
The library logger ``hf_minitron`` is attached below transformers' own library logger, so

- ``transformers.logging.set_verbosity_info()`` / ``..._error()`` and ``TRANSFORMERS_VERBOSITY`` apply to
  hf-minitron too (its level is inherited from transformers' logger);
- messages print to stderr as ``[hf_minitron] message`` through hf-minitron's own handler (they do not
  propagate further, like transformers' own);
- :func:`set_verbosity` sets hf-minitron's level alone (the recipe sets INFO by default so routine progress
  shows while transformers stays at its own level); ``set_verbosity(None)`` follows transformers again.

Routine progress is logged at INFO; WARNING is kept for things the user should act on.

Example:
    >>> from hf_minitron.logging import get_logger, set_verbosity
    >>> logger = get_logger("hf_minitron.my_script")
    >>> set_verbosity("info")  # hf-minitron only; transformers.logging.set_verbosity_* also reaches us
    >>> set_verbosity(None)    # follow transformers' verbosity again
"""

from __future__ import annotations

import contextlib
import logging as _logging
import sys
from collections.abc import Iterator

from transformers.utils import logging as _hf_logging


LIBRARY_NAME = "hf_minitron"

_LEVELS = {"debug": _logging.DEBUG, "info": _logging.INFO, "warning": _logging.WARNING, "error": _logging.ERROR, "critical": _logging.CRITICAL}


class _StderrHandler(_logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (so redirections made after import, e.g. by pytest, are honoured)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_handler: _logging.Handler | None = None


def _library_logger() -> _logging.Logger:
    global _handler
    logger = _logging.getLogger(LIBRARY_NAME)
    transformers_root = _hf_logging.get_logger()
    if logger.parent is not transformers_root:
        # The effective level is looked up through `parent` (whatever `propagate` says), so hf_minitron follows
        # transformers' verbosity. `hf_minitron` has no dotted ancestor: the logging manager never re-parents it.
        logger.parent = transformers_root
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(_logging.Formatter(f"[{LIBRARY_NAME}] %(message)s"))
        logger.addHandler(_handler)
        logger.propagate = False
    return logger


def get_logger(name: str | None = None) -> _logging.Logger:
    """The logger ``name`` (default: the library logger ``hf_minitron``) inside hf-minitron's hierarchy.

    Names outside ``hf_minitron.*`` are prefixed, so a script's logger follows the same verbosity.
    """
    _library_logger()
    if name is None or name == LIBRARY_NAME:
        return _logging.getLogger(LIBRARY_NAME)
    if not name.startswith(LIBRARY_NAME + "."):
        name = f"{LIBRARY_NAME}.{name}"
    return _logging.getLogger(name)


def _as_level(level: int | str | None) -> int:
    if level is None:
        return _logging.NOTSET
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"Unknown log level {level!r}; use one of {sorted(_LEVELS)} or a `logging` constant.")
        return _LEVELS[level.lower()]
    return int(level)


def set_verbosity(level: int | str | None) -> None:
    """Set hf-minitron's own level (``"info"``, ``logging.WARNING``, ...); ``None`` follows transformers' again."""
    _library_logger().setLevel(_as_level(level))


def get_verbosity() -> int:
    """hf-minitron's effective level (transformers' level unless :func:`set_verbosity` set one)."""
    return _library_logger().getEffectiveLevel()


def set_verbosity_info() -> None:
    set_verbosity(_logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(_logging.WARNING)


def set_verbosity_error() -> None:
    set_verbosity(_logging.ERROR)


_own_bars: bool | None = None  # set while `only_own_progress_bars` is active


def progress_enabled() -> bool:
    """Whether hf-minitron's progress bars should show: transformers' switch (``disable_progress_bar()``)."""
    return _hf_logging.is_progress_bar_enabled() if _own_bars is None else _own_bars


@contextlib.contextmanager
def only_own_progress_bars() -> Iterator[None]:
    """For a script's run: hide the per-file bars of transformers and datasets (weight loading and writing,
    dataset mapping), keep one bar per long stage (hf-minitron's and the Trainer's); restored afterwards."""
    global _own_bars
    import datasets

    previous = (_own_bars, _hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    _own_bars = previous[1]
    _hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        _own_bars = previous[0]
        (_hf_logging.enable_progress_bar if previous[1] else _hf_logging.disable_progress_bar)()
        (datasets.enable_progress_bars if previous[2] else datasets.disable_progress_bars)()


_library_logger()

__all__ = [
    "LIBRARY_NAME",
    "get_logger",
    "get_verbosity",
    "only_own_progress_bars",
    "progress_enabled",
    "set_verbosity",
    "set_verbosity_error",
    "set_verbosity_info",
    "set_verbosity_warning",
]
