"""Atomic writes and the small files every stage leaves beside its outputs.

Every file and output folder the pipeline writes goes through :func:`atomic_file` or
:func:`atomic_directory`; nothing else in the package renames a temporary into place.

Files (:func:`atomic_file`, and :func:`write_json_atomic` / :func:`write_text_atomic` on top of it) are
written under a hidden temporary name in the same folder, ``.<stem>.<pid>.tmp<suffix>``, then fsynced,
moved into place with ``os.replace`` and the folder fsynced. A reader sees the old file or the new one,
never half of one; once the call returns, the new file survives a crash or power loss (on filesystems
that honour fsync). If the writer fails, the temporary is removed and the old file is untouched.

Folders (:func:`atomic_directory`) are built under ``.<name>.<pid>.tmp`` beside the final folder, every
file and folder in it fsynced, and then swapped in:

- on Linux, where the filesystem supports ``renameat2(RENAME_EXCHANGE)`` (ext4, xfs, btrfs, tmpfs, ...),
  in one atomic exchange: a reader finds the old folder or the new one at every instant;
- elsewhere (e.g. NFS) with two renames, ``<name>`` -> ``.<name>.<pid>.old`` and the temporary ->
  ``<name>``. Between them the folder is briefly missing for a concurrent reader. If the process is
  killed exactly there, the previous folder is kept whole as ``.<name>.<pid>.old``, and the next
  :func:`atomic_directory` for the same folder renames it back before doing anything else; until such a
  next run, ``<name>`` is missing and the old result waits under that hidden name.

The process id in temporary names tells leftovers of a killed process from work in progress. The next
write of the same file, or the next :func:`atomic_directory` for the same folder, removes leftovers whose
process is gone (``os.kill(pid, 0)`` raises ``ProcessLookupError``) and leaves those of live processes
alone. Process ids are per machine: two machines must not write into one shared output folder at the same
time. A leftover whose process id has meanwhile been taken by an unrelated live process is kept until that
process ends (harmless: it is hidden and ignored by every reader).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from segmenter import interrupts, layout

#: Compression suffixes that belong to the suffix before them (``.nii.gz``, ``.tar.gz``).
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

_FILE_LEFTOVER = re.compile(r"\.(?P<stem>.+)\.(?P<pid>[0-9]+)\.tmp(?P<suffix>.*)", re.S)


# ----------------------------------------------------------------------------------------------------
# Processes, fsync, removal
# ----------------------------------------------------------------------------------------------------
def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts as alive)."""
    if pid <= 0 or os.name == "nt":  # on Windows os.kill would terminate the process: never call it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to someone else
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable (a no-op where folders cannot be fsynced)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file in ``folder`` and below, then every folder (innermost first)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync_file(Path(path))
        _fsync_directory(Path(root))


