"""Hyperparameter search with keras-tuner on validation parts of the training set.

The test split is never read here: every slice comes from the preloaded ``train`` split. Each trial is
scored on one grouped validation split of the training slices (``tune.folds = 1``, the share
``tune.validation_fraction``) or, with ``tune.folds = k >= 2``, trains k models on k grouped folds and
reports the mean of their validation scores.

``experiments/<experiment>/tune/`` afterwards holds keras-tuner's own project folder (``keras_tuner/``;
with ``overwrite=False`` a rerun reloads it, so an interrupted search resumes where it stopped),
``tensorboard/<trial>/`` (scalars and the HParams dashboard for every trial and fold), ``trials.csv``,
``best_hyperparameters.json``, ``objective_vs_hyperparameters.png``, ``validation_split.json`` and
``config.resolved.json``.

Distributed search uses keras-tuner's own chief/worker mode, set by the environment variables
``KERASTUNER_TUNER_ID`` (``chief`` for the chief, any other unique name for a worker),
``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT``. The chief only serves the oracle; the workers
run the trials; when the search ends the chief writes the summary files. All processes must see the same
``experiments/<experiment>/tune/`` folder (one machine, or a shared file system).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd
import tensorflow as tf
from keras_tuner.src.engine import tuner_utils
from pydantic import ValidationError

from segmenter import layout, locks
from segmenter.artifacts import save_resolved_config, write_json_atomic, write_text_atomic
from segmenter.config import AugmentationConfig, Config, ConfigError, ModelConfig, TrainConfig
from segmenter.data_pipeline import AUTOTUNE, batch_for_training, make_dataset
from segmenter.dataset import SliceSet, load_training_samples
from segmenter.manifest import check_classes, read_manifest
from segmenter.positions import input_channels
from segmenter.preprocessing import split_train_test
from segmenter.preprocessing.split import grouped_folds
from segmenter.training import OBJECTIVE, TimeBudget, apply_hyperparameters, build_compiled_model, planned_settings

# ----------------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------------
# The search space, in one place. Each entry is a list (a choice), a dict {"min", "max"[, "step"]
# [, "sampling": "log"]} (a range), or a single value (fixed). Names are fields of the train section
# (``learning_rate``, ``loss``, ``optimizer``, ``batch_size``, ...), of ``train.model`` (``architecture``,
# ``depth``, ``base_filters``, ``normalization``, ``upsampling``, ``backbone``, ...) or of
# ``train.augmentation`` (``flip_horizontal``, ``flip_vertical``, ``rotation_degrees``, ``zoom``,
# ``intensity``), so the best values drop straight into the train stage; plus ``ct_window`` (below).
#
# ``tune.search_space`` in the config replaces entries by name: set an entry to a single value to fix it,
# to None to leave it out (the train section's value is then used), or add any other name above to search
# it too. The default fits a 20-minute CPU search: U-Net only. To compare architectures, augmentations
# and CT windows, list them, e.g.
#
#     "search_space": {
#         "architecture": ["unet", "attention_unet", "residual_unet", "mobilenetv2_unet", "deeplabv3plus"],
#         "rotation_degrees": [0.0, 10.0, 20.0],
#         "zoom": [0.0, 0.1],
#         "intensity": [0.0, 0.1],
#         "ct_window": [[-200, 300], [-160, 240], [-250, 250]],
#     }
#
# ``ct_window`` is a choice of [low, high] intensity windows (Hounsfield units for CT), each given as a
# pair; a single window is written [[low, high]]. A trial with a window recomputes its input images from
# the raw intensities the shards keep (``hu_images``) as preload's ``ct_window`` normalisation does:
# clip the resized intensities to the window, scale to 0..1, exactly the images preload would write
# with that window. The train stage does not apply it: put the best window in
# ``preload.normalization.window`` (method "ct_window") and run preload again before training.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "architecture": ["unet"],
    "depth": [3, 4],
    "base_filters": [8, 16, 32],
    "dropout": {"min": 0.0, "max": 0.3, "step": 0.1},
    "learning_rate": {"min": 1e-4, "max": 3e-3, "sampling": "log"},
    "loss": ["dice", "dice_ce"],
    "flip_vertical": [False, True],
}

# Entries of DEFAULT_SEARCH_SPACE left out for 3D datasets (a config may still search them).
# The plan's batch size is planned for the config's base_filters, so they are not searched by default either.
_NOT_SEARCHED_IN_3D = ("depth", "base_filters", "flip_vertical")

# The one searchable name that is not a train setting; see above.
WINDOW = "ct_window"

# Train settings that the search controls itself (epochs, time) or that make no sense to search.
_NOT_SEARCHABLE = {"model", "augmentation", "volume", "epochs", "time_budget_minutes", "use_tuned_hyperparameters",
                   "class_weights", "encoder_weights"}


def searchable_names() -> set[str]:
    names = set(ModelConfig.model_fields) | set(AugmentationConfig.model_fields) | set(TrainConfig.model_fields)
    return (names - _NOT_SEARCHABLE) | {WINDOW}


def search_space(config: Config) -> dict[str, Any]:
    """The default space with ``tune.search_space`` on top; entries set to None are left out."""
    defaults = DEFAULT_SEARCH_SPACE
    if config.preload.spatial_dims == 3:
        # The 3D plan sets the depth to suit its patch size, and 2D flips do not apply to volumes.
        defaults = {name: spec for name, spec in defaults.items() if name not in _NOT_SEARCHED_IN_3D}
    merged = {**defaults, **config.tune.search_space}
    return {name: spec for name, spec in merged.items() if spec is not None}


def _window_label(window) -> str:
    low, high = window
    return f"{float(low):g},{float(high):g}"


def parse_window(label: str) -> tuple[float, float]:
    """``"-200,300"`` (how a window is stored as a keras-tuner choice) -> (-200.0, 300.0)."""
    low, high = (float(part) for part in label.split(","))
    return low, high


def _spec_values(spec: Any) -> list:
    """The values a search-space entry can take that validation should try (choices, or range ends)."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        return [spec["min"], spec["max"]]
    return [spec]


