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
import difflib
import json
import runpy
import sys
import types
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from segmenter.layout import unsafe_name_problem


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the file or key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    preloaded_root: Path = Path("preloaded_dataset")
    experiments_root: Path = Path("experiments")


class NormalizationConfig(_Section):
    # "nnunet_ct": clip to the 0.5 / 99.5 percentiles of the foreground intensities of the whole training set,
    # then z-score with their mean and standard deviation (nnU-Net's CT scheme; statistics in the manifest).
    method: Literal["ct_window", "minmax", "divide_255", "zscore", "percentile_zscore", "nnunet_ct", "none"] = "minmax"
    window: tuple[float, float] = (-200.0, 300.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    @field_validator("window")
    @classmethod
    def _window_is_a_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (abs(low) < float("inf") and abs(high) < float("inf") and low < high):
            raise ValueError(f"[{low:g}, {high:g}] is no window: give [low, high] with low < high, e.g. [-200, 300]")
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles_are_a_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"[{low:g}, {high:g}]: give [low, high] with 0 <= low < high <= 100, e.g. [0.5, 99.5]")
        return value


class PreloadConfig(_Section):
    input_dir: Path = Path("original_dataset/demo_l3_ct")
    images_subdir: str = "images"
    masks_subdir: str = "masks"
    # Channel names; with more than one, each channel is a file named <case>_0000, <case>_0001, ... (nnU-Net).
    channels: list[str] = Field(default_factory=lambda: ["image"], min_length=1)
    # A fixed test set instead of the random split: case ids, and/or a folder laid out like input_dir.
    test_cases: list[str] = Field(default_factory=list)
    # Cases left out of the dataset altogether, e.g. images whose annotation is missing (not negative cases).
    exclude_cases: list[str] = Field(default_factory=list)
    test_dir: Optional[Path] = None
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    group_pattern: Optional[str] = None
    label_map: dict[int, int] = Field(default_factory=dict)
    unmapped_labels: Literal["error", "background"] = "error"
    require_labels: list[int] = Field(default_factory=list)
    keep_empty_slices: bool = True
    # One setting for every channel, or a list with one per channel.
    normalization: Union[NormalizationConfig, list[NormalizationConfig]] = Field(default_factory=NormalizationConfig)
    image_size: tuple[PositiveInt, PositiveInt] = (256, 256)
    pixel_spacing: Optional[tuple[float, float]] = None
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    slice_axis: int = Field(2, ge=0, le=2)
    workers: int = Field(2, ge=1)
    shard_size: int = Field(1024, ge=1)
    skip_invalid: bool = False
    # 2: the model sees 2D slices (image_size, slice_axis). 3: it sees 3D patches of whole volumes, resampled
    # to target_spacing; patch_size None is planned from the dataset (see segmenter.preprocessing.planner).
    spatial_dims: Literal[2, 3] = 2
    # Voxel size in mm per array axis that 3D volumes are resampled to; None: the training cases' median.
    target_spacing: Optional[tuple[PositiveFloat, PositiveFloat, PositiveFloat]] = None
    patch_size: Optional[tuple[PositiveInt, PositiveInt, PositiveInt]] = None
    # Crop each volume to the box around its non-zero voxels before resampling (undone on output).
    crop_to_nonzero: bool = False
    # Resampling of 3D volumes: images with cubic splines or linearly; label maps linearly on one-hot (each
    # class's mask interpolated, the largest wins) or by nearest neighbour.
    image_interpolation: Literal["cubic", "linear"] = "cubic"
    label_interpolation: Literal["linear", "nearest"] = "linear"
    # A volume (or target spacing) whose coarsest spacing is more than this many times its finest is
    # resampled in-plane first, then along that axis by nearest slice (nnU-Net's thick-slice rule);
    # None: every axis alike.
    anisotropy_threshold: Optional[float] = Field(3.0, gt=1.0)
    # Memory the planner may plan one training step of a 3D model for (activations and gradients), in MB.
    plan_memory_mb: float = Field(2048.0, gt=0.0)

    def channel_normalizations(self) -> list[NormalizationConfig]:
        """The normalisation of each channel, in channel order."""
        if isinstance(self.normalization, NormalizationConfig):
            return [self.normalization] * len(self.channels)
        return list(self.normalization)

    @model_validator(mode="after")
    def _dataset_statistics_need_3d(self) -> "PreloadConfig":
        if self.spatial_dims == 2 and any(n.method == "nnunet_ct" for n in self.channel_normalizations()):
            raise ValueError("normalization nnunet_ct (statistics of the whole training set) needs "
                             "spatial_dims 3; for 2D CT slices use ct_window")
        return self

    @model_validator(mode="after")
    def _one_normalization_per_channel(self) -> "PreloadConfig":
        if isinstance(self.normalization, list) and len(self.normalization) != len(self.channels):
            raise ValueError(f"normalization lists {len(self.normalization)} settings for "
                             f"{len(self.channels)} channels {self.channels}; give one per channel, or one for all")
        return self


