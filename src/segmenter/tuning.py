"""Hyperparameter search with keras-tuner on a validation split of the training set.

The test split is never read here. ``experiments/<experiment>/tune/`` afterwards holds keras-tuner's own
project folder (``keras_tuner/``; with ``overwrite=False`` a rerun reloads it, so an interrupted search
resumes where it stopped), ``tensorboard/<trial>/`` (scalars and the HParams dashboard for every trial),
``trials.csv``, ``best_hyperparameters.json``, ``objective_vs_hyperparameters.png``, ``validation_split.json``
and ``config.resolved.json``.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd

from segmenter.artifacts import read_json, save_resolved_config, write_json_atomic, write_text_atomic
from segmenter.config import Config
from segmenter.data_pipeline import make_dataset
from segmenter.dataset import read_manifest
from segmenter.preprocessing import split_train_test
from segmenter.training import OBJECTIVE, TimeBudget, apply_hyperparameters, build_compiled_model

# The search space, in one place. Each entry is a list (a choice), a dict {"min", "max"[, "step"]
# [, "sampling": "log"]} (a range), or a single value (fixed). Names are fields of the train section
# (``learning_rate``, ``loss``), of ``train.model`` (``architecture``, ``depth``, ...) or of
# ``train.augmentation`` (``flip_vertical``, ``rotation_degrees``, ...), so the best values drop straight
# into the train stage. ``tune.search_space`` in the config replaces entries by name; set an entry to a
# single value to fix it, or add any other field name to search it too.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "architecture": ["unet"],
    "depth": [3, 4],
    "base_filters": [8, 16, 32],
    "dropout": {"min": 0.0, "max": 0.3, "step": 0.1},
    "learning_rate": {"min": 1e-4, "max": 3e-3, "sampling": "log"},
    "loss": ["dice", "dice_ce"],
    "flip_vertical": [False, True],
}


def search_space(config: Config) -> dict[str, Any]:
    return {**DEFAULT_SEARCH_SPACE, **config.tune.search_space}


def declare(hp: kt.HyperParameters, name: str, spec: Any):
    """Declare one hyperparameter from its search-space entry and return its value for this trial."""
    if isinstance(spec, list):
        return hp.Choice(name, spec) if len(spec) > 1 else hp.Fixed(name, spec[0])
    if isinstance(spec, dict):
        low, high = spec["min"], spec["max"]
        if isinstance(low, int) and isinstance(high, int) and not isinstance(spec.get("step", 1), float):
            return hp.Int(name, low, high, step=spec.get("step", 1))
        return hp.Float(name, float(low), float(high), step=spec.get("step"), sampling=spec.get("sampling", "linear"))
    return hp.Fixed(name, spec)


class SegmentationHyperModel(kt.HyperModel):
    """Builds a compiled model and its (possibly augmented) input pipeline from one trial's values."""

    def __init__(self, config: Config, input_shape, train_indices, validation_indices):
        super().__init__(name="segmentation")
        self.config = config
        self.input_shape = input_shape
        self.train_indices = train_indices
        self.validation_indices = validation_indices
        self.space = search_space(config)

    def _settings(self, hp: kt.HyperParameters):
        values = {name: declare(hp, name, spec) for name, spec in self.space.items()}
        return apply_hyperparameters(self.config.train, values)

    def build(self, hp):
        return build_compiled_model(self._settings(hp), self.input_shape, self.config.classes)

    def fit(self, hp, model, *args, **kwargs):
        settings = self._settings(hp)
        config = self.config
        train_data, _ = make_dataset(config.preloaded_dir, "train", config.num_classes, settings.batch_size,
                                     augmentation=settings.augmentation, shuffle=True, seed=config.seed,
                                     subset=self.train_indices)
        validation_data, _ = make_dataset(config.preloaded_dir, "train", config.num_classes, settings.batch_size,
                                          subset=self.validation_indices)
        return model.fit(train_data, validation_data=validation_data, shuffle=False, verbose=2, **kwargs)


def _tuner_class(name: str):
    return {"hyperband": kt.Hyperband, "random": kt.RandomSearch, "bayesian": kt.BayesianOptimization}[name]


def make_tuner(config: Config, hypermodel: SegmentationHyperModel, directory: Path, overwrite: bool) -> kt.Tuner:
    tune = config.tune
    # keras-tuner cannot infer whether a custom metric should go up or down: say so explicitly.
    objective = kt.Objective(f"val_{OBJECTIVE}", direction="max")
    common = dict(objective=objective, directory=str(directory), project_name="keras_tuner", overwrite=overwrite,
                  seed=config.seed, executions_per_trial=tune.executions_per_trial)
    tuner_class = _tuner_class(tune.tuner)
    if tuner_class is kt.Hyperband:
        tuner = kt.Hyperband(hypermodel, max_epochs=tune.max_epochs, factor=3, **common)
    else:
        tuner = tuner_class(hypermodel, max_trials=tune.max_trials, **common)
    _limit_trials(tuner, tune.max_trials, tune.time_budget_minutes)
    return tuner


