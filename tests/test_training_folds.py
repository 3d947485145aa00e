"""k-fold cross-validation of the final configuration: `segmenter train --fold`, folds.json, fold ensembles.

- `train --fold all` trains each fold into train/fold_<k>/, validating on that fold's patients (no patient in
  two folds), and summarises the folds in train/folds.json;
- predict ensembles the fold models (the mean of their probabilities) and records them; evaluate refuses
  predictions whose fold models changed since;
- --fold outside 0..folds-1 is one line and exit status 2.
"""
from __future__ import annotations

import json

import numpy as np

from segmenter import layout
from segmenter.inference import ModelEnsemble, predict_probabilities
from segmenter.manifest import read_manifest
from tests.conftest import run_cli, tiny_ct_config, write_config


def test_folds_train_summarise_and_predict_as_an_ensemble(tiny_ct_dataset, tmp_path):
    config_path = write_config(tmp_path, tiny_ct_config(tiny_ct_dataset, tmp_path, train={"epochs": 1, "folds": 2}))
    for args in (("preload",), ("train", "--fold", "all"), ("predict",), ("evaluate",)):
        result = run_cli(*args, "--config", str(config_path))
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    assert "Folds trained: 2 of 2" in run_cli("train", "--fold", "1", "--config", str(config_path)).stdout

    train_dir = tmp_path / "experiments" / "tiny_ct" / "train"
    summary = json.loads((train_dir / layout.FOLDS_SUMMARY).read_text())
    assert summary["trained"] == ["0", "1"] or summary["trained"] == [0, 1]
    validation = [set(fold["validation_cases"]) for fold in summary["per_fold"].values()]
    training_cases = {case.id for case in read_manifest(tmp_path / "preloaded" / "tiny_ct").train.cases}
    assert not validation[0] & validation[1] and validation[0] | validation[1] == training_cases
    assert 0.0 <= summary["mean"]["mean_foreground_dice"] <= 1.0
    assert not layout.model_path(train_dir).exists()  # only the folds were trained

    record = json.loads((tmp_path / "experiments" / "tiny_ct" / "predict" / "test" / "predictions.json").read_text())
    assert record["model_files"] == [str(layout.model_path(train_dir / f"fold_{k}")) for k in (0, 1)]
    # A fold model trained again since: the predictions are stale for evaluate (exit status 3).
    with open(layout.model_path(train_dir / "fold_1"), "ab") as handle:
        handle.write(b"\0")
    result = run_cli("evaluate", "--config", str(config_path))
    assert result.returncode == 3 and "fold models" in result.stderr

    result = run_cli("train", "--fold", "2", "--config", str(config_path))
    assert result.returncode == 2 and "folds are 0 .. 1" in result.stderr


def test_an_ensemble_averages_the_probabilities_of_its_models():
    class Constant:
        input_shape, output_shape = (None, 4, 4, 1), (None, 4, 4, 2)

        def __init__(self, p):
            self.p = p

        def predict_on_batch(self, batch):
            return np.broadcast_to(np.array([1 - self.p, self.p], np.float32), (*batch.shape[:-1], 2))

    ensemble = ModelEnsemble([Constant(0.2), Constant(0.6), Constant(1.0)])
    batch = np.zeros((2, 4, 4, 1), np.float32)
    np.testing.assert_allclose(ensemble.predict_on_batch(batch)[..., 1], 0.6, rtol=1e-6)
    np.testing.assert_allclose(predict_probabilities(ensemble, batch, batch_size=1)[..., 0], 0.4, rtol=1e-6)
    assert ensemble.output_shape == (None, 4, 4, 2)
