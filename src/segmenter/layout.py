"""Every artifact path and file name segmenter writes or reads, and nowhere else.

::

    <paths.preloaded_root>/.<experiment>.lock  the preloaded dataset's lock (segmenter.locks)
    <paths.preloaded_root>/<experiment>/      preload
        manifest.json                          the typed manifest (segmenter.manifest)
        train.npz | train-00000.npz ...        training samples (segmenter.dataset)
        test/images/<case>[_0000]<.npy|.nii.gz>  test cases at their original geometry (raw intensities)
        test/labels/<case><.npy|.nii.gz>         their label maps (class indices)
    <paths.experiments_root>/<experiment>/
        .<stage>.lock                          each stage's lock, beside its folder (segmenter.locks)
        config.resolved.json                   the last stage's resolved config (tune/, train/model/ and
                                               predict/ also keep their own)
        tune/      trials.csv, best_hyperparameters.json, objective_vs_hyperparameters.png, validation_split.json,
                   tensorboard/, keras_tuner/
        train/     model/{model.keras, preprocessing.json, hyperparameters.json, config.resolved.json} (one unit,
                   replaced whole), checkpoints/{last,best}.keras, checkpoints/{state,settings}.json, history.csv,
                   tensorboard/, training_curves.png
        predict/   test/<case><suffix>, <input folder>/<case><suffix>, each with predictions.json (and, for an
                   input folder, preview/<case>.png and preview/index.html); visualize_<split>.png
        evaluate/  metrics.csv, summary.json, figures/, report.html, pairs.json
    <evaluate --compare --out>/              comparison.csv, paired_tests.csv, comparison.json, figures/, report.html
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from segmenter.errors import InputError

RESOLVED_CONFIG = "config.resolved.json"

# preload
MANIFEST = "manifest.json"
TEST_DIR = "test"
# 3D (preload.spatial_dims 3): one file per training volume, resampled and normalised, in this folder.
TRAIN_VOLUMES_DIR = "train"
TEST_IMAGES = "images"
TEST_LABELS = "labels"

# tune
TRIALS = "trials.csv"
BEST_HYPERPARAMETERS = "best_hyperparameters.json"
TUNING_FIGURE = "objective_vs_hyperparameters.png"
VALIDATION_SPLIT = "validation_split.json"
TENSORBOARD = "tensorboard"
KERAS_TUNER = "keras_tuner"

# train
#: The trained model and the files that describe it, replaced together as one folder (see training).
MODEL_DIR = "model"
MODEL = "model.keras"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_SETTINGS = "settings.json"
#: The checkpoint after the last finished epoch and after the best epoch: each one folder, replaced whole
#: (see training), holding MODEL (model and optimizer state), CHECKPOINT_STATE and CHECKPOINT_SETTINGS.
LAST_CHECKPOINT_DIR = "last"
BEST_CHECKPOINT_DIR = "best"
HISTORY = "history.csv"
TRAINING_CURVES = "training_curves.png"
HYPERPARAMETERS = "hyperparameters.json"
FOLD_PREFIX = "fold_"
FOLDS_SUMMARY = "folds.json"
PREPROCESSING = "preprocessing.json"

# predict
TEST_PREDICTIONS = "test"
PREDICTIONS_RECORD = "predictions.json"
PREVIEW_DIR = "preview"
# predict.save_probabilities: probabilities/<case>.nii.gz beside the label maps of a 3D model.
PROBABILITIES_DIR = "probabilities"
PREVIEW_INDEX = "index.html"

# evaluate
# evaluate --follow: experiments/<experiment>/follow/ (scores.csv, best/model.keras with score.json).
FOLLOW_DIR = "follow"
FOLLOW_SCORES = "scores.csv"
FOLLOW_BEST = "best"
FOLLOW_BEST_SCORE = "score.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
FIGURES = "figures"
REPORT = "report.html"
PAIRS = "pairs.json"

# evaluate --compare (also FIGURES and REPORT)
COMPARISON_MEANS = "comparison.csv"
PAIRED_TESTS = "paired_tests.csv"
COMPARISON = "comparison.json"


def manifest_path(preloaded_dir: Path) -> Path:
    return Path(preloaded_dir) / MANIFEST


def shard_name(split: str, number: int, count: int) -> str:
    """``train.npz`` for a split of one shard, else ``train-00000.npz``, ``train-00001.npz``, ..."""
    return f"{split}.npz" if count == 1 else f"{split}-{number:05d}.npz"


def train_volume_name(case_id: str) -> str:
    """``train/<case>.npz``: a training volume of a 3D dataset, relative to the preloaded dataset's folder."""
    return f"{TRAIN_VOLUMES_DIR}/{case_id}.npz"


