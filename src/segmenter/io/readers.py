"""Read any supported image or label map: one registry of readers keyed by file suffix.

``read_image`` returns float32, ``read_mask`` int32 (after checking every value is an integer), both as
:class:`~segmenter.io.image.LoadedImage` with the axis order, spacing and RAS+ affine conventions described
in :mod:`segmenter.io.image`. A folder is read as one DICOM series.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from segmenter.errors import InputError
from segmenter.io.dicom import read_dicom_file, read_dicom_series
from segmenter.io.grid import map_labels_to_grid
from segmenter.io.image import LoadedImage, as_image, as_mask
from segmenter.io.nifti import read_nifti
from segmenter.io.raster import read_npy, read_png
from segmenter.io.tabular import read_csv

#: Suffix -> reader. Readers return the format's own numeric dtype, unchecked; use read_image/read_mask.
READERS: dict[str, Callable[[Path], LoadedImage]] = {
    ".csv": read_csv,
    ".png": read_png,
    ".npy": read_npy,
    ".nii": read_nifti,
    ".nii.gz": read_nifti,
    ".dcm": read_dicom_file,
}

SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(READERS)


def format_suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with (case-insensitive; ``.nii.gz`` as one), or None."""
    name = Path(path).name.lower()
    matches = [suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix) and len(name) > len(suffix)]
    return max(matches, key=len) if matches else None


def _read_any(path: Path) -> LoadedImage:
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    suffix = format_suffix(path)
    if suffix is None:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise InputError(path, f"unsupported file type (supported: {supported} or a DICOM folder)")
    return READERS[suffix](path)


def read_image(path: Path) -> LoadedImage:
    """Read an image as float32: CSV, PNG, NPY, NIfTI, a DICOM file, or a folder = one DICOM series.

    Raises InputError ("<path>: <problem>", one line) for a missing, unreadable or unsupported file, and
    for arrays that are not 2D/3D real numbers or contain NaN or infinite values.

    Examples
    --------
    >>> image = read_image(Path("ct/dicom"))          # doctest: +SKIP
    >>> image.array.shape, image.spacing              # doctest: +SKIP
    ((512, 512, 20), (0.9765625, 0.9765625, 2.0))
    """
    return as_image(_read_any(path))


def read_channels(paths: list[Path]) -> LoadedImage:
    """Read a case's channel files (one path: a plain image) as one image whose array has the channels last.

    Every channel must have the first one's shape and, where both carry one, its affine: channels of a case
    are co-registered, as nnU-Net requires. The spacing and affine are the first channel's. One channel
    gives the array without a channel axis, as :func:`read_image`.
    """
    first = read_image(paths[0])
    if len(paths) == 1:
        return first
    arrays = [first.array]
    for path in paths[1:]:
        channel = read_image(path)
        if channel.array.shape != first.array.shape:
            raise InputError(path, f"channel of shape {channel.array.shape}, but {Path(paths[0]).name} is "
                                   f"{first.array.shape}; the channels of a case must share one grid")
        if channel.affine is not None and first.affine is not None \
                and not np.allclose(channel.affine, first.affine, atol=1e-3):
            raise InputError(path, f"affine differs from {Path(paths[0]).name}'s; the channels of a case must "
                                   "share one grid")
        arrays.append(channel.array)
    return LoadedImage(np.stack(arrays, axis=-1), first.spacing, first.affine, first.source)


def read_mask(path: Path, reference: LoadedImage | None = None) -> LoadedImage:
    """Read a label map as int32; every value must be an integer ("mask has non-integer values").

    With a ``reference`` image the labels are returned on its grid:

    - both have affines (NIfTI, DICOM): the labels are mapped through the affines onto the reference's
      voxel grid (exact index mapping for flips, permutations and crops; nearest neighbour otherwise) and
      the result carries the reference's spacing and affine. InputError if the label grid does not cover
      the image grid.
    - otherwise the shapes must be equal (InputError if not).
    """
    mask = as_mask(_read_any(path))
    if reference is None:
        return mask
    if reference.affine is not None and mask.affine is not None:
        array = map_labels_to_grid(mask.array, mask.affine, reference.array.shape, reference.affine, mask.source)
        return LoadedImage(np.ascontiguousarray(array), reference.spacing, reference.affine, mask.source)
    if mask.array.shape != reference.array.shape:
        raise InputError(
            mask.source,
            f"mask shape {mask.array.shape} differs from image shape {reference.array.shape} "
            f"({reference.source.name}) and there are no affines to map one onto the other",
        )
    return mask
