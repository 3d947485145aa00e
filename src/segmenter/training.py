"""Train the final model on the whole training set and save it with its history, curves and checkpoints.

``experiments/<experiment>/train/`` afterwards holds::

    model/                    the trained model as one unit, replaced whole only when training succeeded:
      model.keras             the final model (loads with keras.models.load_model after ``import segmenter``)
      hyperparameters.json    the settings the model was trained with, and where they came from
      preprocessing.json      what inference needs to prepare new images as the training slices were
      config.resolved.json
    checkpoints/last/         the checkpoint after the last finished epoch, one unit replaced whole after each epoch:
      model.keras             model and optimizer state (the optimizer's step count included)
      state.json              the epochs done, elapsed time, best epoch so far, learning rate of the next epoch, the
                              seed and epoch the data streams continue from, and the dtype policy (what --resume
                              continues from)
      settings.json           the settings the checkpoint was trained with (--resume refuses others)
    checkpoints/best/         the same after the best epoch (validation mean foreground Dice, else loss)
    history.csv               one row per epoch (Keras CSVLogger), with val_ columns and the learning rate
    tensorboard/              TensorBoard logs
    training_curves.png       loss and Dice per epoch

A checkpoint folder is written under a temporary name and swapped in whole (``atomic_directory``): a kill at any
instant leaves the previous checkpoint or the new one, never a new model beside an old state.json. ``--resume``
reads ``checkpoints/last/`` alone; the data pipeline draws each epoch from (seed, epoch), so a resumed run
continues with the same batches, learning rates and optimizer state as an uninterrupted one.

Mixed precision (``train.mixed_precision``; None: on where TensorFlow sees a GPU) computes in float16 with float32
weights, normalisation layers and softmax, and scales the loss (Keras wraps the optimizer in a LossScaleOptimizer).
In a terminal ``model.fit`` shows a progress bar within each epoch; in a log, one line per epoch. After each
epoch a line tells the time per epoch and about how long the remaining epochs (or the time budget) take.

Several GPUs or machines (``train.distribution``): "mirrored" trains one replica per local GPU
(``tf.distribute.MirroredStrategy``), "multi_worker" one per GPU of every machine that ``TF_CONFIG`` names
(``MultiWorkerMirroredStrategy``); ``train.batch_size`` is the global batch, split evenly over the replicas.
Every worker runs this same function; the chief (see :func:`is_chief`) writes ``train/``, the others write
theirs to a temporary folder that is deleted at the end (see :func:`train_final_model`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import keras
import numpy as np

from segmenter import layout, locks, losses, metrics, models
from segmenter.artifacts import (_recover_directory, atomic_directory, read_json, save_resolved_config,
                                 write_json_atomic, write_text_atomic)
from segmenter.config import (DEFAULT_BATCH_SIZE, DEFAULT_DEPTH, AugmentationConfig, Config, ConfigError,
                              ModelConfig, TrainConfig)
from segmenter.data_pipeline import batch_for_training, epochs_dataset, samples_dataset
from segmenter.errors import InputError
from segmenter.manifest import check_classes, read_manifest
from segmenter.positions import input_channels

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


def planned_settings(train: TrainConfig, plan=None) -> TrainConfig:
    """``train`` with the batch size and depth it leaves open (None) filled in: a 3D dataset's plan gives
    them (nnU-Net plans both), 2D takes ``DEFAULT_BATCH_SIZE`` and ``DEFAULT_DEPTH``."""
    if train.batch_size is not None and train.model.depth is not None:
        return train
    merged = train.model_dump()
    if train.batch_size is None:
        merged["batch_size"] = DEFAULT_BATCH_SIZE if plan is None else plan.batch_size
    if train.model.depth is None:
        merged["model"]["depth"] = DEFAULT_DEPTH if plan is None else plan.depth
    return TrainConfig.model_validate(merged)


def resolve_train_settings(config: Config, plan=None) -> tuple[TrainConfig, str]:
    """The training settings to use and a phrase saying where they came from.

    ``plan``: a 3D dataset's :class:`segmenter.manifest.VolumePlan`; its batch size and depth apply where the
    config leaves them open (None), and tuned values apply on top.
    """
    train = planned_settings(config.train, plan)
    path = best_hyperparameters_path(config)
    if config.train.use_tuned_hyperparameters and path.is_file():
        return apply_hyperparameters(train, read_json(path)["values"]), f"tuned ({path})"
    return train, "config (no tuning results used)" + (" and the 3D plan" if plan is not None else "")


# ----------------------------------------------------------------------------------------------------
# Building blocks shared with the tune stage
# ----------------------------------------------------------------------------------------------------
def uses_mixed_precision(train: TrainConfig) -> bool:
    """``train.mixed_precision``, with None resolved: on where TensorFlow sees a GPU, off on CPU."""
    if train.mixed_precision is not None:
        return train.mixed_precision
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def configure_precision(train: TrainConfig) -> str:
    """Set Keras' global dtype policy for the models built next; returns its name.

    Mixed precision pays off on GPUs with tensor cores; on CPU it runs, just without a speed-up. Under
    "mixed_float16" the normalisation layers and the softmax still run in float32 (see models.blocks), and
    ``Model.compile`` wraps the optimizer in a LossScaleOptimizer (Keras' ``auto_scale_loss``).
    """
    policy = "mixed_float16" if uses_mixed_precision(train) else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


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
    """Stops training cleanly once a wall-clock budget is spent, keeping what was learnt so far.

    ``strategy``: with several workers (MultiWorkerMirroredStrategy) every worker must stop at the same step,
    or the others would wait for it forever; their clocks differ, so the budget is then checked after each
    epoch, and all stop when any one's is spent (a sum over the workers).
    """

    def __init__(self, minutes: Optional[float], already_spent_s: float = 0.0, strategy=None):
        super().__init__()
        self.budget_s = None if minutes is None else minutes * 60.0
        self.already_spent_s = already_spent_s
        self.started = time.monotonic()
        self.stopped_early = False
        self.strategy = strategy if worker_count(strategy) > 1 else None

    def elapsed_s(self) -> float:
        return self.already_spent_s + time.monotonic() - self.started

    def _spent(self) -> bool:
        return self.budget_s is not None and self.elapsed_s() >= self.budget_s

    def _stop(self) -> None:
        self.model.stop_training = True
        self.stopped_early = True

    def on_train_batch_end(self, batch, logs=None):
        if self.strategy is None and self._spent():
            self._stop()

    def on_epoch_end(self, epoch, logs=None):
        if self.strategy is not None and self.budget_s is not None:  # the same on every worker: all reduce
            import tensorflow as tf

            with self.strategy.scope():
                spent = self.strategy.reduce(tf.distribute.ReduceOp.SUM, tf.constant(float(self._spent())),
                                             axis=None)
            if float(spent) > 0:
                self._stop()


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


def _format_duration(seconds: float) -> str:
    """``45 s``, ``2 min 40 s``, ``1 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TimeLeft(keras.callbacks.Callback):
    """Prints after each epoch the time per epoch and about how long the rest of training takes.

    The rest is the mean epoch time of this run (checkpoint saving included) times the epochs left, or what is
    left of the time budget if that ends sooner, e.g.
    ``epoch 3/12: 2 min 40 s per epoch, about 24 min 0 s left (of the epochs)``.
    """

    def __init__(self, epochs: int, time_budget: Optional[TimeBudget] = None, print_fn: Callable = print):
        super().__init__()
        self.epochs = epochs
        self.time_budget = time_budget
        self.print_fn = print_fn
        self.started = time.monotonic()
        self.done = 0

    def on_train_begin(self, logs=None):
        self.started, self.done = time.monotonic(), 0

    def message(self, epoch: int) -> str:
        per_epoch = (time.monotonic() - self.started) / max(1, self.done)
        line = f"epoch {epoch + 1}/{self.epochs}: {_format_duration(per_epoch)} per epoch"
        epochs_left = self.epochs - (epoch + 1)
        if epochs_left <= 0 or (self.model is not None and self.model.stop_training):
            return line
        left, of_what = per_epoch * epochs_left, "the epochs"
        if self.time_budget is not None and self.time_budget.budget_s is not None:
            budget_left = max(0.0, self.time_budget.budget_s - self.time_budget.elapsed_s())
            if budget_left < left:
                left, of_what = budget_left, "the time budget"
        return f"{line}, about {_format_duration(left)} left (of {of_what})"

    def on_epoch_end(self, epoch, logs=None):
        self.done += 1
        self.print_fn(self.message(epoch))


def fit_verbosity(stream=None) -> int:
    """``model.fit``'s verbose: 1 (a progress bar within each epoch) in a terminal, 2 (one line per epoch) in a log."""
    stream = sys.stdout if stream is None else stream
    try:
        return 1 if stream.isatty() else 2
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return 2


def _seed_generators(model: keras.Model) -> dict:
    """The random seed generators of the model's layers (e.g. Dropout's), by layer name and number.

    Keras does not save their state with the model (a loaded Dropout starts a new stream), so checkpoints
    record it in state.json and a resume puts it back (:func:`restore_seed_generators`).
    """
    found = {}
    for layer in model._flatten_layers(include_self=False):
        for number, generator in enumerate(getattr(layer, "_seed_generators", None) or []):
            found[f"{layer.name}/{number}"] = generator
    return found


def seed_generator_states(model: keras.Model) -> dict:
    return {name: keras.ops.convert_to_numpy(generator.state).tolist()
            for name, generator in _seed_generators(model).items()}


def restore_seed_generators(model: keras.Model, states: Optional[dict]) -> None:
    """Set the model's seed generators to ``states`` (from :func:`seed_generator_states`) where names match."""
    for name, generator in _seed_generators(model).items():
        if states and name in states:
            generator.state.assign(np.asarray(states[name], dtype=generator.state.dtype))


def read_checkpoint_state(folder: Path) -> Optional[dict]:
    """A checkpoint folder's state.json, or None unless the folder holds both it and model.keras."""
    folder = Path(folder)
    if not ((folder / layout.MODEL).is_file() and (folder / layout.CHECKPOINT_STATE).is_file()):
        return None
    return read_json(folder / layout.CHECKPOINT_STATE)


def save_checkpoint(model: keras.Model, folder: Path, state: dict, settings: Optional[dict] = None) -> Path:
    """Write model.keras (model and optimizer state), state.json and settings.json as one folder, swapped in whole."""
    with atomic_directory(folder) as tmp:
        model.save(tmp / layout.MODEL)
        write_json_atomic(state, tmp / layout.CHECKPOINT_STATE)
        if settings is not None:
            write_json_atomic(settings, tmp / layout.CHECKPOINT_SETTINGS)
    return Path(folder)


def copy_checkpoint(source: Path, folder: Path) -> Path:
    """Replace the checkpoint folder ``folder`` whole with a copy of ``source`` (e.g. last/ becoming best/)."""
    with atomic_directory(folder) as tmp:
        for path in Path(source).iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
    return Path(folder)


def repair_best_checkpoint(checkpoint_dir: Path) -> None:
    """Make ``best/`` the epoch that ``last/state.json`` names as the best, if a kill came between the two.

    After an improving epoch ``last/`` is written first and ``best/`` copied from it; a kill between the two
    leaves ``last/`` recording itself as the best epoch and ``best/`` an earlier one, so ``best/`` is copied
    again. In every other case ``best/`` already holds the epoch ``last/state.json`` names.
    """
    last_dir = Path(checkpoint_dir) / layout.LAST_CHECKPOINT_DIR
    best_dir = Path(checkpoint_dir) / layout.BEST_CHECKPOINT_DIR
    state = read_checkpoint_state(last_dir)
    if state is None or (state.get("best") or {}).get("epoch") != state["epoch"]:
        return
    best_state = read_checkpoint_state(best_dir)
    if best_state is None or best_state["epoch"] != state["epoch"]:
        copy_checkpoint(last_dir, best_dir)


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the checkpoint after every epoch as one folder, ``last/``, swapped in whole; likewise ``best/``.

    Keras' ModelCheckpoint writes in place, so an interruption while saving leaves a corrupt file, and a
    model file saved apart from its state could be paired with another epoch's; here model.keras (model and
    optimizer state), state.json and settings.json are one folder (:func:`save_checkpoint`). state.json
    records the epochs done, the elapsed time, the best epoch so far, the learning rate of the next epoch
    (``learning_rate_of(epoch)``, else the optimizer's current one) and the seed and epoch the stateless data
    streams continue from: what ``--resume`` continues from. After an epoch with a better ``monitor`` (higher
    for ``mode="max"``) ``last/`` is copied to ``best/``. Stops training after ``patience`` epochs without a
    better ``monitor``. An epoch whose loss is not finite is never saved.
    """

    def __init__(self, folder: Path, time_budget: TimeBudget, *, settings: Optional[dict] = None,
                 monitor: str = "loss", mode: str = "min", best: Optional[dict] = None,
                 patience: Optional[int] = None, seed: Optional[int] = None,
                 learning_rate_of: Optional[Callable[[int], float]] = None):
        super().__init__()
        self.folder = Path(folder)
        self.time_budget = time_budget
        self.settings = settings
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best = best or {"monitor": monitor, "value": None, "epoch": 0}
        self.seed = seed
        self.learning_rate_of = learning_rate_of
        self.stopped_early = False

    def _improved(self, value) -> bool:
        if not _finite(value):
            return False
        best = self.best["value"]
        return best is None or (float(value) > best if self.mode == "max" else float(value) < best)

    def _next_learning_rate(self, epoch: int) -> Optional[float]:
        if self.learning_rate_of is not None:
            return float(self.learning_rate_of(epoch + 1))
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:  # an uncompiled model
            return None
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not _finite(logs.get("loss", 0.0)):
            return
        improved = self._improved(logs.get(self.monitor))
        if improved:
            self.best = {"monitor": self.monitor, "value": float(logs[self.monitor]), "epoch": epoch + 1}
        state = {"epoch": epoch + 1, "elapsed_s": self.time_budget.elapsed_s(), "metrics": logs, "best": self.best,
                 "next_learning_rate": self._next_learning_rate(epoch),
                 # The data pipeline has no random state to save: each epoch's order and augmentation are drawn
                 # from (seed, epoch) alone, so these two determine every stream that follows. The layers'
                 # generators (Dropout's) have state, which Keras does not save with the model.
                 "random": {"seed": self.seed, "next_epoch": epoch + 1,
                            "layers": seed_generator_states(self.model)},
                 # The policy the model was built under, which a resume loads it under (see train_final_model).
                 "dtype_policy": self.model.dtype_policy.name}
        last_dir = self.folder / layout.LAST_CHECKPOINT_DIR
        save_checkpoint(self.model, last_dir, state, self.settings)
        if improved:  # after last/: a kill between the two is repaired from last/ (repair_best_checkpoint)
            copy_checkpoint(last_dir, self.folder / layout.BEST_CHECKPOINT_DIR)
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
            # the decoder's alone: recompile (a fresh optimizer, as is usual for fine-tuning) and retrace. The
            # optimizer belongs to the strategy it is made under: the model's (train.distribution).
            with self.model.distribute_strategy.scope():
                compile_model(self.model, self.train_settings, self.class_names)
            self.model.make_train_function(force=True)


def _drop_history_after(history_csv: Path, epoch: int) -> None:
    """Forget history rows of epochs the checkpoint does not include (an interruption while saving)."""
    if history_csv.is_file():
        import pandas as pd

        history = pd.read_csv(history_csv)
        if (history.epoch >= epoch).any():
            write_text_atomic(history[history.epoch < epoch].to_csv(index=False), history_csv)


# ----------------------------------------------------------------------------------------------------
# Several devices or machines: tf.distribute (train.distribution)
# ----------------------------------------------------------------------------------------------------
#: On a machine without GPUs, train.distribution "mirrored" splits the CPU into this many logical devices, one
#: replica each (e.g. SEGMENTER_CPU_DEVICES=2): data parallelism to try out, and test, without GPUs.
CPU_DEVICES_VARIABLE = "SEGMENTER_CPU_DEVICES"

#: The strategy of each train.distribution, made once per process (train --fold all trains several folds in
#: one): MultiWorkerMirroredStrategy configures TensorFlow's runtime, which can be done only once.
_strategies: dict[str, Any] = {}


def distribution_strategy(distribution: str):
    """The ``tf.distribute.Strategy`` of ``train.distribution``, created once per process; None for "none".

    "mirrored": ``MirroredStrategy`` over the local GPUs, or on a machine without GPUs over its logical CPU
    devices (one, so one replica, unless ``SEGMENTER_CPU_DEVICES`` splits the CPU). "multi_worker":
    ``MultiWorkerMirroredStrategy`` over the workers that ``TF_CONFIG`` names, each with its local GPUs (else
    its CPU); it waits until every worker has started. Call it before TensorFlow runs any op: the
    multi-worker strategy configures the runtime's collective ops and logical devices are set before the
    runtime starts, both of which TensorFlow allows only then.
    """
    if distribution == "none":
        return None
    if distribution not in _strategies:
        import tensorflow as tf

        if distribution == "multi_worker":
            _strategies[distribution] = tf.distribute.MultiWorkerMirroredStrategy()
            _average_logs_over_workers()
        else:
            _split_cpu(tf)
            # None: every local GPU; without GPUs MirroredStrategy would take CPU:0 alone, so name them all.
            devices = None if tf.config.list_logical_devices("GPU") else [
                device.name for device in tf.config.list_logical_devices("CPU")]
            _strategies[distribution] = tf.distribute.MirroredStrategy(devices)
    return _strategies[distribution]


def _split_cpu(tf) -> None:
    """Split the CPU into ``SEGMENTER_CPU_DEVICES`` logical devices where the variable is set and no GPU is."""
    text = os.environ.get(CPU_DEVICES_VARIABLE, "").strip()
    if not text or tf.config.list_physical_devices("GPU"):
        return
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{CPU_DEVICES_VARIABLE}={text}: give the number of CPU devices to train on, e.g. 2")
    try:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * int(text))
    except RuntimeError:  # TensorFlow's runtime had started: its devices stay as they are
        print(f"{CPU_DEVICES_VARIABLE}={text} ignored: TensorFlow had started already", file=sys.stderr)


def _is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_count(strategy) -> int:
    """The processes training together: those ``TF_CONFIG`` names under MultiWorkerMirroredStrategy, else 1."""
    if strategy is None or not _is_multi_worker(strategy) or strategy.cluster_resolver is None:
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def is_chief(strategy=None) -> bool:
    """Whether this process writes the stage's outputs: every process but the workers of a
    MultiWorkerMirroredStrategy other than its chief, which is (as TensorFlow decides) the "chief" task of
    ``TF_CONFIG`` where it names one, else worker 0 (``strategy.cluster_resolver.task_type/task_id``)."""
    if strategy is None or not _is_multi_worker(strategy) or strategy.cluster_resolver is None:
        return True
    resolver = strategy.cluster_resolver
    if not resolver.task_type:  # no TF_CONFIG: a cluster of one
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0


def distributed_input(dataset, strategy, batch_size: int):
    """``dataset`` (a tf.data pipeline of batches of ``batch_size``, the global batch) set up to be split among
    ``strategy``'s replicas.

    ``model.fit`` splits it itself under a strategy (``experimental_distribute_dataset``): each step's global
    batch is divided among the replicas. With several workers each worker must also keep only its share: by
    DATA every worker runs the same deterministic pipeline (batches drawn from (seed, epoch)) and keeps its
    part of every batch. Not FILE (the default's first choice: whole input files per worker), since our
    pipelines are made from in-memory tensors and Python generators, not from files tf.data could divide.

    An incomplete last batch is left out (each epoch's, and the validation set's): TensorFlow fills the
    replicas' shares in turn, so a short batch leaves some replica an empty share, on which the model's
    layers fail (GroupNormalization of an empty batch). Each epoch is shuffled anew, so every sample still
    trains; see :func:`steps_per_epoch`.
    """
    if dataset is None or strategy is None:
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.filter(lambda images, *_: tf.shape(images)[0] == batch_size).with_options(options)


def steps_per_epoch(count: int, batch_size: int, strategy) -> int:
    """Batches per epoch of ``count`` samples: the last one may be incomplete, but not under a strategy
    (:func:`distributed_input` leaves it out), which needs a complete one."""
    if strategy is None:
        return max(1, math.ceil(count / batch_size))
    if count < batch_size:
        raise ConfigError(f"train.batch_size {batch_size} is more than the {count} training samples per epoch: "
                          f"under train.distribution every batch must be complete; give a smaller batch size")
    return count // batch_size


def _announce_replicas(strategy, distribution: str, batch_size: int, chief: bool) -> None:
    """Print how many replicas train and each one's share of the global batch; refuse a batch that does not
    divide evenly among them."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(f"train.batch_size {batch_size} is the global batch, split evenly over the {replicas} "
                          f"replicas of train.distribution {distribution}: give a multiple of {replicas}")
    workers = worker_count(strategy)
    where = (f"{workers} workers, this one the chief" if chief else f"{workers} workers, this one writing to a "
             "temporary folder") if workers > 1 else "one machine"
    print(f"Training on {replicas} replicas ({where}; train.distribution {distribution}): global batch "
          f"{batch_size}, {batch_size // replicas} per replica")


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


#: Settings a --resume may change: it may extend a run, and continue on other devices (the checkpoint is the same
#: model and optimizer state whatever the number of replicas; train.batch_size is the global batch).
RESUMABLE_CHANGES = ("train.epochs", "train.time_budget_minutes", "train.distribution")


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


@dataclasses.dataclass
class FoldsResult:
    results: dict[int, TrainResult]
    summary: str

    def __str__(self) -> str:
        return "\n".join([*(f"Fold {k}: {result}" for k, result in self.results.items()), self.summary])


def train_folds(config: Config, folds, resume: bool = False) -> FoldsResult:
    """Train the folds ``folds`` (fold numbers, or "all") of a ``train.folds``-fold cross-validation one after
    another, then write ``train/folds.json`` (:func:`summarize_folds`)."""
    numbers = list(range(config.train.folds)) if folds == "all" else list(folds)
    outside = [k for k in numbers if not 0 <= k < config.train.folds]
    if outside:
        raise ConfigError(f"--fold {outside[0]}: train.folds is {config.train.folds}, so folds are 0 .. "
                          f"{config.train.folds - 1}")
    results = {k: train_final_model(config, resume=resume, fold=k) for k in numbers}
    if not is_chief(distribution_strategy(config.train.distribution)):  # the chief writes train/folds.json
        return FoldsResult(results, "The chief worker writes the folds' summary (train/folds.json)")
    return FoldsResult(results, summarize_folds(config))


def cross_validation_folds(config: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """``train.folds`` pairs of (train, validation) indices into the training samples: stratified group folds
    (no patient/volume in two folds), seeded, built like preload's split and the tune stage's folds."""
    from segmenter.preprocessing.split import grouped_folds
    from segmenter.tuning import _training_slices  # the tune stage's grouping of the samples

    ids, groups, foreground = _training_slices(config)
    try:
        return grouped_folds(ids, groups, foreground, config.train.folds, config.seed)
    except ValueError as error:
        raise ConfigError(f"train.folds={config.train.folds}: {error} in the training split") from None


def summarize_folds(config: Config) -> str:
    """Write ``train/folds.json`` from the folds trained so far (each fold's validation cases and its best
    epoch's validation Dice per class; their mean and standard deviation) and return it as text."""
    import pandas as pd

    manifest = read_manifest(config.preloaded_dir)
    train_dir = config.stage_dir("train")
    folds, rows = {}, []
    for k, (_, validation) in enumerate(cross_validation_folds(config)):
        history_csv = layout.history_path(layout.fold_dir(train_dir, k))
        if not layout.model_path(layout.fold_dir(train_dir, k)).is_file() or not history_csv.is_file():
            continue
        history = pd.read_csv(history_csv)
        best = history.loc[history[f"val_{OBJECTIVE}"].idxmax()]
        scores = {name: float(best[f"val_dice_{name}"]) for name in config.classes[1:]
                  if f"val_dice_{name}" in history}
        folds[k] = {"validation_cases": sorted({manifest.train.samples[i].case for i in validation}),
                    "best_epoch": int(best["epoch"]) + 1, f"val_{OBJECTIVE}": float(best[f"val_{OBJECTIVE}"]),
                    "val_dice": scores}
        rows.append({OBJECTIVE: float(best[f"val_{OBJECTIVE}"]), **scores})
    table = pd.DataFrame(rows)
    summary = {"folds": config.train.folds, "trained": sorted(folds), "per_fold": folds,
               "mean": {name: float(table[name].mean()) for name in table},
               "std": {name: float(table[name].std(ddof=1)) if len(table) > 1 else None for name in table}}
    write_json_atomic(summary, train_dir / layout.FOLDS_SUMMARY)
    shown = ", ".join(f"{name} {summary['mean'][name]:.3f}" + (f" +- {summary['std'][name]:.3f}"
                                                                if summary["std"][name] is not None else "")
                      for name in table)
    return (f"Folds trained: {len(folds)} of {config.train.folds}; best-epoch validation Dice, mean over folds: "
            f"{shown}\n{train_dir / layout.FOLDS_SUMMARY}")


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


def _volume_data(config: Config, manifest, train: TrainConfig, train_indices, validation_indices, first_epoch: int):
    """(training batches of all epochs, patches per epoch, validation batches or None) of a 3D dataset."""
    from segmenter.volume_dataset import patch_datasets

    patch_size = manifest.plan.patch_size
    dataset, count, validation_data, source, held_out = patch_datasets(
        config.preloaded_dir, patch_size, config.num_classes, train, train_indices, validation_indices,
        seed=config.seed, first_epoch=first_epoch, epochs=train.epochs)
    print(f"Training on {count} patches of {list(patch_size)} per epoch from {len(source)} volumes "
          f"(batch {train.batch_size}, depth {train.model.depth})")
    if held_out is not None:
        print(f"Validating on 2 fixed patches from each of {len(held_out)} held-out volumes "
              f"(train.validation_fraction {train.validation_fraction})")
    return dataset, count, validation_data


def strategy_scope(strategy):
    """``strategy.scope()``, where models and optimizers must be made; nothing without a strategy."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def _average_logs_over_workers() -> None:
    """Work around Keras 3's step function under MultiWorkerMirroredStrategy (Keras 3.15; tensorflow#72388):
    it averages each replica's loss and metric values over the workers with ``strategy.reduce("MEAN", value,
    axis=0)``, which fails for the scalars they are ("Invalid reduction dimension 0 for input with 0
    dimensions"). The average over the replicas is ``axis=None``, as Keras computes it under MirroredStrategy;
    with it every worker's logs are the same, so callbacks decide alike (early stopping, a NaN loss).
    """
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica
    if getattr(keras_reduce, "averages_over_workers", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return keras.tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    reduce_per_replica.averages_over_workers = True
    trainer.reduce_per_replica = reduce_per_replica


def _build_from_local_batch(model: keras.Model) -> None:
    """Work around Keras 3's ``fit`` and ``evaluate`` under MultiWorkerMirroredStrategy (Keras 3.15): before
    the first step they give the first batch, a tuple of per-replica values, to ``strategy.reduce`` as one
    value (``TensorFlowTrainer._maybe_symbolic_build``), which that strategy cannot reduce ("ValueError: Attempt
    to convert a value (PerReplica...) to a Tensor"). The batch only gives the shapes that the compiled loss
    and metrics are built for, so this model's ``_maybe_symbolic_build`` takes them from this worker's share.
    """
    import tensorflow as tf

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return model.distribute_strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(local, next(batches))
                break
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


def train_final_model(config: Config, resume: bool = False, fold: Optional[int] = None) -> TrainResult:
    """Train on the whole training split; see the module docstring for what is written.

    ``fold`` k: train fold k of ``train.folds`` instead, validating on that fold's patients/volumes, into
    ``train/fold_<k>/`` (laid out like ``train/``); see :func:`train_folds`.

    Under ``train.distribution`` "multi_worker" every worker runs this. The chief (:func:`is_chief`) holds the
    stage's lock and writes ``train/`` as any run does. The other workers must take part in every save (Keras
    and TensorFlow read replicated variables with collective operations, so a chief saving alone would wait
    for them forever), so each runs the very same code against a scratch experiment folder in the system's
    temporary folder, takes the stage's lock there and deletes it at the end: workers sharing an experiment
    folder (one machine, or a shared filesystem) never contend for its lock, nothing but the chief writes into
    it, and no code is written twice. Every worker reads what the chief reads from the real folder: the tuned
    hyperparameters and, with ``--resume``, ``checkpoints/last/`` (so resuming several machines needs that
    folder on a filesystem they all see).
    """
    # First, before any TensorFlow op: MultiWorkerMirroredStrategy must be created at program start (see
    # distribution_strategy); so before the lock too, which needs to know whether this is the chief. Without a
    # strategy ("none") nothing changes: the run takes its lock and writes its experiment folder as always.
    strategy = distribution_strategy(config.train.distribution)
    with contextlib.ExitStack() as stack:
        writes_to = config
        if not is_chief(strategy):
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="segmenter-worker-",
                                                                      ignore_cleanup_errors=True))
            writes_to = config.model_copy(update={"paths": config.paths.model_copy(
                update={"experiments_root": Path(scratch)})})
        stack.enter_context(locks.stage_lock(writes_to, "train"))
        return _train_final_model(config, strategy, writes_to, resume, fold)


def _train_final_model(config: Config, strategy, writes_to: Config, resume: bool,
                       fold: Optional[int]) -> TrainResult:
    """:func:`train_final_model`'s work under ``strategy`` (None: none), its outputs written into
    ``writes_to``'s experiment folder (``config``'s, but on a worker other than the chief)."""
    manifest = read_manifest(config.preloaded_dir)
    check_classes(config.classes, manifest.classes, f"the preloaded dataset {config.preloaded_dir}")
    train_settings, source = resolve_train_settings(config, manifest.plan)

    def train_dir(of: Config) -> Path:
        return of.stage_dir("train") if fold is None else layout.fold_dir(of.stage_dir("train"), fold)

    out_dir = train_dir(writes_to)
    checkpoint_dir = layout.checkpoints_dir(out_dir)
    last_dir, best_dir = layout.last_checkpoint_dir(out_dir), layout.best_checkpoint_dir(out_dir)
    resume_dir = layout.last_checkpoint_dir(train_dir(config))  # every worker resumes from the chief's
    history_csv = layout.history_path(out_dir)
    settings = checkpoint_settings(config, train_settings)
    keras.utils.set_random_seed(config.seed)
    policy = configure_precision(train_settings)
    if strategy is not None:
        _announce_replicas(strategy, config.train.distribution, train_settings.batch_size, writes_to is config)

    if fold is None:
        train_indices, validation_indices = validation_split(config, train_settings.validation_fraction)
    else:
        train_indices, validation_indices = cross_validation_folds(config)[fold]
        print(f"Fold {fold} of {config.train.folds}: validating on {len(validation_indices)} of "
              f"{len(train_indices) + len(validation_indices)} training samples (whole patients/volumes)")
    validating = validation_indices is not None
    monitor, mode = (f"val_{OBJECTIVE}", "max") if validating else ("loss", "min")
    keep = train_settings.keep or ("best" if validating else "last")
    input_shape = (*manifest.sample_size, input_channels(len(manifest.channels),
                                                   train_settings.model.position_conditioning))

    initial_epoch, spent_s, best = 0, 0.0, None
    state = None
    if resume and checkpoint_dir.is_dir():
        # A folder killed between the two renames of a swap (filesystems without an atomic exchange) comes back.
        _recover_directory(last_dir)
        _recover_directory(best_dir)
    if resume:
        state = read_checkpoint_state(resume_dir)  # the chief's last_dir
    if state is not None:
        # --resume reads checkpoints/last/ alone: the model, optimizer and state.json of one and the same epoch.
        if (resume_dir / layout.CHECKPOINT_SETTINGS).is_file():
            check_resume_settings(read_json(resume_dir / layout.CHECKPOINT_SETTINGS), settings)
        initial_epoch, spent_s = int(state["epoch"]), float(state["elapsed_s"])
        best = state.get("best") if (state.get("best") or {}).get("monitor") == monitor else None
        repair_best_checkpoint(checkpoint_dir)
        # Loaded under the policy it was trained with (mixed_precision None may resolve otherwise on this
        # machine): Keras wraps the optimizer in a LossScaleOptimizer only under mixed_float16, and the saved
        # optimizer state loads only into the same kind of optimizer.
        policy = state.get("dtype_policy", policy)
        keras.mixed_precision.set_global_policy(policy)
        with strategy_scope(strategy):
            model = keras.models.load_model(resume_dir / layout.MODEL)
            restore_seed_generators(model, (state.get("random") or {}).get("layers"))
        _drop_history_after(history_csv, initial_epoch)
        print(f"Resuming from epoch {initial_epoch} ({resume_dir})")
    else:
        if resume:
            print(f"No checkpoint in {resume_dir.parent}; starting from scratch")
        if out_dir.exists():
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # also an earlier version's last.keras, state.json
            history_csv.unlink(missing_ok=True)
            shutil.rmtree(out_dir / layout.TENSORBOARD, ignore_errors=True)
        with strategy_scope(strategy):
            try:
                model = build_compiled_model(train_settings, input_shape, config.classes)
            except ValueError as error:  # e.g. a missing encoder weights file: the user's setting, named.
                raise ConfigError(f"train.model: {error}") from None
            if train_settings.model.freeze_encoder_epochs > 0:
                models.set_encoder_trainable(model, False)
                compile_model(model, train_settings, config.classes)
    if strategy is not None and _is_multi_worker(strategy):
        _build_from_local_batch(model)

    # Each epoch's order and augmentation depend on (seed, epoch) alone: runs repeat, resumes continue.
    if manifest.spatial_dims == 3:
        dataset, num_slices, validation_data = _volume_data(config, manifest, train_settings, train_indices,
                                                            validation_indices, initial_epoch)
    else:
        samples, num_slices = samples_dataset(config.preloaded_dir, train_indices)
        dataset = epochs_dataset(samples, num_slices, config.num_classes, train_settings.batch_size,
                                 first_epoch=initial_epoch, epochs=train_settings.epochs,
                                 augmentation=train_settings.augmentation, shuffle=True, seed=config.seed)
        validation_data = None
        if validating:
            held_out, num_held_out = samples_dataset(config.preloaded_dir, validation_indices)
            validation_data = batch_for_training(held_out, num_held_out, config.num_classes,
                                                 train_settings.batch_size)
            print(f"Validating on {num_held_out} of {num_slices + num_held_out} training slices "
                  f"(train.validation_fraction {train_settings.validation_fraction})")
    dataset = distributed_input(dataset, strategy, train_settings.batch_size)
    validation_data = distributed_input(validation_data, strategy, train_settings.batch_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    # The experiment's resolved config names the run from its start, so that `segmenter train --resume
    # experiments/<name>` finds it even when the first run is interrupted before it saves anything else.
    save_resolved_config(config, writes_to.experiment_dir)
    time_budget = TimeBudget(train_settings.time_budget_minutes, already_spent_s=spent_s, strategy=strategy)
    guard = DivergenceGuard()
    checkpoint = AtomicCheckpoint(checkpoint_dir, time_budget, settings=settings, monitor=monitor, mode=mode,
                                  best=best, patience=train_settings.early_stopping_patience, seed=config.seed,
                                  learning_rate_of=lambda epoch: learning_rate_at(train_settings, epoch))
    callbacks = [time_budget, guard]
    if train_settings.model.freeze_encoder_epochs > initial_epoch:
        # Before the scheduler: unfreezing recompiles with a fresh optimizer at the base learning rate.
        callbacks.append(EncoderUnfreeze(train_settings.model.freeze_encoder_epochs, train_settings, config.classes))
    callbacks += [
        # Sets the epoch's learning rate and logs it ("learning_rate" in history.csv).
        keras.callbacks.LearningRateScheduler(lambda epoch, _lr: learning_rate_at(train_settings, epoch)),
        # The history row before the checkpoint: a kill between the two leaves a row of an epoch the checkpoint
        # lacks, which a resume drops (_drop_history_after), never a checkpoint without its row.
        keras.callbacks.CSVLogger(str(history_csv), append=initial_epoch > 0),
        checkpoint,
        keras.callbacks.TensorBoard(log_dir=str(out_dir / layout.TENSORBOARD), write_graph=False),
        keras.callbacks.ProgbarLogger(),  # Keras' epoch line (or bar), then the time left below it
        TimeLeft(train_settings.epochs, time_budget),
    ]
    if policy == "mixed_float16":
        print("Mixed precision: float16 compute, float32 weights, normalisation and loss (train.mixed_precision "
              f"{train_settings.mixed_precision})")

    started = time.monotonic()
    # The dataset shuffles itself; in a terminal a progress bar within each epoch, in a log one line per epoch.
    history = model.fit(dataset, epochs=train_settings.epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                        steps_per_epoch=steps_per_epoch(num_slices, train_settings.batch_size, strategy),
                        validation_data=validation_data, shuffle=False, verbose=fit_verbosity())
    seconds = time.monotonic() - started
    epochs_done = len(history.epoch)
    model_path = layout.model_path(train_dir(config))  # the chief's
    if guard.diverged_epoch is not None:
        kept = "the earlier model.keras is kept" if model_path.is_file() else "no model.keras was written"
        raise TrainingDiverged(None, f"training diverged (loss NaN at epoch {guard.diverged_epoch + 1}); "
                                     f"{kept}; try a lower learning rate")
    # model.keras and the files that describe it are one unit (train/model/), written once training succeeded
    # and swapped in whole: a kill at any instant leaves the earlier model with its own settings, or the new one.
    save_resolved_config(config, writes_to.experiment_dir)
    with atomic_directory(layout.model_dir(out_dir)) as bundle:
        save_resolved_config(config, bundle)
        write_json_atomic({"source": source, "settings": train_settings.model_dump(mode="json")},
                          bundle / layout.HYPERPARAMETERS)
        # What inference needs to prepare new images exactly as the training slices were prepared, and
        # whether the model also takes the positions of its patches (the model file says so too).
        write_json_atomic({**manifest.inference_preprocessing(),
                           "position_channels": train_settings.model.position_conditioning},
                          bundle / layout.PREPROCESSING)
        if keep == "best" and (best_dir / layout.MODEL).is_file():
            shutil.copyfile(best_dir / layout.MODEL, bundle / layout.MODEL)
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