def validate_search_space(config: Config) -> dict[str, Any]:
    """Check every entry of the search space before any trial runs; return the space.

    A misspelt name or a value the train section would reject is a ``ConfigError`` naming the entry,
    instead of a silently ignored hyperparameter or a search of failed trials.
    """
    space = search_space(config)
    known = searchable_names()
    for name, spec in space.items():
        where = f"tune.search_space.{name}"
        if name not in known:
            raise ConfigError(f"{where}: not a searchable hyperparameter; searchable are {', '.join(sorted(known))}")
        if isinstance(spec, dict):
            if not {"min", "max"} <= set(spec) or not set(spec) <= {"min", "max", "step", "sampling"}:
                raise ConfigError(f"{where}: a range is {{'min', 'max'[, 'step'][, 'sampling']}}, got {spec}")
            if name == WINDOW:
                raise ConfigError(f"{where}: give a list of [low, high] windows, e.g. [[-200, 300], [-160, 240]]")
        if isinstance(spec, list) and not spec:
            raise ConfigError(f"{where}: an empty list has nothing to choose from")
        if name == WINDOW:
            windows = spec if isinstance(spec, list) else [spec]
            for window in windows:
                if not (isinstance(window, (list, tuple)) and len(window) == 2
                        and all(isinstance(v, (int, float)) for v in window) and window[0] < window[1]):
                    raise ConfigError(f"{where}: each window is a pair [low, high] with low < high, got {window!r}")
            continue
        for value in _spec_values(spec):
            try:
                apply_hyperparameters(config.train, {name: value})
            except ValidationError as error:
                raise ConfigError(f"{where}: {value!r}: {error.errors()[0]['msg']}") from None
    if config.preload.spatial_dims == 2 and any(_spec_values(space.get("position_conditioning", False))):
        raise ConfigError("tune.search_space.position_conditioning: for preload.spatial_dims 3 only (positions of "
                          "patches in their volumes)")
    if WINDOW in space:
        if config.preload.spatial_dims == 3:
            raise ConfigError(f"tune.search_space.{WINDOW}: searched for 2D slices only; for 3D give the window in "
                              "preload.normalization")
        _check_window_inputs(config)
    return space