#: 2D defaults of train.model.depth and train.batch_size (3D datasets take them from their plan).
DEFAULT_DEPTH = 4
DEFAULT_BATCH_SIZE = 4


class ModelConfig(_Section):
    architecture: Literal["unet", "attention_unet", "residual_unet", "mobilenetv2_unet", "deeplabv3plus",
                          "medpatchnet"] = "unet"
    # Down-sampling levels; None: DEFAULT_DEPTH for 2D, the plan's for 3D (see segmenter.preprocessing.planner).
    depth: Optional[int] = Field(None, ge=1, le=6)
    base_filters: int = Field(16, ge=2)
    normalization: Literal["group", "batch", "instance", "none"] = "group"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    upsampling: Literal["transpose", "resize"] = "transpose"
    backbone: Literal["mobilenetv2", "resnet50"] = "mobilenetv2"
    encoder_weights: Optional[str] = None
    freeze_encoder_epochs: int = Field(0, ge=0)
    # Auxiliary outputs at the decoder's coarser levels whose losses join the main one in training
    # (nnU-Net's default; segmenter.models.deep_supervision). The U-Nets and medpatchnet only.
    deep_supervision: bool = False
    # 3D only: the network is also given where each voxel of its patch lies in the volume, at every level
    # (MedPatchNet's position-conditioned convolutions; segmenter.models.positions). The U-Nets and medpatchnet.
    position_conditioning: bool = False

    @model_validator(mode="after")
    def _options_of_the_encoder_decoders(self) -> "ModelConfig":
        for option in ("deep_supervision", "position_conditioning"):
            if getattr(self, option) and self.architecture in ("mobilenetv2_unet", "deeplabv3plus"):
                raise ValueError(f"{option} is for unet, attention_unet, residual_unet and medpatchnet, "
                                 f"not {self.architecture}")
        return self


class VolumeAugmentationConfig(_Section):
    """3D augmentation (preload.spatial_dims 3), applied to image and labels alike; nnU-Net's defaults."""

    # Each listed array axis is mirrored with probability 0.5.
    mirror_axes: list[int] = Field(default_factory=lambda: [0, 1, 2])
    # Rotation about each axis, uniform in +-rotation_degrees; scaling by a factor in scale_range.
    rotation_probability: float = Field(0.2, ge=0.0, le=1.0)
    rotation_degrees: float = Field(30.0, ge=0.0, le=180.0)
    scale_probability: float = Field(0.2, ge=0.0, le=1.0)
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.4)
    # Elastic deformation: a random displacement field smoothed by a Gaussian (sigma in voxels), scaled so
    # that its largest displacement is about elastic_magnitude voxels.
    elastic_probability: float = Field(0.0, ge=0.0, le=1.0)
    elastic_sigma: float = Field(4.0, gt=0.0)
    elastic_magnitude: float = Field(3.0, ge=0.0)
    noise_probability: float = Field(0.1, ge=0.0, le=1.0)
    noise_std: float = Field(0.1, ge=0.0)  # the largest standard deviation, in normalised units
    blur_probability: float = Field(0.2, ge=0.0, le=1.0)
    blur_sigma: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.0)  # voxels
    brightness_probability: float = Field(0.15, ge=0.0, le=1.0)
    brightness_range: tuple[PositiveFloat, PositiveFloat] = (0.75, 1.25)  # multiplicative
    contrast_probability: float = Field(0.15, ge=0.0, le=1.0)
    contrast_range: tuple[PositiveFloat, PositiveFloat] = (0.75, 1.25)
    gamma_probability: float = Field(0.3, ge=0.0, le=1.0)
    gamma_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.5)

    @field_validator("mirror_axes")
    @classmethod
    def _axes_are_spatial(cls, value: list[int]) -> list[int]:
        if any(axis not in (0, 1, 2) for axis in value) or len(set(value)) != len(value):
            raise ValueError(f"{value}: give distinct axes among 0, 1 and 2")
        return value


