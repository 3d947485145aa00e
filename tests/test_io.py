"""Readers, case listing and mask writers of segmenter.io, on generated files and on the shared datasets."""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from segmenter.errors import InputError
from segmenter.io import (
    LPS_TO_RAS,
    READERS,
    SUPPORTED_SUFFIXES,
    LoadedImage,
    case_id,
    list_cases,
    read_image,
    read_mask,
    unsupported_files,
    write_mask,
)

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # along a row: posterior; down a column: inferior; normal -x


def shared_dataset(name: str) -> Path:
    """A dataset from ../shared/datasets; a missing one fails the test (CI has them), never skips it."""
    path = DATASETS / name
    assert path.is_dir(), f"{path} is missing: ../shared/datasets must sit beside the checkout"
    return path


# --------------------------------------------------------------------------------------------------
# Helpers that write test files with each format's own library.
# --------------------------------------------------------------------------------------------------

def write_dicom_slice(path: Path, stored: np.ndarray, position, *, orientation=AXIAL, pixel_spacing=(0.8, 0.6),
                      slope=2.5, intercept=-1024.0, series_uid="1.2.3.4", with_pixels=True,
                      slice_thickness=3.0, **attributes) -> Path:
    """One CT slice written with pydicom's dataset API (explicit VR little endian); ``attributes`` are set too
    (e.g. StudyInstanceUID, PatientID)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = "CT"
    dataset.ImagePositionPatient = [float(value) for value in position]
    dataset.ImageOrientationPatient = list(orientation)
    dataset.PixelSpacing = list(pixel_spacing)
    dataset.SliceThickness = slice_thickness
    for name, value in attributes.items():
        setattr(dataset, name, value)
    dataset.RescaleSlope = slope
    dataset.RescaleIntercept = intercept
    dataset.set_pixel_data(stored, "MONOCHROME2", 16)
    if not with_pixels:
        del dataset.PixelData
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(folder: Path, stored_slices: list[np.ndarray], positions: list, rng,
                       **options) -> list[Path]:
    """Write slices under shuffled file names (file order is not slice order); return paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = rng.permutation(len(stored_slices))
    return [
        write_dicom_slice(folder / f"IM{name:04d}.dcm", stored, position, **options)
        for name, stored, position in zip(names, stored_slices, positions)
    ]


def voxel_to_ras(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, InputError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------

EXPECTED_TABLE = np.array([[1.0, 2.5, -3.0], [4.0, 5.0, 6.25]], dtype=np.float32)

CSV_CASES = [
    ("comma_with_header", "a,b,c\n1,2.5,-3\n4,5,6.25\n"),
    ("semicolon_no_header", "1;2.5;-3\n4;5;6.25\n"),
    ("tab_with_header", "x\ty\tz\n1\t2.5\t-3\n4\t5\t6.25\n"),
    ("comma_spaces_blank_lines", "\n 1 , 2.5 , -3 \n\n4,5,6.25\n\n"),
]


@pytest.mark.parametrize("name, text", CSV_CASES, ids=[case[0] for case in CSV_CASES])
def test_read_csv_variants(tmp_path, name, text):
    path = tmp_path / f"{name}.csv"
    path.write_text(text)
    image = read_image(path)
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, EXPECTED_TABLE)
    assert image.spacing is None and image.affine is None and image.source == path


LABEL_MAP_TEXTS = {
    "one_digit": "0,1,2\n2,0,1\n",
    "one_digit_no_final_newline": "0;1;2\n2;0;1",
    "one_digit_tabs": "0\t1\t2\n2\t0\t1\n",
    "two_digit_label": "0,1,12\n2,0,1\n",
    "windows_line_ends": "0,1,2\r\n2,0,1\r\n",
    "spaces": "0, 1, 2\n2, 0, 1\n",
    "header": "a,b,c\n0,1,2\n2,0,1\n",
    "float_cells": "0.0,1,2\n2,0,1.0\n",
}


@pytest.mark.parametrize("name", LABEL_MAP_TEXTS)
def test_read_csv_label_maps_in_every_layout(tmp_path, name):
    # One-digit label maps take a fast path of their own; every other layout goes through np.loadtxt.
    path = tmp_path / f"{name}.csv"
    path.write_text(LABEL_MAP_TEXTS[name], newline="")
    expected = [[0, 1, 12 if name == "two_digit_label" else 2], [2, 0, 1]]
    mask = read_mask(path)
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, expected)


