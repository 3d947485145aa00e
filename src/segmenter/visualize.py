"""What the model does, in pictures: ``predict --visualize`` grids and the previews of ``predict --input``.

``segmenter predict --visualize train|test [--checkpoint PATH] [--count N]`` draws N (default 8) training
samples or test cases, one row each: the image, the true label map, the predicted label map and the agreement
overlay of :mod:`segmenter.evaluation.figures` (bluish green agreement, vermilion missed, yellow extra).
Training samples are shown as the model sees them, from the shards (normalised, at the sample size); test
cases are read from ``test/images`` and ``test/labels`` and predicted exactly as the predict stage predicts
them (:mod:`segmenter.inference`), at their own geometry; of a volume the plane with the most true
foreground along the slice axis is shown. The samples or cases are evenly spaced over the split (by
position, never by their labels). The model is ``train/model/model.keras`` or any ``.keras`` checkpoint, e.g.
``train/checkpoints/last/model.keras`` while training runs. The figure goes to ``predict/visualize_<split>.png``.

``predict --input`` writes, beside the label maps, ``preview/<case>.png`` (the image in grey with the label
map in colour; of a volume the plane with the most predicted foreground along the slice axis, of several
channels the first) and ``preview/index.html`` listing every case with its thumbnail: a label map of 0, 1, 2
looks black in an ordinary image viewer, the preview is what a user opens. :class:`PreviewWriter` does it
inside the predict stage's temporary output folder, so the previews are swapped in with the masks.
"""
from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from segmenter import io, layout
from segmenter.artifacts import write_text_atomic
from segmenter.config import Config, ConfigError
from segmenter.dataset import SliceSet, load_shard
from segmenter.errors import InputError
from segmenter.evaluation.figures import (
    _OVERLAY_CMAP,
    _OVERLAY_LEGEND,
    MAX_GRID_CASES,
    _as_2d_image,
    _overlay_codes,
    _save,
    _shorten,
    _window,
    grid_indices,
)
from segmenter.manifest import Manifest, check_classes, read_manifest

SPLITS = ("train", "test")
DEFAULT_COUNT = 8
#: At most this many rows in one figure (the case grid's limit).
MAX_COUNT = MAX_GRID_CASES
PREVIEW_DIR, PREVIEW_INDEX = layout.PREVIEW_DIR, layout.PREVIEW_INDEX
# Colours of the foreground classes in label maps: Okabe-Ito colours not used by the agreement overlay,
# then tab10's for datasets with many classes.
_CLASS_COLOURS = ["#0072B2", "#E69F00", "#56B4E9", "#CC79A7"] + [to_hex(c) for c in colormaps["tab10"].colors]


@dataclasses.dataclass
class VisualizeResult:
    path: Path
    split: str
    shown: int
    total: int
    model_path: Path

    def __str__(self) -> str:
        what = "training samples" if self.split == "train" else "test cases"
        spread = "all" if self.shown == self.total else "evenly spaced"
        return f"Drew {self.shown} of {self.total} {what} ({spread}) with {self.model_path}\n{self.path}"


@dataclasses.dataclass
class _Row:
    """One row of the grid: a 2D image (first channel shown), its true and predicted label maps."""

    id: str
    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    aspect: float = 1.0
    window: Optional[tuple[float, float]] = None
    note: str = ""