def _remove(path: Path) -> None:
    """Remove a file or a folder tree; a missing one is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def _default_suffix(name: str) -> str:
    suffixes = Path(name).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSION_SUFFIXES:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def temporary_file_path(path: Path, suffix: Optional[str] = None) -> Path:
    """The temporary name :func:`atomic_file` writes ``path`` under in this process.

    ``.<stem>.<pid>.tmp<suffix>`` in the same folder: hidden, and ending in ``suffix`` (by default the
    file's own, ``.nii.gz`` and the like as one) so format libraries that go by the suffix accept it.
    ``suffix=""`` gives ``.<name>.<pid>.tmp``.
    """
    path = Path(path)
    name = path.name
    if suffix is None:
        suffix = _default_suffix(name)
    if suffix:
        if not (name.lower().endswith(suffix.lower()) and len(name) > len(suffix)):
            raise ValueError(f"{path}: does not end in {suffix!r}")
        stem = name[: -len(suffix)]
    else:
        stem = name
    return path.with_name(f".{stem}.{os.getpid()}.tmp{suffix}")


_scanned_folders: dict[str, dict[str, list[str]]] = {}
_scanned_lock = threading.Lock()


def _scan_dead_file_leftovers(folder: str) -> dict[str, list[str]]:
    """Temporary files of dead processes in ``folder``, by the (lower-case) name they were meant for."""
    found: dict[str, list[str]] = {}
    try:
        with os.scandir(folder) as entries:
            candidates = [(entry.name, _FILE_LEFTOVER.fullmatch(entry.name)) for entry in entries
                          if entry.name.startswith(".") and entry.is_file(follow_symlinks=False)]
    except OSError:
        return found
    for name, match in candidates:
        if match is not None and not _process_alive(int(match["pid"])):
            found.setdefault((match["stem"] + match["suffix"]).lower(), []).append(name)
    return found


def _remove_dead_file_leftovers(path: Path) -> None:
    """Remove temporaries of dead processes meant for ``path``.

    Each folder is listed once per process (so writing many files into one folder stays linear); leftovers
    that appear later are left for the next run.
    """
    folder = os.path.abspath(path.parent)
    with _scanned_lock:
        if folder not in _scanned_folders:
            _scanned_folders[folder] = _scan_dead_file_leftovers(folder)
        names = _scanned_folders[folder].pop(path.name.lower(), [])
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))


@contextlib.contextmanager
def atomic_file(path: Path, *, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    The temporary is named by :func:`temporary_file_path` (``suffix`` as there). When the ``with`` block
    ends normally the temporary, which must then be a file, is fsynced, moved onto ``path`` with
    ``os.replace`` and the folder fsynced. On any exception the temporary is removed and ``path`` is
    untouched. The parent folder is created; temporaries of dead processes meant for ``path`` are removed.

    Example::

        with atomic_file(out / "model.keras") as tmp:
            model.save(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_file_path(path, suffix)
    _remove_dead_file_leftovers(path)
    _remove(tmp)  # left by an earlier, dead process that had the same id
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(errno.ENOENT, f"nothing was written for {path}", str(tmp))
        interrupts.raise_if_requested()  # a stop that the code in the block swallowed still keeps the old file
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_directory(path.parent)


def write_json_atomic(obj: Any, path: Path) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2, default=_json_default) + "\n", path)


def write_text_atomic(text: str, path: Path) -> Path:
    path = Path(path)
    with atomic_file(path, suffix="") as tmp:  # ".<name>.<pid>.tmp": never matches a "*.json" pattern
        tmp.write_text(text)
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


# ----------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------
def _folder_sibling(final_dir: Path, kind: str) -> Path:
    return final_dir.with_name(f".{final_dir.name}.{os.getpid()}.{kind}")


def _recover_directory(final_dir: Path) -> None:
    """Clean up after earlier, dead runs of :func:`atomic_directory` for ``final_dir``.

    If ``final_dir`` is missing and a dead process left ``.<name>.<pid>.old`` (killed between the two
    renames of a swap), that folder is renamed back to ``final_dir``. Then every other
    ``.<name>.<pid>.tmp`` / ``.<name>.<pid>.old`` of a dead process is removed. Leftovers with this
    process's own id come from an earlier process that had the same id (containers reuse ids), since
    this process removes its own before returning.
    """
    pattern = re.compile(rf"\.{re.escape(final_dir.name)}\.(?P<pid>[0-9]+)\.(?P<kind>tmp|old)", re.S)
    dead: list[tuple[Path, str]] = []
    with os.scandir(final_dir.parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is None:
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or not _process_alive(pid):
                dead.append((final_dir.parent / entry.name, match["kind"]))
    olds = [path for path, kind in dead if kind == "old" and path.is_dir() and not path.is_symlink()]
    if olds and not os.path.lexists(final_dir):
        newest = max(olds, key=lambda path: path.stat().st_mtime)
        os.replace(newest, final_dir)
        _fsync_directory(final_dir.parent)
        dead = [(path, kind) for path, kind in dead if path != newest]
    for path, _ in dead:
        _remove(path)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _swap_in(tmp_dir: Path, final_dir: Path) -> None:
    parent = final_dir.parent
    if os.path.lexists(final_dir) and _exchange(tmp_dir, final_dir):
        _fsync_directory(parent)
        _remove(tmp_dir)  # now the previous folder; a leftover of it is removed by the next run
        return
    old_dir = _folder_sibling(final_dir, "old")
    moved_old = False
    try:
        if os.path.lexists(final_dir):
            os.replace(final_dir, old_dir)
            moved_old = True
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if moved_old and not os.path.lexists(final_dir):
            os.replace(old_dir, final_dir)
        _remove(tmp_dir)
        raise
    _fsync_directory(parent)
    _remove(old_dir)


@contextlib.contextmanager
def atomic_directory(final_dir: Path) -> Iterator[Path]:
    """Yield a new, empty temporary folder beside ``final_dir``; on success it replaces ``final_dir`` whole.

    On entry, leftovers of dead processes are cleaned up and a folder lost between the two renames of a
    killed swap is restored (see the module docstring). When the ``with`` block ends normally, everything
    in the temporary folder is fsynced and the folder swapped in. On any exception the temporary folder
    is removed and ``final_dir`` (if it existed) is untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_directory(final_dir)
    tmp_dir = _folder_sibling(final_dir, "tmp")
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        interrupts.raise_if_requested()  # likewise for a folder
        _fsync_tree(tmp_dir)
    except BaseException:
        _remove(tmp_dir)
        raise
    _swap_in(tmp_dir, final_dir)


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
    return write_json_atomic(config.to_jsonable(), Path(folder) / layout.RESOLVED_CONFIG)
