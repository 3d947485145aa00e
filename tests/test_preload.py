"""The preload stage: formats, pairing, filters, the split, up-to-date runs and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segmenter.config import build_config
from segmenter.dataset import NATIVE_TEST_DIR, load_split, open_native_test, read_manifest
from segmenter.errors import InputError
from segmenter.preloading import preload
from tests.conftest import REPO_ROOT, run_cli, shared_dataset, write_config
from segmenter.config import load_config


def make_png_npy_set(folder: Path, count: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Grey PNG images with NPY label maps (0, 1, 2): a bright square (1) and a mid-grey disc (2)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows, cols = np.mgrid[:size, :size]
    for index in range(count):
        mask = np.zeros((size, size), np.int64)
        top, left = rng.integers(2, size // 2 - 2, size=2)
        mask[top:top + 8, left:left + 8] = 1
        mask[(rows - 3 * size // 4) ** 2 + (cols - 3 * size // 4) ** 2 < 16] = 2
        image = (40 + 100 * (mask == 1) + 60 * (mask == 2) + rng.normal(0, 5, mask.shape)).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(folder / "images" / f"{index}.png")
        np.save(folder / "masks" / f"{index}.npy", mask)
    return folder


def config_for(data_dir: Path, work: Path, classes=("background", "a", "b"), **preload_settings):
    raw = {"experiment": "t", "classes": list(classes),
           "paths": {"preloaded_root": str(work / "pre"), "experiments_root": str(work / "exp")},
           "preload": {"input_dir": str(data_dir), "image_size": [16, 16], "workers": 1,
                       "normalization": {"method": "divide_255"}, **preload_settings}}
    return build_config(raw)


def test_png_npy_pairs_are_preloaded_resized_and_split(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=10)
    result = preload(config_for(data, tmp_path), log=lambda *_: None)
    out = result.output_dir
    train, test = load_split(out, "train"), load_split(out, "test")
    assert len(train) + len(test) == 10 and len(test) == 2
    assert train.images.shape == (8, 16, 16, 1) and train.masks.shape == (8, 16, 16)
    assert set(np.unique(train.masks)) == {0, 1, 2}
    assert 0 <= train.images.min() and train.images.max() <= 1
    assert np.isnan(train.spacing).all()  # PNG carries no pixel spacing
    manifest = read_manifest(out)
    assert manifest["splits"]["test"]["num_slices"] == 2
    assert {s["id"] for s in manifest["splits"]["test"]["slices"]} == set(test.ids)


def test_same_inputs_give_same_split_and_are_up_to_date(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=10)
    config = config_for(data, tmp_path)
    first = preload(config, log=lambda *_: None)
    test_ids = set(load_split(first.output_dir, "test").ids)
    again = preload(config, log=lambda *_: None)
    assert again.up_to_date and "up to date" in str(again)
    redone = preload(config, overwrite=True, log=lambda *_: None)
    assert not redone.up_to_date and set(load_split(redone.output_dir, "test").ids) == test_ids
    # A first run or --overwrite hashes the sources while processing them; the up-to-date check hashes them
    # first. Both must record the same digests, or every run after an --overwrite would redo the work.
    sources = read_manifest(redone.output_dir)["sources"]
    assert sources == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
                       for path in sorted((data / "images").iterdir()) + sorted((data / "masks").iterdir())}
    assert preload(config, log=lambda *_: None).up_to_date
    # A changed source file makes it stale.
    np.save(data / "masks" / "0.npy", np.zeros((32, 32), np.int64))
    assert not preload(config, log=lambda *_: None).up_to_date


def test_require_labels_keeps_only_complete_masks(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=6)
    mask = np.load(data / "masks" / "2.npy")
    np.save(data / "masks" / "2.npy", np.where(mask == 2, 0, mask))
    result = preload(config_for(data, tmp_path, require_labels=[0, 1, 2]), log=lambda *_: None)
    assert result.num_train + result.num_test == 5


def test_label_map_merges_source_labels(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=6)
    result = preload(config_for(data, tmp_path, classes=("background", "thing"), label_map={2: 1}),
                     log=lambda *_: None)
    assert set(np.unique(load_split(result.output_dir, "train").masks)) == {0, 1}


def test_unmatched_files_are_reported(tmp_path, capsys):
    data = make_png_npy_set(tmp_path / "data", count=6)
    (data / "masks" / "5.npy").unlink()
    np.save(data / "masks" / "extra.npy", np.zeros((32, 32), np.int64))
    lines = []
    preload(config_for(data, tmp_path), log=lines.append)
    assert "Matched 5 image/mask pairs; 1 images without masks, 1 masks without images." in lines[0]
    assert "5" in lines[1] and "extra" in lines[2]


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem, exit status 1, no partial output
# ---------------------------------------------------------------------------------------------------
def _break_unreadable(data):
    (data / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return "3.png"


def _break_shapes(data):
    np.save(data / "masks" / "3.npy", np.zeros((20, 32), np.int64))
    return "3.npy"


def _break_labels(data):
    mask = np.load(data / "masks" / "3.npy")
    mask[0, 0] = 7
    np.save(data / "masks" / "3.npy", mask)
    return "3.npy"


def _break_pairing(data):
    for path in (data / "masks").iterdir():
        path.rename(path.with_name("m" + path.name))
    return "no image"


BAD_INPUTS = {
    "unreadable file": (_break_unreadable, ""),
    "image and mask shapes differ": (_break_shapes, "shape"),
    "labels outside the classes": (_break_labels, "outside the configured classes"),
    "no matched pairs": (_break_pairing, "mask of the same name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_one_line_and_leaves_earlier_output_intact(tmp_path, case):
    data = make_png_npy_set(tmp_path / "data", count=6)
    raw = {"experiment": "t", "classes": ["background", "a", "b"],
           "paths": {"preloaded_root": str(tmp_path / "pre"), "experiments_root": str(tmp_path / "exp")},
           "preload": {"input_dir": str(data), "image_size": [16, 16], "workers": 1,
                       "normalization": {"method": "divide_255"}}}
    config_path = write_config(tmp_path, raw)
    assert run_cli("preload", "--config", str(config_path)).returncode == 0
    good_manifest = (tmp_path / "pre" / "t" / "manifest.json").read_text()

    breaker, expected = BAD_INPUTS[case]
    named = breaker(data)
    result = run_cli("preload", "--config", str(config_path), "--overwrite")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: "), result.stderr
    assert named in message[0] and expected in message[0]
    # The earlier good dataset survives whole, and no temporary folder is left beside it.
    assert (tmp_path / "pre" / "t" / "manifest.json").read_text() == good_manifest
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["t"]


def test_skip_invalid_skips_and_lists_bad_pairs(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=6)
    _break_shapes(data)
    result = preload(config_for(data, tmp_path), skip_invalid=True, log=lambda *_: None)
    assert result.num_train + result.num_test == 5
    skipped = read_manifest(result.output_dir)["skipped"]
    assert [entry["case_id"] for entry in skipped] == ["3"] and "shape" in skipped[0]["error"]


def test_parallel_workers_give_the_same_dataset(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=8)
    one = preload(config_for(data, tmp_path / "one"), log=lambda *_: None)
    two = preload(config_for(data, tmp_path / "two", workers=2), log=lambda *_: None)
    a, b = load_split(one.output_dir, "train"), load_split(two.output_dir, "train")
    assert list(a.ids) == list(b.ids)
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize("workers", [1, 2])
def test_resized_test_split_is_also_kept_at_its_original_size(tmp_path, workers):
    from PIL import Image

    data = make_png_npy_set(tmp_path / "data", count=10)
    result = preload(config_for(data, tmp_path, workers=workers, pixel_spacing=[0.5, 0.25]), log=lambda *_: None)
    test = load_split(result.output_dir, "test")
    assert read_manifest(result.output_dir)["splits"]["test"]["native"] == NATIVE_TEST_DIR
    native = open_native_test(result.output_dir)
    # The test slices, and nothing else.
    assert sorted(p.stem for p in (result.output_dir / NATIVE_TEST_DIR).iterdir()) == sorted(test.ids)
    for slice_id, resized_spacing in zip(test.ids, test.spacing):
        kept = native[slice_id]
        np.testing.assert_array_equal(kept.mask, np.load(data / "masks" / f"{slice_id}.npy"))
        np.testing.assert_array_equal(kept.intensity, np.asarray(Image.open(data / "images" / f"{slice_id}.png")))
        assert kept.mask.dtype == np.uint8 and kept.intensity.dtype == np.int16
        np.testing.assert_array_equal(kept.spacing, [0.5, 0.25])
        np.testing.assert_array_equal(resized_spacing, [1.0, 0.5])  # 32 -> 16 pixels


def test_test_slices_of_one_volume_kept_at_their_original_size(tmp_path):
    """One NIfTI volume: its slices are split among train and test; only the test slices are read again."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    volume = rng.normal(0, 100, (24, 20, 10)).astype(np.float32)
    labels = np.zeros(volume.shape, np.uint8)
    labels[4:14, 5:15, :] = 1
    affine = np.diag([0.7, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "data" / "images" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "data" / "masks" / "ct.nii.gz")
    result = preload(config_for(tmp_path / "data", tmp_path, classes=("background", "a"),
                                normalization={"method": "zscore"}), log=lambda *_: None)
    test = load_split(result.output_dir, "test")
    native = open_native_test(result.output_dir)
    assert 0 < len(test) < 10
    for slice_id, index in zip(test.ids, test.slice_index):
        kept = native[slice_id]
        np.testing.assert_array_equal(kept.mask, labels[..., index])
        np.testing.assert_array_equal(kept.intensity, volume[..., index])
        assert kept.intensity.dtype == np.float32
        np.testing.assert_allclose(kept.spacing, [0.7, 0.8])
    assert len(list((result.output_dir / NATIVE_TEST_DIR).iterdir())) == len(test)


def test_a_failed_second_read_is_one_line_and_leaves_no_output(tmp_path, monkeypatch):
    from segmenter import preloading

    def unreadable(pair, slice_ids, config):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preloading, "native_slices", unreadable)
    data = make_png_npy_set(tmp_path / "data", count=10)
    with pytest.raises(InputError) as error:
        preload(config_for(data, tmp_path), log=lambda *_: None)
    assert "No space left on device" in str(error.value) and "original size" in str(error.value)
    assert len(str(error.value).splitlines()) == 1 and str(data / "images") in str(error.value)
    assert list((tmp_path / "pre").iterdir()) == []  # no output, no temporary folder


def test_no_original_size_copy_when_nothing_was_resized(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=6)
    result = preload(config_for(data, tmp_path, image_size=[32, 32]), log=lambda *_: None)
    assert read_manifest(result.output_dir)["splits"]["test"]["native"] is None
    assert open_native_test(result.output_dir) is None and not (result.output_dir / NATIVE_TEST_DIR).exists()


def test_spine_dataset_with_its_config(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "spine_mri.py",
                         [f"paths.preloaded_root={tmp_path}", "preload.image_size=[64, 64]"])
    assert config.preload.input_dir == shared_dataset("spine_mri_sagittal").resolve()
    result = preload(config, log=lambda *_: None)
    train, test = load_split(result.output_dir, "train"), load_split(result.output_dir, "test")
    # 15 of the 20 slices have all three labels (see the dataset's README).
    assert len(train) + len(test) == 15
    for masks in (train.masks, test.masks):
        assert all(set(np.unique(m)) == {0, 1, 2} for m in masks)
    assert train.images.max() <= 1.0
