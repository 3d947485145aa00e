"""Preloading the real datasets of ../shared/datasets with their configs, and the reproducible grouped split.

Cases (spine MRI is covered in test_preload.py):

- ct_dicom_muscle: a DICOM CT series with a NIfTI label map placed through the affines; Hounsfield units,
  pixel spacing and the erector spinae landing on muscle-density pixels.
- hippocampus_2d: 3D NIfTI MRI volumes (a subset of 10) cut into slices that keep volume id and index.
- ct_3mm_tissue: a NIfTI CT with its skeletal muscle mask, as explicit pairs.
- the split of 3D inputs is grouped by volume and identical when redone with --overwrite.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segmenter.config import build_config, load_config
from segmenter.dataset import load_split, read_manifest
from segmenter.preloading import preload
from tests.conftest import REPO_ROOT, run_stage_module, shared_dataset

# DICOM PixelSpacing of the CT series (its README); 512 pixels are resized to CT_SIZE.
CT_PIXEL_SPACING_MM = 0.9765625
CT_SIZE = 128
# Hippocampus volumes taken for the tests (the first ones in name order), and their slice size.
NUM_HIPPOCAMPUS_VOLUMES = 10
HIPPOCAMPUS_SIZE = 32


def quiet(*_):
    pass


def both_splits(output_dir: Path):
    return load_split(output_dir, "train"), load_split(output_dir, "test")


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
    train, test = both_splits(result.output_dir)
    assert len(train) + len(test) == 20  # the series' 20 slices, every one showing the erector spinae
    # One series: each slice is its own group in the split, and the log says so.
    assert any("each slice is its own group" in line for line in lines)
    assert read_manifest(result.output_dir)["split_groups"] == "slice"

    hu = np.concatenate([train.hu_images, test.hu_images])
    masks = np.concatenate([train.masks, test.masks])
    assert -1030 <= hu.min() <= -1000  # air
    assert hu.max() > 1000  # cortical bone
    expected_spacing = CT_PIXEL_SPACING_MM * 512 / CT_SIZE
    np.testing.assert_allclose(np.concatenate([train.spacing, test.spacing]), expected_spacing, rtol=1e-6)
    # The label map went through the affines onto muscle: soft-tissue density inside the mask ...
    assert set(np.unique(masks)) == {0, 1}
    assert -50 < hu[masks == 1].mean() < 150
    # ... and behind the spine: DICOM rows run from anterior to posterior, so the muscle lies low in the image.
    rows = np.nonzero(masks == 1)[1]
    assert rows.mean() > 0.6 * CT_SIZE


def test_hippocampus_volumes_are_cut_into_slices_that_keep_their_volume(tmp_path, hippocampus_subset):
    config = load_config(REPO_ROOT / "configs" / "hippocampus_2d.py",
                         hippocampus_overrides(hippocampus_subset, tmp_path))
    result = preload(config, log=quiet)
    train, test = both_splits(result.output_dir)
    manifest = read_manifest(result.output_dir)
    volumes = {p.name[: -len(".nii.gz")] for p in (hippocampus_subset / "imagesTr").iterdir()}

    for slices, split in ((train, "train"), (test, "test")):
        assert set(slices.volume_ids) <= volumes
        for slice_id, volume, index in zip(slices.ids, slices.volume_ids, slices.slice_index):
            assert slice_id == f"{volume}_s{index:04d}"
        # keep_empty_slices is False: every kept slice shows some hippocampus.
        assert all(mask.any() for mask in slices.masks)
        # 1 mm voxels: the spacing after resizing times the size ratio gives 1 mm back.
        records = manifest["splits"][split]["slices"]
        assert [r["id"] for r in records] == list(slices.ids)
        original = np.array([r["original_shape"] for r in records], dtype=np.float64)
        np.testing.assert_allclose(slices.spacing * HIPPOCAMPUS_SIZE / original, 1.0, rtol=1e-5)
    assert not set(train.volume_ids) & set(test.volume_ids)
    assert set(train.volume_ids) | set(test.volume_ids) == volumes
    assert manifest["split_groups"] == "volume"
    assert set(np.unique(np.concatenate([train.masks, test.masks]))) == {0, 1, 2}


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
    train, test = both_splits(result.output_dir)
    assert len(train) + len(test) == 30  # 122 x 101 x 30 voxels, cut along the last axis
    hu = np.concatenate([train.hu_images, test.hu_images])
    masks = np.concatenate([train.masks, test.masks])
    assert set(np.unique(masks)) == {0, 1}
    assert -30 < hu[masks == 1].mean() < 70  # about 18 HU (the dataset's README)
    np.testing.assert_allclose(train.spacing[0], [3.0 * 122 / 128, 3.0 * 101 / 96], rtol=1e-5)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_split_of_volumes_is_grouped_and_identical_when_redone(tmp_path, hippocampus_subset):
    overrides = hippocampus_overrides(hippocampus_subset, tmp_path)
    first = preload(load_config(REPO_ROOT / "configs" / "hippocampus_2d.py", overrides), log=quiet)
    before = read_manifest(first.output_dir)
    train, test = both_splits(first.output_dir)
    assert not set(train.volume_ids) & set(test.volume_ids)

    # Redone through the command line with --overwrite, and with two worker processes that finish in any
    # order: the same split, the same arrays.
    sets = [item for override in overrides[:-1] + ["preload.workers=2"] for item in ("--set", override)]
    result = run_stage_module("preload", "--config", str(REPO_ROOT / "configs" / "hippocampus_2d.py"), *sets,
                              "--overwrite")
    assert result.returncode == 0, result.stderr
    after = read_manifest(first.output_dir)
    assert after["fingerprint"] == before["fingerprint"]
    for split in ("train", "test"):
        assert after["splits"][split]["slices"] == before["splits"][split]["slices"]
    train_again, test_again = both_splits(first.output_dir)
    for old, new in ((train, train_again), (test, test_again)):
        assert list(new.ids) == list(old.ids)
        np.testing.assert_array_equal(new.images, old.images)
        np.testing.assert_array_equal(new.masks, old.masks)


def test_small_shards_hold_the_same_slices_as_one_shard(tmp_path, hippocampus_subset):
    overrides = hippocampus_overrides(hippocampus_subset, tmp_path / "one")
    whole = preload(load_config(REPO_ROOT / "configs" / "hippocampus_2d.py", overrides), log=quiet)
    overrides = hippocampus_overrides(hippocampus_subset, tmp_path / "many") + ["preload.shard_size=50"]
    sharded = preload(load_config(REPO_ROOT / "configs" / "hippocampus_2d.py", overrides), log=quiet)
    shards = read_manifest(sharded.output_dir)["splits"]["train"]["shards"]
    assert len(shards) > 1 and shards[0] == "train-00000.npz"
    one, many = load_split(whole.output_dir, "train"), load_split(sharded.output_dir, "train")
    for field in ("images", "masks", "ids", "volume_ids", "slice_index", "spacing", "hu_images"):
        np.testing.assert_array_equal(getattr(many, field), getattr(one, field))
