"""The tune stage on a tiny preloaded CT set: folds, resuming, the three tuners, the time budget, the
search space (architectures, augmentations, CT window) and keras-tuner's distributed chief/worker mode.

The preloaded dataset is made once for the module and its ``test.npz`` is deleted: every search here runs
without the test split on disk, so any read of it would fail the search.
"""
from __future__ import annotations

import json
import shutil
import os
import re
import socket
import subprocess
import sys
import time

import keras_tuner as kt
import numpy as np
import pandas as pd
import pytest

from segmenter import tuning
from segmenter.config import ConfigError, build_config
from segmenter.dataset import load_training_samples
from segmenter.manifest import read_manifest
from tests.conftest import REPO_ROOT, tiny_ct_config, write_config

OBJECTIVE = "val_mean_foreground_dice"
# Small enough for seconds per trial on a 2-core CPU, with values left to search so that trials differ.
TINY_SPACE = {"depth": 2, "base_filters": 4, "dropout": None, "flip_vertical": None,
              "learning_rate": {"min": 1e-3, "max": 1e-2, "sampling": "log"}, "loss": ["dice", "dice_ce"]}
PRELOAD_WINDOW = (-250.0, 250.0)  # tiny_ct_config's preload.normalization.window

SEARCH_SPACE_ERRORS = [
    ({"archtecture": ["unet"]}, "not a searchable hyperparameter"),
    ({"architecture": ["unet", "vnet"]}, "'vnet'"),
    ({"dropout": {"min": 0.0, "max": 1.5}}, "dropout: 1.5"),
    ({"epochs": [1, 2]}, "not a searchable hyperparameter"),
    ({"ct_window": [[300, -200]]}, "low < high"),
    ({"ct_window": {"min": -200, "max": 300}}, "list of [low, high] windows"),
    ({"loss": []}, "nothing to choose"),
]


@pytest.fixture(scope="module")
def preloaded(tiny_ct_dataset, tmp_path_factory):
    """The tiny CT set preloaded once (32 x 32 slices), without its test split."""
    from segmenter.preload import preload

    work = tmp_path_factory.mktemp("tune_preloaded")
    config = build_config(tiny_ct_config(tiny_ct_dataset, work))
    preload(config, log=lambda *args: None)
    shutil.rmtree(config.preloaded_dir / "test")
    return config.paths.preloaded_root


def search_config(data_dir, preloaded_root, out_dir, **tune):
    """A config of the tiny set searching TINY_SPACE, outputs under ``out_dir``."""
    raw = tiny_ct_config(data_dir, out_dir, tune={"search_space": TINY_SPACE, **tune})
    raw["paths"]["preloaded_root"] = str(preloaded_root)
    return raw


def tune_dir(out_dir):
    return out_dir / "experiments" / "tiny_ct" / "tune"


def hparams_runs(tensorboard_dir) -> set[str]:
    """Names (relative paths) of the TensorBoard runs whose events hold HParams plugin data."""
    import tensorflow as tf

    runs = set()
    for events in tensorboard_dir.rglob("events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            if any(value.metadata.plugin_data.plugin_name == "hparams" for value in event.summary.value):
                runs.add(str(events.parent.relative_to(tensorboard_dir)))
    return runs


# ----------------------------------------------------------------------------------------------------
# Search space and folds (no training)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space, message", SEARCH_SPACE_ERRORS)
def test_bad_search_space_is_a_config_error_naming_the_entry(tiny_ct_dataset, preloaded, tmp_path, space, message):
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, search_space=space))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        tuning.validate_search_space(config)
    assert f"tune.search_space.{next(iter(space))}" in str(error.value)


def test_search_space_entries_replace_fix_or_drop_defaults(tiny_ct_dataset, preloaded, tmp_path):
    space = {"depth": 2, "dropout": None, "rotation_degrees": [0.0, 15.0], "zoom": {"min": 0.0, "max": 0.2}}
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, search_space=space))
    merged = tuning.validate_search_space(config)
    assert merged["depth"] == 2 and "dropout" not in merged and merged["rotation_degrees"] == [0.0, 15.0]
    assert merged["base_filters"] == tuning.DEFAULT_SEARCH_SPACE["base_filters"]
    assert tuning.DEFAULT_SEARCH_SPACE["architecture"] == ["unet"]  # The default stays a CPU-sized search.


