"""3D patch-based segmentation through the five stages, on small generated NIfTI volumes.

- preload (``spatial_dims`` 3) plans the target spacing (median), patch size, batch size and depth, and
  stores each training volume resampled and normalised; test volumes stay raw at their own geometry;
- train draws fixed-size patches, a share centred on foreground, and trains a 3D U-Net;
- predict slides a window over each whole test volume and writes NIfTI on the source grid and affine
  (the resampling undone), evaluate scores whole volumes in mm;
- the same model prepared a volume's prediction as preload prepared the training volume.
"""
from __future__ import annotations

import json
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import segmenter.models  # noqa: F401  (registers the custom layers and models for load_model)
from segmenter import layout
from segmenter.config import load_config
from segmenter.manifest import read_manifest
from tests.conftest import run_cli, write_config

EXTENT_MM = (20, 24, 20)
# One volume has a finer grid: the median spacing (1, 1, 2) is the target, so it is resampled.
SPACINGS = [(1.0, 1.0, 2.0)] * 7 + [(0.8, 0.8, 2.0)]


def write_volumes(folder: Path, seed: int = 0) -> Path:
    """Balls (label 1) and boxes (label 2) in noisy volumes of different shapes and spacings."""
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for index, spacing in enumerate(SPACINGS):
        shape = tuple(int(round(extent / sp)) for extent, sp in zip(EXTENT_MM, spacing))
        grid = np.indices(shape).astype(float) * np.array(spacing)[:, None, None, None]
        centre = np.array([rng.uniform(6, 12), rng.uniform(6, 16), rng.uniform(6, 12)])
        labels = np.zeros(shape, np.uint8)
        labels[((grid - centre[:, None, None, None]) ** 2).sum(0) < 16] = 1
        box = (grid[0] > 13) & (grid[0] < 18) & (grid[1] > 15) & (grid[1] < 21) & (grid[2] > 4) & (grid[2] < 12)
        labels[box] = 2
        image = 100 + 300 * (labels == 1) + 150 * (labels == 2) + rng.normal(0, 20, shape)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = rng.normal(0, 10, 3)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"vol_{index:02d}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / "labelsTr" / f"vol_{index:02d}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("vol3d") / "data")


def config_3d(data: Path, work: Path, **train) -> Path:
    return write_config(work, {
        "experiment": "toy3d",
        "classes": ["background", "ball", "box"],
        "paths": {"preloaded_root": str(work / "pre"), "experiments_root": str(work / "exp")},
        "preload": {"input_dir": str(data), "images_subdir": "imagesTr", "masks_subdir": "labelsTr",
                    "spatial_dims": 3, "workers": 1, "test_fraction": 0.25,
                    "normalization": {"method": "zscore"}},
        "train": {"epochs": 2, "patches_per_epoch": 8, "learning_rate": 0.003,
                  "model": {"base_filters": 4}, **train},
        "predict": {"batch_size": 2},
        "evaluate": {"bootstrap_samples": 20},
    })


