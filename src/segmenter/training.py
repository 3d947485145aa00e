"""Train the final model on the whole training set and save it with its history, curves and checkpoints.

``experiments/<experiment>/train/`` afterwards holds::

    model/                    the trained model as one unit, replaced whole only when training succeeded:
      model.keras             the final model (loads with keras.models.load_model after ``import segmenter``)
      hyperparameters.json    the settings the model was trained with, and where they came from
      preprocessing.json      what inference needs to prepare new images as the training slices were
      config.resolved.json
    checkpoints/last.keras    the model and optimizer state after the last finished epoch
    checkpoints/best.keras    the same after the best epoch (validation mean foreground Dice, else loss)
    checkpoints/state.json    the epoch, elapsed time and best epoch that checkpoint belongs to (for --resume)
    checkpoints/settings.json the settings the checkpoints were trained with (--resume refuses others)
    history.csv               one row per epoch (Keras CSVLogger), with val_ columns and the learning rate
    tensorboard/              TensorBoard logs
    training_curves.png       loss and Dice per epoch
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import keras
import numpy as np

from segmenter import layout, locks, losses, metrics, models
from segmenter.artifacts import (atomic_directory, atomic_file, read_json, save_resolved_config, write_json_atomic,
                                 write_text_atomic)
from segmenter.config import AugmentationConfig, Config, ConfigError, ModelConfig, TrainConfig
from segmenter.data_pipeline import batch_for_training, epochs_dataset, samples_dataset
from segmenter.errors import InputError
from segmenter.manifest import check_classes, read_manifest

OBJECTIVE = "mean_foreground_dice"


# ----------------------------------------------------------------------------------------------------
# Settings: the config's, with the tuned hyperparameters on top
# ----------------------------------------------------------------------------------------------------
def apply_hyperparameters(train: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Return ``train`` with hyperparameter values (flat names, as the tuner uses) put in their sections.

    A name that is a field of ``ModelConfig`` goes to ``train.model``, of ``AugmentationConfig`` to
    ``train.augmentation``, of ``TrainConfig`` to ``train``; names of none are ignored (e.g. keras-tuner's
    own ``tuner/epochs``).
    """
    merged = train.model_dump()
    for name, value in values.items():
        if name in ModelConfig.model_fields:
            merged["model"][name] = value
        elif name in AugmentationConfig.model_fields:
            merged["augmentation"][name] = value
        elif name in TrainConfig.model_fields and name not in ("model", "augmentation"):
            merged[name] = value
    return TrainConfig.model_validate(merged)


def best_hyperparameters_path(config: Config) -> Path:
    return config.stage_dir("tune") / layout.BEST_HYPERPARAMETERS


def resolve_train_settings(config: Config) -> tuple[TrainConfig, str]:
    """The training settings to use and a phrase saying where they came from."""
    path = best_hyperparameters_path(config)
    if config.train.use_tuned_hyperparameters and path.is_file():
        return apply_hyperparameters(config.train, read_json(path)["values"]), f"tuned ({path})"
    return config.train, "config (no tuning results used)"


# ----------------------------------------------------------------------------------------------------
# Building blocks shared with the tune stage
# ----------------------------------------------------------------------------------------------------
def configure_precision(train: TrainConfig) -> None:
    # Mixed precision pays off on GPUs with tensor cores; on CPU it runs, just without a speed-up.
    keras.mixed_precision.set_global_policy("mixed_float16" if train.mixed_precision else "float32")


def make_optimizer(train: TrainConfig) -> keras.optimizers.Optimizer:
    clip = {"clipnorm": train.gradient_clip_norm} if train.gradient_clip_norm is not None else {}
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=train.learning_rate, weight_decay=train.weight_decay, **clip)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=train.learning_rate, **clip)
    return keras.optimizers.SGD(learning_rate=train.learning_rate, momentum=0.99, nesterov=True, **clip)


