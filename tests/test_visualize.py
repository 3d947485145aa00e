"""predict --visualize train|test, previews of predict --input, and the train summary on --resume."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from segmenter import io
from tests.conftest import run_cli, tiny_ct_config, write_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def trained(tiny_ct_dataset, tmp_path_factory):
    """The tiny CT set preloaded and trained for one epoch with a tiny model, through the CLI."""
    work = tmp_path_factory.mktemp("visualize")
    config = write_config(work, tiny_ct_config(tiny_ct_dataset, work, train={"epochs": 1}))
    for stage in ("preload", "train"):
        result = run_cli(stage, "--config", str(config))
        assert result.returncode == 0, f"{stage}:\n{result.stdout}\n{result.stderr}"
    return work, config


def test_visualize_train_with_a_checkpoint_and_test_with_the_model(trained):
    work, config = trained
    predict_dir = work / "experiments" / "tiny_ct" / "predict"
    checkpoint = work / "experiments" / "tiny_ct" / "train" / "checkpoints" / "last" / "model.keras"
    result = run_cli("predict", "--config", str(config), "--visualize", "train", "--checkpoint", str(checkpoint),
                     "--count", "3")
    assert result.returncode == 0, result.stderr
    figure = predict_dir / "visualize_train.png"
    assert result.stdout.strip().splitlines()[-1] == str(figure)
    assert "Drew 3 of" in result.stdout and "training samples" in result.stdout
    width, height = png_size(figure)
    assert 700 <= width <= 1200 and 600 <= height <= 1400  # four panels a row, three rows

    result = run_cli("predict", "--config", str(config), "--visualize", "test")
    assert result.returncode == 0, result.stderr
    figure = predict_dir / "visualize_test.png"
    assert result.stdout.strip().splitlines()[-1] == str(figure)
    assert re.search(r"Drew (\d+) of \1 test cases \(all\)", result.stdout), result.stdout  # fewer than 8 here
    width, height = png_size(figure)
    assert 700 <= width <= 1200 and height >= 300
    assert not list(predict_dir.glob(".*")), "no temporary file may be left behind"


def test_a_checkpoint_drawn_in_bfloat16_gets_the_emulation_notice(trained, monkeypatch, capsys):
    from segmenter import visualize
    from segmenter.config import load_config
    from segmenter.manifest import read_manifest
    from segmenter.models import precision

    work, config_path = trained
    config = load_config(config_path, ["predict.precision=bfloat16"])
    checkpoint = work / "experiments" / "tiny_ct" / "train" / "checkpoints" / "last" / "model.keras"
    # As on a CPU without bfloat16 arithmetic (this machine has it).
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    model, _, path = visualize._load_model(config, read_manifest(config.preloaded_dir), checkpoint)
    assert path == checkpoint
    assert "is emulated and unlikely to be faster" in capsys.readouterr().out
    assert "bfloat16" in {layer.compute_dtype for layer in model.layers}


def test_predict_input_writes_a_preview_per_case_and_an_index(trained, tiny_ct_dataset):
    work, config = trained
    images = tiny_ct_dataset / "images"
    result = run_cli("predict", "--config", str(config), "--input", str(images))
    assert result.returncode == 0, result.stderr
    out = work / "experiments" / "tiny_ct" / "predict" / "images"
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert f"Previews: {out / 'preview' / 'index.html'}" in result.stdout
    cases = sorted(path.stem for path in images.glob("*.csv"))
    assert sorted(path.stem for path in out.glob("*.csv")) == cases  # the masks, as before
    assert sorted(path.stem for path in (out / "preview").glob("*.png")) == cases
    for case in cases:
        width, height = png_size(out / "preview" / f"{case}.png")
        assert 200 <= width <= 800 and 200 <= height <= 800
    index = (out / "preview" / "index.html").read_text()
    for case in cases:
        assert f'<img src="{case}.png"' in index and f'href="../{case}.csv"' in index
    assert "http" not in index and "<script" not in index  # plain, self-contained HTML


def test_a_missing_checkpoint_is_one_line(trained):
    work, config = trained
    missing = work / "experiments" / "tiny_ct" / "train" / "checkpoints" / "nothing.keras"
    result = run_cli("predict", "--config", str(config), "--visualize", "test", "--checkpoint", str(missing))
    assert result.returncode in (1, 3)
    assert result.stderr.strip().count("\n") == 0 and str(missing) in result.stderr


def test_visualize_options_are_checked(trained):
    _, config = trained
    result = run_cli("predict", "--config", str(config), "--count", "3")
    assert result.returncode == 2 and "--visualize" in result.stderr
    result = run_cli("predict", "--config", str(config), "--visualize", "test", "--input", "somewhere")
    assert result.returncode == 2


def test_a_volume_preview_shows_the_plane_with_most_foreground(tmp_path):
    from segmenter.visualize import PreviewWriter, plane_with_most_foreground

    labels = np.zeros((20, 24, 6), np.uint8)
    labels[4:10, 5:12, 1] = 1
    labels[2:18, 3:20, 4] = 2  # the most foreground: plane 4 along axis 2
    assert plane_with_most_foreground(labels, 2) == 4
    assert plane_with_most_foreground(np.zeros_like(labels), 2) == 3  # none at all: the middle
    writer = PreviewWriter(tmp_path / "preview", {"classes": ["background", "a", "b"], "slice_axis": 2,
                                                  "normalization": {"method": "zscore"}}, title="t")
    volume = io.LoadedImage(np.random.default_rng(0).normal(size=(20, 24, 6, 2)).astype(np.float32),
                            (1.0, 1.0, 3.0), np.eye(4), tmp_path / "v_0000.nii.gz")
    writer.add("v", volume, 2, labels, "v.nii.gz")
    writer.write_index()
    assert png_size(tmp_path / "preview" / "v.png")[0] > 200
    index = (tmp_path / "preview" / "index.html").read_text()
    assert "plane 5 of 6" in index and "a, b" in index and 'href="../v.nii.gz"' in index


def test_the_train_summary_counts_the_epochs_of_this_call():
    from segmenter.training import TrainResult

    def summary(epochs, first, planned=3):
        return str(TrainResult(Path("m.keras"), epochs, 4.0, 2.0, {"loss": 0.5}, "config", first_epoch=first,
                               planned_epochs=planned)).splitlines()[0]

    assert summary(3, 2).startswith("Trained 1 more epoch (epoch 3 of 3) in 4 s")
    assert summary(3, 1).startswith("Trained 2 more epochs (epochs 2-3 of 3)")
    assert summary(3, 0).startswith("Trained 3 epochs in")
    assert summary(2, 0).startswith("Trained 2 epochs of 3 in")  # stopped by the time budget
    assert summary(3, 3).startswith("Trained no more epochs (all 3 of 3 were done already)")
