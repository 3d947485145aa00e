"""Errors that carry a one-line message for the user: the file (or key) and the problem."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Union


class InputError(ValueError):
    """Bad input data: ``str(error)`` is ``"<path>: <problem>"`` on one line."""

    def __init__(self, path: Union[str, Path, None], problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path is not None else self.problem)


class StaleOutputError(FileNotFoundError):
    """An earlier stage's output is out of date for this one (another preload, an older model).

    ``str(error)`` is one line ending in the command to run again, e.g. ``...; run segmenter train again``.
    It is a FileNotFoundError so that, like a missing output, it exits with status 3.
    """


class BusyError(RuntimeError):
    """Another live process holds the lock of the outputs this run would write (see :mod:`segmenter.locks`)."""


#: errno values that mean the disk (or the user's quota) is full.
_DISK_FULL_ERRNOS = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))


def resource_problem(error: BaseException) -> "str | None":
    """``"disk"`` or ``"memory"`` when ``error`` (or an error it was raised from) is a full disk or too
    little memory, else None.

    A full disk is an OSError with ENOSPC or EDQUOT, or TensorFlow's ResourceExhaustedError for a write
    (TensorFlow maps ENOSPC to RESOURCE_EXHAUSTED); too little memory is a MemoryError or TensorFlow's
    ResourceExhaustedError (OOM when allocating a tensor). TensorFlow is never imported here.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return "disk"
        if isinstance(error, MemoryError):
            return "memory"
        if type(error).__name__ == "ResourceExhaustedError" and type(error).__module__.startswith("tensorflow"):
            text = str(error).lower()
            return "disk" if "no space left" in text or "quota exceeded" in text else "memory"
        if isinstance(error, RuntimeError) and "consecutive failures" in str(error):
            # keras-tuner gives up after failed trials with their tracebacks as text in one RuntimeError.
            text = str(error)
            if "[Errno 28]" in text or "No space left on device" in text:
                return "disk"
            if "MemoryError" in text or "ResourceExhaustedError" in text or "OOM when allocating" in text:
                return "memory"
        error = error.__cause__ if error.__cause__ is not None else (
            None if error.__suppress_context__ else error.__context__)
    return None
