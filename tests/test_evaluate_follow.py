"""`segmenter evaluate --follow`: a separate process scores each new checkpoint of a training run.

- beside a running training it scores new epochs on the validation cases and ends by itself with the run,
  the last epoch scored;
- stopped and restarted, it keeps the epochs already scored and adds only new ones; best/ is the best epoch;
- without a validation part it stops with one line (exit status 2).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd

from tests.conftest import REPO_ROOT, run_cli, tiny_ct_config, write_config


def _popen(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "import sys; from segmenter.cli import segmenter_main; "
               "sys.exit(segmenter_main(sys.argv[1:]))", *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_follow_scores_new_checkpoints_until_training_ends_and_resumes(tiny_ct_dataset, tmp_path):
    config_path = write_config(tmp_path, tiny_ct_config(tiny_ct_dataset, tmp_path, train={
        "epochs": 3, "validation_fraction": 0.34}))
    assert run_cli("preload", "--config", str(config_path)).returncode == 0
    follow_dir = tmp_path / "experiments" / "tiny_ct" / "follow"

    training = _popen("train", "--config", str(config_path))
    deadline = time.monotonic() + 300
    state = tmp_path / "experiments" / "tiny_ct" / "train" / "checkpoints" / "last" / "state.json"
    while not state.is_file() and training.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # follow once there is something to follow, while training still runs
    follower = _popen("evaluate", "--follow", "--interval", "0.5", "--config", str(config_path))
    assert training.wait(timeout=600) == 0, training.communicate()[1]
    out, err = follower.communicate(timeout=600)
    assert follower.returncode == 0, err
    scores = pd.read_csv(follow_dir / "scores.csv")
    assert 3 in set(scores.epoch) and scores.epoch.is_monotonic_increasing
    assert scores["mean_foreground_dice"].between(0, 1).all() and "dice_muscle" in scores
    best = json.loads((follow_dir / "best" / "score.json").read_text())
    assert best["mean_foreground_dice"] == scores["mean_foreground_dice"].max()
    assert (follow_dir / "best" / "model.keras").is_file()

    # Restarted after two more epochs: the epochs scored before stay, the new last one is added.
    assert run_cli("train", "--resume", "--set", "train.epochs=5", "--config", str(config_path)).returncode == 0
    result = run_cli("evaluate", "--follow", "--once", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    rescored = pd.read_csv(follow_dir / "scores.csv")
    assert set(rescored.epoch) == set(scores.epoch) | {5}
    pd.testing.assert_frame_equal(rescored[rescored.epoch.isin(scores.epoch)].reset_index(drop=True), scores)


def test_follow_needs_a_validation_part(tiny_ct_dataset, tmp_path):
    config_path = write_config(tmp_path, tiny_ct_config(tiny_ct_dataset, tmp_path))
    assert run_cli("preload", "--config", str(config_path)).returncode == 0
    result = run_cli("evaluate", "--follow", "--once", "--config", str(config_path))
    assert result.returncode == 2 and "train.validation_fraction" in result.stderr