def test_read_csv_single_column(tmp_path):
    path = tmp_path / "column.csv"
    path.write_text("value\n1\n2\n3\n")
    np.testing.assert_array_equal(read_image(path).array, [[1], [2], [3]])


# --------------------------------------------------------------------------------------------------
# PNG and NPY
# --------------------------------------------------------------------------------------------------

def test_read_png_8_and_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as written:
        assert written.mode == "I;16"
    image8, image16 = read_image(tmp_path / "g8.png"), read_image(tmp_path / "g16.png")
    assert image8.array.shape == (5, 7) and image8.array.dtype == np.float32
    np.testing.assert_array_equal(image8.array, grey8)
    np.testing.assert_array_equal(image16.array, grey16)
    assert image8.spacing is None and image8.affine is None


def test_read_png_colour_converted_to_grey(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], axis=-1), mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png").array, grey)  # equal channels kept exactly

    colour = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "rgb.png")
    pillow_luma = np.asarray(Image.fromarray(colour, mode="RGB").convert("L"), dtype=np.float32)
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png").array, pillow_luma, atol=0.51)


@pytest.mark.parametrize("shape", [(6, 5), (4, 6, 5)])
def test_read_npy_2d_and_3d(tmp_path, shape):
    array = np.random.default_rng(2).normal(size=shape)
    np.save(tmp_path / "a.npy", array)
    image = read_image(tmp_path / "a.npy")
    assert image.array.shape == shape and image.array.dtype == np.float32
    np.testing.assert_allclose(image.array, array.astype(np.float32))


@pytest.mark.parametrize("array, problem", [
    (np.zeros((2, 3, 4, 5)), "expected a 2D or 3D array"),
    (np.zeros(5), "expected a 2D or 3D array"),
    (np.zeros((3, 3), dtype=complex), "expected real numbers"),
    (np.array([["a", "b"]]), "expected real numbers"),
])
def test_read_npy_rejects_wrong_shapes_and_types(tmp_path, array, problem):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InputError) as error:
        read_image(tmp_path / "bad.npy")
    assert_one_line_error(error, "bad.npy", problem)


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, zooms", [((6, 5), (0.5, 0.7)), ((6, 5, 4), (1.5, 2.0, 3.0))])
def test_read_nifti_data_spacing_affine(tmp_path, shape, zooms):
    array = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    affine = np.diag(list(zooms) + [1.0] * (4 - len(zooms)))
    affine[:3, 3] = [10.0, -20.0, 5.0]
    affine[0, 0] *= -1  # a flipped axis, as in most scanner files
    write_nifti(tmp_path / "v.nii.gz", array, affine)
    image = read_image(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(image.array, array)
    assert image.spacing == pytest.approx(zooms)
    np.testing.assert_allclose(image.affine, affine)


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

def test_read_dicom_file_rescales_and_places(tmp_path):
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    path = write_dicom_slice(tmp_path / "one.dcm", stored, (1.5, -2.25, 10.0), slope=2.5, intercept=-1024.0)
    image = read_image(path)
    assert image.array.shape == (3, 4) and image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, stored * 2.5 - 1024.0)
    assert image.spacing == (0.8, 0.6)
    # Pixel (row 2, col 3) lies at IPP + 2 * 0.8 * Y + 3 * 0.6 * X in LPS.
    lps = np.array([1.5, -2.25, 10.0]) + 2 * 0.8 * np.array([0, 1, 0]) + 3 * 0.6 * np.array([1, 0, 0])
    np.testing.assert_allclose(voxel_to_ras(image.affine, (2, 3, 0)), lps * [-1, -1, 1])


