"""DICOM files and series through pydicom.

Geometry (DICOM PS3.3 C.7.6.2): ImageOrientationPatient holds two unit vectors in LPS+ patient
coordinates, ``X`` = the direction in which the column index grows along a row, then ``Y`` = the direction
in which the row index grows down a column. PixelSpacing is (spacing between rows, spacing between
columns). The centre of pixel (row r, column c) of a slice lies at
``ImagePositionPatient + r * PixelSpacing[0] * Y + c * PixelSpacing[1] * X``.

A series is returned as ``array[row, col, slice]`` with slices sorted by ascending position along the slice
normal ``X x Y``, and spacing (PixelSpacing[0], PixelSpacing[1], slice spacing from the positions). Its
affine has the columns ``PixelSpacing[0] * Y``, ``PixelSpacing[1] * X``, the step between consecutive slice
positions, and the first slice's position, and is then converted from LPS+ to RAS+ (x and y negated) so
that it compares directly with NIfTI affines. Pixel values are ``stored * RescaleSlope + RescaleIntercept``
(per slice), i.e. Hounsfield units for CT.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from segmenter.errors import InputError
from segmenter.io.image import LPS_TO_RAS, LoadedImage

# Positions and orientations agreeing within this many millimetres (or direction cosine units) are equal.
_GEOMETRY_TOLERANCE = 1e-3
# Slice gaps may vary by this fraction of the mean gap before the series counts as irregular.
_SLICE_GAP_TOLERANCE = 0.01


def is_dicom_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() == ".dcm"


def dicom_files_in(folder: Path) -> list[Path]:
    """The visible ``.dcm`` files directly inside ``folder``, sorted by name."""
    return sorted(path for path in Path(folder).iterdir() if is_dicom_file(path))


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as error:  # pydicom raises InvalidDicomError, OSError, struct errors... for damaged files
        raise InputError(path, f"cannot read DICOM file: {error}") from error


def _pixels(dataset: pydicom.Dataset, path: Path) -> np.ndarray:
    """Rescaled grey pixels of one single-frame DICOM file as float64 (rows, cols)."""
    if "PixelData" not in dataset:
        raise InputError(path, "DICOM file has no pixel data")
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise InputError(path, f"colour DICOM ({dataset.get('PhotometricInterpretation')}) is not supported")
    if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
        raise InputError(path, "multi-frame DICOM is not supported; store one slice per file")
    try:
        stored = dataset.pixel_array
    except Exception as error:  # pydicom and its decoders raise many types for damaged pixel data
        raise InputError(path, f"cannot decode DICOM pixel data: {error}") from error
    if stored.ndim != 2:
        raise InputError(path, f"DICOM pixel data has shape {stored.shape}, expected (rows, cols)")
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float64) * slope + intercept


def _orientation(dataset: pydicom.Dataset) -> np.ndarray | None:
    """(2, 3) row and column direction cosines in LPS+, or None when the tag is missing."""
    value = dataset.get("ImageOrientationPatient")
    return None if value is None or len(value) != 6 else np.asarray(value, dtype=np.float64).reshape(2, 3)


def _position(dataset: pydicom.Dataset) -> np.ndarray | None:
    value = dataset.get("ImagePositionPatient")
    return None if value is None or len(value) != 3 else np.asarray(value, dtype=np.float64)


def _pixel_spacing(dataset: pydicom.Dataset) -> tuple[float, float] | None:
    value = dataset.get("PixelSpacing")
    return None if value is None or len(value) != 2 else (float(value[0]), float(value[1]))


def _affine_ras(orientation: np.ndarray, pixel_spacing: tuple[float, float], origin: np.ndarray,
                slice_step: np.ndarray) -> np.ndarray:
    """Voxel (row, col, slice) -> RAS+ mm, from LPS+ orientation, origin and slice step."""
    across_row, down_column = orientation
    affine = np.eye(4)
    affine[:3, 0] = down_column * pixel_spacing[0]
    affine[:3, 1] = across_row * pixel_spacing[1]
    affine[:3, 2] = slice_step
    affine[:3, 3] = origin
    return LPS_TO_RAS @ affine


def read_dicom_file(path: Path) -> LoadedImage:
    """Read one single-frame grey DICOM file as a 2D (rows, cols) array in rescaled units (HU for CT).

    Spacing is PixelSpacing (row, col) when present. The affine maps (row, col, 0) to RAS+ mm; its third
    column is the slice normal times SliceThickness (1 mm when absent). Both are None without the tags.
    """
    path = Path(path)
    dataset = _read_dataset(path)
    pixels = _pixels(dataset, path)
    pixel_spacing = _pixel_spacing(dataset)
    orientation, position = _orientation(dataset), _position(dataset)
    affine = None
    if pixel_spacing is not None and orientation is not None and position is not None:
        thickness = float(dataset.get("SliceThickness", 1.0) or 1.0)
        affine = _affine_ras(orientation, pixel_spacing, position, np.cross(*orientation) * thickness)
    return LoadedImage(pixels, pixel_spacing, affine, path)


def read_dicom_series(folder: Path) -> LoadedImage:
    """Read the ``.dcm`` files of ``folder`` as one series shaped (rows, cols, slices); see module notes.

    Files are ordered by ImagePositionPatient projected on the slice normal, whatever their names.
    Raises InputError for a folder without ``.dcm`` files, several series in one folder, slices of
    different sizes or orientations, missing geometry tags, two slices at the same position, uneven slice
    gaps (missing slices), and for every per-file problem of ``read_dicom_file``.
    """
    folder = Path(folder)
    files = dicom_files_in(folder)
    if not files:
        raise InputError(folder, "folder holds no .dcm files")
    datasets = [_read_dataset(path) for path in files]

    series_ids = {str(dataset.get("SeriesInstanceUID", "")) for dataset in datasets}
    if len(series_ids) > 1:
        raise InputError(
            folder, f"folder mixes {len(series_ids)} DICOM series (SeriesInstanceUID); keep one per folder"
        )
    first_size = (int(datasets[0].get("Rows", 0)), int(datasets[0].get("Columns", 0)))
    for path, dataset in zip(files, datasets):
        size = (int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0)))
        if size != first_size:
            raise InputError(
                folder,
                f"inconsistent slice sizes: {files[0].name} is {first_size[0]}x{first_size[1]} "
                f"but {path.name} is {size[0]}x{size[1]}",
            )

    orientation = _orientation(datasets[0])
    pixel_spacing = _pixel_spacing(datasets[0])
    for path, dataset in zip(files, datasets):
        for name, value in (("ImageOrientationPatient", _orientation(dataset)),
                            ("ImagePositionPatient", _position(dataset)),
                            ("PixelSpacing", _pixel_spacing(dataset))):
            if value is None:
                raise InputError(path, f"DICOM file lacks {name}, needed to place the slices of a series")
        if not np.allclose(_orientation(dataset), orientation, atol=_GEOMETRY_TOLERANCE):
            raise InputError(folder, f"slices have different orientations: {files[0].name} and {path.name}")
        if not np.allclose(_pixel_spacing(dataset), pixel_spacing, atol=_GEOMETRY_TOLERANCE):
            raise InputError(folder, f"slices have different pixel spacings: {files[0].name} and {path.name}")

    normal = np.cross(*orientation)
    positions = np.array([_position(dataset) for dataset in datasets])
    heights = positions @ normal
    order = np.argsort(heights, kind="stable")
    gaps = np.diff(heights[order])
    if len(files) > 1:
        duplicate = int(np.argmin(gaps))
        if gaps[duplicate] < _GEOMETRY_TOLERANCE:
            first, second = files[order[duplicate]].name, files[order[duplicate + 1]].name
            raise InputError(folder, f"two slices at the same position: {first} and {second}")
        if gaps.max() - gaps.min() > _SLICE_GAP_TOLERANCE * gaps.mean() + _GEOMETRY_TOLERANCE:
            raise InputError(
                folder, f"slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm: slices missing?"
            )
        slice_step = (positions[order[-1]] - positions[order[0]]) / (len(files) - 1)
        slice_spacing = float(np.mean(gaps))
    else:
        dataset = datasets[0]
        slice_spacing = float(dataset.get("SpacingBetweenSlices", 0) or dataset.get("SliceThickness", 1.0) or 1.0)
        slice_step = normal * slice_spacing

    array = np.stack([_pixels(datasets[index], files[index]) for index in order], axis=-1)
    affine = _affine_ras(orientation, pixel_spacing, positions[order[0]], slice_step)
    return LoadedImage(array, (pixel_spacing[0], pixel_spacing[1], slice_spacing), affine, folder)
