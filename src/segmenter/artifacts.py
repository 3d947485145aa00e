"""Atomic writes and the small files every stage leaves beside its outputs.

A reader of any artifact sees the old file or the new one, never half of one: files are written under a
temporary name in the same folder and moved into place with ``os.replace``; whole output folders are
built under a temporary name and swapped in at the end, so a failed run leaves an earlier good result
intact and no partial folder behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json_atomic(obj: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_directory(final_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_dir``; on success it replaces ``final_dir`` whole.

    On any exception the temporary folder is removed and ``final_dir`` (if it existed) is untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.{os.getpid()}.tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    old_dir = final_dir.with_name(f".{final_dir.name}.{os.getpid()}.old")
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def check_replaceable_folder(out_dir: Path, inputs, markers, option: str) -> None:
    """Refuse an output folder that ``atomic_directory`` would replace if that destroys other data.

    The output folder is replaced whole, so it may not be, or lie above, any of ``inputs``, and an
    existing non-empty one must hold an earlier output of the same kind (one of the files ``markers``).
    """
    from segmenter.errors import InputError

    out = Path(out_dir).resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if out == folder or out in folder.parents:
            raise InputError(out_dir, f"the output folder would replace {folder}; choose another {option}")
    if out.is_file():
        raise InputError(out_dir, "the output folder is a file")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in markers):
        raise InputError(out_dir, f"exists and is not an earlier output of this command, so it is not replaced; "
                                  f"choose a new or empty {option} folder")


def sha256_of_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_resolved_config(config, folder: Path) -> Path:
    """Write ``config.resolved.json`` (every setting, paths absolute) into ``folder``."""
    return write_json_atomic(config.to_jsonable(), Path(folder) / "config.resolved.json")
