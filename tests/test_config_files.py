"""Experiment files in JSON and YAML, run folders and config.resolved.json as configs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from segmenter.artifacts import save_resolved_config
from segmenter.config import Config, ConfigError, build_config, load_config, read_config_file
from tests.conftest import REPO_ROOT, run_cli, write_config

RAW = {
    "experiment": "files",
    "classes": ["background", "disc", "vertebra"],
    "paths": {"preloaded_root": "pre", "experiments_root": "exp"},
    "preload": {"input_dir": "data", "normalization": {"method": "ct_window", "window": [-250.0, 250.0]},
                "image_size": [64, 64], "label_map": {255: 1, 128: 2}},
    "train": {"epochs": 3, "model": {"depth": 3}},
}


def _same(first: Config, second: Config) -> bool:
    return first.model_dump(exclude={"source_file"}) == second.model_dump(exclude={"source_file"})


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_json_and_yaml_experiment_files_equal_the_python_config(tmp_path, suffix):
    folder = tmp_path / "cfg"
    python_config = load_config(write_config(folder, RAW))
    path = folder / f"exp{suffix}"
    path.write_text(json.dumps(RAW) if suffix == ".json" else yaml.safe_dump(RAW))
    config = load_config(path)
    assert _same(config, python_config)
    # Relative paths resolve against the file's folder, as for .py.
    assert config.preload.input_dir == (folder / "data").resolve()
    assert config.preloaded_dir == (folder / "pre" / "files").resolve()
    assert config.source_file == path.resolve()
    assert config.preload.label_map == {255: 1, 128: 2}


def test_yaml_file_is_validated_the_same_way(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epoch: 5\n  loss: hinge\n"
                    "preload:\n  normalization: {method: ct_window, window: [5, 5]}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("3 problems: ")
    assert f"{path}: unknown setting train.epoch (did you mean train.epochs?)" in message
    assert f"{path}: train.loss: " in message
    assert f"{path}: preload.normalization.window: [5, 5] is no window" in message


def test_empty_yaml_file_means_every_default(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("# nothing set\n")
    assert _same(load_config(path), build_config({}, source_file=path))
    assert load_config(path).train.epochs == Config().train.epochs


@pytest.mark.parametrize("name, text, expected", [
    ("bad.json", '{"train": {"epochs": 5,}}', r"bad.json: not valid JSON: .* at line 1 column \d+"),
    ("bad.yaml", "train:\n  epochs: [5\n", r"bad.yaml: not valid YAML: .* at line \d+ column \d+"),
    ("list.yaml", "- train\n- tune\n", r"list.yaml: must hold one mapping of settings .* not a list"),
    ("list.json", "[1, 2]", r"list.json: must hold one mapping"),
    ("exp.toml", "[train]\nepochs = 5\n", r"exp.toml: a config file is .py \(defining CONFIG\), .json, .yaml or .yml"),
])
def test_unreadable_experiment_files_are_one_line_errors_naming_the_file(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert re.search(expected, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


def test_config_resolved_json_of_a_run_is_itself_a_valid_config(tmp_path):
    original = load_config(write_config(tmp_path / "cfg", RAW))
    run_dir = tmp_path / "run"
    resolved = save_resolved_config(original, run_dir)
    assert "source_file" in json.loads(resolved.read_text())
    again = load_config(resolved)
    assert _same(again, original)
    assert again.source_file == resolved.resolve()  # the source is the file read, not the one it names
    # build_config takes such a dict directly, too, and --set still applies.
    assert build_config(json.loads(resolved.read_text()), overrides=["train.epochs=9"]).train.epochs == 9


@pytest.mark.parametrize("name", ["demo_l3_ct.py", "spine_mri.py", "ct_dicom_muscle.py", "hippocampus_2d.py",
                                  "config_template.py"])
def test_every_ready_config_survives_the_round_trip_through_json_and_yaml(tmp_path, name):
    path = REPO_ROOT / (name if name == "config_template.py" else f"configs/{name}")
    config = load_config(path)
    save_resolved_config(config, tmp_path)
    as_json = load_config(tmp_path / "config.resolved.json")
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(config.to_jsonable()))
    assert _same(as_json, config) and _same(load_config(tmp_path / "resolved.yaml"), config)


def test_a_run_folder_as_config_means_its_config_resolved_json(tmp_path):
    original = load_config(write_config(tmp_path / "cfg", RAW))
    run_dir = tmp_path / "exp" / "files"
    save_resolved_config(original, run_dir)
    assert _same(load_config(run_dir), original)
    assert load_config(run_dir, ["experiment=again"]).experiment == "again"
    with pytest.raises(ConfigError, match=r"no_run: a folder as --config means its config.resolved.json"):
        (tmp_path / "no_run").mkdir()
        load_config(tmp_path / "no_run")


def test_cli_accepts_yaml_and_run_folders_as_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(RAW))
    # A bad --set stops before any work: the status and message show the file was read and validated.
    result = run_cli("preload", "--config", str(path), "--set", "train.epochs=0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --set train.epochs: Input should be greater than or equal to 1"
    save_resolved_config(load_config(path), tmp_path / "run")
    result = run_cli("evaluate", "--config", str(tmp_path / "run"), "--set", "train.epoch=1")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --set train.epoch: unknown setting train.epoch "
                                     "(did you mean train.epochs?)")
    result = run_cli("preload", "--config", str(tmp_path))
    assert result.returncode == 2 and "config.resolved.json" in result.stderr


def test_readme_yaml_example_is_a_valid_config(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Command line\n"):]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    name = re.search(r"# (configs/\S+\.yaml)", block).group(1)
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_text(block)
    config = load_config(path)
    assert config.experiment == "spine_small" and config.classes == ["background", "disc", "vertebra"]
    assert config.preload.input_dir == (tmp_path / "../shared/datasets/spine_mri_sagittal").resolve()
    assert read_config_file(path)["train"] == {"epochs": 20, "model": {"depth": 3}}