def test_searched_values_reach_model_augmentation_and_train_settings(tiny_ct_dataset, preloaded, tmp_path):
    space = {**TINY_SPACE, "architecture": ["unet", "residual_unet"], "rotation_degrees": [0.0, 15.0],
             "zoom": [0.0, 0.1], "intensity": [0.0, 0.2], "flip_vertical": [False, True], "optimizer": ["adam"]}
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, search_space=space))
    hypermodel = tuning.SegmentationHyperModel(config, (32, 32, 1), tuning.search_folds(config))
    hp = kt.HyperParameters()
    hp.values.update({"architecture": "residual_unet", "rotation_degrees": 15.0, "zoom": 0.1, "intensity": 0.2,
                      "flip_vertical": True, "loss": "dice", "learning_rate": 0.002})
    settings = hypermodel._settings(hp)
    assert settings.model.architecture == "residual_unet" and settings.model.depth == 2
    assert settings.augmentation.rotation_degrees == 15.0 and settings.augmentation.zoom == 0.1
    assert settings.augmentation.intensity == 0.2 and settings.augmentation.flip_vertical is True
    assert settings.loss == "dice" and settings.learning_rate == 0.002 and settings.optimizer == "adam"
    assert isinstance(hp._hps["flip_vertical"][0], kt.engine.hyperparameters.Boolean)


@pytest.mark.parametrize("architecture", ["unet", "attention_unet", "residual_unet", "mobilenetv2_unet",
                                          "deeplabv3plus"])
def test_every_architecture_can_be_searched(tiny_ct_dataset, preloaded, tmp_path, architecture):
    space = {**TINY_SPACE, "architecture": ["unet", "attention_unet", "residual_unet", "mobilenetv2_unet",
                                            "deeplabv3plus"]}
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, search_space=space))
    hypermodel = tuning.SegmentationHyperModel(config, (32, 32, 1), tuning.search_folds(config))
    hp = kt.HyperParameters()
    hp.values["architecture"] = architecture
    model = hypermodel.build(hp)
    assert model.output_shape == (None, 32, 32, 2)


def test_an_unbuildable_combination_fails_its_trial_only(tiny_ct_dataset, preloaded, tmp_path):
    space = {**TINY_SPACE, "architecture": ["mobilenetv2_unet"], "depth": 6}
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, search_space=space))
    hypermodel = tuning.SegmentationHyperModel(config, (32, 32, 1), tuning.search_folds(config))
    with pytest.raises(kt.errors.FailedTrialError, match="mobilenetv2_unet"):
        hypermodel.build(kt.HyperParameters())


@pytest.mark.parametrize("folds", [2, 3])
def test_folds_partition_the_training_split_by_volume(tiny_ct_dataset, preloaded, tmp_path, folds):
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, folds=folds))
    slices = read_manifest(config.preloaded_dir).train.samples
    parts = tuning.search_folds(config)
    assert len(parts) == folds
    validations = np.concatenate([validation for _, validation in parts])
    assert sorted(validations) == list(range(len(slices)))  # Every slice validates exactly once.
    for train, validation in parts:
        assert sorted(np.concatenate([train, validation])) == list(range(len(slices)))
        assert not {slices[i].case for i in train} & {slices[i].case for i in validation}
    assert tuning.search_folds(config)[0][1].tolist() == parts[0][1].tolist()  # Same seed, same folds.


def test_more_folds_than_volumes_is_a_config_error(tiny_ct_dataset, preloaded, tmp_path):
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, folds=50))
    with pytest.raises(ConfigError, match="tune.folds=50"):
        tuning.search_folds(config)