@pytest.mark.parametrize("orientation, positions", [
    (AXIAL, [(0.0, 0.0, z) for z in (-30.0, -27.5, -25.0, -22.5, -20.0)]),
    # Sagittal slices: the normal is -x (LPS), so ascending position along it is descending x.
    (SAGITTAL, [(x, -5.0, 40.0) for x in (12.0, 9.0, 6.0, 3.0, 0.0)]),
], ids=["axial", "sagittal"])
def test_read_dicom_series_orders_by_position(tmp_path, orientation, positions):
    rng = np.random.default_rng(4)
    stored_slices = [np.full((3, 4), 100 * (k + 1), dtype=np.uint16) + rng.integers(0, 50, (3, 4), dtype=np.uint16)
                     for k in range(len(positions))]
    # Write them in reversed position order under shuffled names: the reader must sort by geometry.
    write_dicom_series(tmp_path / "series", stored_slices[::-1], positions[::-1], rng, orientation=orientation,
                       slope=0.5, intercept=-1000.0)
    image = read_image(tmp_path / "series")

    assert image.array.shape == (3, 4, 5) and image.array.dtype == np.float32
    for k, stored in enumerate(stored_slices):
        np.testing.assert_array_equal(image.array[:, :, k], stored * 0.5 - 1000.0)
    step = np.linalg.norm(np.subtract(positions[1], positions[0]))
    assert image.spacing == pytest.approx((0.8, 0.6, step))
    across_row, down_column = np.array(orientation[:3]), np.array(orientation[3:])
    for index in [(0, 0, 0), (2, 3, 4), (1, 2, 3)]:
        r, c, k = index
        lps = np.array(positions[k]) + r * 0.8 * down_column + c * 0.6 * across_row
        np.testing.assert_allclose(voxel_to_ras(image.affine, index), LPS_TO_RAS[:3, :3] @ lps, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Bad input: every error is an InputError with the file name in a one-line message.
# --------------------------------------------------------------------------------------------------

def _valid_png_bytes(tmp_path: Path) -> bytes:
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


def _valid_nifti_bytes(tmp_path: Path) -> bytes:
    volume = np.random.default_rng(6).normal(size=(20, 20, 20)).astype(np.float32)
    write_nifti(tmp_path / "ok.nii.gz", volume, np.eye(4))
    return (tmp_path / "ok.nii.gz").read_bytes()


def _valid_npy_bytes(tmp_path: Path) -> bytes:
    np.save(tmp_path / "ok.npy", np.zeros((10, 10)))
    return (tmp_path / "ok.npy").read_bytes()


def _valid_dicom_bytes(tmp_path: Path) -> bytes:
    return write_dicom_slice(tmp_path / "ok.dcm", np.zeros((8, 8), dtype=np.uint16), (0, 0, 0)).read_bytes()


def _make_bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file to read, fragment the message must contain)."""
    cases = {}

    def add(name: str, content: bytes | str, fragment: str):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases[name] = (path, fragment)

    add("garbage.png", b"this is not a png", "cannot read PNG")
    add("truncated.png", _valid_png_bytes(tmp_path)[:200], "cannot read PNG")
    add("truncated.npy", _valid_npy_bytes(tmp_path)[:150], "cannot read NPY")
    add("truncated.nii.gz", _valid_nifti_bytes(tmp_path)[:3000], "cannot read NIfTI")
    add("garbage.nii", b"x" * 400, "cannot read NIfTI")
    add("garbage.dcm", b"not dicom at all", "cannot read DICOM")
    add("truncated.dcm", _valid_dicom_bytes(tmp_path)[:-40], "DICOM")
    add("empty.csv", "", "empty")
    add("blank.csv", "\n \n", "empty")
    add("header_only.csv", "a,b\n", "no data rows")
    add("non_numeric.csv", "a,b\n1,2\n3,x\n", "line 3, column 2: 'x' is not a number")
    add("ragged.csv", "1;2;3\n4;5\n", "line 2 has 2 values, expected 3")
    add("ragged_digits.csv", "0,1,2\n1,0\n2,1,0\n", "line 2 has 2 values, expected 3")
    add("inf.csv", "1,2\ninf,4\n", "contains NaN or infinite values")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [0.0, 1.0]]))
    cases["nan.npy"] = (tmp_path / "nan.npy", "contains NaN or infinite values")
    write_nifti(tmp_path / "inf.nii.gz", np.array([[[np.inf]], [[0.0]]], dtype=np.float32), np.eye(4))
    cases["inf.nii.gz"] = (tmp_path / "inf.nii.gz", "contains NaN or infinite values")
    write_dicom_slice(tmp_path / "no_pixels.dcm", np.zeros((4, 4), dtype=np.uint16), (0, 0, 0), with_pixels=False)
    cases["no_pixels.dcm"] = (tmp_path / "no_pixels.dcm", "no pixel data")
    cases["missing.png"] = (tmp_path / "missing.png", "does not exist")
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = (tmp_path / "notes.txt", "unsupported file type")
    return cases


BAD_FILES = ["garbage.png", "truncated.png", "truncated.npy", "truncated.nii.gz", "garbage.nii", "garbage.dcm",
             "truncated.dcm", "empty.csv", "blank.csv", "header_only.csv", "non_numeric.csv", "ragged.csv",
             "ragged_digits.csv", "inf.csv", "nan.npy", "inf.nii.gz", "no_pixels.dcm", "missing.png", "notes.txt"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _make_bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_raises_one_line_input_error(bad_files, name):
    path, fragment = bad_files[name]
    with pytest.raises(InputError) as error:
        read_image(path)
    assert_one_line_error(error, path.name, fragment)
    assert error.value.path == path


def test_series_with_inconsistent_slice_sizes(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom_slice(folder / "a.dcm", np.zeros((4, 4), dtype=np.uint16), (0, 0, 0))
    write_dicom_slice(folder / "b.dcm", np.zeros((4, 5), dtype=np.uint16), (0, 0, 2))
    with pytest.raises(InputError) as error:
        read_image(folder)
    assert_one_line_error(error, "series", "inconsistent slice sizes", "a.dcm", "b.dcm")


def test_series_with_a_missing_slice_or_two_series(tmp_path):
    gap = tmp_path / "gap"
    gap.mkdir()
    for name, z in [("a", 0.0), ("b", 2.0), ("c", 6.0)]:
        write_dicom_slice(gap / f"{name}.dcm", np.zeros((4, 4), dtype=np.uint16), (0, 0, z))
    with pytest.raises(InputError) as error:
        read_image(gap)
    assert_one_line_error(error, "gap", "slice gaps vary")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_dicom_slice(mixed / "a.dcm", np.zeros((4, 4), dtype=np.uint16), (0, 0, 0), series_uid="1.2.1")
    write_dicom_slice(mixed / "b.dcm", np.zeros((4, 4), dtype=np.uint16), (0, 0, 2), series_uid="1.2.2")
    with pytest.raises(InputError) as error:
        read_image(mixed)
    assert_one_line_error(error, "mixed", "2 DICOM series")


def test_read_mask_rejects_non_integer_values(tmp_path):
    np.save(tmp_path / "soft.npy", np.array([[0.0, 0.5], [1.0, 2.0]]))
    with pytest.raises(InputError) as error:
        read_mask(tmp_path / "soft.npy")
    assert_one_line_error(error, "soft.npy", "mask has non-integer values")


def test_read_mask_accepts_integer_valued_floats(tmp_path):
    np.save(tmp_path / "labels.npy", np.array([[0.0, 1.0], [2.0, 1.0]], dtype=np.float32))
    mask = read_mask(tmp_path / "labels.npy")
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, [[0, 1], [2, 1]])


def test_read_mask_shape_must_match_reference_without_affines(tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((4, 5)))
    np.save(tmp_path / "mask.npy", np.zeros((5, 4), dtype=np.int64))
    with pytest.raises(InputError) as error:
        read_mask(tmp_path / "mask.npy", reference=read_image(tmp_path / "image.npy"))
    assert_one_line_error(error, "mask.npy", "differs from image shape")


# --------------------------------------------------------------------------------------------------
# Mapping a label map onto its image's grid through the affines.
# --------------------------------------------------------------------------------------------------

def _reference_volume(tmp_path: Path) -> tuple[LoadedImage, np.ndarray, np.ndarray]:
    """A NIfTI image with an oblique-free, flipped affine; labels that encode each voxel's index."""
    shape = (5, 6, 7)
    affine = np.array([[-0.8, 0, 0, 30.0], [0, 0.8, 0, -12.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    write_nifti(tmp_path / "image.nii.gz", np.zeros(shape, dtype=np.float32), affine)
    labels = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    return read_image(tmp_path / "image.nii.gz"), labels, affine


@pytest.mark.parametrize("orientation", ["PLI", "SRA", "RAS", "LAS"])
def test_mask_stored_in_another_orientation_maps_back_exactly(tmp_path, orientation):
    reference, labels, affine = _reference_volume(tmp_path)
    stored = nib.Nifti1Image(labels, affine).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                        nib.orientations.axcodes2ornt(tuple(orientation))))
    nib.save(stored, str(tmp_path / "labels.nii.gz"))
    mask = read_mask(tmp_path / "labels.nii.gz", reference=reference)
    np.testing.assert_array_equal(mask.array, labels)
    np.testing.assert_allclose(mask.affine, reference.affine)
    assert mask.spacing == reference.spacing


def test_mask_on_a_larger_grid_is_cropped_and_on_a_smaller_one_rejected(tmp_path):
    reference, labels, affine = _reference_volume(tmp_path)
    big = np.pad(labels, 2, constant_values=-1)
    big_affine = affine.copy()
    big_affine[:3, 3] -= affine[:3, :3] @ [2, 2, 2]
    write_nifti(tmp_path / "big.nii.gz", big, big_affine)
    np.testing.assert_array_equal(read_mask(tmp_path / "big.nii.gz", reference=reference).array, labels)

    write_nifti(tmp_path / "small.nii.gz", labels[:, :, :5], affine)
    with pytest.raises(InputError) as error:
        read_mask(tmp_path / "small.nii.gz", reference=reference)
    assert_one_line_error(error, "small.nii.gz", "does not cover the image grid")


def test_mask_on_a_coarser_grid_is_resampled_nearest_neighbour(tmp_path):
    reference, _, affine = _reference_volume(tmp_path)  # 5 x 6 x 7 voxels
    coarse = np.arange(3 * 3 * 7, dtype=np.int32).reshape(3, 3, 7)
    coarse_affine = affine @ np.diag([2.0, 2.0, 1.0, 1.0])
    coarse_affine[:3, 3] += affine[:3, :3] @ [0.5, 0.5, 0]  # coarse voxel centres between fine ones
    write_nifti(tmp_path / "coarse.nii.gz", coarse, coarse_affine)
    mask = read_mask(tmp_path / "coarse.nii.gz", reference=reference)
    # Fine index i sits at coarse index (i - 0.5) / 2: nearest is round half to even, computed independently.
    fine_to_coarse = [int(np.rint((i - 0.5) / 2)) for i in range(6)]
    expected = coarse[np.ix_(fine_to_coarse[:5], fine_to_coarse[:6], range(7))]
    np.testing.assert_array_equal(mask.array, expected)


def test_nifti_mask_of_a_dicom_series(tmp_path):
    """A label map saved as NIfTI (RAS) in nibabel's default LAS-like order lands on the DICOM grid."""
    rng = np.random.default_rng(7)
    positions = [(-20.0, -30.0, z) for z in (5.0, 7.0, 9.0, 11.0)]
    write_dicom_series(tmp_path / "series", [np.zeros((3, 4), dtype=np.uint16)] * 4, positions, rng)
    image = read_image(tmp_path / "series")
    labels = rng.integers(0, 5, (3, 4, 4)).astype(np.int32)
    # Store as (col, flipped row, slice), the layout of dicom_labels.nii.gz, with the matching affine.
    stored = labels[::-1, :, :].transpose(1, 0, 2)
    stored_affine = image.affine @ np.array([[0, -1, 0, 2], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    write_nifti(tmp_path / "labels.nii.gz", stored, stored_affine)
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.nii.gz", reference=image).array, labels)


# --------------------------------------------------------------------------------------------------
# Cases in a folder
# --------------------------------------------------------------------------------------------------

def test_list_cases_and_unsupported_files(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "case_10.png")
    np.save(tmp_path / "case_2.npy", np.zeros((4, 4)))
    write_nifti(tmp_path / "case_3.nii.gz", np.zeros((4, 4, 2), dtype=np.float32), np.eye(4))
    (tmp_path / "case_4.CSV").write_text("1,2\n")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "series_1").mkdir()
    write_dicom_slice(tmp_path / "series_1" / "x.dcm", np.zeros((4, 4), dtype=np.uint16), (0, 0, 0))

    cases = list_cases(tmp_path, "image")
    assert list(cases) == ["case_2", "case_3", "case_4", "case_10", "series_1"]
    assert cases["case_3"] == tmp_path / "case_3.nii.gz"
    assert cases["series_1"] == tmp_path / "series_1"
    assert unsupported_files(tmp_path) == [tmp_path / "empty_folder", tmp_path / "notes.txt"]


@pytest.mark.parametrize("path, expected", [
    ("a/case_1.nii.gz", "case_1"), ("a/b.c.nii", "b.c"), ("x.png", "x"), ("x.NPY", "x"), ("x.y.csv", "x.y"),
    ("scan.dcm", "scan"),
])
def test_case_id(path, expected):
    assert case_id(Path(path)) == expected


def test_supported_suffixes_match_readers():
    assert set(SUPPORTED_SUFFIXES) == {".csv", ".png", ".npy", ".nii", ".nii.gz", ".dcm"} == set(READERS)


def test_list_cases_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(InputError) as error:
        list_cases(tmp_path, "mask")
    assert_one_line_error(error, str(tmp_path), "'a'", "a.npy", "a.png")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InputError) as error:
        list_cases(tmp_path / "empty", "image")
    assert_one_line_error(error, "empty", "no image files found")

    with pytest.raises(InputError) as error:
        list_cases(tmp_path / "nowhere", "image")
    assert_one_line_error(error, "nowhere", "does not exist")


# --------------------------------------------------------------------------------------------------
# Writing masks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, max_label", [
    (".png", 3), (".png", 300), (".npy", 7), (".csv", 12), (".nii", 2), (".nii.gz", 1000), (".nii.gz", -5),
])
def test_write_mask_round_trip(tmp_path, suffix, max_label):
    rng = np.random.default_rng(8)
    shape = (6, 5) if suffix in (".png", ".csv") else (6, 5, 4)
    low = min(0, max_label)
    labels = rng.integers(low, abs(max_label) + 1, shape)
    reference = None
    if suffix.startswith(".nii"):
        affine = np.array([[0, -0.7, 0, 3.0], [-0.7, 0, 0, 4.0], [0, 0, 2.5, -1.0], [0, 0, 0, 1]])
        reference = LoadedImage(np.zeros(shape, np.float32), (0.7, 0.7, 2.5), affine, tmp_path / "ref")
    path = tmp_path / "out" / f"labels{suffix}"
    path.parent.mkdir()
    path.write_text("old content")  # replaced whole
    assert write_mask(labels, path, reference=reference) == path
    mask = read_mask(path)
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, labels)
    if reference is not None:
        np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-6)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    if suffix == ".png":
        with Image.open(path) as written:
            assert written.mode == ("L" if max_label <= 255 else "I;16")


