"""Errors that carry a one-line message for the user: the file (or key) and the problem."""
from __future__ import annotations

from pathlib import Path
from typing import Union


class InputError(ValueError):
    """Bad input data: ``str(error)`` is ``"<path>: <problem>"`` on one line."""

    def __init__(self, path: Union[str, Path, None], problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path is not None else self.problem)