def learning_rate_at(train: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (from 0) under ``train.lr_schedule`` and ``train.warmup_epochs``.

    A function of the epoch alone, so a resumed run continues the schedule where it stopped.
    """
    base, warmup = train.learning_rate, train.warmup_epochs
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    progress = min(1.0, (epoch - warmup) / max(1, train.epochs - warmup))
    if train.lr_schedule == "poly":
        return base * (1.0 - progress) ** 0.9
    if train.lr_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def build_compiled_model(train: TrainConfig, input_shape, class_names: list[str]) -> keras.Model:
    configure_precision(train)
    model = models.build_model(train.model, input_shape, len(class_names))
    compile_model(model, train, class_names)
    return model


def compile_model(model: keras.Model, train: TrainConfig, class_names: list[str]) -> None:
    model.compile(
        optimizer=make_optimizer(train),
        loss=losses.get_loss(train.loss, len(class_names), train.class_weights),
        metrics=metrics.get_metrics(class_names),
        steps_per_execution=train.steps_per_execution,
        jit_compile=False,  # XLA was slower on CPU (3D convolutions 12x slower), so it stays off.
    )


class TimeBudget(keras.callbacks.Callback):
    """Stops training cleanly once a wall-clock budget is spent, keeping what was learnt so far."""

    def __init__(self, minutes: Optional[float], already_spent_s: float = 0.0):
        super().__init__()
        self.budget_s = None if minutes is None else minutes * 60.0
        self.already_spent_s = already_spent_s
        self.started = time.monotonic()
        self.stopped_early = False

    def elapsed_s(self) -> float:
        return self.already_spent_s + time.monotonic() - self.started

    def on_train_batch_end(self, batch, logs=None):
        if self.budget_s is not None and self.elapsed_s() >= self.budget_s:
            self.model.stop_training = True
            self.stopped_early = True


class DivergenceGuard(keras.callbacks.TerminateOnNaN):
    """Keras' TerminateOnNaN that also remembers the epoch (from 0) whose loss became NaN or infinite."""

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.diverged_epoch: Optional[int] = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.diverged_epoch = self.epoch
        super().on_batch_end(batch, logs)


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; nothing of that run replaced model.keras (exit status 1)."""


def _finite(value) -> bool:
    try:
        return value is not None and bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer after every epoch under a temporary name, then renames it into place.

    Keras' ModelCheckpoint writes in place, so an interruption while saving leaves a corrupt file; this
    one never does, and records the epoch and elapsed time that ``--resume`` continues from. It also keeps
    the best epoch's model (``monitor``, higher is better for ``mode="max"``) as best.keras, the settings
    beside the checkpoints, and stops training after ``patience`` epochs without a better ``monitor``.
    An epoch whose loss is not finite is never saved.
    """

    def __init__(self, folder: Path, time_budget: TimeBudget, *, settings: Optional[dict] = None,
                 monitor: str = "loss", mode: str = "min", best: Optional[dict] = None,
                 patience: Optional[int] = None):
        super().__init__()
        self.folder = Path(folder)
        self.time_budget = time_budget
        self.settings = settings
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best = best or {"monitor": monitor, "value": None, "epoch": 0}
        self.stopped_early = False

    def _improved(self, value) -> bool:
        if not _finite(value):
            return False
        best = self.best["value"]
        return best is None or (float(value) > best if self.mode == "max" else float(value) < best)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _finite(logs.get("loss", 0.0)):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._improved(logs.get(self.monitor)):
            save_model_atomic(self.model, self.folder / layout.BEST_CHECKPOINT)
            self.best = {"monitor": self.monitor, "value": float(logs[self.monitor]), "epoch": epoch + 1}
        save_model_atomic(self.model, self.folder / layout.LAST_CHECKPOINT)
        if self.settings is not None:
            write_json_atomic(self.settings, self.folder / layout.CHECKPOINT_SETTINGS)
        write_json_atomic({"epoch": epoch + 1, "elapsed_s": self.time_budget.elapsed_s(), "metrics": logs,
                           "best": self.best}, self.folder / layout.CHECKPOINT_STATE)
        if self.patience is not None and epoch + 1 - self.best["epoch"] >= self.patience:
            self.model.stop_training = True
            self.stopped_early = True
            print(f"Early stopping: no better {self.monitor} in the {self.patience} epochs since epoch "
                  f"{self.best['epoch']}")


class EncoderUnfreeze(keras.callbacks.Callback):
    """Unfreezes a pretrained encoder after its frozen warm-up epochs."""

    def __init__(self, epochs_frozen: int, train: TrainConfig, class_names: list[str]):
        super().__init__()
        self.epochs_frozen = epochs_frozen
        self.train_settings = train
        self.class_names = class_names

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epochs_frozen:
            models.set_encoder_trainable(self.model, True)
            # The compiled train step captured the trainable variables and the optimizer was built for
            # the decoder's alone: recompile (a fresh optimizer, as is usual for fine-tuning) and retrace.
            compile_model(self.model, self.train_settings, self.class_names)
            self.model.make_train_function(force=True)


def _drop_history_after(history_csv: Path, epoch: int) -> None:
    """Forget history rows of epochs the checkpoint does not include (an interruption while saving)."""
    if history_csv.is_file():
        import pandas as pd

        history = pd.read_csv(history_csv)
        if (history.epoch >= epoch).any():
            write_text_atomic(history[history.epoch < epoch].to_csv(index=False), history_csv)


def save_model_atomic(model: keras.Model, path: Path) -> Path:
    with atomic_file(path) as tmp:  # ".<stem>.<pid>.tmp.keras": Keras insists on the suffix
        model.save(tmp)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    model_path: Path
    epochs: int
    seconds: float
    images_per_second: float
    final_metrics: dict
    settings_source: str
    #: Epochs done before this call (a --resume continues from a checkpoint), and the configured number.
    first_epoch: int = 0
    planned_epochs: Optional[int] = None

    def __str__(self) -> str:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.final_metrics.items() if isinstance(v, float))
        done = self.epochs - self.first_epoch  # the epochs this call trained; self.epochs counts all
        planned = self.planned_epochs if self.planned_epochs is not None else self.epochs
        plural = "" if done == 1 else "s"
        if self.first_epoch == 0:
            what = f"Trained {done} epoch{plural}" + (f" of {planned}" if done < planned else "")
        elif done == 0:
            what = f"Trained no more epochs (all {self.epochs} of {planned} were done already)"
        else:
            numbers = f"epoch {self.epochs}" if done == 1 else f"epochs {self.first_epoch + 1}-{self.epochs}"
            what = f"Trained {done} more epoch{plural} ({numbers} of {planned})"
        return (f"{what} in {self.seconds:.0f} s ({self.images_per_second:.2f} images/s), "
                f"settings from {self.settings_source}; {shown}\n{self.model_path}")