def test_write_mask_of_a_dicom_series_as_nifti_reads_back_on_its_grid(tmp_path):
    rng = np.random.default_rng(9)
    write_dicom_series(tmp_path / "series", [np.zeros((3, 4), dtype=np.uint16)] * 3,
                       [(x, 1.0, 5.0) for x in (0.0, 1.5, 3.0)], rng, orientation=SAGITTAL)
    image = read_image(tmp_path / "series")
    labels = rng.integers(0, 3, image.array.shape)
    write_mask(labels, tmp_path / "labels.nii.gz", reference=image)
    assert nib.load(tmp_path / "labels.nii.gz").header.get_zooms() == pytest.approx(image.spacing)
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.nii.gz", reference=image).array, labels)


@pytest.mark.parametrize("array, name, problem", [
    (np.array([[0.5, 1.0]]), "a.npy", "non-integer"),
    (np.zeros((2, 2, 2), dtype=int), "a.png", "2D"),
    (np.zeros((2, 2, 2), dtype=int), "a.csv", "2D"),
    (np.array([[-1, 0]]), "a.png", "0..65535"),
    (np.zeros((2, 2), dtype=int), "a.txt", "cannot write"),
])
def test_write_mask_errors(tmp_path, array, name, problem):
    with pytest.raises(InputError) as error:
        write_mask(array, tmp_path / name)
    assert_one_line_error(error, name, problem)
    assert [p.name for p in tmp_path.iterdir()] == []