# ----------------------------------------------------------------------------------------------------
# predict --visualize
# ----------------------------------------------------------------------------------------------------
def visualize(config: Config, split: str, checkpoint: Optional[Path] = None,
              count: int = DEFAULT_COUNT) -> VisualizeResult:
    """Draw ``count`` evenly spaced training samples or test cases with the model's predictions (module docstring)."""
    if split not in SPLITS:
        raise ConfigError(f"--visualize: {split!r} is not one of {', '.join(SPLITS)}")
    if not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"--count: {count} is outside 1..{MAX_COUNT}")
    manifest = read_manifest(config.preloaded_dir)
    check_classes(config.classes, manifest.classes, f"the preloaded dataset {config.preloaded_dir}")
    model, preprocessing, model_path = _load_model(config, manifest, checkpoint)
    if split == "train":
        rows, total = _training_rows(config, manifest, model, count)
        title = "Training samples (normalised, at the sample size)"
    else:
        rows, total = _test_rows(config, manifest, model, preprocessing, count)
        title = "Test cases (predicted as the predict stage does)"
    spread = f"all {total}" if len(rows) == total else f"{len(rows)} of {total}, evenly spaced"
    path = grid_figure(rows, manifest.classes, layout.visualization_path(config.stage_dir("predict"), split),
                       f"{title}: {spread}\nmodel: {_shorten(str(model_path), 70)}")
    return VisualizeResult(path, split, len(rows), total, model_path)


def _load_model(config: Config, manifest: Manifest, checkpoint: Optional[Path]):
    """(model, preprocessing, path): train/model/model.keras with its preprocessing.json, or a checkpoint file
    with the preloaded dataset's preprocessing (a checkpoint of a first training has no preprocessing.json yet)."""
    from segmenter import inference  # Keras, and the custom objects load_model needs: only here
    from segmenter.models import inference_model, with_precision
    from segmenter.models.precision import emulation_notice

    if checkpoint is None:
        model, preprocessing = inference.load_trained_model(config)
        return model, preprocessing, layout.model_path(config.stage_dir("train"))
    path = check_checkpoint(config, checkpoint)
    import keras

    try:
        model = inference_model(keras.models.load_model(path, compile=False))
    except Exception as error:  # a damaged or foreign file: whatever Keras raises, one line naming the file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(path, f"cannot be read as a Keras model ({first_line})") from None
    # Outside the try: a failure here is not the file's, and must not be reported as one.
    model = with_precision(model, config.predict.precision)
    if model.output_shape[-1] != len(manifest.classes):
        raise ConfigError(f"{path}: the model has {model.output_shape[-1]} output channels but the preloaded "
                          f"dataset has {len(manifest.classes)} classes {manifest.classes}")
    notice = emulation_notice(config.predict.precision)
    if notice:
        print(notice)
    return model, manifest.inference_preprocessing(), path


