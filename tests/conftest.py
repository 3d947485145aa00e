"""Shared fixtures: tiny generated datasets, config files in tmp_path, running stages as users do."""
from __future__ import annotations

import os
import pprint
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """A dataset from ../shared/datasets; a missing one fails the test (CI has them), never skips it."""
    path = SHARED_DATASETS / name
    assert path.is_dir(), f"{path} is missing: ../shared/datasets must sit beside the checkout"
    return path


def write_config(folder: Path, config: dict, name: str = "config.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("CONFIG = " + pprint.pformat(config, sort_dicts=False) + "\n")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``segmenter <args>`` through ``python -m`` in a fresh process, as a user would."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "import sys; from segmenter.cli import segmenter_main; "
               "sys.exit(segmenter_main(sys.argv[1:]))", *args]
    return subprocess.run(command, cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_stage_module(stage: str, *args: str, cwd: Path | None = None, timeout: int = 600):
    """Run ``python -m stages.<stage> <args>`` in a fresh process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd or REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_ct_dataset(tmp_path_factory) -> Path:
    """12 synthetic 64 x 64 L3 CT slices with muscle masks, in the CSV layout (images/, masks/)."""
    from segmenter.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "tiny_ct", num_slices=12, size=64, seed=3)


def tiny_ct_config(data_dir: Path, work_dir: Path, **sections) -> dict:
    """A small but complete config for the tiny CT set, outputs under ``work_dir``."""
    config = {
        "experiment": "tiny_ct",
        "classes": ["background", "muscle"],
        "paths": {"preloaded_root": str(work_dir / "preloaded"), "experiments_root": str(work_dir / "experiments")},
        "preload": {"input_dir": str(data_dir), "normalization": {"method": "ct_window", "window": [-250, 250]},
                    "image_size": [32, 32], "workers": 1},
        "tune": {"tuner": "random", "max_trials": 2, "max_epochs": 1, "time_budget_minutes": 5.0},
        "train": {"epochs": 2, "batch_size": 4, "model": {"depth": 2, "base_filters": 4}},
        "evaluate": {"bootstrap_samples": 50, "display_window": [-200, 200]},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config