#: Settings a --resume may change: it may extend a run.
RESUMABLE_CHANGES = ("train.epochs", "train.time_budget_minutes")


def _flatten(values: dict, prefix: str) -> dict:
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def checkpoint_settings(config: Config, train: TrainConfig) -> dict:
    """What the checkpoints depend on, by dotted name: the seed and the resolved train settings."""
    return {"seed": config.seed, **_flatten(train.model_dump(mode="json"), "train.")}


def check_resume_settings(saved: dict, current: dict) -> None:
    """Refuse (one line) to resume a checkpoint trained with other settings, epochs and time budget aside."""
    changed = [name for name in sorted(set(saved) | set(current))
               if name not in RESUMABLE_CHANGES and saved.get(name) != current.get(name)]
    if changed:
        shown = ", ".join(f"{name} {saved.get(name)!r} -> {current.get(name)!r}" for name in changed)
        raise ConfigError(f"--resume: the settings differ from the checkpoint's ({shown}); resume with the "
                          f"checkpoint's settings, or train without --resume to start over")


def validation_split(config: Config, fraction: float) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(train, validation) indices into the training samples, whole patients/volumes drawn with the seed;
    (None, None) for ``fraction`` 0."""
    if fraction <= 0:
        return None, None
    from segmenter.preprocessing import split_train_test
    from segmenter.tuning import _training_slices  # the tune stage's grouping of the samples

    ids, groups, foreground = _training_slices(config)
    try:
        return split_train_test(ids, groups, foreground, fraction, config.seed)
    except ValueError as error:
        raise ConfigError(f"train.validation_fraction: {error}") from None


@locks.locked("train")
def train_final_model(config: Config, resume: bool = False) -> TrainResult:
    """Train on the whole training split; see the module docstring for what is written."""
    manifest = read_manifest(config.preloaded_dir)
    check_classes(config.classes, manifest.classes, f"the preloaded dataset {config.preloaded_dir}")
    train_settings, source = resolve_train_settings(config)
    out_dir = config.stage_dir("train")
    checkpoint_dir = out_dir / layout.CHECKPOINTS
    last_checkpoint = checkpoint_dir / layout.LAST_CHECKPOINT
    best_checkpoint = checkpoint_dir / layout.BEST_CHECKPOINT
    state_path = checkpoint_dir / layout.CHECKPOINT_STATE
    settings_path = checkpoint_dir / layout.CHECKPOINT_SETTINGS
    history_csv = layout.history_path(out_dir)
    settings = checkpoint_settings(config, train_settings)
    keras.utils.set_random_seed(config.seed)

    train_indices, validation_indices = validation_split(config, train_settings.validation_fraction)
    validating = validation_indices is not None
    monitor, mode = (f"val_{OBJECTIVE}", "max") if validating else ("loss", "min")
    keep = train_settings.keep or ("best" if validating else "last")
    input_shape = (*manifest.sample_size, len(manifest.channels))

    initial_epoch, spent_s, best = 0, 0.0, None
    if resume and last_checkpoint.is_file() and state_path.is_file():
        if settings_path.is_file():
            check_resume_settings(read_json(settings_path), settings)
        state = read_json(state_path)
        initial_epoch, spent_s = int(state["epoch"]), float(state["elapsed_s"])
        best = state.get("best") if (state.get("best") or {}).get("monitor") == monitor else None
        configure_precision(train_settings)
        model = keras.models.load_model(last_checkpoint)
        _drop_history_after(history_csv, initial_epoch)
        print(f"Resuming from epoch {initial_epoch} ({last_checkpoint})")
    else:
        if resume:
            print(f"No checkpoint in {checkpoint_dir}; starting from scratch")
        if out_dir.exists():
            for stale in [last_checkpoint, best_checkpoint, state_path, settings_path, history_csv]:
                stale.unlink(missing_ok=True)
            shutil.rmtree(out_dir / layout.TENSORBOARD, ignore_errors=True)
        try:
            model = build_compiled_model(train_settings, input_shape, config.classes)
        except ValueError as error:  # e.g. a missing encoder weights file: the user's setting, named.
            raise ConfigError(f"train.model: {error}") from None
        if train_settings.model.freeze_encoder_epochs > 0:
            models.set_encoder_trainable(model, False)
            compile_model(model, train_settings, config.classes)

    # Each epoch's order and augmentation depend on (seed, epoch) alone: runs repeat, resumes continue.
    samples, num_slices = samples_dataset(config.preloaded_dir, train_indices)
    dataset = epochs_dataset(samples, num_slices, config.num_classes, train_settings.batch_size,
                             first_epoch=initial_epoch, epochs=train_settings.epochs,
                             augmentation=train_settings.augmentation, shuffle=True, seed=config.seed)
    validation_data = None
    if validating:
        held_out, num_held_out = samples_dataset(config.preloaded_dir, validation_indices)
        validation_data = batch_for_training(held_out, num_held_out, config.num_classes, train_settings.batch_size)
        print(f"Validating on {num_held_out} of {num_slices + num_held_out} training slices "
              f"(train.validation_fraction {train_settings.validation_fraction})")

    out_dir.mkdir(parents=True, exist_ok=True)
    # The experiment's resolved config names the run from its start, so that `segmenter train --resume
    # experiments/<name>` finds it even when the first run is interrupted before it saves anything else.
    save_resolved_config(config, config.experiment_dir)
    time_budget = TimeBudget(train_settings.time_budget_minutes, already_spent_s=spent_s)
    guard = DivergenceGuard()
    checkpoint = AtomicCheckpoint(checkpoint_dir, time_budget, settings=settings, monitor=monitor, mode=mode,
                                  best=best, patience=train_settings.early_stopping_patience)
    callbacks = [time_budget, guard]
    if train_settings.model.freeze_encoder_epochs > initial_epoch:
        # Before the scheduler: unfreezing recompiles with a fresh optimizer at the base learning rate.
        callbacks.append(EncoderUnfreeze(train_settings.model.freeze_encoder_epochs, train_settings, config.classes))
    callbacks += [
        # Sets the epoch's learning rate and logs it ("learning_rate" in history.csv).
        keras.callbacks.LearningRateScheduler(lambda epoch, _lr: learning_rate_at(train_settings, epoch)),
        checkpoint,
        keras.callbacks.CSVLogger(str(history_csv), append=initial_epoch > 0),
        keras.callbacks.TensorBoard(log_dir=str(out_dir / layout.TENSORBOARD), write_graph=False),
    ]

    started = time.monotonic()
    history = model.fit(dataset, epochs=train_settings.epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                        steps_per_epoch=max(1, math.ceil(num_slices / train_settings.batch_size)),
                        validation_data=validation_data, shuffle=False, verbose=2)  # The dataset shuffles itself.
    seconds = time.monotonic() - started
    epochs_done = len(history.epoch)
    model_path = layout.model_path(out_dir)
    if guard.diverged_epoch is not None:
        kept = "the earlier model.keras is kept" if model_path.is_file() else "no model.keras was written"
        raise TrainingDiverged(None, f"training diverged (loss NaN at epoch {guard.diverged_epoch + 1}); "
                                     f"{kept}; try a lower learning rate")
    # model.keras and the files that describe it are one unit (train/model/), written once training succeeded
    # and swapped in whole: a kill at any instant leaves the earlier model with its own settings, or the new one.
    save_resolved_config(config, config.experiment_dir)
    with atomic_directory(layout.model_dir(out_dir)) as bundle:
        save_resolved_config(config, bundle)
        write_json_atomic({"source": source, "settings": train_settings.model_dump(mode="json")},
                          bundle / layout.HYPERPARAMETERS)
        # What inference needs to prepare new images exactly as the training slices were prepared.
        write_json_atomic({**manifest.preprocessing, "classes": config.classes, "channels": manifest.channels,
                           "preload_fingerprint": manifest.fingerprint}, bundle / layout.PREPROCESSING)
        if keep == "best" and best_checkpoint.is_file():
            shutil.copyfile(best_checkpoint, bundle / layout.MODEL)
            print(f"model.keras: the best epoch, {checkpoint.best['epoch']} ({monitor} "
                  f"{checkpoint.best['value']:.4f})")
        else:
            model.save(bundle / layout.MODEL)

    from segmenter.evaluation.figures import training_curves_figure

    training_curves_figure(history_csv, out_dir / layout.TRAINING_CURVES)
    final = {name: float(values[-1]) for name, values in history.history.items() if values}
    return TrainResult(model_path, initial_epoch + epochs_done, seconds,
                       num_slices * epochs_done / max(seconds, 1e-9), final, source,
                       first_epoch=initial_epoch, planned_epochs=train_settings.epochs)