def _check_window_inputs(config: Config) -> None:
    """A CT window needs single-channel shards that keep the raw intensities (``hu_images``)."""
    manifest = read_manifest(config.preloaded_dir)
    first_shard = config.preloaded_dir / manifest.train.shards[0]
    with np.load(first_shard) as shard:  # Reads the archive's table of contents, not the arrays.
        has_raw = "hu_images" in shard.files
    if len(manifest.channels) != 1 or not has_raw:
        raise ConfigError(f"tune.search_space.{WINDOW}: needs single-channel images whose raw intensities the "
                          f"shards keep (hu_images); {first_shard} has {len(manifest.channels)} channel(s)"
                          + ("" if has_raw else " and no hu_images (run preload again)"))


def declare(hp: kt.HyperParameters, name: str, spec: Any):
    """Declare one hyperparameter from its search-space entry and return its value for this trial."""
    if name == WINDOW:
        # keras-tuner choices hold numbers, strings or booleans: a window is stored as "low,high".
        labels = [_window_label(w) for w in (spec if isinstance(spec[0], (list, tuple)) else [spec])]
        return hp.Choice(name, labels) if len(labels) > 1 else hp.Fixed(name, labels[0])
    if isinstance(spec, list):
        if len(spec) == 2 and all(isinstance(v, bool) for v in spec) and spec[0] != spec[1]:
            return hp.Boolean(name)  # A Choice would store True and False as 1 and 0.
        return hp.Choice(name, spec) if len(spec) > 1 else hp.Fixed(name, spec[0])
    if isinstance(spec, dict):
        low, high = spec["min"], spec["max"]
        if isinstance(low, int) and isinstance(high, int) and not isinstance(spec.get("step", 1), float):
            return hp.Int(name, low, high, step=spec.get("step", 1))
        return hp.Float(name, float(low), float(high), step=spec.get("step"), sampling=spec.get("sampling", "linear"))
    return hp.Fixed(name, spec)


# ----------------------------------------------------------------------------------------------------
# Validation splits of the training slices
# ----------------------------------------------------------------------------------------------------
def _training_slices(config: Config) -> tuple[list[str], list[str], list[bool]]:
    """Ids, groups and foreground flags of the training samples: grouped by their cases' groups (patients).

    The samples of a single volume (a "slab" split, see segmenter.preload.split) are each their own group.
    """
    manifest = read_manifest(config.preloaded_dir)
    samples = manifest.train.samples
    ids = [sample.id for sample in samples]
    case_groups = {case.id: case.group for case in manifest.train.cases}
    groups = ids if manifest.split == "slab" else [case_groups[sample.case] for sample in samples]
    return ids, groups, [sample.labels != [0] for sample in samples]