def test_volumes_run_through_the_five_stages_in_3d(volumes, tmp_path):
    config_path = config_3d(volumes, tmp_path)
    for stage in ("preload", "train", "predict", "evaluate"):
        result = run_cli(stage, "--config", str(config_path))
        assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"
        if stage == "preload":
            assert "3D plan:" in result.stdout

    preloaded = tmp_path / "pre" / "toy3d"
    manifest = read_manifest(preloaded)
    plan = manifest.plan
    assert manifest.spatial_dims == 3 and plan is not None
    assert plan.target_spacing == [1.0, 1.0, 2.0]
    assert manifest.sample_size == plan.patch_size
    assert all(side % 2 ** plan.depth == 0 for side in plan.patch_size) and plan.batch_size >= 2
    assert len(manifest.test.cases) == 2 and len(manifest.train.samples) == 6
    # Training volumes are stored resampled to the target spacing and normalised per volume.
    for sample, name in zip(manifest.train.samples, manifest.train.shards):
        case = next(c for c in manifest.train.cases if c.id == sample.case)
        with np.load(preloaded / name) as data:
            image, labels = data["image"], data["labels"]
        expected = [round(n * s / t) for n, s, t in zip(case.shape, case.spacing, plan.target_spacing)]
        assert list(labels.shape) == expected and image.shape == (*expected, 1)
        assert abs(float(image.mean())) < 0.1 and set(np.unique(labels)) <= {0, 1, 2}
        # Where each class occurs, for the patch sampler: every voxel of these small classes, class 1 first.
        with np.load(preloaded / name) as data:
            locations, counts = data["locations"], data["location_counts"]
        assert counts.tolist() == [int((labels == 1).sum()), int((labels == 2).sum())]
        np.testing.assert_array_equal(locations, np.concatenate([np.argwhere(labels == 1), np.argwhere(labels == 2)]))

    experiment = tmp_path / "exp" / "toy3d"
    model = keras.models.load_model(layout.model_path(experiment / "train"), compile=False)
    assert tuple(model.input_shape[1:]) == (*plan.patch_size, 1)
    preprocessing = json.loads(layout.preprocessing_path(experiment / "train").read_text())
    assert preprocessing["spatial_dims"] == 3 and preprocessing["plan"]["patch_size"] == plan.patch_size
    for case in manifest.test.cases:
        source = nib.load(volumes / "labelsTr" / f"{case.id}.nii.gz")
        predicted = nib.load(experiment / "predict" / "test" / f"{case.id}.nii.gz")
        assert predicted.shape == source.shape
        np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2}
    metrics = pd.read_csv(experiment / "evaluate" / "metrics.csv")
    assert set(metrics.image_id) == {case.id for case in manifest.test.cases}
    assert set(metrics["class"]) == {"ball", "box"} and "volume_true" in metrics

    # New volumes: label maps, probability maps and previews; post-processing keeps one component per class.
    new_scans = tmp_path / "new_scans"
    new_scans.mkdir()
    for case in manifest.test.cases:
        (new_scans / f"{case.id}.nii.gz").symlink_to(volumes / "imagesTr" / f"{case.id}.nii.gz")
    result = run_cli("predict", "--config", str(config_path), "--input", str(new_scans),
                     "--set", "predict.save_probabilities=True", "--set", "predict.keep_largest_component=True")
    assert result.returncode == 0, result.stderr
    for case in manifest.test.cases:
        source = nib.load(new_scans / f"{case.id}.nii.gz")
        labels = nib.load(experiment / "predict" / "new_scans" / f"{case.id}.nii.gz")
        probabilities = nib.load(experiment / "predict" / "new_scans" / "probabilities" / f"{case.id}.nii.gz")
        assert probabilities.shape == (*source.shape, 3)
        np.testing.assert_allclose(probabilities.affine, source.affine, atol=1e-5)
        p = np.asarray(probabilities.dataobj)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-2)
        array = np.asarray(labels.dataobj)
        for label in (1, 2):
            assert ndimage.label(array == label, structure=np.ones((3, 3, 3)))[1] <= 1
        assert (experiment / "predict" / "new_scans" / "preview" / f"{case.id}.png").is_file()
    for split in ("train", "test"):
        result = run_cli("predict", "--config", str(config_path), "--visualize", split, "--count", "2")
        assert result.returncode == 0, result.stderr
        assert (experiment / "predict" / f"visualize_{split}.png").stat().st_size > 1000


def test_a_position_conditioned_medpatchnet_gets_its_positions_in_every_stage(volumes, tmp_path):
    """train (patches with positions, also for validation), predict (sliding window with positions), evaluate
    --follow (the validation volumes) and the model bundle all agree on the model's four input channels."""
    from segmenter import models
    from segmenter.evaluation.follow import follow_training
    from segmenter.inference import predict_test_set
    from segmenter.preload import preload
    from segmenter.training import train_final_model

    config_path = config_3d(volumes, tmp_path, validation_fraction=0.34,
                            model={"architecture": "medpatchnet", "base_filters": 4, "position_conditioning": True})
    config = load_config(config_path)
    preload(config, log=lambda *_: None)
    train_final_model(config)
    experiment = tmp_path / "exp" / "toy3d"
    model = keras.models.load_model(layout.model_path(experiment / "train"), compile=False)
    assert models.takes_positions(model) and model.input_shape[-1] == 1 + 3
    preprocessing = json.loads(layout.preprocessing_path(experiment / "train").read_text())
    assert preprocessing["position_channels"] is True and preprocessing["channels"] == ["image"]
    history = pd.read_csv(layout.history_path(experiment / "train"))
    assert len(history) == 2 and history["val_loss"].notna().all()

    assert predict_test_set(config).num_masks == 2
    follow = follow_training(config, once=True, log=lambda *_: None)
    scores = pd.read_csv(experiment / "follow" / "scores.csv")
    assert list(scores.epoch) == [2] and scores["mean_foreground_dice"].between(0, 1).all(), follow
    result = run_cli("evaluate", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(experiment / "evaluate" / "metrics.csv")) == 4  # 2 volumes x 2 classes


def test_a_volume_is_predicted_on_its_own_grid_through_resampling(volumes, tmp_path):
    """A fake model that returns its input's class map: the prediction must give back the true labels."""
    from segmenter.config import NormalizationConfig
    from segmenter.inference import predict_volume
    from segmenter.config import PredictConfig
    from segmenter.manifest import VolumePlan

    source = nib.load(volumes / "labelsTr" / "vol_07.nii.gz")  # the 0.8 mm volume: resampled to 1 mm and back
    labels = np.asarray(source.dataobj).astype(np.uint8)
    plan = VolumePlan(target_spacing=[1.0, 1.0, 2.0], median_shape=[20, 24, 10], patch_size=[16, 16, 8],
                      batch_size=2, depth=2, estimated_mb=1.0, crop_to_nonzero=False, intensity_statistics=[None])

    class MaskAsProbability:  # the input (normalisation "none") is the mask itself: p(structure) = intensity
        def predict_on_batch(self, batch):
            p = np.clip(batch[..., :1], 0.0, 1.0)
            return np.concatenate([1.0 - p, p], axis=-1)

    preprocessing = {"plan": plan.model_dump(mode="json"), "classes": ["background", "structure"]}
    for label in (1, 2):
        truth = labels == label
        predicted, _ = predict_volume(MaskAsProbability(), truth[..., None].astype(np.float32),
                                      source.header.get_zooms(), [NormalizationConfig(method="none")], preprocessing,
                                      2, PredictConfig(mirror=False))
        assert predicted.shape == labels.shape and set(np.unique(predicted)) == {0, 1}
        # Cubic resampling to the 1 mm grid and linear back blur the border by about a voxel at most.
        found = predicted == 1
        dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
        assert dice > 0.9, (label, dice)


