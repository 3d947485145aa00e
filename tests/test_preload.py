"""The preload stage: formats, pairing, filters, the split, up-to-date runs and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segmenter.config import build_config
from segmenter import layout
from segmenter.dataset import load_training_samples
from segmenter.errors import InputError
from segmenter.manifest import read_manifest
from segmenter.preload import preload
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


def ids_of_test_cases(output_dir: Path) -> set:
    return {case.id for case in read_manifest(output_dir).test.cases}


def test_png_npy_pairs_are_preloaded_resized_and_split(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=10)
    result = preload(config_for(data, tmp_path), log=lambda *_: None)
    out = result.output_dir
    train = load_training_samples(out)
    manifest = read_manifest(out)
    assert len(manifest.train.cases) == len(train) == 8 and len(manifest.test.cases) == 2
    assert train.images.shape == (8, 16, 16, 1) and train.masks.shape == (8, 16, 16)
    assert set(np.unique(train.masks)) == {0, 1, 2}
    assert 0 <= train.images.min() and train.images.max() <= 1
    assert np.isnan(train.spacing).all()  # PNG carries no pixel spacing
    # The test cases are kept whole at their own size: raw intensities and label maps, for predict and evaluate.
    for case in manifest.test.cases:
        assert case.shape == [32, 32] and case.output_suffix == ".png" and case.labels == [0, 1, 2]
        label_map = np.load(layout.test_labels_dir(out) / f"{case.id}.npy")
        np.testing.assert_array_equal(label_map, np.load(data / "masks" / f"{case.id}.npy"))
        assert label_map.dtype == np.uint8
        assert np.load(layout.test_images_dir(out) / f"{case.id}.npy").dtype == np.int16  # integral PNG values
    assert not set(train.case_ids) & ids_of_test_cases(out)


def test_same_inputs_give_same_split_and_are_up_to_date(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=10)
    config = config_for(data, tmp_path)
    first = preload(config, log=lambda *_: None)
    tested = ids_of_test_cases(first.output_dir)
    again = preload(config, log=lambda *_: None)
    assert again.up_to_date and "up to date" in str(again)
    redone = preload(config, overwrite=True, log=lambda *_: None)
    assert not redone.up_to_date and ids_of_test_cases(redone.output_dir) == tested
    # A first run or --overwrite hashes the sources while processing them; the up-to-date check hashes them
    # first. Both must record the same digests, or every run after an --overwrite would redo the work.
    sources = read_manifest(redone.output_dir).sources
    assert sources == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
                       for path in sorted((data / "images").iterdir()) + sorted((data / "masks").iterdir())}
    assert preload(config, log=lambda *_: None).up_to_date
    # A changed source file makes it stale.
    np.save(data / "masks" / "0.npy", np.zeros((32, 32), np.int64))
    assert not preload(config, log=lambda *_: None).up_to_date


def test_require_labels_filters_training_samples_only(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=10)
    for name in ("2", "7"):
        mask = np.load(data / "masks" / f"{name}.npy")
        np.save(data / "masks" / f"{name}.npy", np.where(mask == 2, 0, mask))
    result = preload(config_for(data, tmp_path, require_labels=[0, 1, 2]), log=lambda *_: None)
    manifest = read_manifest(result.output_dir)
    # The split is made before any label is read; the filter drops incomplete training samples only.
    assert len(manifest.train.cases) + len(manifest.test.cases) == 10
    trained = {sample.case for sample in manifest.train.samples}
    assert trained == {case.id for case in manifest.train.cases} - {"2", "7"}
    assert all(sample.labels == [0, 1, 2] for sample in manifest.train.samples)


def test_test_split_is_chosen_without_the_labels(tmp_path):
    """Cases emptied of every label are tested like any other: the split depends on ids and seed only."""
    data = make_png_npy_set(tmp_path / "data", count=10)
    tested = ids_of_test_cases(preload(config_for(data, tmp_path / "a"), log=lambda *_: None).output_dir)
    for path in (data / "masks").iterdir():
        np.save(path, np.zeros((32, 32), np.int64))
    config = config_for(data, tmp_path / "b", keep_empty_slices=False)
    with pytest.raises(InputError, match="no training samples"):
        preload(config, log=lambda *_: None)
    emptied = preload(config_for(data, tmp_path / "c"), log=lambda *_: None)
    assert ids_of_test_cases(emptied.output_dir) == tested
    assert all(case.labels == [0] for case in read_manifest(emptied.output_dir).test.cases)


def test_exclude_cases_leaves_cases_out_by_name(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=8)
    result = preload(config_for(data, tmp_path, exclude_cases=["3", "5"]), log=lambda *_: None)
    manifest = read_manifest(result.output_dir)
    assert {c.id for c in manifest.train.cases + manifest.test.cases} == {"0", "1", "2", "4", "6", "7"}
    with pytest.raises(InputError, match="exclude_cases"):
        preload(config_for(data, tmp_path / "x", exclude_cases=["nope"]), log=lambda *_: None)


def test_label_map_merges_source_labels(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=6)
    result = preload(config_for(data, tmp_path, classes=("background", "thing"), label_map={2: 1}),
                     log=lambda *_: None)
    assert set(np.unique(load_training_samples(result.output_dir).masks)) == {0, 1}


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
    assert result.num_train_cases + result.num_test_cases == 5
    skipped = read_manifest(result.output_dir).skipped
    assert [entry["case_id"] for entry in skipped] == ["3"] and "shape" in skipped[0]["error"]


def test_parallel_workers_give_the_same_dataset(tmp_path):
    """Each worker appends its samples to its own scratch files: the shards and the manifest are the same as
    when the stage's process prepares every case itself, and no scratch file is left."""
    data = make_png_npy_set(tmp_path / "data", count=40)
    one = preload(config_for(data, tmp_path / "one"), log=lambda *_: None)
    two = preload(config_for(data, tmp_path / "two", workers=2, shard_size=7), log=lambda *_: None)
    a, b = load_training_samples(one.output_dir), load_training_samples(two.output_dir)
    for name, array in a.to_arrays().items():
        np.testing.assert_array_equal(array, getattr(b, name), err_msg=name)
    manifest_one, manifest_two = read_manifest(one.output_dir), read_manifest(two.output_dir)
    assert manifest_one.train.samples == manifest_two.train.samples
    assert manifest_one.train.cases == manifest_two.train.cases and manifest_one.test == manifest_two.test
    assert len(manifest_two.train.shards) == 5  # 32 samples in shards of 7, written by several threads
    for output in (one.output_dir, two.output_dir):
        assert sorted(path.name for path in output.iterdir()) == sorted(
            ["manifest.json", "test", *read_manifest(output).train.shards])


