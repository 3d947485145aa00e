"""A checkpoint is one unit: training killed in the middle of an epoch and again while it saves a checkpoint,
then resumed, ends exactly where an uninterrupted run ends. Also the checkpoint callback's folders, mixed
precision and the time-left line after each epoch."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from segmenter import layout
from segmenter.config import TrainConfig, build_config, load_config
from segmenter.preload import preload
from segmenter.training import (AtomicCheckpoint, TimeBudget, TimeLeft, _format_duration, build_compiled_model,
                                configure_precision, fit_verbosity, read_checkpoint_state, repair_best_checkpoint,
                                train_final_model)
from tests.conftest import REPO_ROOT, tiny_ct_config, write_config

EPOCHS = 5
TRAIN = {"epochs": EPOCHS, "batch_size": 4, "lr_schedule": "poly", "warmup_epochs": 1, "learning_rate": 0.01,
         "validation_fraction": 0.3, "model": {"depth": 2, "base_filters": 2, "dropout": 0.2},
         "augmentation": {"flip_vertical": True, "rotation_degrees": 10.0}}

# `segmenter train` in a fresh process, as run_cli runs it, with one of two test hooks put in from outside
# (nothing in the package knows about them):
#   batch: after each training batch, write "<epoch> <batch>" (from 0) to TEST_MARKER and wait 0.3 s, so that
#          the test can kill the process in the middle of an epoch;
#   save:  inside the first checkpoints/last/ folder this process saves, once every file is written to the
#          temporary folder but before it is swapped in, write the folder's path to TEST_MARKER and hang.
DRIVER = textwrap.dedent("""
    import contextlib, os, sys, time
    from pathlib import Path
    from segmenter import training

    marker, hook = Path(os.environ["TEST_MARKER"]), os.environ["TEST_HOOK"]
    if hook == "batch":
        after_batch = training.DivergenceGuard.on_batch_end

        def on_batch_end(self, batch, logs=None):
            after_batch(self, batch, logs)
            marker.write_text(f"{self.epoch} {batch}")
            time.sleep(0.3)

        training.DivergenceGuard.on_batch_end = on_batch_end
    else:
        swap_in = training.atomic_directory

        @contextlib.contextmanager
        def hanging_before_the_swap(final_dir):
            with swap_in(final_dir) as tmp:
                yield tmp
                if Path(final_dir).name == "last":
                    marker.write_text(str(tmp))
                    time.sleep(600)

        training.atomic_directory = hanging_before_the_swap
    from segmenter.cli import segmenter_main
    sys.exit(segmenter_main(sys.argv[1:]))
