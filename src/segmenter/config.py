"""Load, override and validate a segmenter configuration.

A configuration is a Python file that defines ``CONFIG``, one nested dict with the sections ``preload``,
``tune``, ``train``, ``predict`` and ``evaluate`` plus the dataset's ``classes`` and the ``experiment``
name. Keys a file leaves out take the defaults below, which ``config_template.py`` spells out and
documents. Validation uses pydantic (``extra="forbid"``) so that a misspelt key is an error instead of a
silently ignored setting, the failure mode of CS230's untyped parameter bag.

Relative paths in a config file resolve against that file's folder; relative paths given with
``--set`` resolve against the current directory, where the user typed them.
"""
from __future__ import annotations

import ast
import copy
import runpy
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the file or key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    preloaded_root: Path = Path("preloaded_dataset")
    experiments_root: Path = Path("experiments")


class NormalizationConfig(_Section):
    method: Literal["ct_window", "minmax", "divide_255", "zscore", "percentile_zscore", "none"] = "minmax"
    window: tuple[float, float] = (-200.0, 300.0)
    percentiles: tuple[float, float] = (0.5, 99.5)


class PreloadConfig(_Section):
    input_dir: Path = Path("original_dataset/demo_l3_ct")
    images_subdir: str = "images"
    masks_subdir: str = "masks"
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    group_pattern: Optional[str] = None
    label_map: dict[int, int] = Field(default_factory=dict)
    unmapped_labels: Literal["error", "background"] = "error"
    require_labels: list[int] = Field(default_factory=list)
    keep_empty_slices: bool = True
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    image_size: tuple[PositiveInt, PositiveInt] = (256, 256)
    pixel_spacing: Optional[tuple[float, float]] = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    slice_axis: int = Field(2, ge=0, le=2)
    workers: int = Field(2, ge=1)
    shard_size: int = Field(1024, ge=1)
    skip_invalid: bool = False


class ModelConfig(_Section):
    architecture: Literal["unet", "attention_unet", "residual_unet", "mobilenetv2_unet", "deeplabv3plus"] = "unet"
    depth: int = Field(4, ge=1, le=6)
    base_filters: int = Field(16, ge=2)
    normalization: Literal["group", "batch", "instance", "none"] = "group"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    upsampling: Literal["transpose", "resize"] = "transpose"
    backbone: Literal["mobilenetv2", "resnet50"] = "mobilenetv2"
    encoder_weights: Optional[str] = None
    freeze_encoder_epochs: int = Field(0, ge=0)


class AugmentationConfig(_Section):
    flip_horizontal: bool = True
    flip_vertical: bool = False
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)
    zoom: float = Field(0.0, ge=0.0, lt=1.0)
    intensity: float = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: Literal["dice", "jaccard", "cross_entropy", "dice_ce", "focal", "tversky"] = "dice_ce"
    class_weights: Optional[list[float]] = None
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(4, ge=1)
    epochs: int = Field(100, ge=1)
    time_budget_minutes: Optional[float] = Field(None, gt=0.0)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    use_tuned_hyperparameters: bool = True
    mixed_precision: bool = False
    steps_per_execution: int = Field(1, ge=1)


class TuneConfig(_Section):
    tuner: Literal["hyperband", "random", "bayesian"] = "hyperband"
    max_trials: int = Field(10, ge=1)
    max_epochs: int = Field(20, ge=1)
    time_budget_minutes: Optional[float] = Field(20.0, gt=0.0)
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    folds: int = Field(1, ge=1)
    executions_per_trial: int = Field(1, ge=1)
    search_space: dict[str, Any] = Field(default_factory=dict)


class PredictConfig(_Section):
    batch_size: int = Field(8, ge=1)


class EvaluateConfig(_Section):
    nsd_tolerance: float = Field(2.0, ge=0.0)
    display_window: Optional[tuple[float, float]] = None
    bootstrap_samples: int = Field(1000, ge=0)


