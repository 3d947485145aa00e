"""train.distribution: MirroredStrategy over two logical CPU devices, and two MultiWorkerMirroredStrategy workers
on this machine (127.0.0.1), each a fresh `segmenter train` process as users run them, all on CPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from segmenter.config import build_config
from segmenter.preload import preload
from tests.conftest import REPO_ROOT, tiny_ct_config, write_config

#: Seconds one training process may take (each trains a tiny model for 3 epochs in a few seconds).
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def config_file(tiny_ct_dataset, tmp_path_factory) -> Path:
    """A config file of a tiny 3-epoch training, its dataset preloaded."""
    work = tmp_path_factory.mktemp("distributed")
    values = tiny_ct_config(tiny_ct_dataset, work, train={
        "epochs": 3, "batch_size": 4, "learning_rate": 0.005, "use_tuned_hyperparameters": False,
        "model": {"depth": 2, "base_filters": 4}})
    preload(build_config(values), log=lambda *_: None)
    return write_config(work, values)


def _env(**extra: str) -> dict:
    # CPU only, whatever the machine: the replicas are the logical CPU devices or the worker processes.
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "-1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")])),
            **extra}


def _train_command(config_file: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from segmenter.cli import segmenter_main; "
            "sys.exit(segmenter_main(sys.argv[1:]))", "train", "--config", str(config_file),
            *(arg for override in overrides for arg in ("--set", override))]


def _experiment_dir(config_file: Path) -> Path:
    return config_file.parent / "experiments" / "tiny_ct"


def _check_loss_falls_and_model_loads(train_dir: Path) -> "keras.Model":
    import keras

    import segmenter.losses  # noqa: F401  (registers the losses and metrics the saved model was compiled with)
    import segmenter.metrics  # noqa: F401

    history = pd.read_csv(train_dir / "history.csv")
    assert list(history.epoch) == [0, 1, 2]
    assert history.loss.iloc[0] > history.loss.iloc[-1]
    model = keras.models.load_model(train_dir / "model" / "model.keras")
    assert model.output_shape[-1] == 2
    return model


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_mirrored_on_two_logical_cpu_devices(config_file):
    experiment = _experiment_dir(config_file)
    # Batch norm, whose training step (FusedBatchNormalization) updates moving statistics in each replica.
    done = subprocess.run(_train_command(config_file, "train.distribution=mirrored", "train.model.normalization=batch"),
                          cwd=REPO_ROOT,
                          env=_env(SEGMENTER_CPU_DEVICES="2"), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Training on 2 replicas (one machine; train.distribution mirrored): global batch 4, 2 per replica" \
        in done.stdout
    model = _check_loss_falls_and_model_loads(experiment / "train")
    norms = [layer for layer in model.layers if type(layer).__name__ == "FusedBatchNormalization"]
    assert norms and all(abs(float(layer.moving_mean.numpy().mean())) > 0 for layer in norms)


def test_two_workers_train_together_and_only_the_chief_writes(config_file, tmp_path):
    experiment = _experiment_dir(config_file)
    if experiment.exists():  # the mirrored run's outputs: this run must write its own
        import shutil

        shutil.rmtree(experiment)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes, logs, scratch = [], [], []
    try:
        for index in range(2):
            # Each worker its own temporary folder, to see that the non-chief's scratch folder is removed.
            scratch.append(tmp_path / f"tmp_{index}")
            scratch[-1].mkdir()
            logs.append(open(tmp_path / f"worker_{index}.log", "w+"))
            env = _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                       TMPDIR=str(scratch[-1]))
            processes.append(subprocess.Popen(
                # A time budget that never ends training, so that its check agrees across the workers each epoch.
                _train_command(config_file, "train.distribution=multi_worker", "train.time_budget_minutes=60"),
                cwd=REPO_ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
        for process in processes:
            process.wait(timeout=TIMEOUT_S)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        for process, output in zip(processes, outputs):
            assert process.returncode == 0, output[-4000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        for log in logs:
            log.close()

    assert "Training on 2 replicas (2 workers, this one the chief; train.distribution multi_worker)" in outputs[0]
    assert "Training on 2 replicas (2 workers, this one writing to a temporary folder" in outputs[1]
    train_dir = experiment / "train"
    _check_loss_falls_and_model_loads(train_dir)
    # The chief's outputs alone: one run's files, no second lock, nothing of the worker's.
    assert sorted(path.name for path in experiment.iterdir()) == ["config.resolved.json", "train"]
    assert sorted(path.name for path in train_dir.iterdir()) == [
        "checkpoints", "history.csv", "model", "tensorboard", "training_curves.png"]
    assert json.loads((train_dir / "checkpoints" / "last" / "state.json").read_text())["epoch"] == 3
    assert not list(scratch[1].glob("segmenter-worker-*"))  # the worker's scratch experiment folder is gone
