"""Label maps of a DICOM series written as a DICOM Segmentation object (SEG) through highdicom.

A SEG is its own DICOM instance (a new series in the source study) that references every source slice
by SOP Instance UID, so PACS viewers, OHIF and 3D Slicer overlay it on the series it was made from. One
binary segment is written per foreground class: segment number ``n`` is class ``n`` of ``class_names``
(class 0, background, is not a segment), labelled with the class name. Frames holding no foreground are
omitted (highdicom's default), except for an all-background label map, where highdicom keeps every frame
because a SEG cannot have none.

Voxel order: the label map is in the order :func:`segmenter.io.read_image` returns for the series
folder, ``label_map[row, col, slice]`` with slices sorted by ascending position along the slice normal
(see :mod:`segmenter.io.dicom`). Slice ``k`` of the label map becomes frames derived from the ``k``-th
slice in that order.
"""
from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from segmenter.artifacts import atomic_file
from segmenter.errors import InputError
from segmenter.io.dicom import _orientation, _position, dicom_files_in

#: Suffix of a DICOM SEG output, e.g. ``case_1.seg.dcm``: still ``.dcm`` for DICOM tools, and the
#: ``.seg`` part keeps it apart from the image slices of the same case.
DICOM_SEG_SUFFIX = ".seg.dcm"

# Patient and study attributes highdicom copies from the first slice. They are Type 2 (present, maybe
# empty) in any conformant image, but minimal files written by conversion tools often leave them out.
_COPIED_TYPE_2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")

# SEG is a new series in the source study; a high number sorts it after the scanner's own series.
_SERIES_NUMBER = 1000


def _segmenter_version() -> str:
    try:
        return importlib.metadata.version("segmenter")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _ordered_series_headers(series_dir: Path) -> list[pydicom.Dataset]:
    """The headers of the series' slices in :func:`segmenter.io.read_image`'s slice order.

    Only headers are read (no pixel data): highdicom needs the slices' identifiers and geometry, and
    decoding a whole series again just to write its SEG would be wasted work.
    """
    if not series_dir.is_dir():
        raise InputError(series_dir, "a DICOM SEG needs the folder of the source DICOM series")
    files = dicom_files_in(series_dir)
    if not files:
        raise InputError(series_dir, "folder holds no .dcm files")
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:  # pydicom raises InvalidDicomError, OSError, struct errors...
            raise InputError(path, f"cannot read DICOM file: {error}") from error
    if len({str(header.get("SeriesInstanceUID", "")) for header in headers}) > 1:
        raise InputError(series_dir, "folder mixes several DICOM series (SeriesInstanceUID)")
    if len({(header.get("Rows"), header.get("Columns")) for header in headers}) > 1:
        raise InputError(series_dir, "slices of the series differ in size (Rows, Columns)")
    for path, header in zip(files, headers):
        if _orientation(header) is None or _position(header) is None:
            raise InputError(path, "DICOM file lacks ImageOrientationPatient or ImagePositionPatient")
    _fill_missing_identifiers(series_dir, files, headers)
    # The same key and the same stable sort of the name-sorted files as read_dicom_series, so that slice
    # k here is slice k of the array read_image returns.
    normal = np.cross(*_orientation(headers[0]))
    heights = np.array([_position(header) for header in headers]) @ normal
    return [headers[index] for index in np.argsort(heights, kind="stable")]


def _fill_missing_identifiers(series_dir: Path, files: list[Path], headers: list[pydicom.Dataset]) -> None:
    """Complete, in memory, what highdicom copies or references, where conversion or anonymisation lost it.

    Absent Type 2 patient and study attributes are added empty, as the SEG would carry them anyway.
    SOP Class and Instance UIDs come from the file meta header (PS3.10 requires them to be equal), so
    the SEG frames reference the real slices. A blank Study or Series Instance UID cannot be recovered:
    one is derived from the slices' instance UIDs, the same on every run over the same series, with a
    warning, because the SEG then links to its slices but not to a study or series a PACS knows.
    """
    for path, header in zip(files, headers):
        for name in _COPIED_TYPE_2:
            if name not in header:
                setattr(header, name, None)
        meta = getattr(header, "file_meta", None) or pydicom.Dataset()
        for name, meta_name in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(header.get(name, "") or ""):
                setattr(header, name, str(meta.get(meta_name, "") or ""))
            if not str(header.get(name, "") or ""):
                raise InputError(path, f"DICOM file has no {name}, which a DICOM SEG must reference")
    instances = sorted(str(header.SOPInstanceUID) for header in headers)
    for name in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not str(headers[0].get(name, "") or ""):
            uid = generate_uid(entropy_srcs=[name, *instances])
            warnings.warn(f"{series_dir}: the DICOM series has no {name}; the SEG uses {uid} derived from "
                          f"its slices, so a PACS will not link it to the original one", stacklevel=4)
            for header in headers:
                setattr(header, name, uid)