class Config(_Section):
    experiment: str = "demo_l3_ct"
    classes: list[str] = Field(default_factory=lambda: ["background", "muscle"], min_length=2)
    seed: int = 42
    paths: PathsConfig = Field(default_factory=PathsConfig)
    preload: PreloadConfig = Field(default_factory=PreloadConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # The file this config was read from; set by load_config, not by users.
    source_file: Optional[Path] = None

    @field_validator("experiment")
    @classmethod
    def _experiment_is_a_folder_name(cls, value: str) -> str:
        if not value or "/" in value or value in {".", ".."}:
            raise ValueError(f"experiment must be a plain folder name, got {value!r}")
        return value

    @model_validator(mode="after")
    def _labels_within_classes(self) -> "Config":
        num_classes = len(self.classes)
        for source, target in self.preload.label_map.items():
            if not 0 <= target < num_classes:
                raise ValueError(f"preload.label_map maps {source} to {target}, outside the {num_classes} classes")
        for label in self.preload.require_labels:
            if not 0 <= label < num_classes:
                raise ValueError(f"preload.require_labels has {label}, outside the {num_classes} classes")
        if self.train.class_weights is not None and len(self.train.class_weights) != num_classes:
            raise ValueError(f"train.class_weights needs {num_classes} values, one per class")
        model = self.train.model
        # DeepLabV3+ always down-samples 16 times; the U-Nets once per level.
        factor = 16 if model.architecture == "deeplabv3plus" else 2 ** model.depth
        if any(size % factor for size in self.preload.image_size):
            raise ValueError(f"preload.image_size {list(self.preload.image_size)} must be divisible by {factor} "
                             f"for a {model.architecture} of depth {model.depth}")
        return self

    # Convenience views used throughout the library.
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preloaded_dir(self) -> Path:
        return self.paths.preloaded_root / self.experiment

    @property
    def experiment_dir(self) -> Path:
        return self.paths.experiments_root / self.experiment

    def stage_dir(self, stage: str) -> Path:
        return self.experiment_dir / stage

    def to_jsonable(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Paths inside the config, as dotted keys, that resolve against the config file's folder.
PATH_KEYS = ("paths.preloaded_root", "paths.experiments_root", "preload.input_dir", "train.model.encoder_weights")
# Values of path keys that are not paths.
NOT_PATHS = (None, "imagenet")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the dotted key and a Python value (literal if it parses, else string)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown setting (misspelt key?)"
    return f"{source}: {where}: {message}"


def read_config_file(path: Path) -> dict[str, Any]:
    """Execute a config file and return a deep copy of its ``CONFIG`` dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as error:  # A broken user file: report where, not a traceback.
        raise ConfigError(f"{path}: cannot be executed: {type(error).__name__}: {error}") from error
    if "CONFIG" not in namespace or not isinstance(namespace["CONFIG"], dict):
        raise ConfigError(f"{path}: defines no CONFIG dict")
    return copy.deepcopy(namespace["CONFIG"])


def build_config(
    raw: dict[str, Any],
    source_file: Optional[Path] = None,
    overrides: Optional[list[str]] = None,
    cwd: Optional[Path] = None,
) -> Config:
    """Apply ``--set`` overrides to a raw config dict, resolve its paths and validate it."""
    raw = copy.deepcopy(raw)
    base_dir = Path(source_file).resolve().parent if source_file else Path.cwd()
    cwd = Path(cwd) if cwd else Path.cwd()
    overridden_paths = set()
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        if key in PATH_KEYS:
            overridden_paths.add(key)
    source = str(source_file) if source_file else "config"
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
    for key in PATH_KEYS:
        *section_names, field_name = key.split(".")
        section = config
        for name in section_names:
            section = getattr(section, name)
        value = getattr(section, field_name)
        if value in NOT_PATHS:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (cwd if key in overridden_paths else base_dir) / path
        setattr(section, field_name, type(value)(path.resolve()) if isinstance(value, str) else path.resolve())
    config.source_file = Path(source_file).resolve() if source_file else None
    return config


def default_config_path(start: Optional[Path] = None) -> Path:
    """``config.py`` in the current directory when present, else ``config_template.py``.

    Looks in the current directory first, then in the project checkout this package was installed from
    (an editable install), so ``segmenter train`` works from the repository root and from anywhere else.
    """
    candidates = []
    for folder in [Path(start or Path.cwd()), Path(__file__).resolve().parents[2]]:
        candidates += [folder / "config.py", folder / "config_template.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError("no --config given and neither config.py nor config_template.py found in the current directory")


def load_config(path: Optional[Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read, override, resolve and validate a config file (``config.py`` or the template by default)."""
    path = Path(path) if path else default_config_path()
    return build_config(read_config_file(path), source_file=path, overrides=overrides)
