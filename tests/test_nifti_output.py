"""NIfTI label maps keep their reference's affine, in sform and qform, both coded as scanner coordinates."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmenter.io import LoadedImage, read_image, read_mask, write_mask

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTALSEG = REPO_ROOT.parent / "shared" / "datasets" / "ct_abdomen_totalseg"
SCANNER = 1  # NIfTI xform code NIFTI_XFORM_SCANNER_ANAT


def rotation_about_z(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


def affine_from(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


AFFINES = {
    # What the DICOM readers produce for an axial series: rows go posterior, columns left (LPS -> RAS).
    "dicom_axial": affine_from(np.array([[0, -0.75, 0], [-0.75, 0, 0], [0, 0, 2.5]]), [120.5, 88.25, -300.0]),
    "flipped_x": affine_from(np.diag([-1.5, 1.25, 3.0]), [10.0, -20.0, 5.0]),
    # Oblique (gantry-tilt-like) rotation with anisotropic voxels: still rigid + zooms, so qform holds it.
    "oblique": affine_from(rotation_about_z(17.0) @ np.diag([0.8, 0.8, 2.0]), [-3.5, 44.0, 12.0]),
}


def assert_scanner_xforms(path: Path, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.load(path)
    header = image.header
    assert int(header["sform_code"]) == SCANNER and int(header["qform_code"]) == SCANNER
    sform, sform_code = image.get_sform(coded=True)
    qform, qform_code = image.get_qform(coded=True)
    assert sform_code == qform_code == SCANNER
    # sform is stored as float32 numbers; qform as a quaternion, offsets and zooms (float32 too).
    np.testing.assert_allclose(sform, affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(qform, affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(image.affine, affine, rtol=0, atol=1e-4)
    assert header.get_xyzt_units()[0] == "mm"
    return image


@pytest.mark.parametrize("name", list(AFFINES))
def test_write_mask_puts_reference_affine_in_sform_and_qform(tmp_path, name):
    affine = AFFINES[name]
    shape = (7, 6, 5)
    labels = np.random.default_rng(1).integers(0, 4, shape)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    reference = LoadedImage(np.zeros(shape, np.float32), spacing, affine, tmp_path / "reference")
    path = write_mask(labels, tmp_path / "labels.nii.gz", reference=reference)
    image = assert_scanner_xforms(path, affine)
    assert image.header.get_zooms() == pytest.approx(spacing)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), labels)


def test_label_map_of_a_nifti_image_keeps_its_affine_exactly(tmp_path):
    ct_path = TOTALSEG / "ct_3mm_tissue" / "ct.nii.gz"
    assert ct_path.is_file(), f"{ct_path} is missing: ../shared/datasets must sit beside the checkout"
    ct = read_image(ct_path)
    source = nib.load(ct_path)
    labels = read_mask(TOTALSEG / "ct_3mm_tissue" / "skeletal_muscle.nii.gz", reference=ct).array
    path = write_mask(labels, tmp_path / "muscle.nii.gz", reference=ct)
    written = assert_scanner_xforms(path, source.affine)
    # Both affines come from the same float32 header fields, so they agree to the last bit.
    np.testing.assert_array_equal(written.get_sform(), source.affine)
    np.testing.assert_array_equal(read_mask(path).affine, ct.affine)
    np.testing.assert_array_equal(read_mask(path, reference=ct).array, labels)


def test_label_map_of_a_nifti_image_with_an_oblique_affine(tmp_path):
    affine = AFFINES["oblique"]
    nib.save(nib.Nifti1Image(np.zeros((7, 6, 5), np.float32), affine), str(tmp_path / "image.nii.gz"))
    image = read_image(tmp_path / "image.nii.gz")
    labels = np.random.default_rng(2).integers(0, 3, image.array.shape)
    path = write_mask(labels, tmp_path / "labels.nii.gz", reference=image)
    written = assert_scanner_xforms(path, affine)
    np.testing.assert_array_equal(written.get_sform(), nib.load(tmp_path / "image.nii.gz").affine)
    np.testing.assert_array_equal(read_mask(path, reference=image).array, labels)