def _segmentation(headers: list[pydicom.Dataset], frames: np.ndarray, segments: list[hd.seg.SegmentDescription],
                  algorithm_name: str, version: str) -> hd.seg.Segmentation:
    """The binary SEG of ``frames`` (frame i derived from ``headers[i]``) in a new series."""
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="segmenter",
        manufacturer_model_name=algorithm_name,
        software_versions=version,
        device_serial_number="none",  # Type 1 in the equipment module; software has no serial number
        series_description=f"{algorithm_name} segmentation"[:64],
    )


def write_dicom_seg(
    label_map: np.ndarray,
    series_dir: Path,
    class_names: list[str] | tuple[str, ...],
    path: Path,
    *,
    algorithm_name: str = "segmenter",
    algorithm_version: str | None = None,
) -> Path:
    """Write ``label_map`` of the DICOM series in ``series_dir`` as a binary DICOM SEG, atomically.

    Parameters
    ----------
    label_map : np.ndarray
        Integer labels shaped (rows, cols, slices) in the voxel order of ``read_image(series_dir)``,
        values ``0 .. len(class_names) - 1``; 0 is background.
    series_dir : Path
        Folder of the source series (the ``.dcm`` files that ``read_image`` reads as one series).
    class_names : sequence of str
        Class names by label; ``class_names[1:]`` become segments 1..K with those names as labels.
    path : Path
        Output file, conventionally ending in :data:`DICOM_SEG_SUFFIX`. Parent folders are created.
    algorithm_name, algorithm_version : str
        Recorded as the segments' algorithm and as the equipment's model name and software version;
        the version defaults to the installed segmenter version.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        ``series_dir`` is not a readable single DICOM series with geometry tags; ``label_map`` has not
        the series' shape or holds values outside ``0 .. len(class_names) - 1``; fewer than two classes.
    """
    path, series_dir = Path(path), Path(series_dir)
    label_map = np.asarray(label_map)
    number_of_segments = len(class_names) - 1
    if number_of_segments < 1:
        raise InputError(path, f"a DICOM SEG needs a background and at least one class, got {class_names}")
    headers = _ordered_series_headers(series_dir)
    series_shape = (int(headers[0].Rows), int(headers[0].Columns), len(headers))
    if label_map.shape != series_shape:
        raise InputError(
            path, f"label map shape {label_map.shape} differs from the DICOM series {series_dir} "
                  f"(rows, cols, slices) {series_shape}"
        )
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool):
        raise InputError(path, f"label map holds {label_map.dtype} values, expected integers")
    low, high = int(label_map.min()), int(label_map.max())
    if low < 0 or high > number_of_segments:
        raise InputError(path, f"label map values {low}..{high} are outside the classes 0..{number_of_segments}")

    version = algorithm_version or _segmenter_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    # The classes are whatever the user trained; "Tissue"/"Tissue" is the generic SNOMED CT pair that is
    # true of any anatomical class (viewers show the segment label, which carries the class name).
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(class_names[number]),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number in range(1, number_of_segments + 1)
    ]
    # highdicom reads a (frames, rows, cols) uint8/uint16 array as labels = segment numbers, frame i
    # derived from source_images[i]: move the slice axis first to pair slice k with the k-th header.
    frames = np.moveaxis(label_map, -1, 0).astype(np.uint8 if number_of_segments <= 255 else np.uint16)
    try:
        segmentation = _segmentation(headers, frames, segments, algorithm_name, version)
    except ValueError as error:  # highdicom's checks of the source slices (geometry, attributes)
        raise InputError(series_dir, f"cannot make a DICOM SEG of this series: {error}") from error

    # Written under a hidden temporary name and moved into place (creating the folder): readers never
    # see half a file, and a failed write leaves no temporary and the old file untouched.
    with atomic_file(path) as temporary:
        segmentation.save_as(temporary)
    return path
