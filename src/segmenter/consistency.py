"""Checks that the outputs of earlier stages belong together, before a stage uses them.

Each check fails with :class:`segmenter.errors.StaleOutputError` (exit status 3): one line naming the file,
what does not match and the stage to run again.

- the model (``train/preprocessing.json``) was trained on the preloaded dataset as it is now: the
  manifest's fingerprint (sources and preload settings) is the one recorded at training time, and the
  model's input (rows, columns, channels) is the training samples' (:func:`check_model_data`,
  :func:`check_model_input`); else ``segmenter train`` again;
- the test-set predictions were made by the current model from the current preload: ``predict/test/
  predictions.json`` records the sha256 of ``model.keras`` and the preload's fingerprint at predict time
  (:func:`check_predictions_current`); else ``segmenter predict`` again.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

from segmenter import layout
from segmenter.artifacts import read_json, sha256_of_file
from segmenter.errors import StaleOutputError
from segmenter.manifest import Manifest


def check_model_data(preprocessing: dict, manifest: Manifest, train_dir: Path, preloaded_dir: Path) -> None:
    """The model of ``train_dir`` was trained on the preloaded dataset ``preloaded_dir`` as it is now."""
    where = layout.preprocessing_path(train_dir)
    recorded = preprocessing.get("preload_fingerprint")
    if recorded != manifest.fingerprint:
        raise StaleOutputError(f"{where}: the model was trained on another preload of {preloaded_dir} (its data or "
                               "preload settings changed since); run segmenter train again")
    channels = preprocessing.get("channels")
    if channels is not None and list(channels) != list(manifest.channels):
        raise StaleOutputError(f"{where}: the model takes the channels {list(channels)}, the preloaded dataset has "
                               f"{list(manifest.channels)}; run segmenter train again")
    size = preprocessing.get("image_size")
    if size is not None and list(size) != list(manifest.sample_size):
        raise StaleOutputError(f"{where}: the model was trained on {list(size)} images, the preloaded dataset's are "
                               f"{list(manifest.sample_size)}; run segmenter train again")


def check_model_input(input_shape: Sequence[Optional[int]], image_size: Sequence[int], num_channels: int,
                      model_path: Path, against: str) -> None:
    """The model's input shape ``(batch, rows, columns, channels)`` takes ``image_size`` images of ``num_channels``.

    ``against`` names what the size and channels come from (the preloaded dataset, preprocessing.json).
    """
    expected = (*[int(value) for value in image_size], int(num_channels))
    actual = tuple(input_shape[1:])
    if len(actual) != len(expected) or any(a is not None and a != e for a, e in zip(actual, expected)):
        shown = tuple("any" if value is None else value for value in actual)
        raise StaleOutputError(f"{model_path}: the model takes inputs of shape {shown} (rows, columns, channels), "
                               f"{against} has {expected}; run segmenter train again")


def model_digest(train_dir: Path) -> Optional[str]:
    """sha256 of ``train_dir/model.keras``, None when there is none."""
    path = layout.model_path(train_dir)
    return sha256_of_file(path) if path.is_file() else None


def models_digest(model_paths: Sequence[Path]) -> str:
    """One digest of the models a prediction used: a single model's sha256, or that of the fold models' sha256s."""
    digests = [sha256_of_file(path) for path in model_paths]
    return digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


def check_predictions_current(predictions_dir: Path, train_dir: Path, manifest: Manifest,
                              preloaded_dir: Path) -> None:
    """The predictions in ``predictions_dir`` were made by the current model from the current preload.

    The model (``train_dir/preprocessing.json``) must itself belong to the preload (:func:`check_model_data`).
    Predictions without ``predictions.json`` (not written by predict) and an experiment without its model
    cannot be checked and pass. A record of an older segmenter without the model's digest is compared by
    modification time: a model newer than the predictions fails.
    """
    preprocessing_file = layout.preprocessing_path(train_dir)
    if preprocessing_file.is_file():
        check_model_data(read_json(preprocessing_file), manifest, train_dir, preloaded_dir)
    record_path = Path(predictions_dir) / layout.PREDICTIONS_RECORD
    if not record_path.is_file():
        return
    record = read_json(record_path)
    fingerprint = record.get("preload_fingerprint")
    if fingerprint is not None and fingerprint != manifest.fingerprint:
        raise StaleOutputError(f"{record_path}: the predictions are of another preload of {preloaded_dir}; run "
                               "segmenter predict again")
    model_files = record.get("model_files")
    if model_files and len(model_files) > 1:  # a fold ensemble: its models, as recorded
        missing = [path for path in model_files if not Path(path).is_file()]
        if missing or models_digest([Path(path) for path in model_files]) != record.get("model_sha256"):
            raise StaleOutputError(f"{record_path}: the predictions were made with fold models that have changed "
                                   f"or gone since ({(missing or model_files)[0]}); run segmenter predict again")
        return
    model_path = layout.model_path(train_dir)
    if not model_path.is_file():
        return
    recorded = record.get("model_sha256")
    if recorded is not None:
        stale = recorded != sha256_of_file(model_path)
    else:
        stale = model_path.stat().st_mtime > record_path.stat().st_mtime
    if stale:
        raise StaleOutputError(f"{record_path}: the predictions were made with another model than {model_path} "
                               "(trained since); run segmenter predict again")
