"""Follow a training run: score each new checkpoint on the validation cases and keep the best.

    segmenter evaluate --follow [--interval SECONDS] [--once]

As the medseg_dl framework ran its evaluator beside its trainer: a separate process watches
``train/checkpoints/last/`` and, for every epoch it has not scored yet, predicts the validation cases
(``train.validation_fraction``: the same whole patients/volumes the train stage holds out) with that
checkpoint and scores each case as a whole (Dice and HD95 per class, :func:`segmentation_metrics`; a 2D
dataset's slices of one volume are stacked back into the volume). It writes ``experiments/<experiment>/follow/``:

- ``scores.csv``: one row per scored epoch: the mean Dice and HD95 of each class over the validation cases and
  their mean foreground Dice (the objective);
- ``best/``: ``model.keras`` of the best epoch so far with ``score.json``, swapped in whole;
- ``config.resolved.json``.

It can be stopped and restarted at any time: epochs already in ``scores.csv`` are not scored again, and every
file is replaced atomically. It ends by itself when the training run has ended (its lock is free) and its
last checkpoint is scored; ``--once`` scores what is there and returns.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from segmenter import layout, locks
from segmenter.artifacts import atomic_directory, read_json, save_resolved_config, write_json_atomic, write_text_atomic
from segmenter.config import Config, ConfigError
from segmenter.evaluation.surface import segmentation_metrics
from segmenter.manifest import Manifest, read_manifest

OBJECTIVE = "mean_foreground_dice"


@dataclasses.dataclass
class FollowResult:
    folder: Path
    scored: list[int]
    best_epoch: Optional[int]
    best_score: Optional[float]

    def __str__(self) -> str:
        done = f"scored epochs {', '.join(map(str, self.scored))}" if self.scored else "no new checkpoint to score"
        best = "" if self.best_epoch is None else f"; best epoch {self.best_epoch} ({OBJECTIVE} {self.best_score:.4f})"
        return f"Followed the training run: {done}{best}\n{self.folder / layout.FOLLOW_SCORES}"


def validation_cases(config: Config, manifest: Manifest) -> np.ndarray:
    """Indices of the training samples the train stage validates on (whole patients/volumes)."""
    from segmenter.training import resolve_train_settings, validation_split

    settings, _ = resolve_train_settings(config, manifest.plan)
    _, indices = validation_split(config, settings.validation_fraction)
    if indices is None:
        raise ConfigError("evaluate --follow scores the validation cases of a training run: set "
                          "train.validation_fraction (e.g. 0.2) for the run it follows")
    return indices


def case_predictions(model, config: Config, manifest: Manifest, indices: np.ndarray):
    """Yield (case id, true label map, predicted label map, spacing) of each validation case."""
    from segmenter import inference

    if manifest.spatial_dims == 3:
        for index in indices:
            with np.load(Path(config.preloaded_dir) / manifest.train.shards[index]) as data:
                image, truth = data["image"], data["labels"]
            pred, _ = inference.predict_prepared_volume(model, image, manifest.plan.patch_size, len(manifest.classes),
                                                        config.predict.batch_size, config.predict)
            yield manifest.train.samples[index].case, truth, pred, manifest.plan.target_spacing
        return
    from segmenter.dataset import load_training_samples

    samples = load_training_samples(config.preloaded_dir).subset(indices)
    probabilities = inference.predict_probabilities(model, samples.images, config.predict.batch_size)
    predicted = probabilities.argmax(-1).astype(np.uint8)
    for case in dict.fromkeys(samples.case_ids):  # the cases in sample order; a volume's slices are stacked
        rows = np.flatnonzero(samples.case_ids == case)
        rows = rows[np.argsort(samples.slice_index[rows], kind="stable")]
        spacing = samples.spacing[rows[0]] if samples.spacing is not None else None
        spacing = None if spacing is None or not np.all(np.isfinite(spacing)) else list(spacing)
        if len(rows) == 1:
            yield str(case), samples.masks[rows[0]], predicted[rows[0]], spacing
        else:  # slices of one volume: scored in 3D (no slice spacing is known: distances in-plane units)
            yield str(case), samples.masks[rows], predicted[rows], None if spacing is None else [1.0, *spacing]


def score_checkpoint(model, config: Config, manifest: Manifest, indices: np.ndarray) -> dict:
    """Mean Dice and HD95 per class over the validation cases, and the mean foreground Dice."""
    per_class: dict[str, list[tuple[float, float]]] = {name: [] for name in manifest.classes[1:]}
    for _, truth, pred, spacing in case_predictions(model, config, manifest, indices):
        for label, name in enumerate(manifest.classes[1:], start=1):
            metrics = segmentation_metrics(truth == label, pred == label, spacing, config.evaluate.nsd_tolerance,
                                           config.evaluate.hd95)
            per_class[name].append((metrics["dice"], metrics["hd95"]))
    row = {}
    for name, values in per_class.items():
        row[f"dice_{name}"] = float(np.mean([dice for dice, _ in values]))
        row[f"hd95_{name}"] = float(np.nanmean([hd for _, hd in values])) if any(np.isfinite(hd) for _, hd in values) \
            else float("nan")
    row[OBJECTIVE] = float(np.mean([row[f"dice_{name}"] for name in per_class]))
    return row


def _copy_checkpoint(last_dir: Path, into: Path) -> Optional[dict]:
    """Copy the last checkpoint (model and state) aside; its state, or None when there is none (yet)."""
    try:
        state = read_json(last_dir / layout.CHECKPOINT_STATE)
        shutil.copyfile(last_dir / layout.MODEL, into / layout.MODEL)
    except (FileNotFoundError, ValueError):  # no checkpoint yet, or swapped while read: the next poll retries
        return None
    # The folder is swapped whole: a state read before the copy that differs after it belongs to another epoch.
    if read_json(last_dir / layout.CHECKPOINT_STATE).get("epoch") != state.get("epoch"):
        return None
    return state


def follow_training(config: Config, interval_s: float = 30.0, once: bool = False, log=print) -> FollowResult:
    """Score new checkpoints of the experiment's training run until it ends (module docstring)."""
    import keras

    import segmenter.losses  # noqa: F401  (custom objects of the checkpoints)
    import segmenter.metrics  # noqa: F401
    import segmenter.models

    manifest = read_manifest(config.preloaded_dir)
    indices = validation_cases(config, manifest)
    train_dir = config.stage_dir("train")
    last_dir = layout.last_checkpoint_dir(train_dir)
    folder = config.experiment_dir / layout.FOLLOW_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, folder)
    scores = pd.read_csv(folder / layout.FOLLOW_SCORES) if (folder / layout.FOLLOW_SCORES).is_file() else pd.DataFrame()
    best_score = folder / layout.FOLLOW_BEST / layout.FOLLOW_BEST_SCORE
    best = read_json(best_score) if best_score.is_file() else None
    training_lock = locks.FileLock(locks.stage_lock_path(config, "train"))
    scored = []
    log(f"Following {last_dir}: scoring each new epoch on {len(indices)} validation samples of "
        f"{len(set(manifest.train.samples[i].case for i in indices))} cases")
    while True:
        running = training_lock.held_by_another()
        with tempfile.TemporaryDirectory(dir=folder, prefix=".checkpoint.") as scratch:
            state = _copy_checkpoint(last_dir, Path(scratch))
            epoch = None if state is None else int(state["epoch"])
            if epoch is not None and (scores.empty or epoch not in set(scores["epoch"])):
                model = segmenter.models.inference_model(
                    keras.models.load_model(Path(scratch) / layout.MODEL, compile=False))
                row = {"epoch": epoch, **score_checkpoint(model, config, manifest, indices)}
                scores = pd.concat([scores, pd.DataFrame([row])], ignore_index=True).sort_values("epoch")
                write_text_atomic(scores.to_csv(index=False), folder / layout.FOLLOW_SCORES)
                scored.append(epoch)
                log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
                if best is None or row[OBJECTIVE] > best[OBJECTIVE]:
                    best = {"epoch": epoch, OBJECTIVE: row[OBJECTIVE], "scores": row}
                    with atomic_directory(folder / layout.FOLLOW_BEST) as bundle:
                        shutil.copyfile(Path(scratch) / layout.MODEL, bundle / layout.MODEL)
                        write_json_atomic(best, bundle / layout.FOLLOW_BEST_SCORE)
        if once or not running:
            break
        time.sleep(interval_s)
    if state is None and scores.empty:
        raise FileNotFoundError(f"{last_dir}: no checkpoint to score; run segmenter train (with "
                                "train.validation_fraction) and follow it")
    return FollowResult(folder, scored, None if best is None else best["epoch"],
                        None if best is None else best[OBJECTIVE])
