"""Find the cases of a dataset folder: one supported file, or one DICOM series folder, per case id."""
from __future__ import annotations

import re
from pathlib import Path

from segmenter.errors import InputError
from segmenter.io.dicom import dicom_files_in
from segmenter.io.readers import SUPPORTED_SUFFIXES, format_suffix


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _is_dicom_series_folder(path: Path) -> bool:
    return path.is_dir() and bool(dicom_files_in(path))


def case_id(path: Path) -> str:
    """The case id of a file or DICOM series folder: the name without its format suffix.

    ``.nii.gz`` counts as one suffix; a folder's id is its name.

    >>> case_id(Path("images/case_007.nii.gz"))
    'case_007'
    """
    path = Path(path)
    if path.is_dir():
        return path.name
    suffix = format_suffix(path)
    if suffix is None:
        raise InputError(path, f"unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return path.name[: -len(suffix)]


def _natural_key(text: str) -> list:
    """Sort key putting "2" before "10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _visible_entries(folder: Path, kind: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is a file, not a folder"
        raise InputError(folder, f"{kind} folder {problem}")
    return sorted(entry for entry in folder.iterdir() if not _is_hidden(entry))


def list_cases(folder: Path, kind: str) -> dict[str, Path]:
    """Map case id -> path for every supported file and DICOM series subfolder of ``folder``.

    A subfolder holding ``.dcm`` files is one DICOM series case keyed by the folder's name. Hidden entries
    (names starting with ".") are ignored, as are unsupported files (see ``unsupported_files``). The dict
    is in natural order of the ids ("2" before "10"). ``kind`` ("image" or "mask") only words the errors.

    Raises InputError for a missing folder, a folder without any case, and two entries with one id
    (e.g. ``a.png`` and ``a.npy``; the message names both).
    """
    cases: dict[str, Path] = {}
    for entry in _visible_entries(folder, kind):
        if entry.is_dir():
            if not _is_dicom_series_folder(entry):
                continue
        elif format_suffix(entry) is None:
            continue
        identifier = case_id(entry)
        if identifier in cases:
            raise InputError(
                folder,
                f"two {kind} files share the case id {identifier!r}: {cases[identifier].name} and {entry.name}",
            )
        cases[identifier] = entry
    if not cases:
        raise InputError(
            folder,
            f"no {kind} files found (supported: {', '.join(SUPPORTED_SUFFIXES)} or subfolders of .dcm files)",
        )
    return {identifier: cases[identifier] for identifier in sorted(cases, key=_natural_key)}


def unsupported_files(folder: Path) -> list[Path]:
    """The visible entries of ``folder`` that ``list_cases`` skips: other file types, folders without .dcm."""
    return [
        entry
        for entry in _visible_entries(folder, "data")
        if (entry.is_dir() and not _is_dicom_series_folder(entry))
        or (entry.is_file() and format_suffix(entry) is None)
    ]