def check_checkpoint(config: Config, checkpoint: Path) -> Path:
    """``checkpoint`` if it is an existing ``.keras`` file; else FileNotFoundError or InputError (one line).

    Cheap (no Keras): the predict stage calls it before it loads TensorFlow.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        example = layout.last_checkpoint_path(config.stage_dir("train"))
        raise FileNotFoundError(f"{path}: no such model file; --checkpoint takes a .keras file, e.g. {example}")
    if path.suffix != ".keras":
        raise InputError(path, "not a Keras model file (.keras); --checkpoint takes e.g. checkpoints/last/model.keras")
    return path


def _training_rows(config: Config, manifest: Manifest, model, count: int) -> tuple[list[_Row], int]:
    """Evenly spaced training samples, read shard by shard (only the picked ones are kept), and predicted."""
    from segmenter import inference

    total = manifest.train.num_samples
    if total == 0:
        raise InputError(config.preloaded_dir, "the preloaded dataset has no training samples")
    picked = grid_indices(total, count)
    if manifest.spatial_dims == 3:
        return [_training_volume_row(config, manifest, model, index) for index in picked], total
    parts, start = [], 0
    for name in manifest.train.shards:
        shard = load_shard(Path(config.preloaded_dir) / name)
        local = [index - start for index in picked if start <= index < start + len(shard)]
        if local:
            parts.append(shard.subset(local))
        start += len(shard)
    samples = SliceSet.concatenate(parts)
    probabilities = inference.predict_probabilities(model, samples.images, config.predict.batch_size)
    rows = []
    for i in range(len(samples)):
        spacing = samples.spacing[i] if samples.spacing is not None else None
        rows.append(_Row(str(samples.ids[i]), samples.images[i], samples.masks[i],
                         inference.labels_at_size(probabilities[i], None), aspect=_aspect(spacing)))
    return rows, total


def _training_volume_row(config: Config, manifest: Manifest, model, index: int) -> _Row:
    """A 3D training volume as stored (resampled, normalised), predicted whole by sliding window; the plane
    along ``preload.slice_axis`` with the most true foreground is drawn."""
    from segmenter.inference import predict_prepared_volume

    with np.load(Path(config.preloaded_dir) / manifest.train.shards[index]) as data:
        image, truth = data["image"], data["labels"]
    pred, _ = predict_prepared_volume(model, image, manifest.plan.patch_size, len(manifest.classes),
                                      config.predict.batch_size, config.predict)
    axis = manifest.slice_axis
    plane = plane_with_most_foreground(truth, axis, fallback=pred)
    in_plane = [manifest.plan.target_spacing[a] for a in range(3) if a != axis]
    return _Row(manifest.train.samples[index].id, np.take(image, plane, axis=axis), np.take(truth, plane, axis=axis),
                np.take(pred, plane, axis=axis), aspect=_aspect(in_plane),
                note=f"plane {plane + 1} of {truth.shape[axis]}")


def _test_rows(config: Config, manifest: Manifest, model, preprocessing: dict, count: int) -> tuple[list[_Row], int]:
    """Evenly spaced test cases, predicted by :mod:`segmenter.inference` as the predict stage does."""
    from segmenter import inference

    case_ids = [case.id for case in manifest.test.cases]
    if not case_ids:
        raise InputError(config.preloaded_dir, "the preloaded dataset has no test cases")
    images_dir, labels_dir = layout.test_images_dir(config.preloaded_dir), layout.test_labels_dir(config.preloaded_dir)
    image_files = io.list_image_cases(images_dir, len(manifest.channels))
    label_files = io.list_cases(labels_dir, "mask")
    window = display_window(preprocessing, config.evaluate.display_window)
    slice_axis = int(preprocessing.get("slice_axis", 2))
    rows = []
    for index in grid_indices(len(case_ids), count):
        case_id = case_ids[index]
        if case_id not in image_files or case_id not in label_files:
            raise FileNotFoundError(f"{images_dir.parent}: test case {case_id} missing; run the preload stage again")
        paths = image_files[case_id]
        image = io.read_channels(paths)
        pred = inference.predict_image(model, image.array, len(paths), preprocessing, config.predict.batch_size,
                                       spacing=image.spacing, options=config.predict)
        truth = io.read_mask(label_files[case_id], reference=image).array
        note, array, spacing = "", image.array, image.spacing
        if truth.ndim == 3:
            plane = plane_with_most_foreground(truth, slice_axis, fallback=pred)
            note = f"plane {plane + 1} of {truth.shape[slice_axis]}"
            array, truth, pred = (np.take(a, plane, axis=slice_axis) for a in (array, truth, pred))
            spacing = None if spacing is None else [s for i, s in enumerate(spacing) if i != slice_axis]
        rows.append(_Row(case_id, array, truth, pred, aspect=_aspect(spacing), window=window, note=note))
    return rows, len(case_ids)


def grid_figure(rows: Sequence[_Row], classes: Sequence[str], path: Path, title: str) -> Path:
    """One row per sample or case: image, truth, prediction (label maps in class colours), overlay."""
    cmap = label_colormap(len(classes), background="black")
    height = 2.15 * len(rows) + 1.2
    figure = Figure(figsize=(8.4, height))
    axes = figure.subplots(len(rows), 4, squeeze=False)
    for row, (image_axis, truth_axis, pred_axis, overlay_axis) in zip(rows, axes):
        image = _as_2d_image(row.image)
        truth, pred = np.asarray(row.truth), np.asarray(row.pred)
        low, high = _window(image, row.window)
        image_axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=row.aspect)
        image_axis.set_title(_shorten(row.id, 26) + (f"\n{row.note}" if row.note else ""), fontsize=7)
        for axis, labels, name in ((truth_axis, truth, "truth"), (pred_axis, pred, "prediction")):
            axis.imshow(labels, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, aspect=row.aspect,
                        interpolation="nearest")
            axis.set_title(name, fontsize=7)
        codes = overlay_codes(truth, pred)
        overlay_axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=row.aspect)
        overlay_axis.imshow(codes, cmap=_OVERLAY_CMAP, vmin=0, vmax=3, alpha=0.6, aspect=row.aspect,
                            interpolation="nearest")
        overlay_axis.set_title(f"overlay, foreground Dice {foreground_dice(truth, pred):.3f}", fontsize=7)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    class_legend = [Patch(color=cmap.colors[i], label=name) for i, name in enumerate(classes) if i > 0]
    handles = class_legend + _OVERLAY_LEGEND
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, (0.35 + 0.15 * (len(handles) > 5)) / height, 1, 1))
    return _save(figure, path)


def overlay_codes(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """0 none, 1 agreement, 2 missed, 3 extra, over all foreground classes as in the evaluation's case grid:
    a true foreground pixel predicted as another class counts as missed."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    codes = _overlay_codes(truth > 0, pred > 0)
    codes[(codes == 1) & (truth != pred)] = 2
    return codes