class AugmentationConfig(_Section):
    flip_horizontal: bool = True
    flip_vertical: bool = False
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)
    zoom: float = Field(0.0, ge=0.0, lt=1.0)
    intensity: float = Field(0.0, ge=0.0, lt=1.0)
    volume: VolumeAugmentationConfig = Field(default_factory=VolumeAugmentationConfig)


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: Literal["dice", "jaccard", "cross_entropy", "dice_ce", "focal", "tversky"] = "dice_ce"
    class_weights: Optional[list[float]] = None
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    # None: DEFAULT_BATCH_SIZE for 2D, the plan's for 3D.
    batch_size: Optional[int] = Field(None, ge=1)
    epochs: int = Field(100, ge=1)
    time_budget_minutes: Optional[float] = Field(None, gt=0.0)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    use_tuned_hyperparameters: bool = True
    # float16 compute with float32 weights (normalisation, softmax and loss stay float32); None: on where
    # TensorFlow sees a GPU, off on CPU.
    mixed_precision: Optional[bool] = None
    # "mirrored": tf.distribute.MirroredStrategy over the local GPUs; "multi_worker": MultiWorkerMirroredStrategy
    # over the machines TF_CONFIG describes. batch_size is then the global batch, split evenly over the replicas.
    distribution: Literal["none", "mirrored", "multi_worker"] = "none"
    steps_per_execution: int = Field(1, ge=1)
    # Share of the training set (whole patients/volumes, drawn with the seed) held out to validate each
    # epoch; 0.0: none.
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # Which model becomes model.keras: "best" (checkpoints/best/model.keras) or "last"; None: "best" when there
    # is validation, else "last".
    keep: Optional[Literal["best", "last"]] = None
    lr_schedule: Literal["constant", "poly", "cosine"] = "constant"
    warmup_epochs: int = Field(0, ge=0)
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    gradient_clip_norm: Optional[float] = Field(None, gt=0.0)
    # 3D: patches drawn per epoch (None: one per training volume) and the share of them centred on a
    # foreground voxel (of a class drawn uniformly among those the volume holds), as nnU-Net samples.
    patches_per_epoch: Optional[int] = Field(None, ge=1)
    # k of the k-fold cross-validation of `segmenter train --fold`: whole patients/volumes per fold.
    folds: int = Field(5, ge=2)
    foreground_fraction: float = Field(1.0 / 3.0, ge=0.0, le=1.0)


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
    # 3D sliding-window prediction: the share of a patch that neighbouring patches overlap, and mirroring
    # test-time augmentation (all 8 flips averaged; 8x the time) - None: on where a GPU is present.
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    mirror: Optional[bool] = None
    # Predict with the mean probabilities of the k fold models (segmenter train --fold): None: when all
    # train.folds fold models exist, else the final model; True: the folds (an error when one is missing).
    folds: Optional[bool] = None
    # Keep only the largest connected component of each class (the rest becomes background).
    keep_largest_component: bool = False
    # 3D models: also write each case's class probabilities, probabilities/<case>.nii.gz (float32, one
    # volume per class; K times the memory of one volume).
    save_probabilities: bool = False
    # The precision the model computes in (models.precision): None: as it was trained (float32, or float16
    # after mixed-precision training); "bfloat16": convolutions in bfloat16, normalisation and softmax in
    # float32 (1.9-2.1x as fast for the 2D U-Net of benchmarks/train_bench.py on a CPU with AVX512_BF16, README);
    # "float32": full precision throughout.
    precision: Optional[Literal["float32", "bfloat16"]] = None


