"""Preloading the real datasets of ../shared/datasets with their configs, and the reproducible grouped split.

Cases (spine MRI is covered in test_preload.py):

- ct_dicom_muscle: a DICOM CT series with a NIfTI label map placed through the affines; Hounsfield units,
  pixel spacing and the erector spinae landing on muscle-density pixels; one series, so a test slab.
- hippocampus_2d: 3D NIfTI MRI volumes (a subset of 10): training volumes cut into slices that keep their
  case and index, test volumes kept whole with their affine.
- ct_3mm_tissue: a NIfTI CT with its skeletal muscle mask, as explicit pairs.
- the split of 3D inputs is by volume and identical when redone with --overwrite.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nibabel as nib

from segmenter import layout
from segmenter.config import build_config, load_config
from segmenter.dataset import load_training_samples
from segmenter.manifest import read_manifest
from segmenter.preload import preload
from tests.conftest import REPO_ROOT, run_stage_module, shared_dataset

# DICOM PixelSpacing of the CT series (its README); 512 pixels are resized to CT_SIZE.
CT_PIXEL_SPACING_MM = 0.9765625
CT_SIZE = 128
# Hippocampus volumes taken for the tests (the first ones in name order), and their slice size.
NUM_HIPPOCAMPUS_VOLUMES = 10
HIPPOCAMPUS_SIZE = 32


def quiet(*_):
    pass


def stored_volume(output_dir: Path, case_id: str, kind: str = "images") -> np.ndarray:
    folder = layout.test_images_dir(output_dir) if kind == "images" else layout.test_labels_dir(output_dir)
    return np.asarray(nib.load(folder / f"{case_id}.nii.gz").dataobj)


@pytest.fixture(scope="module")
def hippocampus_subset(tmp_path_factory) -> Path:
    """imagesTr/ and labelsTr/ with symbolic links to the first volumes of msd_hippocampus."""
    source = shared_dataset("msd_hippocampus")
    folder = tmp_path_factory.mktemp("hippocampus")
    names = sorted(p.name for p in (source / "imagesTr").glob("*.nii.gz"))[:NUM_HIPPOCAMPUS_VOLUMES]
    for subfolder in ("imagesTr", "labelsTr"):
        (folder / subfolder).mkdir()
        for name in names:
            (folder / subfolder / name).symlink_to(source / subfolder / name)
    return folder


def hippocampus_overrides(data: Path, preloaded_root: Path) -> list[str]:
    return [f"paths.preloaded_root={preloaded_root}", f"preload.input_dir={data}",
            f"preload.image_size=[{HIPPOCAMPUS_SIZE}, {HIPPOCAMPUS_SIZE}]", "preload.workers=1"]


# ---------------------------------------------------------------------------------------------------
def test_ct_dicom_series_with_nifti_labels(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "ct_dicom_muscle.py",
                         [f"paths.preloaded_root={tmp_path}", f"preload.image_size=[{CT_SIZE}, {CT_SIZE}]",
                          "preload.workers=1"])
    lines = []
    result = preload(config, log=lines.append)
    train, manifest = load_training_samples(result.output_dir), read_manifest(result.output_dir)
    # One series: a test slab of a fifth of its 20 slices, the other 16 trained on, and the log says so.
    assert manifest.split == "slab" and any("slab" in line for line in lines)
    (slab,) = manifest.test.cases
    assert len(train) == 16 and slab.shape == [512, 512, 4]
    # The series' spacing: pixel spacing in-plane, the distance between slice positions across.
    assert slab.spacing[:2] == pytest.approx([CT_PIXEL_SPACING_MM] * 2) and slab.spacing[2] > 0

    hu = np.concatenate([train.hu_images.ravel(), stored_volume(result.output_dir, slab.id).ravel()])
    assert -1030 <= hu.min() <= -1000  # air
    assert hu.max() > 1000  # cortical bone
    np.testing.assert_allclose(train.spacing, CT_PIXEL_SPACING_MM * 512 / CT_SIZE, rtol=1e-6)
    # The label map went through the affines onto muscle: soft-tissue density inside the mask ...
    masks = train.masks
    assert set(np.unique(masks)) == {0, 1}
    assert -50 < train.hu_images[masks == 1].mean() < 150
    slab_labels = stored_volume(result.output_dir, slab.id, "labels")
    assert -50 < stored_volume(result.output_dir, slab.id)[slab_labels == 1].mean() < 150
    # ... and behind the spine: DICOM rows run from anterior to posterior, so the muscle lies low in the image.
    rows = np.nonzero(masks == 1)[1]
    assert rows.mean() > 0.6 * CT_SIZE


def test_hippocampus_volumes_are_trained_as_slices_and_tested_whole(tmp_path, hippocampus_subset):
    config = load_config(REPO_ROOT / "configs" / "hippocampus_2d.py",
                         hippocampus_overrides(hippocampus_subset, tmp_path))
    result = preload(config, log=quiet)
    train, manifest = load_training_samples(result.output_dir), read_manifest(result.output_dir)
    volumes = {p.name[: -len(".nii.gz")] for p in (hippocampus_subset / "imagesTr").iterdir()}

    assert set(train.case_ids) == {case.id for case in manifest.train.cases}
    for sample_id, case, index in zip(train.ids, train.case_ids, train.slice_index):
        assert sample_id == f"{case}_s{index:04d}"
    # keep_empty_slices is False: every training slice shows some hippocampus.
    assert all(mask.any() for mask in train.masks)
    # 1 mm voxels: the spacing after resizing times the size ratio gives 1 mm back.
    original = np.array([s.original_shape for s in manifest.train.samples], dtype=np.float64)
    np.testing.assert_allclose(train.spacing * HIPPOCAMPUS_SIZE / original, 1.0, rtol=1e-5)
    # The test volumes are whole, every slice, with the source's affine and labels.
    tested = {case.id for case in manifest.test.cases}
    assert not set(train.case_ids) & tested and set(train.case_ids) | tested == volumes
    for case in manifest.test.cases:
        source = nib.load(hippocampus_subset / "labelsTr" / f"{case.id}.nii.gz")
        stored = nib.load(layout.test_labels_dir(result.output_dir) / f"{case.id}.nii.gz")
        np.testing.assert_array_equal(np.asarray(stored.dataobj), np.asarray(source.dataobj).astype(np.uint8))
        np.testing.assert_allclose(stored.affine, source.affine)
        assert case.shape == list(source.shape) and case.spacing == [1.0, 1.0, 1.0]
    assert manifest.split == "random"
    assert set(np.unique(train.masks)) == {0, 1, 2}


def test_nifti_ct_with_skeletal_muscle_mask(tmp_path):
    data = shared_dataset("ct_abdomen_totalseg")
    config = build_config({
        "experiment": "ct_tissue",
        "classes": ["background", "muscle"],
        "paths": {"preloaded_root": str(tmp_path / "pre"), "experiments_root": str(tmp_path / "exp")},
        "preload": {"input_dir": str(data),
                    "pairs": [["ct_3mm_tissue/ct.nii.gz", "ct_3mm_tissue/skeletal_muscle.nii.gz"]],
                    "normalization": {"method": "ct_window", "window": [-250.0, 250.0]},
                    "image_size": [128, 96], "slice_axis": 2, "workers": 1},
    })
    result = preload(config, log=quiet)
    train, manifest = load_training_samples(result.output_dir), read_manifest(result.output_dir)
    (slab,) = manifest.test.cases
    assert len(train) + slab.shape[2] == 30  # 122 x 101 x 30 voxels, cut along the last axis
    assert set(np.unique(train.masks)) <= {0, 1}
    image, labels = stored_volume(result.output_dir, slab.id), stored_volume(result.output_dir, slab.id, "labels")
    hu = np.concatenate([train.hu_images[train.masks == 1], image[labels == 1]])
    assert -30 < hu.mean() < 70  # about 18 HU (the dataset's README)
    np.testing.assert_allclose(train.spacing[0], [3.0 * 122 / 128, 3.0 * 101 / 96], rtol=1e-5)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_split_of_volumes_is_grouped_and_identical_when_redone(tmp_path, hippocampus_subset):
    overrides = hippocampus_overrides(hippocampus_subset, tmp_path)
    first = preload(load_config(REPO_ROOT / "configs" / "hippocampus_2d.py", overrides), log=quiet)
    before = read_manifest(first.output_dir)
    train = load_training_samples(first.output_dir)

    # Redone through the command line with --overwrite, and with two worker processes that finish in any
    # order: the same split, the same arrays.
    sets = [item for override in overrides[:-1] + ["preload.workers=2"] for item in ("--set", override)]
    result = run_stage_module("preload", "--config", str(REPO_ROOT / "configs" / "hippocampus_2d.py"), *sets,
                              "--overwrite")
    assert result.returncode == 0, result.stderr
    after = read_manifest(first.output_dir)
    assert after.fingerprint == before.fingerprint
    assert after.train == before.train and after.test == before.test
    train_again = load_training_samples(first.output_dir)
    assert list(train_again.ids) == list(train.ids)
    np.testing.assert_array_equal(train_again.images, train.images)
    np.testing.assert_array_equal(train_again.masks, train.masks)


def test_small_shards_hold_the_same_samples_as_one_shard(tmp_path, hippocampus_subset):
    overrides = hippocampus_overrides(hippocampus_subset, tmp_path / "one")
    whole = preload(load_config(REPO_ROOT / "configs" / "hippocampus_2d.py", overrides), log=quiet)
    overrides = hippocampus_overrides(hippocampus_subset, tmp_path / "many") + ["preload.shard_size=50"]
    sharded = preload(load_config(REPO_ROOT / "configs" / "hippocampus_2d.py", overrides), log=quiet)
    shards = read_manifest(sharded.output_dir).train.shards
    assert len(shards) > 1 and shards[0] == "train-00000.npz"
    one, many = load_training_samples(whole.output_dir), load_training_samples(sharded.output_dir)
    for field in ("images", "masks", "ids", "case_ids", "slice_index", "spacing", "hu_images"):
        np.testing.assert_array_equal(getattr(many, field), getattr(one, field))