def foreground_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice over all foreground classes (a pixel agrees when both hold the same class); 1 when both are empty."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    denominator = np.count_nonzero(truth) + np.count_nonzero(pred)
    return 1.0 if denominator == 0 else 2.0 * np.count_nonzero((truth > 0) & (truth == pred)) / denominator


# ----------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------
def label_colormap(num_classes: int, background="black") -> ListedColormap:
    """Class ``k`` -> a colour; draw with ``vmin=-0.5, vmax=num_classes - 0.5``. ``background``: colour of 0."""
    colours = [_CLASS_COLOURS[i % len(_CLASS_COLOURS)] for i in range(num_classes - 1)]
    return ListedColormap([background, *colours])


def plane_with_most_foreground(labels: np.ndarray, axis: int, fallback: Optional[np.ndarray] = None) -> int:
    """Index along ``axis`` of the plane with the most foreground of ``labels`` (else of ``fallback``, else the middle)."""
    for candidate in (labels, fallback):
        if candidate is None:
            continue
        counts = np.count_nonzero(np.moveaxis(np.asarray(candidate), axis, 0).reshape(candidate.shape[axis], -1),
                                  axis=1)
        if counts.any():
            return int(counts.argmax())
    return labels.shape[axis] // 2


def display_window(preprocessing: dict,
                   configured: Optional[Sequence[float]] = None) -> Optional[tuple[float, float]]:
    """The grey window for raw images: ``evaluate.display_window`` if set, else the first channel's CT
    window, else None (each image's 1st-99th percentile)."""
    if configured is not None:
        return tuple(float(value) for value in configured)
    settings = preprocessing.get("normalization")
    first = settings[0] if isinstance(settings, list) and settings else settings
    if isinstance(first, dict) and first.get("method") == "ct_window" and first.get("window"):
        return tuple(float(value) for value in first["window"])
    return None


def _aspect(spacing) -> float:
    """Row spacing / column spacing, so that pixels are drawn with their physical shape; 1 when unknown."""
    if spacing is None or len(spacing) != 2:
        return 1.0
    rows, columns = (float(value) for value in spacing)
    return rows / columns if np.isfinite(rows) and np.isfinite(columns) and rows > 0 and columns > 0 else 1.0


