"""Cases as the unit of data: nnU-Net folders with several channels, fixed test sets, classes that must agree.

Cases:

- a generated two-channel dataset in nnU-Net layout (imagesTr/<case>_0000.nii.gz, _0001, labelsTr/,
  dataset.json) preloads from its path alone and runs to evaluate: test volumes predicted whole, scored in 3D;
- each channel is normalised with its own setting;
- a fixed test set, by case ids and by a folder;
- train, predict and evaluate stop with one line when the config's classes differ from the data's or model's.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from segmenter import layout
from segmenter.config import ConfigError, build_config, load_config
from segmenter.dataset import load_training_samples
from segmenter.manifest import read_manifest
from segmenter.preload import preload
from tests.conftest import run_cli, write_config

CASES = 6
SHAPE = (16, 16, 6)


def quiet(*_):
    pass


def write_two_channel_nnunet_dataset(folder: Path, cases: int = CASES, seed: int = 0) -> Path:
    """A ball (label 1) and a box (label 2), bright in channel 0 and dark in channel 1 (on another scale)."""
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    grid = np.indices(SHAPE)
    for index in range(cases):
        centre = rng.uniform(5, 10, size=3)
        labels = np.zeros(SHAPE, np.uint8)
        labels[((grid - centre[:, None, None, None] * np.array([1, 1, 0.4])[:, None, None, None]) ** 2).sum(0) < 9] = 1
        labels[2:6, 10:14, 1:5] = 2
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        affine[:3, 3] = rng.normal(0, 10, 3)
        t2 = 100 + 300 * (labels == 1) + 150 * (labels == 2) + rng.normal(0, 10, SHAPE)
        adc = 2000 - 900 * (labels > 0) + rng.normal(0, 50, SHAPE)
        name = f"case_{index:03d}"
        for channel, array in enumerate((t2, adc)):
            nib.save(nib.Nifti1Image(array.astype(np.float32), affine), folder / "imagesTr" / f"{name}_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / "labelsTr" / f"{name}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "name": "Dataset900_Toy", "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "lesion": 1, "gland": 2}, "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory) -> Path:
    return write_two_channel_nnunet_dataset(tmp_path_factory.mktemp("nnunet") / "Dataset900_Toy")


def nnunet_config(data: Path, work: Path, **preload_settings):
    """Only the dataset's path and small settings: classes, channels and subfolders come from dataset.json."""
    path = write_config(work, {
        "paths": {"preloaded_root": str(work / "pre"), "experiments_root": str(work / "exp")},
        "preload": {"input_dir": str(data), "image_size": [16, 16], "workers": 1,
                    "normalization": {"method": "zscore"}, **preload_settings},
        "train": {"epochs": 2, "batch_size": 4, "model": {"depth": 2, "base_filters": 4}},
        "evaluate": {"bootstrap_samples": 20},
    })
    return path


def test_nnunet_two_channel_dataset_runs_from_its_path_to_evaluate(nnunet_dataset, tmp_path):
    config_path = nnunet_config(nnunet_dataset, tmp_path)
    config = load_config(config_path)
    assert config.experiment == "Dataset900_Toy"
    assert config.classes == ["background", "lesion", "gland"] and config.preload.channels == ["T2", "ADC"]
    for stage in ("preload", "train", "predict", "evaluate"):
        result = run_cli(stage, "--config", str(config_path))
        assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"

    preloaded = tmp_path / "pre" / "Dataset900_Toy"
    manifest = read_manifest(preloaded)
    assert manifest.channels == ["T2", "ADC"] and len(manifest.test.cases) == 2
    samples = load_training_samples(preloaded)
    assert samples.images.shape[1:] == (16, 16, 2)
    # Both channels are in the test folder under nnU-Net's names; predictions are NIfTI volumes on the
    # source grid with the source affine.
    experiment = tmp_path / "exp" / "Dataset900_Toy"
    for case in manifest.test.cases:
        for channel in (0, 1):
            assert (layout.test_images_dir(preloaded) / f"{case.id}_{channel:04d}.nii.gz").is_file()
        source = nib.load(nnunet_dataset / "labelsTr" / f"{case.id}.nii.gz")
        predicted = nib.load(experiment / "predict" / "test" / f"{case.id}.nii.gz")
        assert predicted.shape == SHAPE
        np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-5)
        assert int(predicted.header["sform_code"]) == 1
    summary = json.loads((experiment / "evaluate" / "summary.json").read_text())
    assert summary["n_images"] == 2 and summary["distance_unit"] == "mm" and summary["area_unit"] == "cm3"
    metrics = pd.read_csv(experiment / "evaluate" / "metrics.csv")
    assert set(metrics["class"]) == {"lesion", "gland"} and "volume_true" in metrics
    # 3D volumes in cm3: voxels x 0.8 x 0.8 x 2.5 mm / 1000.
    for case in manifest.test.cases:
        truth = np.asarray(nib.load(nnunet_dataset / "labelsTr" / f"{case.id}.nii.gz").dataobj)
        row = metrics[(metrics.image_id == case.id) & (metrics["class"] == "gland")].iloc[0]
        assert row.volume_true == pytest.approx((truth == 2).sum() * 0.8 * 0.8 * 2.5 / 1000)


def test_each_channel_is_normalised_with_its_own_setting(nnunet_dataset, tmp_path):
    config = load_config(nnunet_config(nnunet_dataset, tmp_path, normalization=[
        {"method": "zscore"}, {"method": "minmax"}]))
    result = preload(config, log=quiet)
    images = load_training_samples(result.output_dir).images
    for image in images:
        assert abs(image[..., 0].mean()) < 1e-4 and image[..., 0].std() == pytest.approx(1.0, abs=1e-3)
        assert image[..., 1].min() == pytest.approx(0.0) and image[..., 1].max() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="one per channel"):
        load_config(nnunet_config(nnunet_dataset, tmp_path / "bad", normalization=[{"method": "zscore"}] * 3))