# --------------------------------------------------------------------------------------------------
# Real data in ../shared/datasets
# --------------------------------------------------------------------------------------------------

SPINE_EMPTY = {0, 5, 10}
SPINE_DISCS_ONLY = {1, 13}


def test_spine_png_and_npy():
    root = shared_dataset("spine_mri_sagittal")
    images, masks = list_cases(root / "images", "image"), list_cases(root / "masks", "mask")
    assert list(images) == [str(n) for n in range(20)] == list(masks)
    for identifier, image_path in images.items():
        image = read_image(image_path)
        mask = read_mask(masks[identifier], reference=image)
        assert image.array.shape == (256, 256) == mask.array.shape
        assert 0 <= image.array.min() and image.array.max() <= 255
        number = int(identifier)
        expected = {0} if number in SPINE_EMPTY else {0, 1} if number in SPINE_DISCS_ONLY else {0, 1, 2}
        assert set(np.unique(mask.array).tolist()) == expected, identifier


@pytest.fixture(scope="module")
def totalseg_series():
    return read_image(shared_dataset("ct_abdomen_totalseg") / "dicom")


def test_totalseg_dicom_series_hounsfield_units_and_geometry(totalseg_series):
    image = totalseg_series
    assert image.array.shape == (512, 512, 20)
    assert image.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert image.array.min() == pytest.approx(-1024, abs=1)
    assert image.array.max() > 1000
    anterior_air = image.array[40:80, 200:300, :]  # in front of the abdomen
    assert np.median(anterior_air) == pytest.approx(-1000, abs=30)
    # Axial slices sorted by ascending z (inferior -> superior); RAS axes: rows go posterior, cols to the left.
    np.testing.assert_allclose(image.affine[:3, :3], [[0, -0.9765625, 0], [-0.9765625, 0, 0], [0, 0, 2.0]])


