"""Write label maps in the format named by the file suffix, atomically.

Every file goes through :func:`segmenter.artifacts.atomic_file`: it is written under a hidden temporary
name in the same folder, ending in the same suffix so the format libraries accept it, then moved into
place. A reader sees the old file or the new one, never half of one, and ``list_cases`` ignores a leftover
temporary file (its name starts with ".").
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from segmenter.artifacts import atomic_file
from segmenter.errors import InputError
from segmenter.io.image import LoadedImage
from segmenter.io.nifti import write_nifti
from segmenter.io.raster import write_npy, write_png
from segmenter.io.readers import format_suffix
from segmenter.io.tabular import write_csv


def _write_nifti_with_reference(array: np.ndarray, path: Path, reference: LoadedImage | None) -> None:
    affine = None
    if reference is not None and reference.affine is not None:
        affine = reference.affine
    elif reference is not None and reference.spacing is not None:
        affine = np.diag(list(reference.spacing) + [1.0] * (4 - len(reference.spacing)))
    write_nifti(array, path, affine)


def _write_csv_2d(array: np.ndarray, path: Path, reference: LoadedImage | None) -> None:
    if array.ndim != 2:
        raise InputError(path, f"a CSV file holds a 2D label map, got shape {array.shape}")
    write_csv(array, path)


#: Suffix -> writer(array, path, reference). The array is already checked to be integer-valued.
WRITERS: dict[str, Callable[[np.ndarray, Path, LoadedImage | None], None]] = {
    ".png": lambda array, path, reference: write_png(array, path),
    ".npy": lambda array, path, reference: write_npy(array, path),
    ".csv": _write_csv_2d,
    ".nii": _write_nifti_with_reference,
    ".nii.gz": _write_nifti_with_reference,
}


def write_mask(array: np.ndarray, path: Path, reference: LoadedImage | None = None) -> Path:
    """Write an integer label map to ``path`` in the format of its suffix, atomically; return ``path``.

    Formats: ``.png`` (2D, uint8 when labels fit, else uint16), ``.npy`` (int32), ``.csv`` (2D, comma-
    separated integers, no header), ``.nii``/``.nii.gz`` (uint8/int16/int32, with ``reference.affine``
    when given, else a diagonal affine from ``reference.spacing``, else identity). The array must be in
    the reference's voxel order. Parent folders are created.

    Raises InputError for non-integer values, an unsupported suffix, or a shape the format cannot hold.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(path, f"cannot write {array.dtype} values as a label map")
    if np.issubdtype(array.dtype, np.floating) and not (
        np.all(np.isfinite(array)) and np.array_equal(array, np.round(array))
    ):
        raise InputError(path, "mask has non-integer values")
    suffix = format_suffix(path)
    if suffix not in WRITERS:
        raise InputError(path, f"cannot write a label map as this file type (supported: {', '.join(WRITERS)})")
    try:
        with atomic_file(path, suffix=suffix) as temporary:  # ".<stem>.<pid>.tmp<suffix>"
            WRITERS[suffix](array, temporary, reference)
    except InputError as error:  # name the file the caller asked for, not the temporary one
        raise InputError(path, error.problem) from None
    return path


#: Label-map suffix per input format: label maps go back in the user's format, except where that format
#: cannot hold a label map written by us (DICOM), where NIfTI with the series' affine is the usual choice.
OUTPUT_SUFFIX = {".csv": ".csv", ".png": ".png", ".npy": ".npy", ".nii": ".nii.gz", ".nii.gz": ".nii.gz",
                 ".dcm": ".nii.gz"}


def output_suffix(source: Path, ndim: int) -> str:
    """The suffix a predicted label map of ``source`` is written with: its own 2D format, NIfTI for volumes."""
    source = Path(source)
    if ndim == 3 or source.is_dir():
        return ".nii.gz"
    return OUTPUT_SUFFIX.get(format_suffix(source) or "", ".nii.gz")