def test_a_case_missing_a_channel_is_named(nnunet_dataset, tmp_path):
    data = tmp_path / "copy"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").symlink_to(nnunet_dataset / "labelsTr")
    (data / "dataset.json").symlink_to(nnunet_dataset / "dataset.json")
    for path in (nnunet_dataset / "imagesTr").iterdir():
        if path.name != "case_002_0001.nii.gz":
            (data / "imagesTr" / path.name).symlink_to(path)
    result = run_cli("preload", "--config", str(nnunet_config(data, tmp_path)))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {data / 'imagesTr'}: case 'case_002' has no channel 1 (case_002_0001); "
                                      "every case needs all 2 channels")


def test_fixed_test_set_by_case_ids(nnunet_dataset, tmp_path):
    config = load_config(nnunet_config(nnunet_dataset, tmp_path, test_cases=["case_001", "case_004"]))
    manifest = read_manifest(preload(config, log=quiet).output_dir)
    assert manifest.split == "fixed" and [case.id for case in manifest.test.cases] == ["case_001", "case_004"]
    assert {case.id for case in manifest.train.cases} == {"case_000", "case_002", "case_003", "case_005"}
    with pytest.raises(ValueError, match="case_999"):
        preload(load_config(nnunet_config(nnunet_dataset, tmp_path / "x", test_cases=["case_999"])), log=quiet)


def test_fixed_test_set_from_a_folder(nnunet_dataset, tmp_path):
    test_folder = write_two_channel_nnunet_dataset(tmp_path / "held_out", cases=2, seed=5)
    for path in (test_folder / "imagesTr").iterdir():  # the same names as training cases: a clash
        path.rename(path.with_name(path.name.replace("case_", "test_")))
    for path in (test_folder / "labelsTr").iterdir():
        path.rename(path.with_name(path.name.replace("case_", "test_")))
    config = load_config(nnunet_config(nnunet_dataset, tmp_path, test_dir=str(test_folder)))
    manifest = read_manifest(preload(config, log=quiet).output_dir)
    assert manifest.split == "fixed" and [case.id for case in manifest.test.cases] == ["test_000", "test_001"]
    assert len(manifest.train.cases) == CASES


def test_classes_that_differ_from_the_data_stop_each_stage_with_one_line(tmp_path, tiny_ct_dataset):
    from segmenter import inference, training
    from segmenter.evaluation import pipeline
    from tests.conftest import tiny_ct_config

    raw = tiny_ct_config(tiny_ct_dataset, tmp_path, train={"epochs": 1})
    config = build_config(raw)
    preload(config, log=quiet)
    training.train_final_model(config)
    inference.predict_test_set(config)
    wrong = build_config({**raw, "classes": ["background", "muscle", "fat", "bone"]})
    for stage in (training.train_final_model, inference.predict_test_set, pipeline.evaluate_experiment):
        with pytest.raises(ConfigError) as error:
            stage(wrong)
        assert "['background', 'muscle', 'fat', 'bone']" in str(error.value)
        assert "['background', 'muscle']" in str(error.value) and len(str(error.value).splitlines()) == 1
    # Through the command line: one line, the exit status of a bad config (evaluate imports no TensorFlow).
    result = run_cli("evaluate", "--config", str(write_config(tmp_path, raw)), "--set",
                     "classes=['background', 'muscle', 'fat', 'bone']")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_one_dicom_series_runs_to_evaluate_and_predict_writes_dicom_seg(tmp_path):
    """configs/ct_dicom_muscle.py: one real series, split into a training part and a test slab scored in 3D;
    predict --input --format dicom-seg writes a DICOM SEG referencing the series."""
    import highdicom as hd

    from tests.conftest import REPO_ROOT, shared_dataset

    sets = [item for override in (f"paths.preloaded_root={tmp_path / 'pre'}", f"paths.experiments_root={tmp_path / 'exp'}",
                                  "preload.image_size=[64, 64]", "train.epochs=1", "train.time_budget_minutes=None",
                                  "train.model.depth=2", "train.model.base_filters=4", "evaluate.bootstrap_samples=10")
            for item in ("--set", override)]
    config = str(REPO_ROOT / "configs" / "ct_dicom_muscle.py")
    for stage in ("preload", "train", "predict", "evaluate"):
        result = run_cli(stage, "--config", config, *sets)
        assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"
    manifest = read_manifest(tmp_path / "pre" / "ct_dicom_muscle")
    (slab,) = manifest.test.cases
    assert manifest.split == "slab" and slab.slab[1] - slab.slab[0] == 4  # a fifth of 20 slices
    assert sorted({s.slice_index for s in manifest.train.samples} | set(range(*slab.slab))) == list(range(20))
    summary = json.loads((tmp_path / "exp" / "ct_dicom_muscle" / "evaluate" / "summary.json").read_text())
    assert summary["n_images"] == 1 and summary["area_unit"] == "cm3"

    series = tmp_path / "series"
    series.mkdir()
    (series / "ct").symlink_to(shared_dataset("ct_abdomen_totalseg") / "dicom")
    result = run_cli("predict", "--config", config, *sets, "--input", str(series), "--format", "dicom-seg")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "exp" / "ct_dicom_muscle" / "predict" / "series"
    assert (out / "ct.nii.gz").is_file()
    segmentation = hd.seg.segread(out / "ct.seg.dcm")
    assert [segment.SegmentLabel for segment in segmentation.SegmentSequence] == ["muscle"]
