"""The train stage in-process: settings resolution, time budget, pretrained-encoder warm-up, resume state."""
from __future__ import annotations

import json
from pathlib import Path

import keras
import pandas as pd
import pytest

from segmenter.artifacts import write_json_atomic
from segmenter.config import TrainConfig, build_config
from segmenter.preload import preload
from segmenter.training import apply_hyperparameters, resolve_train_settings, train_final_model
from tests.conftest import tiny_ct_config


@pytest.fixture(scope="module")
def preloaded_config(tiny_ct_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    config = build_config(tiny_ct_config(tiny_ct_dataset, work))
    preload(config, log=lambda *_: None)
    return config


def test_hyperparameters_go_to_their_sections():
    train = apply_hyperparameters(TrainConfig(), {"depth": 3, "learning_rate": 0.01, "flip_vertical": True,
                                                  "tuner/epochs": 4, "loss": "dice"})
    assert (train.model.depth, train.learning_rate, train.augmentation.flip_vertical, train.loss) == (
        3, 0.01, True, "dice")


def test_tuned_values_are_used_unless_switched_off(preloaded_config):
    path = preloaded_config.stage_dir("tune") / "best_hyperparameters.json"
    write_json_atomic({"values": {"base_filters": 6}}, path)
    try:
        settings, source = resolve_train_settings(preloaded_config)
        assert settings.model.base_filters == 6 and source.startswith("tuned")
        config = preloaded_config.model_copy(deep=True)
        config.train.use_tuned_hyperparameters = False
        settings, source = resolve_train_settings(config)
        assert settings.model.base_filters == 4 and source.startswith("config")
    finally:
        path.unlink()


def test_time_budget_stops_training_and_keeps_the_model(preloaded_config):
    config = preloaded_config.model_copy(deep=True)
    config.train.epochs = 10_000
    config.train.time_budget_minutes = 0.1
    result = train_final_model(config)
    assert 1 <= result.epochs < 10_000
    assert result.model_path.is_file()
    state = json.loads((config.stage_dir("train") / "checkpoints" / "last" / "state.json").read_text())
    assert state["epoch"] == result.epochs


def test_frozen_pretrained_encoder_is_unfrozen_after_warm_up(preloaded_config):
    config = preloaded_config.model_copy(deep=True)
    config.train.epochs = 2
    config.train.model.architecture = "mobilenetv2_unet"
    config.train.model.depth = 2
    config.train.model.freeze_encoder_epochs = 1
    result = train_final_model(config)
    model = keras.models.load_model(result.model_path)
    assert model.get_layer("encoder").trainable
    assert len(pd.read_csv(config.stage_dir("train") / "history.csv")) == 2


def test_a_failed_final_save_keeps_the_earlier_model_with_its_own_files(preloaded_config, monkeypatch):
    """model.keras, preprocessing.json, hyperparameters.json and config.resolved.json are one unit (train/model/):
    a failure while the new ones are written leaves every file of the earlier run as it was."""
    from segmenter import layout

    config = preloaded_config.model_copy(deep=True)
    config.train.epochs = 1
    first = train_final_model(config)
    bundle = layout.model_dir(config.stage_dir("train"))
    before = {path.name: path.read_bytes() for path in bundle.iterdir()}
    assert set(before) == {"model.keras", "preprocessing.json", "hyperparameters.json", "config.resolved.json"}

    original_save = keras.Model.save

    def fails_on_the_final_model(model, path, *args, **kwargs):
        # The final model is saved in train/model/'s temporary folder; checkpoints in checkpoints/.last.*.tmp/
        if path.name == layout.MODEL and Path(path).parent.name.startswith(f".{layout.MODEL_DIR}."):
            raise OSError("disk gone")
        return original_save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", fails_on_the_final_model)
    config.train.learning_rate = 0.02  # another run's settings, which must not end up beside the old model
    with pytest.raises(OSError, match="disk gone"):
        train_final_model(config)
    assert {path.name: path.read_bytes() for path in bundle.iterdir()} == before
    assert first.model_path == layout.model_path(config.stage_dir("train"))
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".model.")]  # no temporary folder left