def test_the_tune_stage_searches_3d_architectures(volumes, tmp_path):
    """Trials build 3D models from the plan and train on patches drawn from the search-train volumes (with
    their positions: position_conditioning is a train.model setting like the others)."""
    from segmenter.preload import preload
    from segmenter import tuning

    config = load_config(config_3d(volumes, tmp_path))
    config = config.model_copy(update={"tune": config.tune.model_copy(update={
        "tuner": "random", "max_trials": 2, "max_epochs": 1, "validation_fraction": 0.34,
        "search_space": {"architecture": ["unet", "medpatchnet"], "learning_rate": 0.003,
                         "position_conditioning": True}})})
    config.train.patches_per_epoch = 4
    preload(config, log=lambda *_: None)
    result = tuning.run_search(config)
    trials = pd.read_csv(tmp_path / "exp" / "toy3d" / "tune" / "trials.csv")
    assert len(trials) == 2 and set(trials.status) == {"COMPLETED"}
    assert trials[f"val_{tuning.OBJECTIVE}"].between(0.0, 1.0).all() and result.num_trials == 2
    assert set(trials.architecture) <= {"unet", "medpatchnet"} and "depth" not in trials  # the plan's depth
    assert trials.position_conditioning.all()  # each trial's model took, and was fed, the patches' positions


def test_a_cropped_volume_is_put_back_in_place():
    """crop_to_nonzero: the prediction of the cropped box lands where the box was; outside it is background."""
    from segmenter.config import NormalizationConfig
    from segmenter.manifest import VolumePlan
    from segmenter.volumes import prepare_volume, probabilities_to_labels

    image = np.zeros((30, 28, 12, 1), np.float32)
    image[5:25, 4:20, 2:10] = 50.0 + np.random.default_rng(0).normal(0, 1, (20, 16, 8, 1))
    labels = np.zeros((30, 28, 12), np.uint8)
    labels[10:15, 8:12, 4:8] = 1
    plan = VolumePlan(target_spacing=[2.0, 2.0, 2.0], median_shape=[10, 8, 4], patch_size=[8, 8, 4], batch_size=2,
                      depth=1, estimated_mb=1.0, crop_to_nonzero=True, intensity_statistics=[None])
    prepared, prepared_labels, geometry = prepare_volume(image, (1.0, 1.0, 1.0), plan, [NormalizationConfig(
        method="zscore")], labels=labels, num_classes=2)
    assert geometry.box == (slice(5, 25), slice(4, 20), slice(2, 10))
    assert prepared.shape == (10, 8, 4, 1) and prepared_labels.shape == (10, 8, 4)
    # z-score over the cropped box only (nnU-Net's order: crop, normalise, resample).
    assert abs(float(prepared.mean())) < 0.1
    one_hot = np.eye(2, dtype=np.float32)[prepared_labels]
    restored = probabilities_to_labels(one_hot, geometry)
    assert restored.shape == labels.shape and not restored[:5].any() and not restored[25:].any()
    dice = 2 * (restored & labels).sum() / (restored.sum() + labels.sum())
    assert dice > 0.8


def test_nnunet_ct_normalisation_uses_the_training_sets_foreground_statistics(volumes, tmp_path):
    from segmenter.preload import preload

    config = load_config(config_3d(volumes, tmp_path))
    config.preload.normalization = config.preload.normalization.model_copy(update={"method": "nnunet_ct"})
    manifest = read_manifest(preload(config, log=lambda *_: None).output_dir)
    stats = manifest.plan.intensity_statistics[0]
    # The foreground of the generated volumes is 400 (ball) or 250 (box) plus noise of sd 20.
    assert 250 < stats["mean"] < 400 and stats["percentile_00_5"] < stats["mean"] < stats["percentile_99_5"]
    with np.load(tmp_path / "pre" / "toy3d" / manifest.train.shards[0]) as data:
        image, labels = data["image"][..., 0], data["labels"]
    expected_ball = (400 - stats["mean"]) / stats["std"]
    assert abs(float(np.median(image[labels == 1])) - expected_ball) < 0.3
    # Background (100) is clipped to the lowest foreground percentile, as nnU-Net does.
    low = (stats["percentile_00_5"] - stats["mean"]) / stats["std"]
    assert float(np.median(image[labels == 0])) == pytest.approx(low, abs=0.05)