def test_ct_window_dataset_windows_the_raw_intensities(preloaded):
    train = load_training_samples(preloaded / "tiny_ct")
    window = (-100.0, 150.0)
    batches = list(tuning.windowed_dataset(train, window, 2, batch_size=4))
    images = np.concatenate([image for image, _ in batches])[..., 0]
    masks = np.concatenate([mask for _, mask in batches])
    expected = (np.clip(train.hu_images, *window) - window[0]) / (window[1] - window[0])
    np.testing.assert_allclose(images, expected, atol=1e-6)
    np.testing.assert_array_equal(masks.argmax(-1), train.masks)
    # Preload's own window reproduces preload's images except near edges that straddle the window: preload
    # clips before resizing (64 -> 32 here), the search after.
    preload_window = np.concatenate([i for i, _ in tuning.windowed_dataset(train, PRELOAD_WINDOW, 2, 4)])
    assert np.median(np.abs(preload_window - train.images)) < 1e-6
    assert np.corrcoef(preload_window.ravel(), train.images.ravel())[0, 1] > 0.9


# ----------------------------------------------------------------------------------------------------
# Searches (tiny models, one epoch)
# ----------------------------------------------------------------------------------------------------
def test_cross_validated_search_reports_the_mean_of_its_folds(tiny_ct_dataset, preloaded, tmp_path):
    # The search below cannot read the test cases: they are not in the training shards.
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=1, folds=2))
    result = tuning.run_search(config)

    out = tune_dir(tmp_path)
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 1 and trials.status[0] == "COMPLETED"
    folds = trials[[f"{OBJECTIVE}_fold0", f"{OBJECTIVE}_fold1"]].iloc[0]
    assert trials[OBJECTIVE][0] == pytest.approx(folds.mean())
    assert result.best_score == pytest.approx(folds.mean()) and "2-fold" in str(result)
    split = json.loads((out / "validation_split.json").read_text())
    train_ids = {s.id for s in read_manifest(preloaded / "tiny_ct").train.samples}
    assert len(split["folds"]) == 2
    assert set(split["folds"][0]["validation"]) | set(split["folds"][1]["validation"]) == train_ids
    assert json.loads((out / "best_hyperparameters.json").read_text())["folds"] == 2
    assert {"fold0_execution0", "fold1_execution0"} <= hparams_runs(out / "tensorboard" / "0")
    trial_dir = out / "keras_tuner" / "trial_0"
    assert (trial_dir / "checkpoint.weights.h5").is_file() and (trial_dir / "checkpoint_fold1.weights.h5").is_file()


def test_interrupted_search_resumes_and_overwrite_starts_afresh(tiny_ct_dataset, preloaded, tmp_path, capsys):
    tuning.run_search(build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=1)))
    first = pd.read_csv(tune_dir(tmp_path) / "trials.csv")
    capsys.readouterr()

    tuning.run_search(build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=2)))
    output = capsys.readouterr().out
    assert "Reloading Tuner from" in output and "1 trials finished earlier" in output
    assert output.count("Running Trial #") == 1  # Only the new trial ran.
    resumed = pd.read_csv(tune_dir(tmp_path) / "trials.csv")
    assert len(resumed) == 2
    pd.testing.assert_frame_equal(resumed.iloc[:1], first)  # Trial 0 kept its values, score and time.

    tuning.run_search(build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=1)),
                      overwrite=True)
    output = capsys.readouterr().out
    assert "Reloading" not in output and output.count("Running Trial #") == 1
    assert len(pd.read_csv(tune_dir(tmp_path) / "trials.csv")) == 1


