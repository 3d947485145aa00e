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


_CHANNEL_SUFFIX = re.compile(r"^(.*)_(\d{4})$")


def list_image_cases(folder: Path, num_channels: int, kind: str = "image") -> dict[str, list[Path]]:
    """Map case id -> its image files, one per channel, in channel order (nnU-Net's naming).

    With several channels every case is ``<case>_0000<suffix>``, ``<case>_0001<suffix>``, ...; with one
    channel a file is its own case, and a folder whose every file ends in ``_0000`` (nnU-Net's single-channel
    naming) has that ending taken off, so ``case_0000.nii.gz`` pairs with the label map ``case.nii.gz``.

    Raises InputError for a case missing a channel or with a channel beyond ``num_channels`` (naming it),
    besides the errors of :func:`list_cases`.
    """
    files = list_cases(folder, kind)
    numbered = {identifier: _CHANNEL_SUFFIX.match(identifier) for identifier in files}
    if num_channels == 1:
        if all(match and match.group(2) == "0000" for match in numbered.values()):
            return {match.group(1): [files[identifier]] for identifier, match in numbered.items()}
        return {identifier: [path] for identifier, path in files.items()}
    channels: dict[str, dict[int, Path]] = {}
    for identifier, match in numbered.items():
        if match is None or int(match.group(2)) >= num_channels:
            raise InputError(files[identifier], f"with {num_channels} channels, {kind} files are named "
                                                f"<case>_0000 ... <case>_{num_channels - 1:04d} (nnU-Net's naming)")
        channels.setdefault(match.group(1), {})[int(match.group(2))] = files[identifier]
    for case, found in channels.items():
        missing = [channel for channel in range(num_channels) if channel not in found]
        if missing:
            raise InputError(folder, f"case {case!r} has no channel {missing[0]} ({case}_{missing[0]:04d}); "
                                     f"every case needs all {num_channels} channels")
    return {case: [found[channel] for channel in range(num_channels)]
            for case, found in sorted(channels.items(), key=lambda item: _natural_key(item[0]))}
