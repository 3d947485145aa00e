"""The image every reader returns, and the checks every reader's array goes through.

Conventions, the same for every format:

- ``LoadedImage.array`` keeps the axis order of the file: (rows, cols) for CSV, PNG and a single DICOM
  file; (rows, cols, slices) for a DICOM series; the stored (i, j, k) voxel order for NIfTI and NPY.
  Nothing is reoriented on reading.
- ``LoadedImage.spacing`` is millimetres per array axis, in the same order as the array axes, or
  ``None`` where the format carries none (CSV, PNG, NPY).
- ``LoadedImage.affine`` is a 4x4 matrix taking a voxel index ``(i, j, k, 1)`` (array order) to world
  millimetres, or ``None`` where the format carries no geometry (CSV, PNG, NPY, a DICOM file without
  position tags). The world frame is always **RAS+**, as in NIfTI and nibabel: x grows towards the
  patient's Right, y towards Anterior, z towards Superior. DICOM stores patient coordinates in **LPS+**
  (x towards Left, y towards Posterior), so the DICOM readers convert: RAS+ = diag(-1, -1, 1) @ LPS+.
  A DICOM image and a NIfTI label map of it can thus be compared through their affines directly, and a
  mask of a DICOM series written as NIfTI with the series' affine lines up in any NIfTI viewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segmenter.errors import InputError

#: Multiplying an LPS+ (DICOM) affine on the left by this matrix gives the RAS+ (NIfTI) affine.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class LoadedImage:
    """An image or label map read from disk.

    Attributes
    ----------
    array : np.ndarray
        2D (rows, cols) or 3D; float32 from ``read_image``, int32 from ``read_mask``.
    spacing : tuple of float or None
        Millimetres per array axis, same order as ``array.shape``; ``None`` when the format has none.
    affine : np.ndarray or None
        4x4 voxel index -> RAS+ world millimetres (NIfTI and DICOM); ``None`` otherwise.
    source : Path
        The file or DICOM series folder it was read from.
    """

    array: np.ndarray
    spacing: tuple[float, ...] | None
    affine: np.ndarray | None
    source: Path


def check_numeric_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Return ``array`` if it is a 2D or 3D real numeric array of finite values; else raise InputError."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(path, f"holds {array.dtype} values, expected real numbers")
    if array.ndim not in (2, 3):
        raise InputError(path, f"has shape {array.shape}, expected a 2D or 3D array")
    if 0 in array.shape:
        raise InputError(path, f"is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(path, "contains NaN or infinite values")
    return array


def as_image(loaded: LoadedImage) -> LoadedImage:
    """Checked copy of ``loaded`` with a float32 array."""
    array = check_numeric_array(np.asarray(loaded.array), loaded.source)
    with np.errstate(over="ignore"):
        converted = array.astype(np.float32, copy=False)
    if converted.dtype != array.dtype and np.issubdtype(array.dtype, np.floating) \
            and not np.all(np.isfinite(converted)):  # finite float64 beyond float32's +-3.4e38
        raise InputError(loaded.source, f"has values beyond the float32 range (+-3.4e38), e.g. "
                                        f"{array.flat[np.flatnonzero(~np.isfinite(converted))[0]]:g}")
    return LoadedImage(converted, loaded.spacing, loaded.affine, loaded.source)


def as_mask(loaded: LoadedImage) -> LoadedImage:
    """Checked copy of ``loaded`` with an int32 array; InputError unless every value is an integer."""
    array = check_numeric_array(np.asarray(loaded.array), loaded.source)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise InputError(loaded.source, "mask has non-integer values")
    info = np.iinfo(np.int32)
    if array.min() < info.min or array.max() > info.max:
        raise InputError(loaded.source, f"mask values {array.min()}..{array.max()} do not fit in int32")
    return LoadedImage(array.astype(np.int32, copy=False), loaded.spacing, loaded.affine, loaded.source)