def test_images_dir(preloaded_dir: Path) -> Path:
    return Path(preloaded_dir) / TEST_DIR / TEST_IMAGES


def test_labels_dir(preloaded_dir: Path) -> Path:
    return Path(preloaded_dir) / TEST_DIR / TEST_LABELS


def channel_file_stem(case_id: str, channel: int, num_channels: int) -> str:
    """nnU-Net's naming: ``<case>`` for one channel, ``<case>_0000``, ``<case>_0001``, ... for several."""
    return case_id if num_channels == 1 else f"{case_id}_{channel:04d}"


def model_dir(train_dir: Path) -> Path:
    """``train/model/``: model.keras with its preprocessing.json, hyperparameters.json and config.resolved.json."""
    return Path(train_dir) / MODEL_DIR


def model_path(train_dir: Path) -> Path:
    return model_dir(train_dir) / MODEL


def preprocessing_path(train_dir: Path) -> Path:
    return model_dir(train_dir) / PREPROCESSING


def hyperparameters_path(train_dir: Path) -> Path:
    return model_dir(train_dir) / HYPERPARAMETERS


def checkpoints_dir(train_dir: Path) -> Path:
    return Path(train_dir) / CHECKPOINTS


def last_checkpoint_dir(train_dir: Path) -> Path:
    """``train/checkpoints/last/``: model.keras, state.json and settings.json after the last finished epoch."""
    return checkpoints_dir(train_dir) / LAST_CHECKPOINT_DIR


def best_checkpoint_dir(train_dir: Path) -> Path:
    """``train/checkpoints/best/``: the same after the best epoch."""
    return checkpoints_dir(train_dir) / BEST_CHECKPOINT_DIR


def last_checkpoint_path(train_dir: Path) -> Path:
    """``train/checkpoints/last/model.keras`` (loads with keras.models.load_model after ``import segmenter``)."""
    return last_checkpoint_dir(train_dir) / MODEL


def fold_dir(train_dir: Path, fold: int) -> Path:
    """``train/fold_<k>/``: fold k of a k-fold training (``segmenter train --fold k``), laid out like ``train/``."""
    return Path(train_dir) / f"{FOLD_PREFIX}{fold}"


def history_path(train_dir: Path) -> Path:
    return Path(train_dir) / HISTORY


def test_predictions_dir(predict_dir: Path) -> Path:
    return Path(predict_dir) / TEST_PREDICTIONS


def visualization_path(predict_dir: Path, split: str) -> Path:
    """``predict/visualize_<split>.png`` (``segmenter predict --visualize``)."""
    return Path(predict_dir) / f"visualize_{split}.png"


def dataset_lock_path(preloaded_root: Path, experiment: str) -> Path:
    """The preloaded dataset's lock file, beside its folder (which preload replaces whole)."""
    return Path(preloaded_root) / f".{experiment}.lock"


def stage_lock_path(experiment_dir: Path, stage: str) -> Path:
    """A stage's lock file, beside its folder (which evaluate replaces whole)."""
    return Path(experiment_dir) / f".{stage}.lock"


# ----------------------------------------------------------------------------------------------------
# Names that become paths
# ----------------------------------------------------------------------------------------------------
def unsafe_name_problem(name: str, hidden_ok: bool = True) -> Optional[str]:
    """Why ``name`` cannot be used as one file or folder name inside its folder, or None when it can.

    Refused: an empty name, ``.`` and ``..``, a path separator (``/`` or ``\\``) or a NUL character, and
    with ``hidden_ok=False`` a leading ``.`` (hidden files are skipped by every stage that lists a folder).
    """
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL character"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if name in (".", ".."):
        return "is '.' or '..'"
    if not hidden_ok and name.startswith("."):
        return "starts with '.' (a hidden file, which later stages skip)"
    return None


def safe_name(name: str, what: str, path: Union[str, Path, None] = None, hidden_ok: bool = False) -> str:
    """``name`` if it can be a file name inside its folder, else InputError naming ``what`` and ``path``.

    Case ids become file names (``test/images/<case>.npy``, ``predict/test/<case>.nii.gz``): an id such as
    ``../x`` would write outside its folder, and one starting with ``.`` would be skipped by the next stage.
    """
    problem = unsafe_name_problem(str(name), hidden_ok=hidden_ok)
    if problem is not None:
        raise InputError(path, f"{what} {str(name)!r} {problem}; it cannot be a file name inside its folder")
    return str(name)