def test_totalseg_dicom_series_slices_follow_positions(totalseg_series):
    files = sorted((shared_dataset("ct_abdomen_totalseg") / "dicom").glob("*.dcm"))
    heights = [float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]) for path in files]
    assert heights != sorted(heights), "file order should differ from slice order in this dataset"
    by_height = [path for _, path in sorted(zip(heights, files))]
    for k in (0, 7, 19):
        single = read_image(by_height[k])
        np.testing.assert_array_equal(totalseg_series.array[:, :, k], single.array)
        series_affine = totalseg_series.affine
        np.testing.assert_allclose(single.affine[:3, 3], series_affine[:3, 3] + k * series_affine[:3, 2])


def _tissue_checks(ct: np.ndarray, labels: np.ndarray) -> dict[str, bool]:
    aorta, left_erector, right_erector = (ct[labels == label].mean() for label in (52, 86, 87))
    return {
        "aorta above 100 HU": aorta > 100,
        "left erector spinae -50..150 HU": -50 < left_erector < 150,
        "right erector spinae -50..150 HU": -50 < right_erector < 150,
    }


def test_totalseg_nifti_labels_map_onto_dicom_series(totalseg_series):
    labels_path = shared_dataset("ct_abdomen_totalseg") / "dicom_labels.nii.gz"
    mapped = read_mask(labels_path, reference=totalseg_series)
    assert mapped.array.shape == totalseg_series.array.shape
    np.testing.assert_allclose(mapped.affine, totalseg_series.affine)
    assert all(_tissue_checks(totalseg_series.array, mapped.array).values()), _tissue_checks(
        totalseg_series.array, mapped.array)
    # Pairing the arrays by index alone (ignoring the affines) puts labels on the wrong tissue.
    naive = read_mask(labels_path).array
    assert naive.shape == totalseg_series.array.shape
    assert not all(_tissue_checks(totalseg_series.array, naive).values())


