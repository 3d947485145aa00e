"""DICOM SEG output (segmenter.io.dicom_seg), read back with pydicom and highdicom.

The real series is ../shared/datasets/ct_abdomen_totalseg/dicom with its TotalSegmentator label map; the
checks recompute the slice order from ImagePositionPatient themselves instead of trusting the writer's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SegmentationStorage, generate_uid

from segmenter.errors import InputError
from segmenter.io import read_image, read_mask
from segmenter.io.dicom_seg import DICOM_SEG_SUFFIX, write_dicom_seg
from tests.test_io import write_dicom_slice

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTALSEG = REPO_ROOT.parent / "shared" / "datasets" / "ct_abdomen_totalseg"

# Class index -> TotalSegmentator id (class_map.json). Chosen for coverage: spleen on all 20 slices,
# pancreas on 4, T11 on 17, a rib on 9, and the left kidney on none (an empty segment).
CLASSES = {"background": 0, "spleen": 1, "pancreas": 7, "vertebrae_T11": 33, "rib_left_6": 97, "kidney_left": 3}
CLASS_NAMES = list(CLASSES)


def assert_one_line_error(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def frame_table(dataset: pydicom.Dataset) -> list[tuple[int, str, list[float]]]:
    """(segment number, referenced SOP Instance UID, ImagePositionPatient) of each frame, read with pydicom."""
    rows = []
    for item in dataset.PerFrameFunctionalGroupsSequence:
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sources = [source for derivation in item.DerivationImageSequence for source in derivation.SourceImageSequence]
        assert len(sources) == 1, "each frame must derive from exactly one slice"
        position = [float(value) for value in item.PlanePositionSequence[0].ImagePositionPatient]
        rows.append((segment, str(sources[0].ReferencedSOPInstanceUID), position))
    return rows


@pytest.fixture(scope="module")
def totalseg(tmp_path_factory):
    """The series, its label map reduced to CLASSES on the series grid, the SEG written from it."""
    assert TOTALSEG.is_dir(), f"{TOTALSEG} is missing: ../shared/datasets must sit beside the checkout"
    series_dir = TOTALSEG / "dicom"
    image = read_image(series_dir)
    totalseg_labels = read_mask(TOTALSEG / "dicom_labels.nii.gz", reference=image).array
    label_map = np.zeros(totalseg_labels.shape, dtype=np.int32)
    for index, totalseg_id in enumerate(CLASSES.values()):
        if index:
            label_map[totalseg_labels == totalseg_id] = index

    # Slice order from the files themselves: this axial series (normal +z) ascends in z. The slices'
    # own SOPInstanceUID is blanked by anonymisation; the file meta header keeps it.
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(series_dir.glob("*.dcm"))]
    assert [float(value) for value in headers[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    headers.sort(key=lambda header: float(header.ImagePositionPatient[2]))
    slice_uids = [str(header.file_meta.MediaStorageSOPInstanceUID) for header in headers]
    # ...and it is read_image's order: slice k sits at the series affine's k-th step.
    for k, header in enumerate(headers):
        ras = image.affine @ [0, 0, k, 1]
        np.testing.assert_allclose(np.array(header.ImagePositionPatient, dtype=float), ras[:3] * [-1, -1, 1])

    path = tmp_path_factory.mktemp("seg") / f"case{DICOM_SEG_SUFFIX}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert write_dicom_seg(label_map, series_dir, CLASS_NAMES, path, algorithm_version="9.9") == path
    return {"series_dir": series_dir, "label_map": label_map, "headers": headers, "slice_uids": slice_uids,
            "path": path, "warnings": [str(warning.message) for warning in caught]}


def test_seg_frames_segments_and_references(totalseg):
    label_map, slice_uids = totalseg["label_map"], totalseg["slice_uids"]
    dataset = pydicom.dcmread(totalseg["path"])
    assert dataset.SOPClassUID == SegmentationStorage and dataset.Modality == "SEG"
    assert dataset.SegmentationType == "BINARY"
    assert [int(item.SegmentNumber) for item in dataset.SegmentSequence] == [1, 2, 3, 4, 5]
    assert [item.SegmentLabel for item in dataset.SegmentSequence] == CLASS_NAMES[1:]
    for item in dataset.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "segmenter"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Tissue"
    assert dataset.SoftwareVersions == "9.9"

    # Empty frames are omitted: one frame per (slice, segment) pair holding that segment.
    present = {segment: {k for k in range(label_map.shape[2]) if (label_map[:, :, k] == segment).any()}
               for segment in range(1, len(CLASS_NAMES))}
    assert [len(slices) for slices in present.values()] == [20, 4, 17, 9, 0]
    frames = frame_table(dataset)
    assert int(dataset.NumberOfFrames) == len(frames) == sum(len(slices) for slices in present.values()) == 50

    for segment, slices in present.items():
        referenced = {uid for number, uid, _ in frames if number == segment}
        assert referenced == {slice_uids[k] for k in slices}, CLASS_NAMES[segment]
    referenced_series = dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced_series} == set(slice_uids)

    # Every frame lies where its slice lies, and its pixels are that slice's voxels of its segment:
    # together the frames rebuild the label map voxel for voxel.
    pixels = dataset.pixel_array
    assert pixels.shape == (50, 512, 512)
    rebuilt = np.zeros_like(label_map)
    for frame, (segment, uid, position) in zip(pixels, frames):
        k = slice_uids.index(uid)
        np.testing.assert_allclose(position, [float(v) for v in totalseg["headers"][k].ImagePositionPatient])
        np.testing.assert_array_equal(frame.astype(bool), label_map[:, :, k] == segment)
        rebuilt[:, :, k][frame.astype(bool)] = segment
    np.testing.assert_array_equal(rebuilt, label_map)


def test_highdicom_reads_the_label_map_back(totalseg):
    segmentation = hd.seg.segread(totalseg["path"])
    assert segmentation.get_segment_numbers() == [1, 2, 3, 4, 5]
    assert [segmentation.get_segment_description(n).segment_label for n in range(1, 6)] == CLASS_NAMES[1:]
    assert {uids[2] for uids in segmentation.get_source_image_uids()} == set(totalseg["slice_uids"])
    # Every slice has a frame (the spleen is on all of them), so no missing frame needs assuming empty.
    pixels = segmentation.get_pixels_by_source_instance(totalseg["slice_uids"], combine_segments=True)
    np.testing.assert_array_equal(np.moveaxis(pixels, 0, -1), totalseg["label_map"])


def test_anonymised_series_gets_stable_study_and_series_uids(totalseg, tmp_path):
    # The shared series has blank Study/Series Instance UIDs: the SEG needs some, derived from the slices.
    assert len(totalseg["warnings"]) == 2
    assert "StudyInstanceUID" in totalseg["warnings"][0] and "SeriesInstanceUID" in totalseg["warnings"][1]
    first = pydicom.dcmread(totalseg["path"], stop_before_pixels=True)
    with pytest.warns(UserWarning) as caught:
        again = write_dicom_seg(np.zeros_like(totalseg["label_map"]), totalseg["series_dir"], CLASS_NAMES[:2],
                                tmp_path / "empty.seg.dcm")
    assert [str(warning.message) for warning in caught] == totalseg["warnings"]
    second = pydicom.dcmread(again)
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == second.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID  # each SEG is a new series
    # An all-background map cannot omit every frame: highdicom keeps one empty frame per slice.
    assert int(second.NumberOfFrames) == 20 and not second.pixel_array.any()


# --------------------------------------------------------------------------------------------------
# A small generated series with complete identifiers, in an orientation where slice order is not file
# order and not ascending x, y or z.
# --------------------------------------------------------------------------------------------------

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal -x: read_image orders slices by descending x


def write_series(folder: Path, count: int = 4, shape=(6, 5)) -> dict[str, int]:
    """Slices whose pixels all equal their position rank + 1, under shuffled names; SOP UID -> rank."""
    folder.mkdir(parents=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    rank_of = {}
    names = np.random.default_rng(4).permutation(count)
    for rank, name in enumerate(names):
        path = write_dicom_slice(
            folder / f"IM{name:04d}.dcm", np.full(shape, rank + 1, dtype=np.uint16),
            [10.0 - 1.5 * rank, 1.0, 5.0],  # rank 0 has the largest x
            orientation=SAGITTAL, pixel_spacing=(0.8, 0.6), slope=1.0, intercept=0.0, series_uid=series,
            slice_thickness=1.5, StudyInstanceUID=study, FrameOfReferenceUID=frame_of_reference, PatientID="P1",
            PatientName="Test^Patient")
        rank_of[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = rank
    return rank_of


def test_generated_sagittal_series_keeps_identifiers_and_slice_order(tmp_path):
    rank_of = write_series(tmp_path / "series")
    image = read_image(tmp_path / "series")
    slice_of_rank = {int(image.array[0, 0, k]) - 1: k for k in range(image.array.shape[2])}
    label_map = np.random.default_rng(5).integers(0, 3, image.array.shape)
    path = tmp_path / "out" / "nested" / "case.seg.dcm"
    path.parent.mkdir(parents=True)
    path.write_text("old content")  # replaced whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete identifiers: nothing to warn about
        write_dicom_seg(label_map, tmp_path / "series", ["background", "a", "b"], path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    dataset = pydicom.dcmread(path)
    source = pydicom.dcmread(next((tmp_path / "series").glob("*.dcm")), stop_before_pixels=True)
    assert dataset.StudyInstanceUID == source.StudyInstanceUID
    assert dataset.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert dataset.PatientID == "P1"
    rebuilt = np.zeros_like(label_map)
    for frame, (segment, uid, _) in zip(dataset.pixel_array, frame_table(dataset)):
        k = slice_of_rank[rank_of[uid]]
        np.testing.assert_array_equal(frame.astype(bool), label_map[:, :, k] == segment)
        rebuilt[:, :, k][frame.astype(bool)] = segment
    np.testing.assert_array_equal(rebuilt, label_map)


@pytest.mark.parametrize("change, fragments", [
    (lambda labels: labels[:, :, :-1], ["(6, 5, 3)", "(6, 5, 4)", "series"]),
    (lambda labels: labels.transpose(1, 0, 2), ["(5, 6, 4)", "(6, 5, 4)"]),
    (lambda labels: labels + 3, ["outside the classes 0..2"]),
    (lambda labels: labels.astype(np.float32), ["float32"]),
])
def test_bad_label_maps_raise_one_line_input_error(tmp_path, change, fragments):
    write_series(tmp_path / "series")
    labels = np.zeros((6, 5, 4), dtype=np.int32)
    path = tmp_path / "out" / "case.seg.dcm"
    with pytest.raises(InputError) as error:
        write_dicom_seg(change(labels), tmp_path / "series", ["background", "a", "b"], path)
    assert_one_line_error(error, str(path), *fragments)
    assert not path.parent.exists() or not any(path.parent.iterdir())


def test_not_a_dicom_series_raises_one_line_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError) as error:
        write_dicom_seg(np.zeros((2, 2, 1), int), tmp_path / "empty", ["background", "a"], tmp_path / "x.seg.dcm")
    assert_one_line_error(error, "empty", "no .dcm files")

    (tmp_path / "image.nii.gz").write_bytes(b"")
    with pytest.raises(InputError) as error:
        write_dicom_seg(np.zeros((2, 2, 1), int), tmp_path / "image.nii.gz", ["background", "a"],
                        tmp_path / "x.seg.dcm")
    assert_one_line_error(error, "image.nii.gz", "DICOM series")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(InputError) as error:
        write_dicom_seg(np.zeros((2, 2, 1), int), tmp_path / "broken", ["background", "a"], tmp_path / "x.seg.dcm")
    assert_one_line_error(error, "a.dcm", "cannot read DICOM")
    assert not (tmp_path / "x.seg.dcm").exists()