class EvaluateConfig(_Section):
    nsd_tolerance: float = Field(2.0, ge=0.0)
    # "max_directed": the larger of the two directed 95th percentiles (MONAI, DeepMind, nnU-Net users);
    # "pooled": the 95th percentile of both directions pooled (medpy).
    hd95: Literal["max_directed", "pooled"] = "max_directed"
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
        if unsafe_name_problem(value) is not None:
            raise ValueError(f"experiment must be a plain folder name, got {value!r}")
        return value

    @field_validator("classes")
    @classmethod
    def _class_names_are_unique(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError(f"class names cannot be empty, got {value}")
        for name in value:  # names become parts of file names and metric names
            problem = unsafe_name_problem(name)
            if problem is not None:
                raise ValueError(f"class name {name!r} {problem}; class names must not be paths")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"class names must be unique; {', '.join(map(repr, repeated))} "
                             f"appear{'s' if len(repeated) == 1 else ''} more than once in {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_fits_numpy(cls, value: int) -> int:
        if not 0 <= value <= 2**32 - 1:
            raise ValueError(f"{value} is outside 0..4294967295 (2**32 - 1), the seeds NumPy and TensorFlow take")
        return value

    @model_validator(mode="after")
    def _display_window_is_a_range(self) -> "Config":
        window = self.evaluate.display_window
        if window is not None and not window[0] < window[1]:
            raise ValueError(f"evaluate.display_window [{window[0]:g}, {window[1]:g}] is no window: "
                             f"give [low, high] with low < high, e.g. [-200, 200], or None")
        return self

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
        if self.preload.spatial_dims == 3:
            if model.architecture in ("mobilenetv2_unet", "deeplabv3plus"):
                raise ValueError(f"train.model.architecture {model.architecture} is 2D only (its encoder is a 2D "
                                 f"keras.applications network); for preload.spatial_dims 3 use unet, "
                                 f"residual_unet, attention_unet or medpatchnet")
            return self  # the 3D patch size is checked against the depth when it is planned
        if model.position_conditioning:
            raise ValueError("train.model.position_conditioning needs preload.spatial_dims 3: it tells a model "
                             "trained on patches where they lie in their volume (a 2D model sees whole slices)")
        # DeepLabV3+ always down-samples 16 times; the U-Nets once per level.
        depth = DEFAULT_DEPTH if model.depth is None else model.depth
        factor = 16 if model.architecture == "deeplabv3plus" else 2 ** depth
        if any(size % factor for size in self.preload.image_size):
            raise ValueError(f"preload.image_size {list(self.preload.image_size)} must be divisible by {factor} "
                             f"for a {model.architecture} of depth {depth}")
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
PATH_KEYS = ("paths.preloaded_root", "paths.experiments_root", "preload.input_dir", "preload.test_dir",
             "train.model.encoder_weights")
# Values of path keys that are not paths.
NOT_PATHS = (None, "imagenet")


def _model_in(annotation: Any) -> Optional[type]:
    """The pydantic model an annotation holds (directly, or as a member of a Union/Optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for member in get_args(annotation):
            model = _model_in(member)
            if model is not None:
                return model
    return None


def _field_annotation(key: Sequence[str]) -> Any:
    """The annotation of the setting at a dotted key (as parts), or None when there is no such setting."""
    model: Optional[type] = Config
    annotation = None
    for part in key:
        fields = getattr(model, "model_fields", None) if model is not None else None
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = _model_in(annotation)
    return annotation


def _accepts_text(annotation: Any) -> bool:
    """Whether a setting takes a string (or a path): str, Path, Optional of either, a Union with either."""
    if annotation in (str, Path):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts_text(member) for member in get_args(annotation))
    return False


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the dotted key and a Python value (literal if it parses, else string).

    Where the setting takes a string or a path, a value that parses as a number is kept as its text:
    ``--set experiment=2024`` names the experiment "2024".
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key before '=', e.g. train.epochs=5")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and _accepts_text(_field_annotation(key.split("."))):
        value = raw.strip()
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        section = ".".join(parts[:depth + 1])
        annotation = _field_annotation(parts[:depth + 1])
        if annotation is not None and _model_in(annotation) is None and get_origin(annotation) is not dict:
            raise ConfigError(f"--set {key}: {section} is a setting, not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {section} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _union_tag_at(loc: Sequence[Any]) -> Optional[int]:
    """Where pydantic names the member of a Union it tried (``NormalizationConfig``, ``list[...]``) in a location."""
    for index in range(1, len(loc)):
        annotation = _field_annotation([str(part) for part in loc[:index]])
        if get_origin(annotation) in (Union, types.UnionType):
            members = [member for member in get_args(annotation) if member is not type(None)]
            fields = getattr(_model_in(annotation), "model_fields", {})
            if len(members) > 1 and isinstance(loc[index], str) and loc[index] not in fields:
                return index
    return None


def _clean_errors(errors: list[dict]) -> list[dict]:
    """pydantic's errors without the Union noise: for ``normalization`` (one setting, or a list of them), an
    error of the member the value was not meant for ("Input should be a valid list" for a dict) is dropped."""
    by_place: dict[tuple, list[dict]] = {}
    cleaned = []
    for error in errors:
        loc = tuple(error["loc"])
        tag_at = _union_tag_at(loc)
        if tag_at is None:
            cleaned.append(error)
            continue
        wrong_member = len(loc) == tag_at + 1 and error["type"] in (
            "list_type", "model_type", "model_attributes_type", "dict_type", "tuple_type")
        untagged = {**error, "loc": loc[:tag_at] + loc[tag_at + 1:], "wrong_member": wrong_member}
        by_place.setdefault(loc[:tag_at], []).append(untagged)
    for group in by_place.values():
        meant = [error for error in group if not error["wrong_member"]]
        if meant:
            cleaned += meant
        else:  # neither member fits: say so once
            cleaned.append({**group[0], "msg": "expected one setting (a dict) or a list of them, one per channel"})
    return cleaned


def _validation_problems(error: ValidationError, source: str, override_keys: Sequence[str] = ()) -> list[str]:
    """One text per problem, each naming where it comes from: the config file or the ``--set`` that caused it."""
    problems = []
    for item in _clean_errors(error.errors()):
        loc = [str(part) for part in item["loc"]]
        where = ".".join(loc)
        message = str(item["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if item["type"] == "extra_forbidden":
            section = [part for part in loc[:-1] if not part.isdigit()]  # list items: their section's fields
            fields = getattr(_model_in(_field_annotation(section)) if section else Config, "model_fields", {})
            close = difflib.get_close_matches(loc[-1], list(fields), n=1)
            hint = f" (did you mean {'.'.join(loc[:-1] + close[:1])}?)" if close else ""
            problem = f"unknown setting {where}{hint}"
        else:
            problem = f"{where}: {message}" if where else message
        blamed = None
        for key in reversed(list(override_keys)):  # the last --set of a key is the one that counts
            if where and (where == key or where.startswith(key + ".")):
                blamed = key
            elif (not where or key.startswith(where + ".")) and (key in message or key.split(".")[-1] in message):
                blamed = key
            if blamed:
                break
        if blamed is None:
            problems.append(f"{source}: {problem}")
        elif where == blamed and item["type"] != "extra_forbidden":
            problems.append(f"--set {blamed}: {message}")
        else:
            problems.append(f"--set {blamed}: {problem}")
    return problems


def _one_line(problems: Sequence[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems)


def _format_validation_error(error: ValidationError, source: str, override_keys: Sequence[str] = ()) -> str:
    """Every problem pydantic found, on one line, each naming its source (file or ``--set``) and key."""
    return _one_line(_validation_problems(error, source, override_keys))


def _one_line_text(text: Any) -> str:
    return " ".join(str(text).split())


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw settings of a config file, as a new dict.

    ``.py``: the file is executed and its ``CONFIG`` dict taken. ``.json``, ``.yaml``/``.yml``: the file holds
    the same nested mapping (an experiment file; a run's ``config.resolved.json`` is one).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    if suffix == ".py":
        try:
            namespace = runpy.run_path(str(path))
        except Exception as error:  # A broken user file: report where, not a traceback.
            raise ConfigError(f"{path}: cannot be executed: {type(error).__name__}: {error}") from error
        if "CONFIG" not in namespace or not isinstance(namespace["CONFIG"], dict):
            raise ConfigError(f"{path}: defines no CONFIG dict")
        return copy.deepcopy(namespace["CONFIG"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read: {error}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} "
                              f"column {error.colno}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or error
            raise ConfigError(f"{path}: not valid YAML: {_one_line_text(problem)}{where}") from None
        if data is None:  # an empty file: every setting at its default
            data = {}
    else:
        raise ConfigError(f"{path}: a config file is .py (defining CONFIG), .json, .yaml or .yml, "
                          f"not {suffix or 'without suffix'}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold one mapping of settings (sections preload, train, ...), "
                          f"not a {type(data).__name__}")
    return data


def _apply_dataset_description(raw: dict[str, Any], base_dir: Path) -> None:
    """Take the experiment, classes, channels and subfolders of an nnU-Net/Decathlon input folder's
    ``dataset.json`` as defaults, for the keys the config leaves out (see segmenter.preload.discovery)."""
    from segmenter.preload.discovery import dataset_description  # it imports this module

    preload = raw.get("preload") if isinstance(raw.get("preload"), dict) else {}
    if "input_dir" not in preload:
        return
    folder = Path(preload["input_dir"]).expanduser()
    try:
        description = dataset_description(folder if folder.is_absolute() else base_dir / folder)
    except ValueError as error:  # InputError: a dataset.json that cannot be used, named with its problem
        raise ConfigError(str(error)) from None
    if description is None:
        return
    for key in ("experiment", "classes"):
        raw.setdefault(key, description[key])
    for key in ("channels", "images_subdir", "masks_subdir"):
        preload.setdefault(key, description[key])


def build_config(
    raw: dict[str, Any],
    source_file: Optional[Path] = None,
    overrides: Optional[list[str]] = None,
    cwd: Optional[Path] = None,
) -> Config:
    """Apply ``--set`` overrides to a raw config dict, resolve its paths and validate it."""
    raw = copy.deepcopy(raw)
    # A run's config.resolved.json names the file it came from; the source is set anew below.
    raw.pop("source_file", None)
    base_dir = Path(source_file).resolve().parent if source_file else Path.cwd()
    cwd = Path(cwd) if cwd else Path.cwd()
    overridden_paths = set()
    override_keys = []
    problems = []  # every problem at once, not only the first
    for text in overrides or []:
        try:
            key, value = parse_override(text)
            _set_dotted(raw, key, value)
        except ConfigError as error:
            problems.append(str(error))
            continue
        override_keys.append(key)
        if key in PATH_KEYS:
            overridden_paths.add(key)
    _apply_dataset_description(raw, base_dir if "preload.input_dir" not in overridden_paths else cwd)
    source = str(source_file) if source_file else "config"
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        problems += _validation_problems(error, source, override_keys)
    if problems:
        raise ConfigError(_one_line(problems))
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


def run_folder_config(folder: Path) -> Path:
    """The config of a run folder (``experiments/<name>`` or one of its stage folders): its config.resolved.json."""
    from segmenter.layout import RESOLVED_CONFIG

    path = Path(folder) / RESOLVED_CONFIG
    if not path.is_file():
        raise ConfigError(f"{folder}: a folder as --config means its {RESOLVED_CONFIG}, which it does not hold "
                          f"(a stage writes it into experiments/<name>/ when it finishes); give the config file")
    return path


def load_config(path: Optional[Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read, override, resolve and validate a config.

    ``path`` is a config file (.py, .json, .yaml/.yml) or a run folder, meaning its ``config.resolved.json``.
    Without one, ``config.py`` in the current folder is used (and said so on stderr), else the template.
    """
    if path is None:
        path = default_config_path()
        if path.name == "config.py":
            shown = "./config.py" if path.parent.resolve() == Path.cwd().resolve() else str(path)
            print(f"Using {shown} (no --config given)", file=sys.stderr)
    path = Path(path)
    if path.is_dir():
        path = run_folder_config(path)
    return build_config(read_config_file(path), source_file=path, overrides=overrides)