@pytest.mark.parametrize("tuner", ["hyperband", "random", "bayesian"])
def test_each_tuner_writes_trials_best_figure_and_hparams_logs(tiny_ct_dataset, preloaded, tmp_path, tuner):
    # Hyperband needs max_epochs >= 2: with 1 its only bracket holds a single trial.
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, tuner=tuner, max_trials=2,
                                        max_epochs=2 if tuner == "hyperband" else 1))
    result = tuning.run_search(config)

    out = tune_dir(tmp_path)
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and result.num_trials == 2
    assert {"trial_id", "learning_rate", "loss", OBJECTIVE, "epochs", "seconds"} <= set(trials)
    assert trials[OBJECTIVE].between(0, 1).all() and (trials.seconds > 0).all() and (trials.epochs >= 1).all()
    best = json.loads((out / "best_hyperparameters.json").read_text())
    assert best["score"] == pytest.approx(trials[OBJECTIVE].max())
    assert set(best["values"]) == {"architecture", "depth", "base_filters", "learning_rate", "loss"}
    assert (out / "objective_vs_hyperparameters.png").stat().st_size > 1000
    for trial_id in trials.trial_id:
        assert "execution0" in hparams_runs(out / "tensorboard" / trial_id)


def test_time_budget_ends_the_search_keeping_the_best_so_far(tiny_ct_dataset, preloaded, tmp_path):
    config = build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=50,
                                        time_budget_minutes=0.05))
    result = tuning.run_search(config)
    out = tune_dir(tmp_path)
    assert 1 <= len(pd.read_csv(out / "trials.csv")) <= 2 and result.num_trials <= 2
    assert json.loads((out / "best_hyperparameters.json").read_text())["score"] == pytest.approx(result.best_score)


def test_ct_window_search(tiny_ct_dataset, preloaded, tmp_path):
    space = {**TINY_SPACE, "ct_window": [[-200, 300], [-160, 240]]}
    result = tuning.run_search(build_config(search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=1,
                                                          search_space=space)))
    trials = pd.read_csv(tune_dir(tmp_path) / "trials.csv")
    assert trials.ct_window[0] in ("-200,300", "-160,240")
    assert "preload.normalization.window" in str(result)  # The user is told the train stage will not apply it.


# ----------------------------------------------------------------------------------------------------
# Distributed search: a chief and two workers on this machine
# ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_distributed_search_with_a_chief_and_two_workers(tiny_ct_dataset, preloaded, tmp_path):
    config_path = write_config(tmp_path, search_config(tiny_ct_dataset, preloaded, tmp_path, max_trials=3))
    port = str(_free_port())
    command = [sys.executable, "-c", "import sys; from segmenter.cli import segmenter_main; "
               "sys.exit(segmenter_main(sys.argv[1:]))", "tune", "--config", str(config_path)]
    processes = {}
    for tuner_id in ("chief", "worker0", "worker1"):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "KERASTUNER_TUNER_ID": tuner_id,
               "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port}
        log = open(tmp_path / f"{tuner_id}.log", "w")
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes[tuner_id] = (process, log)
    deadline, timed_out = time.monotonic() + 300, False
    try:
        for process, _ in processes.values():
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for process, log in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    logs = {tuner_id: (tmp_path / f"{tuner_id}.log").read_text() for tuner_id in processes}
    assert not timed_out, "the search did not end in 300 s:\n" + "\n".join(
        f"--- {tuner_id}\n{log[-2000:]}" for tuner_id, log in logs.items())
    for tuner_id, (process, _) in processes.items():
        assert process.returncode == 0, f"{tuner_id} failed:\n{logs[tuner_id][-3000:]}"

    # Every trial ran exactly once, on one of the workers; the chief ran none and wrote the summaries.
    ran = []
    for worker in ("worker0", "worker1"):
        match = re.search(rf"Worker {worker} ran trials (.*?); the chief writes", logs[worker])
        assert match, logs[worker][-3000:]
        ran += [] if match.group(1) == "(none)" else match.group(1).split(", ")
    assert sorted(ran) == ["0", "1", "2"]
    assert "Searched 3 trials" in logs["chief"] and "val_loss" not in logs["chief"]
    out = tune_dir(tmp_path)
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    assert sorted(trials.trial_id) == ["0", "1", "2"] and (trials.status == "COMPLETED").all()
    assert trials.seconds.notna().all()  # Reported by the workers through the oracle.
    assert (out / "best_hyperparameters.json").is_file() and (out / "objective_vs_hyperparameters.png").is_file()
