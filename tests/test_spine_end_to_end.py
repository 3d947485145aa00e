"""The spine MRI use case end to end on the real dataset in ../shared, with configs/spine_mri.py.

Small settings (64 x 64, 2 epochs) keep it fast: this checks the mechanics and artifacts on real data;
the accuracy of the default run is measured by benchmarks/spine_default_run.py (see README).
"""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segmenter.manifest import read_manifest
from tests.conftest import REPO_ROOT, run_cli, shared_dataset

pytestmark = pytest.mark.slow


def test_spine_pipeline_through_the_command_line(tmp_path):
    shared_dataset("spine_mri_sagittal")
    config = str(REPO_ROOT / "configs" / "spine_mri.py")
    overrides = [f"paths.preloaded_root={tmp_path / 'pre'}", f"paths.experiments_root={tmp_path / 'exp'}",
                 "preload.image_size=[64, 64]", "train.epochs=2", "train.time_budget_minutes=None",
                 "train.model.depth=3", "tune.tuner=random", "tune.max_trials=2", "tune.max_epochs=1",
                 "tune.search_space={'depth': [3], 'base_filters': [4, 8]}"]
    sets = [item for override in overrides for item in ("--set", override)]
    for stage in ("preload", "tune", "train", "predict", "evaluate"):
        result = run_cli(stage, "--config", config, *sets)
        assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"

    test_ids = [case.id for case in read_manifest(tmp_path / "pre" / "spine_mri").test.cases]
    assert len(test_ids) == 3
    evaluate = tmp_path / "exp" / "spine_mri" / "evaluate"
    metrics = pd.read_csv(evaluate / "metrics.csv")
    assert len(metrics) == 3 * 2 and set(metrics["class"]) == {"disc", "vertebra"}
    assert metrics.dice.between(0, 1).all()
    summary = json.loads((evaluate / "summary.json").read_text())
    assert set(summary["classes"]) == {"disc", "vertebra"} and summary["n_images"] == 3
    for slice_id in test_ids:  # scored on the 256 x 256 source masks, not 64 x 64 copies
        # The prediction is in the source image's format: a PNG label map.
        mask = np.asarray(Image.open(tmp_path / "exp" / "spine_mri" / "predict" / "test" / f"{slice_id}.png"))
        assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1, 2}
        true_disc = np.load(shared_dataset("spine_mri_sagittal") / "masks" / f"{slice_id}.npy") == 1
        row = metrics[(metrics.image_id.astype(str) == slice_id) & (metrics["class"] == "disc")].iloc[0]
        assert row.area_true == true_disc.sum()
    assert len(pd.read_csv(tmp_path / "exp" / "spine_mri" / "tune" / "trials.csv")) == 2
