"""All five stages through the command line on a tiny generated CT set, checking every artifact."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from segmenter import layout
from segmenter.dataset import load_training_samples
from segmenter.manifest import read_manifest
from tests.conftest import run_cli, run_stage_module, tiny_ct_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tiny_ct_dataset, tmp_path_factory):
    """Run preload, tune, train, predict (test set and --input) and evaluate once for the module."""
    work = tmp_path_factory.mktemp("run")
    config_path = write_config(work, tiny_ct_config(tiny_ct_dataset, work))
    outputs = {}
    for stage in ("preload", "tune", "train", "predict", "evaluate"):
        result = run_cli(stage, "--config", str(config_path))
        assert result.returncode == 0, f"{stage} failed:\n{result.stdout}\n{result.stderr}"
        outputs[stage] = result.stdout
    new_images = tiny_ct_dataset / "images"
    result = run_stage_module("predict", "--config", str(config_path), "--input", str(new_images))
    assert result.returncode == 0, result.stderr
    outputs["predict_input"] = result.stdout
    return work, config_path, outputs


def test_preloaded_dataset(finished_run, tiny_ct_dataset):
    work, _, _ = finished_run
    preloaded = work / "preloaded" / "tiny_ct"
    manifest = read_manifest(preloaded)
    train = load_training_samples(preloaded)
    test_ids = {case.id for case in manifest.test.cases}
    assert (preloaded / "train.npz").is_file() and layout.test_labels_dir(preloaded).is_dir()
    assert len(train) + len(test_ids) == 12 and len(test_ids) >= 2
    assert set(train.ids).isdisjoint(test_ids)
    assert train.images.shape[1:] == (32, 32, 1) and train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert set(np.unique(train.masks)) == {0, 1}
    assert manifest.classes == ["background", "muscle"] and manifest.channels == ["image"]
    assert manifest.config["experiment"] == "tiny_ct"
    sources = {path for case in manifest.train.cases + manifest.test.cases for path in case.images}
    assert sources == {str(p) for p in (tiny_ct_dataset / "images").glob("*.csv")}
    assert all(len(digest) == 64 for digest in manifest.sources.values())


def test_tune_artifacts(finished_run):
    work, _, _ = finished_run
    tune = work / "experiments" / "tiny_ct" / "tune"
    trials = pd.read_csv(tune / "trials.csv")
    assert len(trials) == 2
    assert {"learning_rate", "base_filters", "loss", "val_mean_foreground_dice", "epochs", "seconds"} <= set(trials)
    best = json.loads((tune / "best_hyperparameters.json").read_text())
    assert best["direction"] == "max" and 0.0 <= best["score"] <= 1.0
    assert (tune / "objective_vs_hyperparameters.png").stat().st_size > 1000
    assert len(list((tune / "tensorboard").iterdir())) == 2  # one log folder per trial


def test_train_artifacts(finished_run):
    work, _, outputs = finished_run
    train = work / "experiments" / "tiny_ct" / "train"
    for name in ("model/model.keras", "checkpoints/last/model.keras", "history.csv", "training_curves.png",
                 "model/preprocessing.json", "model/config.resolved.json", "model/hyperparameters.json"):
        assert (train / name).is_file(), name
    assert len(pd.read_csv(train / "history.csv")) == 2
    assert any((train / "tensorboard").rglob("events.out.tfevents*"))
    assert json.loads((train / "model" / "hyperparameters.json").read_text())["source"].startswith("tuned")
    assert (work / "experiments" / "tiny_ct" / "config.resolved.json").is_file()


def test_predictions(finished_run, tiny_ct_dataset):
    work, _, _ = finished_run
    manifest = read_manifest(work / "preloaded" / "tiny_ct")
    predict_dir = work / "experiments" / "tiny_ct" / "predict"
    # Preload resized the 64 x 64 slices to 32 x 32 for training; test masks come back on the original grid,
    # in the source's format (CSV), one per test case and nothing else.
    assert sorted(p.name for p in (predict_dir / "test").glob("*.csv")) == sorted(
        f"{case.id}.csv" for case in manifest.test.cases)
    for case in manifest.test.cases:
        mask = np.loadtxt(predict_dir / "test" / f"{case.id}.csv", delimiter=",")
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}
    # --input: one mask per input file, under the input's name, at the input's own size.
    outputs = sorted(p.name for p in (predict_dir / "images").glob("*.csv"))
    assert outputs == sorted(p.name for p in (tiny_ct_dataset / "images").glob("*.csv"))
    mask = np.loadtxt(predict_dir / "images" / outputs[0], delimiter=",")
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}


def test_bfloat16_prediction_gives_the_float32_masks(finished_run, tiny_ct_dataset, tmp_path):
    work, config_path, _ = finished_run
    float32_dir = work / "experiments" / "tiny_ct" / "predict" / "images"
    result = run_cli("predict", "--config", str(config_path), "--input", str(tiny_ct_dataset / "images"),
                     "--output", str(tmp_path / "bfloat16"), "--set", "predict.precision=bfloat16")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "bfloat16" / layout.PREDICTIONS_RECORD).read_text())["precision"] == "bfloat16"
    assert json.loads((float32_dir / layout.PREDICTIONS_RECORD).read_text())["precision"] is None
    names = sorted(p.name for p in float32_dir.glob("*.csv"))
    assert names == sorted(p.name for p in (tmp_path / "bfloat16").glob("*.csv"))
    float32 = np.stack([np.loadtxt(float32_dir / name, delimiter=",") for name in names])
    bfloat16 = np.stack([np.loadtxt(tmp_path / "bfloat16" / name, delimiter=",") for name in names])
    # Rounding to bfloat16 moves only pixels whose two probabilities were within a few hundredths.
    labelled = (float32 > 0) | (bfloat16 > 0)
    assert labelled.sum() > 100 and (float32 == bfloat16)[labelled].mean() > 0.97
    # The one-line notice appears exactly where no device here computes bfloat16.
    from segmenter.models import precision
    emulated = precision.bfloat16_is_emulated(precision.gpu_capabilities(), precision.cpu_flags())
    assert ("is emulated and unlikely to be faster" in result.stdout) == emulated


def test_predict_in_bfloat16_says_where_it_would_be_emulated(finished_run, monkeypatch, capsys):
    from segmenter import inference
    from segmenter.config import load_config
    from segmenter.models import precision

    _, config_path, _ = finished_run
    config = load_config(config_path, ["predict.precision=bfloat16"])
    # As on a CPU without bfloat16 arithmetic (this machine has it), then as on one with it.
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    model, _, _ = inference.trained_models(config)
    assert "is emulated and unlikely to be faster" in capsys.readouterr().out
    assert "bfloat16" in {layer.compute_dtype for layer in model.layers}
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    inference.trained_models(config)
    assert "is emulated" not in capsys.readouterr().out


def test_evaluation(finished_run):
    work, _, outputs = finished_run
    evaluate = work / "experiments" / "tiny_ct" / "evaluate"
    test = read_manifest(work / "preloaded" / "tiny_ct").test.cases
    metrics = pd.read_csv(evaluate / "metrics.csv")
    assert len(metrics) == len(test)  # one row per image and foreground class
    assert list(metrics.columns[:8]) == ["image_id", "class", "dice", "iou", "hd", "hd95", "assd", "nsd"]
    assert metrics.dice.between(0, 1).all()
    summary = json.loads((evaluate / "summary.json").read_text())
    assert summary["n_images"] == len(test)
    assert set(summary["classes"]) == {"muscle"}
    assert {"dice_mean", "hd95_mean", "assd_mean"} <= set(summary["classes"]["muscle"])
    report = evaluate / "report.html"
    assert report.stat().st_size > 10_000
    assert outputs["evaluate"].strip().splitlines()[-1] == str(report)
    assert len(list((evaluate / "figures").glob("compare_muscle_*.png"))) == 3


def test_evaluation_scores_on_the_original_grid(finished_run, tiny_ct_dataset):
    """Areas and mean intensities are those of the 64 x 64 source masks and images, not the 32 x 32 copies."""
    work, _, _ = finished_run
    evaluate = work / "experiments" / "tiny_ct" / "evaluate"
    metrics = pd.read_csv(evaluate / "metrics.csv", dtype={"image_id": str}).set_index("image_id")
    for slice_id, row in metrics.iterrows():
        image = np.loadtxt(tiny_ct_dataset / "images" / f"{slice_id}.csv", delimiter=",")
        mask = np.loadtxt(tiny_ct_dataset / "masks" / f"{slice_id}.csv", delimiter=",") == 1
        assert row.area_true == mask.sum()  # pixels: the tiny set has no spacing
        assert row.mean_intensity_true == pytest.approx(image[mask].mean())


def test_experiment_evaluation_equals_the_folder_evaluation_of_its_files(finished_run, tmp_path):
    """One evaluation path: evaluate --truth --pred --images on the experiment's folders gives the same rows."""
    work, config_path, _ = finished_run
    preloaded, experiment = work / "preloaded" / "tiny_ct", work / "experiments" / "tiny_ct"
    result = run_cli("evaluate", "--truth", str(layout.test_labels_dir(preloaded)),
                     "--pred", str(experiment / "predict" / "test"), "--images", str(layout.test_images_dir(preloaded)),
                     "--classes", "background,muscle", "--out", str(tmp_path / "folders"))
    assert result.returncode == 0, result.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "folders" / "metrics.csv"),
                                  pd.read_csv(experiment / "evaluate" / "metrics.csv"))
    # The same summary too, but for the bootstrap interval (the experiment's config sets 50 resamples).
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (tmp_path / "folders",
                                                                                   experiment / "evaluate")]
    for summary in summaries:
        for stats in summary["classes"].values():
            stats.pop("dice_mean_ci95")
    assert summaries[0] == summaries[1]


def test_preload_again_is_up_to_date(finished_run):
    _, config_path, _ = finished_run
    result = run_cli("preload", "--config", str(config_path))
    assert result.returncode == 0 and "up to date" in result.stdout


def test_train_resume_continues_from_checkpoint(finished_run):
    work, config_path, _ = finished_run
    result = run_cli("train", "--config", str(config_path), "--resume", "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert "Resuming from epoch 2" in result.stdout
    history = pd.read_csv(work / "experiments" / "tiny_ct" / "train" / "history.csv")
    assert history.epoch.tolist() == [0, 1, 2]


def test_predict_refuses_an_output_folder_that_would_replace_data(finished_run, tiny_ct_dataset):
    _, config_path, _ = finished_run
    images = tiny_ct_dataset / "images"
    before = sorted(p.name for p in images.iterdir())
    result = run_stage_module("predict", "--config", str(config_path), "--input", str(images),
                              "--output", str(tiny_ct_dataset))
    assert result.returncode == 1 and "would replace" in result.stderr
    assert sorted(p.name for p in images.iterdir()) == before