def test_totalseg_3mm_ct_with_skeletal_muscle_mask():
    folder = shared_dataset("ct_abdomen_totalseg") / "ct_3mm_tissue"
    ct = read_image(folder / "ct.nii.gz")
    muscle = read_mask(folder / "skeletal_muscle.nii.gz", reference=ct)
    assert ct.array.shape == (122, 101, 30) and ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert set(np.unique(muscle.array).tolist()) == {0, 1}
    mean_hu = ct.array[muscle.array == 1].mean()
    assert -30 < mean_hu < 70
    assert mean_hu == pytest.approx(18, abs=5)


def test_hippocampus_float32_label_file():
    root = shared_dataset("msd_hippocampus")
    with open(root / "inventory.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    row = next(row for row in rows if row["label_dtype"] == "float32")
    label_path = root / "labelsTr" / row["file"]
    assert nib.load(label_path).get_data_dtype() == np.float32
    image = read_image(root / "imagesTr" / row["file"])
    mask = read_mask(label_path, reference=image)
    assert image.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert str(image.array.shape) == row["shape"]
    assert mask.array.dtype == np.int32
    assert set(np.unique(mask.array).tolist()) == {0, 1, 2}
    assert (mask.array == 1).sum() == int(row["n_label1"]) and (mask.array == 2).sum() == int(row["n_label2"])