# ----------------------------------------------------------------------------------------------------
# predict --input previews
# ----------------------------------------------------------------------------------------------------
class PreviewWriter:
    """``<folder>/<case>.png`` for every case as it is predicted, then ``<folder>/index.html`` listing them.

    The predict stage makes one inside its temporary output folder (``preview/``), so previews appear, or
    not, together with the label maps.
    """

    def __init__(self, folder: Path, preprocessing: dict, title: str = "Predictions",
                 window: Optional[Sequence[float]] = None):
        self.folder = Path(folder)
        self.classes = list(preprocessing["classes"])
        self.slice_axis = int(preprocessing.get("slice_axis", 2))
        self.window = display_window(preprocessing, window)
        self.title = title
        self.entries: list[dict] = []
        self.cmap = label_colormap(len(self.classes), background=(0, 0, 0, 0))

    def add(self, case_id: str, image: io.LoadedImage, num_channels: int, label_map: np.ndarray,
            mask_name: str) -> Path:
        """Write the preview of one case (its image as read, channels last if several) and its label map."""
        array = np.asarray(image.array)
        if num_channels > 1:
            array = array[..., 0]
        labels = np.asarray(label_map)
        spacing = image.spacing
        note = ""
        # The index names the classes predicted anywhere in the case; the figure's legend those in its plane.
        found = [self.classes[int(value)] for value in np.unique(labels) if 0 < value < len(self.classes)]
        if labels.ndim == 3:
            plane = plane_with_most_foreground(labels, self.slice_axis)
            note = f"plane {plane + 1} of {labels.shape[self.slice_axis]} (most foreground)"
            array, labels = (np.take(a, plane, axis=self.slice_axis) for a in (array, labels))
            spacing = None if spacing is None else [s for i, s in enumerate(spacing) if i != self.slice_axis]
        present = [int(value) for value in np.unique(labels) if 0 < value < len(self.classes)]
        path = self.folder / f"{case_id}.png"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._figure(array, labels, present, _aspect(spacing), case_id, note, path)
        self.entries.append({"case": case_id, "png": path.name, "mask": mask_name, "note": note,
                             "classes": found})
        return path

    def _figure(self, image, labels, present, aspect, case_id, note, path) -> Path:
        image = _as_2d_image(image)
        low, high = _window(image, self.window)
        figure = Figure(figsize=(3.6, 3.9))
        axis = figure.subplots()
        axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect)
        axis.imshow(labels, cmap=self.cmap, vmin=-0.5, vmax=len(self.classes) - 0.5, alpha=0.5, aspect=aspect,
                    interpolation="nearest")
        axis.set_axis_off()
        axis.set_title(_shorten(case_id, 34) + (f"\n{note}" if note else ""), fontsize=8)
        handles = [Patch(color=self.cmap.colors[value], label=self.classes[value]) for value in present]
        if handles:
            figure.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=7, frameon=False)
        else:
            figure.text(0.5, 0.03, "no foreground predicted", ha="center", fontsize=7)
        figure.tight_layout(rect=(0, 0.08, 1, 1))
        return _save(figure, path)

    def write_index(self) -> Path:
        """``index.html``: every case with its thumbnail, linking the preview; plain HTML, relative links only."""
        swatches = " ".join(
            f'<span class="swatch" style="background:{to_hex(self.cmap.colors[i])}"></span>{html.escape(name)}'
            for i, name in enumerate(self.classes) if i > 0)
        items = []
        for entry in self.entries:
            href = quote(entry["png"])
            found = ", ".join(entry["classes"]) or "no foreground predicted"
            items.append(
                f'<figure><a href="{href}"><img src="{href}" alt="preview of {html.escape(entry["case"])}" '
                f'loading="lazy"></a><figcaption><a href="{href}">{html.escape(entry["case"])}</a><br>'
                f'mask: <a href="../{quote(entry["mask"])}">{html.escape(entry["mask"])}</a><br>'
                f'{html.escape(found)}{"<br>" + html.escape(entry["note"]) if entry["note"] else ""}'
                '</figcaption></figure>')
        count = len(self.entries)
        page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(self.title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: 220px; }}
img {{ width: 220px; height: auto; border: 1px solid #ccc; }}
figcaption {{ font-size: 0.85em; overflow-wrap: anywhere; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.8em; vertical-align: middle; }}
</style>
</head>
<body>
<h1>{html.escape(self.title)}</h1>
<p>{count} case{"" if count == 1 else "s"}: the image in grey with the predicted label map in colour
(of a volume the plane with the most predicted foreground, of several channels the first). Classes: {swatches}</p>
<div class="grid">
{chr(10).join(items)}
</div>
</body>
</html>
"""
        return write_text_atomic(page, self.folder / PREVIEW_INDEX)