def _limit_trials(tuner: kt.Tuner, max_trials: int, minutes) -> None:
    """End the search cleanly after ``max_trials`` trials or when the wall-clock budget is spent.

    keras-tuner's search loop stops when its oracle hands out a STOPPED trial; Hyperband has no trial
    limit of its own and no tuner has a time limit, so the oracle's ``create_trial`` is wrapped here.
    """
    oracle = tuner.oracle
    create_trial = oracle.create_trial
    started = time.monotonic()

    def limited_create_trial(tuner_id):
        finished = [t for t in oracle.trials.values() if t.status != kt.engine.trial.TrialStatus.RUNNING]
        out_of_time = minutes is not None and time.monotonic() - started >= minutes * 60
        if len(finished) >= max_trials or out_of_time:
            return kt.engine.trial.Trial(oracle.get_space(), status=kt.engine.trial.TrialStatus.STOPPED)
        return create_trial(tuner_id)

    oracle.create_trial = limited_create_trial


def validation_indices(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Split the training slices into search-train and validation parts, grouped by volume like preload."""
    slices = read_manifest(config.preloaded_dir)["splits"]["train"]["slices"]
    ids = [s["id"] for s in slices]
    return split_train_test(ids, [s["volume_id"] for s in slices], [s["labels"] != [0] for s in slices],
                            config.tune.validation_fraction, config.seed)


def trials_table(tuner: kt.Tuner, trial_seconds: dict) -> pd.DataFrame:
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        values = dict(trial.hyperparameters.values)
        epochs = values.pop("tuner/epochs", None)
        for internal in [k for k in values if k.startswith("tuner/")]:
            values.pop(internal)
        history = trial.metrics.get_history(f"val_{OBJECTIVE}") if trial.metrics.exists(f"val_{OBJECTIVE}") else []
        rows.append({"trial_id": trial_id, "status": str(trial.status), **values,
                     f"val_{OBJECTIVE}": trial.score,
                     "epochs": epochs if epochs is not None else (len(history) or None),
                     "seconds": trial_seconds.get(trial_id)})
    return pd.DataFrame(rows)


def objective_figure(table: pd.DataFrame, names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


class _TrialTimer(keras.callbacks.Callback):
    """Adds each trial's training seconds to ``trial_seconds.json`` (kept across resumed searches)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def on_train_begin(self, logs=None):
        self.started = time.monotonic()

    def on_train_end(self, logs=None):
        log_dir = getattr(self, "trial_id", None)
        times = read_json(self.path) if self.path.is_file() else {}
        times[log_dir or str(len(times))] = times.get(log_dir, 0.0) + time.monotonic() - self.started
        write_json_atomic(times, self.path)


@dataclasses.dataclass
class TuneResult:
    output_dir: Path
    num_trials: int
    best_score: float
    best_values: dict

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.best_values.items() if not k.startswith("tuner/"))
        return (f"Searched {self.num_trials} trials; best validation {OBJECTIVE} {self.best_score:.4f} with {shown}\n"
                f"{self.output_dir / 'best_hyperparameters.json'}")


def run_search(config: Config, overwrite: bool = False) -> TuneResult:
    """Run (or resume) the search and write the tune stage's artifacts."""
    manifest = read_manifest(config.preloaded_dir)
    out_dir = config.stage_dir("tune")
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, config.experiment_dir)
    save_resolved_config(config, out_dir)
    keras.utils.set_random_seed(config.seed)

    train_indices, val_indices = validation_indices(config)
    slices = manifest["splits"]["train"]["slices"]
    write_json_atomic({"train": [slices[i]["id"] for i in train_indices],
                       "validation": [slices[i]["id"] for i in val_indices]}, out_dir / "validation_split.json")
    input_shape = (*manifest["image_size"], manifest["channels"])
    hypermodel = SegmentationHyperModel(config, input_shape, train_indices, val_indices)
    tuner = make_tuner(config, hypermodel, out_dir, overwrite=False)

    seconds_path = out_dir / "trial_seconds.json"
    timer = _TrialTimer(seconds_path)
    callbacks = [keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard"), write_graph=False),
                 TimeBudget(config.tune.time_budget_minutes), timer]
    # The timer needs the trial id: keras-tuner gives callbacks none, so take it from on_trial_begin.
    original_on_trial_begin = tuner.on_trial_begin

    def on_trial_begin(trial):
        timer.trial_id = trial.trial_id
        original_on_trial_begin(trial)

    tuner.on_trial_begin = on_trial_begin
    tuner.search(epochs=config.tune.max_epochs, callbacks=callbacks)

    table = trials_table(tuner, read_json(seconds_path) if seconds_path.is_file() else {})
    write_text_atomic(table.to_csv(index=False), out_dir / "trials.csv")
    best_trials = tuner.oracle.get_best_trials(1)
    if not best_trials or best_trials[0].score is None:
        raise RuntimeError(f"{out_dir}: the search finished no trial with a score; raise tune.time_budget_minutes")
    best = best_trials[0]
    values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    write_json_atomic({"objective": f"val_{OBJECTIVE}", "direction": "max", "score": best.score,
                       "trial_id": best.trial_id, "values": values}, out_dir / "best_hyperparameters.json")
    objective_figure(table, list(search_space(config)), out_dir / "objective_vs_hyperparameters.png")
    return TuneResult(out_dir, len(table), float(best.score), values)
