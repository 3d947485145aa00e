"""The segmenter command: help, version, stage names, exit statuses, a quiet start, the device line, packaging."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from segmenter import cli
from segmenter.artifacts import save_resolved_config
from segmenter.config import ConfigError, build_config
from segmenter.errors import InputError
from tests.conftest import REPO_ROOT, run_cli, run_stage_module

DEVICE_LINE = re.compile(r"^Running on (CPU \(\d+ cores?\)|GPU: .+|\d+ GPUs: .+)$")

# What TensorFlow 2.21 wrote to stderr on every stage start before (CPU machine, TF_CPP_MIN_LOG_LEVEL=2 or 3).
TF_221_CHATTER = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796171006.160577    5795 port.cc:153] oneDNN custom operations are on. You may see slightly \
different numerical results due to floating-point round-off errors from different computation orders. To turn \
them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796171006.160832    5795 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will \
not be used.
I0000 00:00:1796171006.206258    5795 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use \
available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI FMA, in other operations, rebuild TensorFlow with \
the appropriate compiler flags.
W0000 00:00:1796171006.300000    5795 some_file.cc:12] a warning-level record
"""
TF_ERROR_RECORD = ("E0000 00:00:1796171449.191294   10246 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
                   "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")


def run_plain(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``segmenter <args>`` in a fresh process with the user's environment: no TF_CPP_MIN_LOG_LEVEL set."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-c", "import sys; from segmenter.cli import segmenter_main; "
               "sys.exit(segmenter_main(sys.argv[1:]))", *args]
    return subprocess.run(command, cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------
# segmenter --help, --version, unknown stages, prog of python -m stages.<stage>
# ----------------------------------------------------------------------------------------------------
def test_help_lists_the_five_stages_with_the_first_line_of_their_docstrings():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for stage in cli.STAGES:
        first_line = importlib.import_module(f"stages.{stage}").__doc__.strip().splitlines()[0]
        summary = first_line.split(":", 1)[1].strip()
        matching = [line for line in lines if line.split() and line.split()[0] == stage]
        assert len(matching) == 1, result.stdout
        assert matching[0].split(None, 1)[1] == summary
    # The exit statuses are listed too.
    for status in ("0", "1", "2", "3"):
        assert any(line.strip().startswith(f"{status} ") for line in lines), result.stdout


def test_unknown_stage_suggests_the_closest_with_exit_status_2():
    result = run_cli("trian")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown stage 'trian'; did you mean 'train'?"
    result = run_cli("xyz")
    assert result.returncode == 2 and "unknown stage 'xyz'" in result.stderr and "preload" in result.stderr
    # An option before the stage is a usage error too, and so is no stage at all.
    assert run_cli("--config", "x.py").returncode == 2
    assert run_cli().returncode == 2


def test_version_is_the_installed_package_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"segmenter {importlib.metadata.version('segmenter')}"
    # The installed version is the one pyproject.toml declares.
    declared = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert importlib.metadata.version("segmenter") == declared


@pytest.mark.parametrize("stage", cli.STAGES)
def test_module_help_shows_the_segmenter_command_as_prog(stage):
    result = run_stage_module(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: segmenter {stage} ")
    assert ".py" not in result.stdout.splitlines()[0]


# ----------------------------------------------------------------------------------------------------
# Exit statuses
# ----------------------------------------------------------------------------------------------------
def _raises(error: Exception):
    def body():
        raise error
    return body


@pytest.mark.parametrize("error, status", [
    (InputError("data/a.csv", "not a number in row 3"), 1),
    (ConfigError("train.model: no such weights file"), 2),
    (FileNotFoundError("preloaded_dataset/x: no preloaded dataset here; run the preload stage first"), 3),
])
def test_run_stage_maps_errors_to_documented_statuses(capsys, error, status):
    assert cli.run_stage(_raises(error)) == status
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"
    assert dict(cli.EXIT_STATUSES)[status]  # documented in segmenter --help


def test_bad_config_and_usage_are_status_2_with_every_problem_on_one_line(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  epoch: 5\n")
    result = run_cli("preload", "--config", str(config), "--set", "train.epochs=0", "--set", "seed=-1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 3 problems: "), result.stderr
    assert f"{config}: unknown setting train.epoch (did you mean train.epochs?)" in lines[0]
    assert "--set train.epochs: " in lines[0] and "--set seed: " in lines[0]
    assert run_cli("train", "--no-such-option").returncode == 2


def test_resume_run_dir_and_config_together_is_a_usage_error(tmp_path):
    result = run_cli("train", "--config", "config_template.py", "--resume", str(tmp_path))
    assert result.returncode == 2 and "--resume RUN_DIR" in result.stderr
    result = run_cli("train", "--resume", str(tmp_path / "missing"))
    assert result.returncode == 2 and "no such run folder" in result.stderr


def test_a_real_stage_starts_quietly_names_its_device_and_says_what_is_missing(tmp_path):
    """train --resume RUN_DIR: settings from the run folder alone; no preloaded dataset -> status 3;
    stderr holds that one line and none of TensorFlow's start-up notices; stdout names the device."""
    config = build_config({"experiment": "quiet", "paths": {"preloaded_root": str(tmp_path / "pre"),
                                                          "experiments_root": str(tmp_path / "exp")}})
    run_dir = tmp_path / "exp" / "quiet"
    save_resolved_config(config, run_dir)
    result = run_plain("train", "--resume", str(run_dir))
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # exactly one line
    assert result.stderr.startswith("error: ") and str(tmp_path / "pre" / "quiet") in result.stderr
    assert "preload" in result.stderr
    stdout = result.stdout.splitlines()
    assert stdout and DEVICE_LINE.match(stdout[0]), result.stdout
    assert sum(bool(DEVICE_LINE.match(line)) for line in stdout) == 1  # printed once


# ----------------------------------------------------------------------------------------------------
# TensorFlow's start-up chatter and the warning after a time-budget stop
# ----------------------------------------------------------------------------------------------------
def test_chatter_filter_drops_records_below_the_log_level_and_keeps_the_rest():
    other = "/x/keras/src/foo.py:12: UserWarning: something the user should see\n  warnings.warn(\n"
    text = TF_221_CHATTER + TF_ERROR_RECORD + other
    assert cli.filter_tensorflow_chatter(text, 3) == other
    assert cli.filter_tensorflow_chatter(text, 2) == TF_ERROR_RECORD + other
    assert cli.filter_tensorflow_chatter(text, 0) == text  # TF_CPP_MIN_LOG_LEVEL=0 shows everything
    # Lines that merely look alike are kept.
    assert cli.filter_tensorflow_chatter("I0000 is not a record\n", 3) == "I0000 is not a record\n"


def test_filtered_stderr_captures_what_native_code_writes_to_fd_2(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with cli.filtered_stderr():
        os.write(2, (TF_221_CHATTER + TF_ERROR_RECORD + "kept line\n").encode())
    assert capfd.readouterr().err == TF_ERROR_RECORD + "kept line\n"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with cli.filtered_stderr():
        os.write(2, TF_221_CHATTER.encode())
    assert capfd.readouterr().err == TF_221_CHATTER


def test_importing_tensorflow_the_stage_way_prints_nothing():
    code = ("from segmenter import cli; cli.quiet_tensorflow(); import keras, tensorflow as tf; "
            "tf.constant(1.0) + 1.0; print(cli.announce_device()); cli.announce_device()")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and DEVICE_LINE.match(lines[0])  # announced once


def test_keras_ran_out_of_data_warning_is_not_shown():
    from keras.src.trainers.epoch_iterator import EpochIterator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.silence_known_warnings()
        EpochIterator._interrupted_warning(None)  # what Keras says after a time-budget stop
        warnings.warn("a warning that stays", UserWarning)
    assert [str(warning.message) for warning in caught] == ["a warning that stays"]


def test_device_description_names_cpu_cores_or_gpus(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet_tensorflow sets it if unset; restored afterwards
    assert DEVICE_LINE.match(cli.describe_device())


# ----------------------------------------------------------------------------------------------------
# Config announcement, src/main.py, README, packaging
# ----------------------------------------------------------------------------------------------------
def test_project_config_py_is_announced_when_no_config_is_given(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.py").write_text("CONFIG = {'experiment': 'from_cwd'}\n")
    monkeypatch.chdir(tmp_path)
    config = cli.load_config_or_exit(argparse.Namespace(config=None, overrides=[]))
    assert config.experiment == "from_cwd"
    assert capsys.readouterr().err == "Using ./config.py (no --config given)\n"
    cli.load_config_or_exit(argparse.Namespace(config=tmp_path / "config.py", overrides=[]))
    assert capsys.readouterr().err == ""


def test_main_py_says_which_config_it_uses_in_the_readme_s_words():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "src" / "main.py")], cwd=REPO_ROOT.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sentence = result.stdout.strip()
    assert sentence == "src/main.py uses configs/demo_l3_ct.py; change CONFIG in src/main.py to use another config."
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert sentence in readme
    assert sentence in " ".join((REPO_ROOT / "src" / "main.py").read_text().split())


def _readme_section(title: str) -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def test_readme_shows_the_current_help_and_exit_statuses():
    section = _readme_section("Command line")
    block = section.split("```\n$ segmenter --help\n", 1)[1].split("```", 1)[0]
    assert block.rstrip("\n") == cli.main_help()
    for phrase in ("environment-gpu.yml", '".[gpu]"', "--resume experiments/<name>", ".yaml", ".json",
                   "Using ./config.py (no --config given)"):
        assert phrase in section


def test_gpu_install_path_matches_the_cpu_one():
    import yaml

    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'gpu = ["tensorflow[and-cuda]>=2.21,<2.22"]' in pyproject
    assert '"tensorflow>=2.21,<2.22"' in pyproject and '"pyyaml>=6"' in pyproject
    cpu = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    gpu = yaml.safe_load((REPO_ROOT / "environment-gpu.yml").read_text())
    assert gpu["channels"] == cpu["channels"]
    def plain(environment):
        return [entry for entry in environment["dependencies"] if isinstance(entry, str)]

    assert plain(gpu) == plain(cpu)
    cpu_pip = next(d["pip"] for d in cpu["dependencies"] if isinstance(d, dict))
    gpu_pip = next(d["pip"] for d in gpu["dependencies"] if isinstance(d, dict))
    assert cpu_pip == ["-e .[test]"] and gpu_pip == ["-e .[test,gpu]"]
    assert gpu["name"] != cpu["name"]


def test_stages_without_tensorflow_name_their_device_too(tmp_path, tiny_ct_dataset):
    from tests.conftest import tiny_ct_config, write_config

    config_path = write_config(tmp_path, tiny_ct_config(tiny_ct_dataset, tmp_path))
    result = run_plain("preload", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"Running on CPU ({len(os.sched_getaffinity(0))} cores; this stage " \
                                            "does not use TensorFlow)"


def test_an_interrupted_first_training_run_can_be_resumed_from_its_folder(tmp_path, tiny_ct_dataset, monkeypatch):
    """train writes the experiment's config.resolved.json before it fits, so --resume experiments/<name> works."""
    import keras

    from segmenter import training
    from segmenter.preload import preload
    from tests.conftest import tiny_ct_config

    config = build_config(tiny_ct_config(tiny_ct_dataset, tmp_path))
    preload(config, log=lambda *_: None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train_final_model(config)
    resolved = config.experiment_dir / "config.resolved.json"
    assert resolved.is_file()
    assert cli.load_config_or_exit(argparse.Namespace(config=config.experiment_dir, overrides=[])).experiment == "tiny_ct"
