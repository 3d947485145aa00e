"""Config loading: defaults match the template, overrides, path resolution, one-line errors."""
from pathlib import Path

import pytest

from segmenter.config import Config, ConfigError, build_config, load_config, read_config_file
from tests.conftest import REPO_ROOT, write_config


def test_template_spells_out_every_default():
    template = read_config_file(REPO_ROOT / "config_template.py")
    defaults = Config().model_dump(mode="json", exclude={"source_file"})
    assert Config.model_validate(template).model_dump(mode="json", exclude={"source_file"}) == defaults
    # Every key of the schema appears in the template, so the template documents every setting.
    def keys(tree, prefix=""):
        return {prefix + k for k, v in tree.items()} | {
            key for k, v in tree.items() if isinstance(v, dict) and k not in ("label_map", "search_space")
            for key in keys(v, prefix + k + ".")}
    assert keys(defaults) == keys(template)


@pytest.mark.parametrize("name", ["demo_l3_ct.py", "spine_mri.py", "ct_dicom_muscle.py", "hippocampus_2d.py"])
def test_ready_configs_validate(name):
    path = REPO_ROOT / "configs" / name
    if name in ("ct_dicom_muscle.py", "hippocampus_2d.py") and not path.exists():
        pytest.fail(f"{path} missing")
    config = load_config(path)
    assert config.preload.input_dir.is_absolute()
    assert config.paths.experiments_root == (REPO_ROOT / "experiments").resolve()


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = write_config(tmp_path / "sub", {"preload": {"input_dir": "data"}})
    config = load_config(path)
    assert config.preload.input_dir == (tmp_path / "sub" / "data").resolve()
    assert config.preloaded_dir == (tmp_path / "sub" / "preloaded_dataset" / "demo_l3_ct").resolve()


def test_set_overrides_dotted_keys_with_python_literals(tmp_path):
    path = write_config(tmp_path, {})
    config = load_config(path, ["train.epochs=5", "train.model.base_filters=32", "experiment=abc",
                                "preload.image_size=[64, 64]", "train.time_budget_minutes=None"])
    assert (config.train.epochs, config.train.model.base_filters, config.experiment) == (5, 32, "abc")
    assert config.preload.image_size == (64, 64)
    assert config.train.time_budget_minutes is None


def test_set_path_resolves_against_the_current_folder(tmp_path, monkeypatch):
    path = write_config(tmp_path / "cfg", {})
    monkeypatch.chdir(tmp_path)
    config = load_config(path, ["preload.input_dir=mydata"])
    assert config.preload.input_dir == (tmp_path / "mydata").resolve()


@pytest.mark.parametrize("overrides, expected", [
    (["train.epoch=5"], "train.epoch: unknown setting"),
    (["train.epochs=0"], "train.epochs"),
    (["train.loss=hinge"], "train.loss"),
    (["preload.label_map={255: 7}"], "outside the 2 classes"),
    (["train"], "expected key=value"),
])
def test_bad_settings_give_one_line_errors_naming_the_key(tmp_path, overrides, expected):
    path = write_config(tmp_path, {})
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_broken_config_file_is_named(tmp_path):
    path = tmp_path / "config.py"
    path.write_text("CONFIG = {\n")
    with pytest.raises(ConfigError, match="config.py: cannot be executed"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
