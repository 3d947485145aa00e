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


# ----------------------------------------------------------------------------------------------------
# Settings validated before any work: ranges, every problem at once, --set named, close keys suggested
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["preload.normalization.window=[5, 5]"], "--set preload.normalization.window: [5, 5] is no window"),
    (["preload.normalization.window=[300, -200]"], "--set preload.normalization.window: [300, -200] is no window"),
    (["preload.normalization.percentiles=[99, 1]"], "0 <= low < high <= 100"),
    (["preload.normalization.percentiles=[-1, 99]"], "0 <= low < high <= 100"),
    (["preload.normalization.percentiles=[1, 101]"], "0 <= low < high <= 100"),
    (["seed=-1"], "--set seed: -1 is outside 0..4294967295"),
    (["seed=4294967296"], "--set seed: 4294967296 is outside 0..4294967295"),
    (["classes=['background', 'muscle', 'muscle']"], "--set classes: class names must be unique; 'muscle'"),
    (["evaluate.display_window=[200, -200]"], "evaluate.display_window [200, -200] is no window"),
    (["preload.normalization=[{'method': 'ct_window', 'window': [5, 5]}]"],
     "--set preload.normalization: preload.normalization.0.window: [5, 5] is no window"),
])
def test_ranges_are_checked_before_any_work(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, {}), overrides)
    assert expected in str(error.value)
    # One setting or a list of them: no noise about the form the value was not meant to have.
    assert "valid list" not in str(error.value) and "valid dictionary" not in str(error.value)


def test_range_edges_are_accepted(tmp_path):
    config = load_config(write_config(tmp_path, {}), ["seed=0", "preload.normalization.percentiles=[0, 100]",
                                                      "preload.normalization.window=[-1000, -999.5]"])
    assert config.seed == 0 and config.preload.normalization.percentiles == (0, 100)
    assert load_config(write_config(tmp_path, {}), [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_set_keeps_a_number_as_text_where_a_setting_takes_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write_config(tmp_path, {}), ["experiment=2024", "preload.images_subdir=01",
                                                      "preload.input_dir=2024", "train.epochs=7", "seed=3"])
    assert config.experiment == "2024" and config.preload.images_subdir == "01"
    assert config.preload.input_dir == (tmp_path / "2024").resolve()
    assert (config.train.epochs, config.seed) == (7, 3)  # numbers stay numbers where numbers are expected
    assert config.preloaded_dir.name == "2024"


def test_every_problem_is_listed_at_once_each_naming_its_source(tmp_path):
    path = write_config(tmp_path, {"train": {"loss": "hinge"}, "classes": ["a", "a"]})
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.epochs=0", "tune.max_trial=3", "train"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("5 problems: ")
    assert f"{path}: classes: class names must be unique" in message
    assert f"{path}: train.loss: Input should be" in message
    assert "--set train.epochs: Input should be greater than or equal to 1" in message
    assert "--set tune.max_trial: unknown setting tune.max_trial (did you mean tune.max_trials?)" in message
    assert "--set 'train': expected key=value" in message
    # A file's problem is never blamed on --set, nor the other way round.
    assert f"{path}: train.epochs" not in message and "--set train.loss" not in message


@pytest.mark.parametrize("raw, expected", [
    ({"train": {"epoch": 5}}, "unknown setting train.epoch (did you mean train.epochs?)"),
    ({"trian": {"epochs": 5}}, "unknown setting trian (did you mean train?)"),
    ({"train": {"model": {"depht": 3}}}, "unknown setting train.model.depht (did you mean train.model.depth?)"),
    ({"preload": {"normalization": {"methd": "zscore"}}},
     "unknown setting preload.normalization.methd (did you mean preload.normalization.method?)"),
    ({"preload": {"normalization": [{"methd": "zscore"}]}},
     "unknown setting preload.normalization.0.methd (did you mean preload.normalization.0.method?)"),
    ({"Train": {"epochs": 5}}, "unknown setting Train (did you mean train?)"),
    ({"train": {"zzz": 1}}, "unknown setting train.zzz"),
])
def test_misspelt_key_suggests_the_closest_valid_key(tmp_path, raw, expected):
    path = write_config(tmp_path, raw)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: {expected}"


def test_set_into_a_setting_that_is_not_a_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--set train.epochs.x: train.epochs is a setting, not a section"):
        load_config(write_config(tmp_path, {}), ["train.epochs.x=1"])
    # Dict settings take dotted keys.
    config = load_config(write_config(tmp_path, {}), ["preload.label_map.255=1", "tune.search_space.depth=[3, 4]"])
    assert config.preload.label_map == {255: 1} and config.tune.search_space == {"depth": [3, 4]}


def test_source_file_in_a_raw_config_is_ignored_and_set_anew(tmp_path):
    config = build_config({"source_file": "/somewhere/else.py", "experiment": "x"})
    assert config.source_file is None and config.experiment == "x"
    path = write_config(tmp_path, {"source_file": "/somewhere/else.py"})
    assert load_config(path).source_file == path.resolve()


def test_config_py_in_the_current_folder_is_announced(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, {"experiment": "here"})
    monkeypatch.chdir(tmp_path)
    assert load_config().experiment == "here"
    assert capsys.readouterr().err == "Using ./config.py (no --config given)\n"
    load_config(tmp_path / "config.py")
    assert capsys.readouterr().err == ""
    (tmp_path / "config.py").unlink()
    (tmp_path / "config_template.py").write_text("CONFIG = {}\n")
    load_config()  # the template is the documented default: nothing to announce
    assert capsys.readouterr().err == ""