""")


def _env(**extra) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **extra}


def _train(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from segmenter.cli import segmenter_main; "
               "sys.exit(segmenter_main(sys.argv[1:]))", "train", "--config", str(config_path), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _train_and_kill(config_path: Path, hook: str, ready, tmp_path: Path, *args: str) -> str:
    """Run `segmenter train` with ``hook``, SIGKILL it once ``ready(marker text)``; returns that text."""
    marker, log = tmp_path / f"{hook}.marker", tmp_path / f"{hook}.log"
    marker.unlink(missing_ok=True)
    command = [sys.executable, "-c", DRIVER, "train", "--config", str(config_path), *args]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(TEST_MARKER=str(marker), TEST_HOOK=hook),
                                   stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                text = marker.read_text() if marker.is_file() else ""
                if text and ready(text):
                    break
                assert process.poll() is None, f"training ended before the kill:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no kill point reached:\n{log.read_text()}"
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return text


def _weights(path: Path) -> list:
    return keras.models.load_model(path).get_weights()


def _iterations(path: Path) -> int:
    return int(keras.ops.convert_to_numpy(keras.models.load_model(path).optimizer.iterations))


def test_killed_mid_epoch_and_mid_save_then_resumed_ends_as_an_uninterrupted_run(tiny_ct_dataset, tmp_path, capsys):
    def config_file(name: str) -> Path:
        config = tiny_ct_config(tiny_ct_dataset, tmp_path, train=TRAIN, seed=11)
        config["paths"]["experiments_root"] = str(tmp_path / name)  # one preloaded dataset for both runs
        return write_config(tmp_path / name, config)

    reference_config, interrupted_config = config_file("reference"), config_file("interrupted")
    preload(build_config(tiny_ct_config(tiny_ct_dataset, tmp_path, train=TRAIN, seed=11)), log=lambda *_: None)
    reference, interrupted = (tmp_path / name / "tiny_ct" / "train" for name in ("reference", "interrupted"))

    # The uninterrupted run, in this process (one TensorFlow start-up fewer).
    capsys.readouterr()
    train_final_model(load_config(reference_config))
    stdout = capsys.readouterr().out
    # Not a terminal: one line per epoch and no progress bar; after each epoch the time left.
    time_left = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(time_left) == EPOCHS, stdout
    for number, line in enumerate(time_left[:-1], start=1):
        assert re.fullmatch(rf"epoch {number}/{EPOCHS}: [0-9].* per epoch, about [0-9].* left \(of the epochs\)",
                            line), line
    assert re.fullmatch(rf"epoch {EPOCHS}/{EPOCHS}: [0-9][0-9a-z ]* per epoch", time_left[-1]), time_left[-1]
    assert "\b" not in stdout and "\r" not in stdout

    # (a) Killed in the middle of the third epoch (from 0: epoch 2, after its first batch).
    _train_and_kill(interrupted_config, "batch", lambda text: text == "2 0", tmp_path)
    last = layout.last_checkpoint_dir(interrupted)
    assert read_checkpoint_state(last)["epoch"] == 2
    assert _iterations(layout.last_checkpoint_path(interrupted)) == 2 * _iterations(
        layout.last_checkpoint_path(reference)) // EPOCHS

    # (b) Resumed, and killed while it saves the checkpoint of epoch 3: the temporary folder is complete, the
    # swap has not happened, and last/ is still epoch 2's model, optimizer and state together.
    tmp_dir = Path(_train_and_kill(interrupted_config, "save", bool, tmp_path, "--resume"))
    assert tmp_dir.parent == last.parent and tmp_dir.name.startswith(".last.") and tmp_dir.is_dir()
    assert json.loads((tmp_dir / "state.json").read_text())["epoch"] == 3
    state = read_checkpoint_state(last)
    assert state["epoch"] == 2 and (state["random"]["seed"], state["random"]["next_epoch"]) == (11, 2)
    assert state["random"]["layers"]  # the Dropout layers' generators, which Keras does not save
    assert sorted(p.name for p in last.iterdir()) == ["model.keras", "settings.json", "state.json"]
    assert pd.read_csv(interrupted / "history.csv").epoch.tolist() == [0, 1, 2]  # the row before the checkpoint

    resumed = _train(interrupted_config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from epoch 2" in resumed.stdout
    assert not tmp_dir.exists()  # the killed process's temporary folder is cleaned up

    # The epoch counter, learning rates, optimizer step count and (the CPU run is deterministic) the weights
    # and losses equal the uninterrupted run's.
    expected, actual = pd.read_csv(reference / "history.csv"), pd.read_csv(interrupted / "history.csv")
    assert actual.epoch.tolist() == expected.epoch.tolist() == list(range(EPOCHS))
    assert actual.learning_rate.tolist() == expected.learning_rate.tolist()
    pd.testing.assert_frame_equal(actual, expected)
    for which in (layout.LAST_CHECKPOINT_DIR, layout.BEST_CHECKPOINT_DIR):
        ours, theirs = (read_checkpoint_state(train / "checkpoints" / which) for train in (interrupted, reference))
        assert ours["epoch"] == theirs["epoch"] and ours["best"] == theirs["best"]
        assert ours["next_learning_rate"] == theirs["next_learning_rate"]
        assert ours["random"] == theirs["random"]  # the Dropout streams continued where they stopped
    assert read_checkpoint_state(last)["epoch"] == EPOCHS
    assert _iterations(layout.last_checkpoint_path(interrupted)) == _iterations(layout.last_checkpoint_path(reference))
    assert _iterations(layout.last_checkpoint_path(reference)) % EPOCHS == 0
    for model in (layout.last_checkpoint_path, layout.model_path):
        assert all(np.array_equal(a, b) for a, b in zip(_weights(model(interrupted)), _weights(model(reference))))


def test_checkpoint_folders_best_early_stopping_and_repair(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    callback = AtomicCheckpoint(tmp_path, TimeBudget(None), settings={"seed": 1}, monitor="val_dice", mode="max",
                                patience=2, seed=1, learning_rate_of=lambda epoch: 0.1 * epoch)
    model.stop_training = False
    callback.set_model(model)
    for epoch, dice in enumerate([0.5, 0.6, 0.55]):
        callback.on_epoch_end(epoch, {"loss": 1.0, "val_dice": dice})
    assert callback.best["epoch"] == 2 and not model.stop_training
    callback.on_epoch_end(3, {"loss": float("nan"), "val_dice": 0.9})  # never saved, never the best
    last, best = tmp_path / "last", tmp_path / "best"
    state = read_checkpoint_state(last)
    assert state["epoch"] == 3 and state["next_learning_rate"] == pytest.approx(0.3)
    assert state["random"] == {"seed": 1, "next_epoch": 3, "layers": {}} and state["best"]["epoch"] == 2
    assert read_checkpoint_state(best)["epoch"] == 2
    callback.on_epoch_end(4, {"loss": 1.0, "val_dice": 0.58})
    assert model.stop_training and callback.stopped_early
    assert {p.name for p in tmp_path.iterdir()} == {"last", "best"}  # no temporary folder left
    for folder in (last, best):
        assert {p.name for p in folder.iterdir()} == {"model.keras", "state.json", "settings.json"}
        assert json.loads((folder / "settings.json").read_text()) == {"seed": 1}
        keras.models.load_model(folder / "model.keras", compile=False)

    # A kill after an improving epoch's last/ but before its best/: the resume copies last/ to best/.
    earlier_best = tmp_path.parent / f"{tmp_path.name}_earlier_best"
    shutil.copytree(best, earlier_best)
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)  # the weights of a later epoch
    callback.best = {"monitor": "val_dice", "value": None, "epoch": 0}
    callback.on_epoch_end(5, {"loss": 1.0, "val_dice": 0.7})  # improves: last/ and best/ are epoch 6
    shutil.rmtree(best)
    shutil.copytree(earlier_best, best)  # best/ as it was before epoch 6
    assert read_checkpoint_state(best)["epoch"] == 2
    repair_best_checkpoint(tmp_path)
    assert read_checkpoint_state(best)["epoch"] == 6
    assert (best / "model.keras").read_bytes() == (last / "model.keras").read_bytes()
    assert (best / "model.keras").read_bytes() != (earlier_best / "model.keras").read_bytes()
    before = (best / "state.json").stat().st_mtime_ns
    repair_best_checkpoint(tmp_path)  # consistent: nothing to do
    assert (best / "state.json").stat().st_mtime_ns == before


@pytest.fixture
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_default_and_float32_normalisation(tiny_ct_dataset, tmp_path, float32_afterwards):
    import tensorflow as tf

    assert TrainConfig().mixed_precision is None
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert configure_precision(TrainConfig()) == ("mixed_float16" if has_gpu else "float32")
    assert configure_precision(TrainConfig(mixed_precision=False)) == "float32"

    for normalization in ("group", "instance", "batch"):
        train = TrainConfig(mixed_precision=True, model={"depth": 2, "base_filters": 4,
                                                         "normalization": normalization})
        model = build_compiled_model(train, (32, 32, 1), ["background", "muscle"])
        norms = [layer for layer in model.layers if layer.name.endswith("_norm")]
        assert norms and all(layer.dtype_policy.name == "float32" for layer in norms)
        assert model.get_layer("logits").compute_dtype == "float16" and model.output.dtype == "float32"
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    config = build_config(tiny_ct_config(tiny_ct_dataset, tmp_path, train={
        "epochs": 1, "mixed_precision": True, "model": {"depth": 2, "base_filters": 4}}))
    preload(config, log=lambda *_: None)
    result = train_final_model(config)
    assert np.isfinite(result.final_metrics["loss"])
    state = read_checkpoint_state(layout.last_checkpoint_dir(config.stage_dir("train")))
    assert state["dtype_policy"] == "mixed_float16"  # what a resume loads the checkpoint under
    keras.mixed_precision.set_global_policy("float32")  # for inference it loads anywhere
    model = keras.models.load_model(result.model_path, compile=False)
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert {policies[name] for name in policies if name.endswith("_norm")} == {"float32"}
    assert {policies[name] for name in policies if name.endswith("_conv")} == {"mixed_float16"}
    assert np.isfinite(model.predict(np.zeros((1, 32, 32, 1), np.float32), verbose=0)).all()


def test_time_left_line_and_verbosity():
    assert [_format_duration(s) for s in (0.4, 45, 160, 3725)] == ["0 s", "45 s", "2 min 40 s", "1 h 02 min"]

    class Budget(TimeBudget):
        def elapsed_s(self):
            return 50.0

    lines = []
    callback = TimeLeft(12, Budget(1.0), print_fn=lines.append)  # 10 s of the 60 s budget left
    callback.on_train_begin()
    callback.started -= 3 * 160  # three epochs of 160 s
    callback.done = 2
    callback.on_epoch_end(2)
    assert lines == ["epoch 3/12: 2 min 40 s per epoch, about 10 s left (of the time budget)"]
    callback.time_budget = None
    callback.started -= 160
    callback.on_epoch_end(3)
    assert lines[-1] == "epoch 4/12: 2 min 40 s per epoch, about 21 min 20 s left (of the epochs)"

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert fit_verbosity(Stream(True)) == 1 and fit_verbosity(Stream(False)) == 2 and fit_verbosity(object()) == 2