def validation_indices(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Split the training slices into search-train and validation parts, grouped by volume like preload."""
    ids, groups, foreground = _training_slices(config)
    try:
        return split_train_test(ids, groups, foreground, config.tune.validation_fraction, config.seed)
    except ValueError as error:
        raise ConfigError(f"tune.validation_fraction: {error}") from None


def search_folds(config: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) indices into the training slices, one pair per fold.

    ``tune.folds = 1``: the single split of ``validation_indices``. ``tune.folds = k``: k stratified
    group folds (no patient/volume in two folds), built like preload's split.
    """
    if config.tune.folds == 1:
        return [validation_indices(config)]
    ids, groups, foreground = _training_slices(config)
    try:
        return grouped_folds(ids, groups, foreground, config.tune.folds, config.seed)
    except ValueError as error:
        raise ConfigError(f"tune.folds={config.tune.folds}: {error} in the training split") from None


# ----------------------------------------------------------------------------------------------------
# The hypermodel and the tuners
# ----------------------------------------------------------------------------------------------------
def windowed_dataset(slices: SliceSet, window: tuple[float, float], num_classes: int, batch_size: int, *,
                     augmentation=None, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Like ``make_dataset``, with images recomputed from the raw intensities through a CT window."""
    low, high = (float(v) for v in window)
    dataset = tf.data.Dataset.from_tensor_slices((slices.hu_images[..., np.newaxis].astype(np.float32),
                                                  slices.masks.astype(np.int32)))
    # Preload's ct_window normalisation: clip to the window, then scale it to 0..1.
    dataset = dataset.map(lambda raw, mask: ((tf.clip_by_value(raw, low, high) - low) / (high - low), mask),
                          num_parallel_calls=AUTOTUNE)
    return batch_for_training(dataset, len(slices), num_classes, batch_size, augmentation=augmentation,
                              shuffle=shuffle, seed=seed)


class SegmentationHyperModel(kt.HyperModel):
    """Builds a compiled model and its (possibly augmented) input pipeline from one trial's values."""

    def __init__(self, config: Config, image_shape, folds: list[tuple[np.ndarray, np.ndarray]]):
        super().__init__(name="segmentation")
        self.config = config
        self.image_shape = image_shape  # of the samples; a position-conditioned trial's model takes 3 channels more
        self.folds = folds
        self.space = search_space(config)
        self._train_slices: Optional[SliceSet] = None
        # A 3D dataset's plan gives the batch size and depth the config leaves out; trial values go on top.
        self.plan = read_manifest(config.preloaded_dir).plan
        self.base_settings = planned_settings(config.train, self.plan)

    def _settings(self, hp: kt.HyperParameters) -> TrainConfig:
        values = {name: declare(hp, name, spec) for name, spec in self.space.items()}
        return apply_hyperparameters(self.base_settings, values)

    def build(self, hp):
        settings = self._settings(hp)
        try:
            input_shape = (*self.image_shape[:-1],
                           input_channels(self.image_shape[-1], settings.model.position_conditioning))
            return build_compiled_model(settings, input_shape, self.config.classes)
        except ValueError as error:
            # A combination the architecture cannot build (e.g. depth too large for the image size):
            # fail this trial without retrying it, and go on with the search.
            raise kt.errors.FailedTrialError(f"cannot build {settings.model.architecture}: {error}") from error

    def _dataset(self, settings: TrainConfig, hp: kt.HyperParameters, indices: np.ndarray, training: bool):
        config = self.config
        augmentation = settings.augmentation if training else None
        if WINDOW in self.space:
            if self._train_slices is None:
                self._train_slices = load_training_samples(config.preloaded_dir)
            return windowed_dataset(self._train_slices.subset(indices), parse_window(hp.get(WINDOW)),
                                    config.num_classes, settings.batch_size, augmentation=augmentation,
                                    shuffle=training, seed=config.seed)
        dataset, _ = make_dataset(config.preloaded_dir, config.num_classes, settings.batch_size,
                                  augmentation=augmentation, shuffle=training, seed=config.seed, subset=indices)
        return dataset

    def fit(self, hp, model, *args, fold: int = 0, **kwargs):
        """Train on fold ``fold``'s training part and validate on its validation part."""
        settings = self._settings(hp)
        train_indices, validation_indices_ = self.folds[fold]
        if self.plan is not None:
            from segmenter.volume_dataset import patch_datasets

            # Epochs are drawn lazily, as many as the trial runs; Hyperband continues a trial at its epoch.
            dataset, count, validation, _, _ = patch_datasets(
                self.config.preloaded_dir, self.plan.patch_size, self.config.num_classes, settings, train_indices,
                validation_indices_, seed=self.config.seed, first_epoch=kwargs.get("initial_epoch", 0),
                epochs=2**31 - 1)
            return model.fit(dataset, validation_data=validation, steps_per_epoch=math.ceil(count / settings.batch_size),
                             shuffle=False, verbose=2, **kwargs)
        return model.fit(self._dataset(settings, hp, train_indices, training=True),
                         validation_data=self._dataset(settings, hp, validation_indices_, training=False),
                         shuffle=False, verbose=2, **kwargs)  # The datasets shuffle themselves.


class CrossValidatedTuner(kt.Tuner):
    """Runs each trial once per fold of the hypermodel and reports the mean of the fold scores.

    Mixed in after a keras-tuner tuner class (``class T(kt.Hyperband, CrossValidatedTuner)``), so that
    the tuner's own ``run_trial`` (Hyperband's sets the epochs) ends up here instead of in
    ``kt.Tuner.run_trial``, which this one follows: fresh model per run, TensorBoard and HParams logs,
    best-epoch checkpoint. Each fold keeps its own checkpoint, so Hyperband continues a fold's model from
    the same fold's model of the earlier round. Besides the objective (the mean over folds and executions
    of each model's best epoch) a trial reports ``<objective>_fold<k>`` per fold when there are several,
    ``epochs`` (epochs the models reached) and ``seconds`` (the trial's wall-clock time); keras-tuner keeps
    them in its trial files, so they survive a resumed search and reach the chief of a distributed one.

    Uses keras-tuner 1.4 internals (``_build_and_fit_model``, ``_configure_tensorboard_dir``,
    ``_get_checkpoint_fname``), hence the ``<1.5`` pin in pyproject.toml.
    """

    _fold = 0

    def run_trial(self, trial, *args, **kwargs):
        started = time.monotonic()
        objective = self.oracle.objective
        original_callbacks = kwargs.pop("callbacks", [])
        num_folds = len(self.hypermodel.folds)
        best_epoch_metrics, fold_scores, epochs = [], [[] for _ in range(num_folds)], []
        try:
            for fold in range(num_folds):
                self._fold = fold
                checkpoint = tuner_utils.SaveBestEpoch(objective, self._get_checkpoint_fname(trial.trial_id))
                for execution in range(self.executions_per_trial):
                    callbacks = self._deepcopy_callbacks(original_callbacks)
                    self._configure_tensorboard_dir(callbacks, trial, execution)
                    callbacks += [tuner_utils.TunerCallback(self, trial), checkpoint]
                    history = self._build_and_fit_model(trial, *args, fold=fold, callbacks=callbacks, **kwargs)
                    metrics = tuner_utils.convert_to_metrics_dict(history, objective)
                    best_epoch_metrics.append(metrics)
                    fold_scores[fold].append(metrics[objective.name])
                    epochs.append(history.epoch[-1] + 1 if history.epoch else kwargs.get("initial_epoch", 0))
        finally:
            self._fold = 0
        report = {name: float(value) for name, value in tuner_utils.average_metrics_dicts(best_epoch_metrics).items()}
        if num_folds > 1:
            report.update({f"{objective.name}_fold{fold}": float(np.mean(scores))
                           for fold, scores in enumerate(fold_scores)})
        report["epochs"] = max(epochs)
        report["seconds"] = time.monotonic() - started
        return report

    def _get_checkpoint_fname(self, trial_id):
        name = "checkpoint.weights.h5" if self._fold == 0 else f"checkpoint_fold{self._fold}.weights.h5"
        return os.path.join(self.get_trial_dir(trial_id), name)

    def _get_tensorboard_dir(self, logdir, trial_id, execution):
        run = f"execution{execution}" if len(self.hypermodel.folds) == 1 else f"fold{self._fold}_execution{execution}"
        return os.path.join(str(logdir), str(trial_id), run)


class HyperbandSearch(kt.Hyperband, CrossValidatedTuner):
    pass


class RandomSearch(kt.RandomSearch, CrossValidatedTuner):
    pass


class BayesianSearch(kt.BayesianOptimization, CrossValidatedTuner):
    pass


TUNERS = {"hyperband": HyperbandSearch, "random": RandomSearch, "bayesian": BayesianSearch}


def make_tuner(config: Config, hypermodel: SegmentationHyperModel, directory: Path, overwrite: bool) -> kt.Tuner:
    tune = config.tune
    # keras-tuner cannot infer whether a custom metric should go up or down: say so explicitly.
    objective = kt.Objective(f"val_{OBJECTIVE}", direction="max")
    common = dict(objective=objective, directory=str(directory), project_name=layout.KERAS_TUNER, overwrite=overwrite,
                  seed=config.seed, executions_per_trial=tune.executions_per_trial)
    tuner_class = TUNERS[tune.tuner]
    if tuner_class is HyperbandSearch:
        tuner = tuner_class(hypermodel, max_epochs=tune.max_epochs, factor=3, **common)
    else:
        tuner = tuner_class(hypermodel, max_trials=tune.max_trials, **common)
    if distributed_role() != "worker":  # A worker's oracle is a client of the chief's, which keeps the limits.
        _limit_trials(tuner.oracle, tune.max_trials, tune.time_budget_minutes)
    return tuner


def _limit_trials(oracle: kt.Oracle, max_trials: int, minutes: Optional[float]) -> None:
    """End the search cleanly after ``max_trials`` trials or when the wall-clock budget is spent.

    keras-tuner's search loop stops when its oracle hands out a STOPPED trial; Hyperband has no trial
    limit of its own and no tuner has a time limit, so the oracle's ``create_trial`` is wrapped here. A
    trial interrupted in an earlier run (waiting in the retry queue) still runs when the search resumes.
    """
    create_trial = oracle.create_trial
    started = time.monotonic()

    def limited_create_trial(tuner_id):
        retries_pending = bool(getattr(oracle, "_retry_queue", []))
        out_of_trials = len(oracle.trials) >= max_trials and not retries_pending
        out_of_time = minutes is not None and time.monotonic() - started >= minutes * 60
        if out_of_trials or out_of_time:
            # As the oracle's own create_trial does: a tuner told to stop is no longer waited for (the
            # chief of a distributed search ends when none is left).
            oracle.tuner_ids.discard(tuner_id)
            return kt.engine.trial.Trial(oracle.get_space(), status=kt.engine.trial.TrialStatus.STOPPED)
        return create_trial(tuner_id)

    oracle.create_trial = limited_create_trial


def distributed_role() -> Optional[str]:
    """"chief", "worker" or None (not distributed), by keras-tuner's rules for its environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if name not in os.environ]
    if missing:
        raise ConfigError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} not: a distributed search "
                          "needs all three")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


# ----------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------
def _metric(trial, name: str):
    return trial.metrics.get_best_value(name) if trial.metrics.exists(name) else None


def trials_table(oracle: kt.Oracle) -> pd.DataFrame:
    """One row per trial in the order they started: values, objective (and per fold), epochs, seconds."""
    order = list(oracle.start_order) + sorted(set(oracle.trials) - set(oracle.start_order))
    rows = []
    for trial_id in order:
        trial = oracle.trials[trial_id]
        values = dict(trial.hyperparameters.values)
        hyperband_epochs = values.get("tuner/epochs")
        values = {k: v for k, v in values.items() if not k.startswith("tuner/")}
        folds = {name: _metric(trial, name) for name in sorted(trial.metrics.metrics)
                 if name.startswith(f"val_{OBJECTIVE}_fold")}
        epochs = _metric(trial, "epochs")
        rows.append({"trial_id": trial_id, "status": str(trial.status), **values,
                     f"val_{OBJECTIVE}": trial.score, **folds,
                     "epochs": int(epochs) if epochs is not None else hyperband_epochs,
                     "seconds": _metric(trial, "seconds")})
    return pd.DataFrame(rows)


def objective_figure(table: pd.DataFrame, names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = [n for n in names if n in table.columns and table[n].nunique(dropna=True) > 1] or names[:1]
    scored = table.dropna(subset=[f"val_{OBJECTIVE}"])
    columns = min(3, max(1, len(names)))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        values = scored[name] if name in scored else pd.Series([None] * len(scored))
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            axis.scatter(values, scored[f"val_{OBJECTIVE}"], color="tab:blue")
            if name == "learning_rate":
                axis.set_xscale("log")
                # Within less than a decade matplotlib's log ticks (3x10^-4, 4x10^-4, ...) overlap: ticks at
                # 1, 2 and 5 per decade, in plain numbers.
                axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                axis.xaxis.set_minor_formatter(NullFormatter())
        else:
            labels = values.astype(str)
            categories = sorted(labels.unique())
            axis.scatter([categories.index(v) for v in labels], scored[f"val_{OBJECTIVE}"], color="tab:blue")
            axis.set_xticks(range(len(categories)), categories)
        axis.set_xlabel(name)
        axis.set_ylabel("validation mean foreground Dice")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.suptitle("Search objective against each hyperparameter (one point per trial)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@dataclasses.dataclass
class TuneResult:
    output_dir: Path
    num_trials: int
    best_score: float
    best_values: dict
    folds: int = 1

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.best_values.items() if not k.startswith("tuner/"))
        scored_on = "validation" if self.folds == 1 else f"mean {self.folds}-fold validation"
        text = f"Searched {self.num_trials} trials; best {scored_on} {OBJECTIVE} {self.best_score:.4f} with {shown}\n"
        if WINDOW in self.best_values:
            text += (f"The train stage does not apply {WINDOW}: set preload.normalization.window = "
                     f"[{self.best_values[WINDOW]}] (method ct_window) and run preload again.\n")
        return text + str(self.output_dir / layout.BEST_HYPERPARAMETERS)


@dataclasses.dataclass
class WorkerResult:
    output_dir: Path
    tuner_id: str
    trial_ids: list

    def __str__(self) -> str:
        return (f"Worker {self.tuner_id} ran trials {', '.join(self.trial_ids) or '(none)'}; the chief writes "
                f"the summary files in {self.output_dir}")


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------
@locks.locked("tune")
def run_search(config: Config, overwrite: bool = False) -> Union[TuneResult, WorkerResult]:
    """Run (or resume) the search and write the tune stage's artifacts.

    In a distributed search (see the module docstring) the chief serves the oracle until the workers have
    finished, then writes the summaries; a worker runs trials and writes none (it never deletes anything,
    even with ``overwrite``: start the chief first).
    """
    role = distributed_role()
    validate_search_space(config)
    manifest = read_manifest(config.preloaded_dir)
    check_classes(config.classes, manifest.classes, f"the preloaded dataset {config.preloaded_dir}")
    out_dir = config.stage_dir("tune")
    if overwrite and role == "worker":
        print("--overwrite is ignored on a worker: the chief starts the search afresh")
    elif overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)

    folds = search_folds(config)
    if role != "worker":
        save_resolved_config(config, config.experiment_dir)
        save_resolved_config(config, out_dir)
        samples = manifest.train.samples
        parts = [{"train": [samples[i].id for i in train], "validation": [samples[i].id for i in validation]}
                 for train, validation in folds]
        write_json_atomic(parts[0] if len(parts) == 1 else {"folds": parts}, out_dir / layout.VALIDATION_SPLIT)
    hypermodel = SegmentationHyperModel(config, (*manifest.sample_size, len(manifest.channels)), folds)
    tuner = make_tuner(config, hypermodel, out_dir, overwrite=False)
    if role != "worker" and tuner.oracle.trials:
        finished = sum(t.status != kt.engine.trial.TrialStatus.RUNNING for t in tuner.oracle.trials.values())
        print(f"Resuming the search in {out_dir / layout.KERAS_TUNER}: {finished} trials finished earlier")
    if role == "chief":
        print(f"Serving the search's oracle on {os.environ['KERASTUNER_ORACLE_IP']}:"
              f"{os.environ['KERASTUNER_ORACLE_PORT']} until the workers have run its trials")

    callbacks = [keras.callbacks.TensorBoard(log_dir=str(out_dir / layout.TENSORBOARD), write_graph=False),
                 TimeBudget(config.tune.time_budget_minutes)]
    trial_ids = []
    original_on_trial_begin = tuner.on_trial_begin

    def on_trial_begin(trial):
        trial_ids.append(trial.trial_id)
        original_on_trial_begin(trial)

    tuner.on_trial_begin = on_trial_begin
    # On the chief this serves the oracle until the workers are done; elsewhere it runs trials.
    tuner.search(epochs=config.tune.max_epochs, callbacks=callbacks)
    if role == "worker":
        return WorkerResult(out_dir, tuner.tuner_id, trial_ids)

    table = trials_table(tuner.oracle)
    write_text_atomic(table.to_csv(index=False), out_dir / layout.TRIALS)
    best_trials = tuner.oracle.get_best_trials(1)
    if not best_trials or best_trials[0].score is None:
        raise ConfigError(f"tune.time_budget_minutes: the search finished no trial with a score in {out_dir}; "
                          "give it more time")
    best = best_trials[0]
    values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    write_json_atomic({"objective": f"val_{OBJECTIVE}", "direction": "max", "score": best.score,
                       "folds": config.tune.folds, "trial_id": best.trial_id, "values": values},
                      out_dir / layout.BEST_HYPERPARAMETERS)
    objective_figure(table, list(search_space(config)), out_dir / layout.TUNING_FIGURE)
    return TuneResult(out_dir, len(table), float(best.score), values, config.tune.folds)