@pytest.mark.parametrize("workers", [1, 2])
def test_test_cases_keep_their_original_size_and_spacing(tmp_path, workers):
    from PIL import Image

    data = make_png_npy_set(tmp_path / "data", count=10)
    result = preload(config_for(data, tmp_path, workers=workers, pixel_spacing=[0.5, 0.25]), log=lambda *_: None)
    manifest = read_manifest(result.output_dir)
    # The test cases, and nothing else.
    assert sorted(p.stem for p in layout.test_images_dir(result.output_dir).iterdir()) == sorted(ids_of_test_cases(result.output_dir))
    for case in manifest.test.cases:
        np.testing.assert_array_equal(np.load(layout.test_images_dir(result.output_dir) / f"{case.id}.npy"),
                                      np.asarray(Image.open(data / "images" / f"{case.id}.png")))
        assert case.spacing == [0.5, 0.25]
    np.testing.assert_array_equal([s.spacing for s in manifest.train.samples], [[1.0, 0.5]] * 8)  # 32 -> 16 pixels


def test_one_volume_is_split_into_a_training_part_and_a_test_slab(tmp_path):
    """One NIfTI volume: a contiguous slab of its slices is the test case, the other slices are trained on."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    volume = rng.normal(0, 100, (24, 20, 10)).astype(np.float32)
    labels = np.zeros(volume.shape, np.uint8)
    labels[4:14, 5:15, :] = 1
    affine = np.array([[0.7, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "data" / "images" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "data" / "masks" / "ct.nii.gz")
    lines = []
    result = preload(config_for(tmp_path / "data", tmp_path, classes=("background", "a"),
                                normalization={"method": "zscore"}), log=lines.append)
    manifest = read_manifest(result.output_dir)
    assert manifest.split == "slab" and any("slab" in line for line in lines)
    (slab_case,) = manifest.test.cases
    first, stop = slab_case.slab
    assert stop - first == 2  # a fifth of 10 slices
    assert {s.slice_index for s in manifest.train.samples} == set(range(10)) - set(range(first, stop))
    stored = nib.load(layout.test_images_dir(result.output_dir) / f"{slab_case.id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(stored.dataobj), volume[..., first:stop])
    # The slab's affine puts its first voxel where that slice lies in the whole volume.
    np.testing.assert_allclose(stored.affine, affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, first],
                                                                 [0, 0, 0, 1]]))
    stored_labels = nib.load(layout.test_labels_dir(result.output_dir) / f"{slab_case.id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(stored_labels.dataobj), labels[..., first:stop])


def test_an_older_manifest_is_redone_with_a_notice(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=6)
    config = config_for(data, tmp_path)
    result = preload(config, log=lambda *_: None)
    path = layout.manifest_path(result.output_dir)
    old = json.loads(path.read_text())
    old["version"] = 4
    path.write_text(json.dumps(old))
    lines = []
    assert not preload(config, log=lines.append).up_to_date
    assert any("manifest version 4" in line and "preloading again" in line for line in lines)
    assert read_manifest(result.output_dir).version == json.loads(path.read_text())["version"] != 4


def test_spine_dataset_with_its_config(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "spine_mri.py",
                         [f"paths.preloaded_root={tmp_path}", "preload.image_size=[64, 64]"])
    assert config.preload.input_dir == shared_dataset("spine_mri_sagittal").resolve()
    result = preload(config, log=lambda *_: None)
    train, manifest = load_training_samples(result.output_dir), read_manifest(result.output_dir)
    # The config leaves out the 5 slices whose annotation is missing or partial (see the dataset's README).
    assert len(train) + len(manifest.test.cases) == 15 and len(manifest.test.cases) == 3
    assert all(set(np.unique(m)) == {0, 1, 2} for m in train.masks)
    assert all(case.labels == [0, 1, 2] for case in manifest.test.cases)
    assert train.images.max() <= 1.0
