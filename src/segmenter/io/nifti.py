"""NIfTI files (``.nii``, ``.nii.gz``) through nibabel."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from segmenter.errors import InputError
from segmenter.io.image import LoadedImage


def read_nifti(path: Path) -> LoadedImage:
    """Read a NIfTI image in its stored voxel order (no reorientation).

    The data are scaled by the header's ``scl_slope``/``scl_inter`` (nibabel's ``dataobj``); trailing axes
    of length 1 beyond the third are dropped. Spacing is the header's zooms for the array axes; the affine
    is nibabel's best affine (sform, else qform), which maps voxel indices to RAS+ millimetres.
    """
    path = Path(path)
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for damaged files (EOFError, zlib, header errors)
        raise InputError(path, f"cannot read NIfTI file: {error}") from error
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    spacing = tuple(float(zoom) for zoom in image.header.get_zooms()[: array.ndim])
    return LoadedImage(np.asarray(array), spacing, np.asarray(image.affine, dtype=np.float64), path)


def write_nifti_image(array: np.ndarray, path: Path, affine: np.ndarray | None) -> None:
    """Write intensities (int16 when every value is an integer that fits, else float32) with ``affine``.

    Used for the test cases that preload keeps at their original geometry; the codes are as in write_nifti.
    """
    array = np.asarray(array)
    integral = array.size and -32768 <= array.min() and array.max() <= 32767 and np.array_equal(array, np.rint(array))
    _save(array.astype(np.int16 if integral else np.float32), path, affine)


def _save(array: np.ndarray, path: Path, affine: np.ndarray | None) -> None:
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def write_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None) -> None:
    """Write an integer label map; ``affine`` (voxel -> RAS+ mm) goes into both sform and qform.

    The smallest of uint8, int16 and int32 that holds the labels is used. ``path`` must end in ``.nii``
    or ``.nii.gz`` (nibabel picks compression from it).
    """
    array = np.asarray(array)
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low >= 0 and high <= np.iinfo(np.uint8).max:
        dtype = np.uint8
    elif np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
        dtype = np.int16
    else:
        dtype = np.int32
    _save(array.astype(dtype), path, affine)
