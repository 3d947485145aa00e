"""Figures for the evaluation report: one function per figure, each saving one PNG and returning its path.

Figures are built on ``matplotlib.figure.Figure`` objects drawn by the Agg canvas rather than through
``pyplot``: nothing touches pyplot's global figure list or the interactive backend, so these functions
work on headless machines and in threads, and a figure is freed as soon as the function returns.

Overlay colours follow the Okabe-Ito palette, which stays distinguishable with colour-vision
deficiencies: bluish green = agreement (true positive), vermilion = missed (false negative), yellow =
extra (false positive).
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from segmenter.artifacts import atomic_file
from segmenter.evaluation.surface import segmentation_metrics
from segmenter.evaluation.tables import known_spacing

DPI = 110
AGREEMENT_COLOUR = "#009E73"
MISSED_COLOUR = "#D55E00"
EXTRA_COLOUR = "#F0E442"
# Index 0 is transparent so that only disagreeing or agreeing pixels are painted over the image.
_OVERLAY_CMAP = ListedColormap([(0, 0, 0, 0), AGREEMENT_COLOUR, MISSED_COLOUR, EXTRA_COLOUR])
_OVERLAY_LEGEND = [
    Patch(color=AGREEMENT_COLOUR, label="agreement (true positive)"),
    Patch(color=MISSED_COLOUR, label="missed (false negative)"),
    Patch(color=EXTRA_COLOUR, label="extra (false positive)"),
]
QUANTITIES = {"area": "area", "volume": "volume", "mean_intensity": "mean intensity"}
MAX_GRID_CASES = 48


def comparison_figure(
    image2d: Optional[np.ndarray],
    truth_label_map: np.ndarray,
    pred_label_map: np.ndarray,
    class_id: int,
    class_name: str,
    title: str,
    path: Path,
    display_window: Optional[tuple[float, float]] = None,
    *,
    spacing: Optional[Sequence[float]] = None,
    scores: Optional[dict] = None,
    anatomical_planes: bool = True,
) -> Path:
    """Four panels for one slice and class: image, true mask, predicted mask, agreement overlay.

    Of a volume (3D masks), three rows of these panels: the axial, coronal and sagittal planes through the
    centre of mass of the class's true and predicted voxels (see :func:`orthogonal_planes`).

    Parameters
    ----------
    image2d : ndarray, shape (row, column) or (row, column, channel), or None
        The slice; of several channels the first is shown. None (masks without their image, as when
        scoring two folders of masks) leaves out the image panel and draws the overlay on black. With 3D
        masks, the volume (its shape, or with a trailing channel axis).
    truth_label_map, pred_label_map : ndarray of int, shape (row, column) or (row, column, plane)
        Class indices. A volume is expected in the display orientation of
        :data:`segmenter.evaluation.folders.DISPLAY_AXES` (rows anterior to posterior, columns patient-right
        to patient-left, planes inferior to superior).
    class_id, class_name : int, str
        The class drawn and named.
    title : str
        Start of the figure title; the case's Dice and HD95 are appended.
    path : Path
        Where the PNG is written.
    display_window : (float, float) or None
        Intensity range mapped to black..white (e.g. a CT window in HU); None uses the 1st-99th
        percentile of the image (of a volume, of the three planes shown).
    spacing : sequence of float or None
        Pixel spacing in mm per array axis, for HD95 in mm and the pixels' drawn shape; None (or NaN) gives
        pixels.
    scores : dict or None
        The case's ``dice``, ``hd95`` and ``case`` as scored (a volume's), shown in the title; None: those of
        the masks given.
    anatomical_planes : bool
        Of a volume: name the rows axial, coronal and sagittal (the volume is in display orientation);
        False names them by array axis only (a volume without an affine, whose orientation is unknown).

    Returns
    -------
    path : Path
    """
    return _save(comparison_drawing(image2d, truth_label_map, pred_label_map, class_id, class_name, title,
                                    display_window, spacing=spacing, scores=scores,
                                    anatomical_planes=anatomical_planes), path)


def comparison_drawing(
    image: Optional[np.ndarray],
    truth_label_map: np.ndarray,
    pred_label_map: np.ndarray,
    class_id: int,
    class_name: str,
    title: str,
    display_window: Optional[tuple[float, float]] = None,
    *,
    spacing: Optional[Sequence[float]] = None,
    scores: Optional[dict] = None,
    anatomical_planes: bool = True,
) -> Figure:
    """The figure :func:`comparison_figure` saves (same parameters but the path), unsaved."""
    truth = np.asarray(truth_label_map) == class_id
    pred = np.asarray(pred_label_map) == class_id
    has_image = image is not None
    if truth.ndim == 3:
        image = None if image is None else np.asarray(image, dtype=np.float64)
        if image is not None and image.ndim == 4:  # a trailing channel axis: the first channel is shown
            image = image[..., 0]
    else:
        image = _as_2d_image(image) if has_image else None
    if image is None:
        image = np.zeros(truth.shape)
    if truth.shape != image.shape or pred.shape != image.shape:
        raise ValueError(f"image {image.shape} and masks {truth.shape}, {pred.shape} differ in shape")
    spacing = known_spacing(spacing)
    if spacing is not None and len(spacing) != truth.ndim:
        raise ValueError(f"spacing {spacing} does not match masks of {truth.ndim} axes")
    unit = "px" if spacing is None else "mm"
    # The tolerance does not matter here: only Dice and HD95 are shown.
    metrics = scores if scores is not None else segmentation_metrics(truth, pred, spacing, nsd_tolerance=1.0)
    if truth.ndim == 3:
        centre = orthogonal_planes(truth, pred, True)
        rows = [(name, *(_plane_view(volume, axis, centre[axis]) for volume in (image, truth, pred)),
                 None if spacing is None else _plane_spacing(spacing, axis))
                for axis, name in _plane_names(truth.shape, centre, anatomical_planes)]
        shown = np.concatenate([view.ravel() for _, view, *_ in rows])
    else:
        rows = [(None, image, truth, pred, spacing)]
        shown = image
    low, high = _window(shown, display_window) if has_image else (0.0, 1.0)

    height = 3.9 if len(rows) == 1 else 3.2 * len(rows) + 0.8
    figure = Figure(figsize=(13 if has_image else 10, height))
    grid = figure.subplots(len(rows), 4 if has_image else 3, squeeze=False)
    for index, (label, image_view, truth_view, pred_view, view_spacing) in enumerate(rows):
        _panel_row(list(grid[index]), image_view if has_image else None, truth_view, pred_view, class_name,
                   low, high, view_spacing, titles=index == 0, label=label)
    figure.legend(handles=_OVERLAY_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False)
    figure.suptitle(
        f"{title} | {class_name}: Dice {_fmt(metrics['dice'], 3)}, HD95 {_fmt(metrics['hd95'], 2)} {unit}"
        f" ({metrics['case'].replace('_', ' ')})"
    )
    # The legend takes the same height (0.06 of the 2D figure's 3.9 inches) whatever the figure's height.
    figure.tight_layout(rect=(0, 0.06 * 3.9 / height, 1, 1))
    return figure


def orthogonal_planes(truth_label_map: np.ndarray, pred_label_map: np.ndarray, class_id) -> tuple[int, ...]:
    """Index on each axis of the planes through the centre of mass of a class's true and predicted voxels.

    The centre of mass of their union, rounded to the nearest voxel; the centre of the volume when neither
    holds the class. ``class_id`` may be ``True`` for boolean masks.
    """
    truth, pred = np.asarray(truth_label_map), np.asarray(pred_label_map)
    union = (truth == class_id) | (pred == class_id)
    if not union.any():
        return tuple(size // 2 for size in union.shape)
    # Voxel counts per index along each axis give the centre of mass without listing every voxel.
    centre = []
    for axis, size in enumerate(union.shape):
        counts = union.sum(axis=tuple(other for other in range(union.ndim) if other != axis), dtype=np.int64)
        mean = float(np.dot(counts, np.arange(size))) / float(counts.sum())
        centre.append(min(size - 1, max(0, int(math.floor(mean + 0.5)))))
    return tuple(centre)


def _panel_row(axes: list, image: Optional[np.ndarray], truth: np.ndarray, pred: np.ndarray, class_name: str,
               low: float, high: float, spacing: Optional[Sequence[float]], *, titles: bool = True,
               label: Optional[str] = None) -> None:
    """Draw one plane as a row of panels: image (when given), true mask, predicted mask, overlay.

    ``axes`` holds 4 axes with an image, else 3 (the overlay is then drawn on black). ``spacing`` (row mm,
    column mm) draws pixels with their physical shape, so anisotropic planes are not distorted. ``label``
    names the row, left of its first panel.
    """
    has_image = image is not None
    if not has_image:
        image = np.zeros(truth.shape)
    aspect = 1.0 if spacing is None else spacing[0] / spacing[1]
    if has_image:
        axes[0].imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect)
        if titles:
            axes[0].set_title(f"Image (window {low:.4g} to {high:.4g})")
    true_axis, pred_axis, overlay_axis = axes[-3:]
    true_axis.imshow(truth, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    pred_axis.imshow(pred, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    overlay_axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect)
    overlay_axis.imshow(_overlay_codes(truth, pred), cmap=_OVERLAY_CMAP, vmin=0, vmax=3, aspect=aspect,
                        alpha=0.6 if has_image else 1.0, interpolation="nearest")
    if titles:
        true_axis.set_title(f"True {class_name}")
        pred_axis.set_title(f"Predicted {class_name}")
        overlay_axis.set_title("Overlay")
    for axis in axes:
        axis.set_axis_off()
    if label is not None:
        # A y label needs the axis on: keep it, without ticks or frame.
        first = axes[0]
        first.set_axis_on()
        first.set_xticks([])
        first.set_yticks([])
        for spine in first.spines.values():
            spine.set_visible(False)
        first.set_ylabel(label, fontsize=10)


def _plane_view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane at ``index`` on ``axis`` of a (row, column, plane) volume, turned for display.

    Axis 2 (axial in display orientation): the plane as stored. Axis 0 (coronal) and axis 1 (sagittal):
    the volume's last axis runs up the picture (superior at the top), the other stays horizontal.
    """
    if axis == 2:
        return volume[:, :, index]
    return np.flipud(np.take(volume, index, axis=axis).T)


def _plane_spacing(spacing: Sequence[float], axis: int) -> tuple[float, float]:
    """(row mm, column mm) of the plane :func:`_plane_view` draws for ``axis``."""
    return {2: (spacing[0], spacing[1]), 0: (spacing[2], spacing[1]), 1: (spacing[2], spacing[0])}[axis]


def _plane_names(shape: Sequence[int], centre: Sequence[int], anatomical: bool) -> list[tuple[int, str]]:
    """(axis, row label) of the three rows: axial, coronal, sagittal."""
    names = {2: "Axial", 0: "Coronal", 1: "Sagittal"}
    rows = []
    for axis in (2, 0, 1):
        where = f"index {centre[axis]} of {shape[axis]} on axis {axis}"
        rows.append((axis, f"{names[axis]}\n({where})" if anatomical else f"Plane at {where}"))
    return rows


def select_cases(table: pd.DataFrame, class_name: str) -> dict[str, str]:
    """Image ids of the best, median and worst Dice for one class.

    Images where both masks are empty are skipped (a perfect score on nothing makes an uninformative
    picture) unless no other image exists; ties are broken by image id so the choice is reproducible.

    Returns
    -------
    cases : dict
        ``{"best": image_id, "median": image_id, "worst": image_id}``.
    """
    rows = table[table["class"] == class_name]
    if rows.empty:
        raise ValueError(f"no rows for class {class_name!r} in the metrics table")
    informative = rows[rows["case"] != "both_empty"]
    if not informative.empty:
        rows = informative
    ordered = rows.sort_values(["dice", "image_id"], ascending=[False, True], kind="mergesort")
    ids = ordered["image_id"].tolist()
    return {"best": ids[0], "median": ids[len(ids) // 2], "worst": ids[-1]}


def grid_indices(count: int, limit: int = MAX_GRID_CASES) -> list[int]:
    """Which of ``count`` cases the case grid shows: all of them, or ``limit`` evenly spaced ones."""
    return np.unique(np.linspace(0, count - 1, min(count, limit)).round().astype(int)).tolist() if count else []


def case_grid_figure(
    images: Optional[Sequence[np.ndarray]],
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    ids: Sequence[str],
    path: Path,
    display_window: Optional[tuple[float, float]] = None,
    *,
    total: Optional[int] = None,
) -> Path:
    """A grid of test cases, each with the agreement overlay of all foreground classes and its Dice.

    A foreground pixel counts as agreement when both label maps hold the same class there, as missed
    when the truth's class is not predicted there (including a wrong class), and as extra when the
    prediction marks foreground on true background. Every case given is drawn; pass the cases that
    :func:`grid_indices` picks, and ``total``, the number of cases they were picked from, for the title.

    Parameters
    ----------
    images, truths, preds : sequences of ndarray, shape (row, column) [, channel]
        ``images`` may be None (masks without their images): overlays are then drawn on black. Cases
        may differ in shape.
    ids : sequence of str
    path : Path
    display_window : (float, float) or None
        None uses each image's 1st-99th percentile.
    total : int or None
        How many cases there are in all; None: as many as given.
    """
    count = len(ids)
    total = count if total is None else total
    has_images = images is not None
    if not ((len(images) if has_images else count) == len(truths) == len(preds) == count) or count == 0:
        raise ValueError("images, truths, preds and ids must be non-empty and of equal length")
    shown = range(count)
    columns = min(8, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(2.0 * columns, 2.2 * rows + 0.9))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axis in axes:
        axis.set_axis_off()
    for axis, index in zip(axes, shown):
        truth = np.asarray(truths[index])
        pred = np.asarray(preds[index])
        image = _as_2d_image(images[index]) if has_images else np.zeros(truth.shape)
        low, high = _window(image, display_window) if has_images else (0.0, 1.0)
        axis.imshow(image, cmap="gray", vmin=low, vmax=high)
        agree = (truth > 0) & (truth == pred)
        missed = (truth > 0) & (truth != pred)
        extra = (pred > 0) & (truth == 0)
        codes = np.select([agree, missed, extra], [1, 2, 3], default=0)
        axis.imshow(codes, cmap=_OVERLAY_CMAP, vmin=0, vmax=3, alpha=0.6 if has_images else 1.0,
                    interpolation="nearest")
        denominator = np.count_nonzero(truth > 0) + np.count_nonzero(pred > 0)
        dice = 1.0 if denominator == 0 else 2.0 * np.count_nonzero(agree) / denominator
        axis.set_title(f"{_shorten(str(ids[index]))}\nDice {dice:.3f}", fontsize=7)
    if count < total:
        figure.suptitle(f"Test cases with overlays ({count} of {total} shown, evenly spaced)")
    else:
        figure.suptitle(f"All {total} test cases")
    figure.legend(handles=_OVERLAY_LEGEND, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(figure, path)


def distribution_figure(table: pd.DataFrame, metric: str, path: Path, *, unit: Optional[str] = None) -> Path:
    """Box plot with every image as a dot, one box per class, for one metric column.

    Undefined values (distances when one mask is empty) cannot be drawn; the x labels say how many
    there were per class. ``unit`` defaults to ``table.attrs["distance_unit"]`` for distance metrics.
    """
    if metric not in table.columns:
        raise ValueError(f"metric {metric!r} is not a column of the table")
    if unit is None and metric in ("hd", "hd95", "assd"):
        unit = table.attrs.get("distance_unit")
    class_order = list(dict.fromkeys(table["class"]))
    labels = []
    for name in class_order:
        values = table.loc[table["class"] == name, metric]
        undefined = int(values.isna().sum())
        labels.append(f"{name}\n(n={values.notna().sum()}" + (f", {undefined} undefined)" if undefined else ")"))
    data = table[["class", metric]].dropna()
    figure = Figure(figsize=(max(4.0, 1.6 * len(class_order) + 2), 4.2))
    axis = figure.subplots()
    if not data.empty:
        with warnings.catch_warnings():
            # seaborn 0.13 passes matplotlib's deprecated ``vert`` argument; the warning is not ours to fix.
            warnings.filterwarnings("ignore", message=".*vert: bool.*", category=DeprecationWarning)
            # Outliers are not drawn by the box plot because the strip plot already shows every image.
            sns.boxplot(data=data, x="class", y=metric, order=class_order, ax=axis, color="#cfe3f3",
                        showfliers=False)
        sns.stripplot(data=data, x="class", y=metric, order=class_order, ax=axis, color="#0b3c5d", size=3,
                      alpha=0.6, jitter=0.2)
    axis.set_xticks(range(len(class_order)))
    axis.set_xticklabels(labels)
    axis.set_xlabel("")
    axis.set_ylabel(_metric_label(metric, unit))
    axis.set_title(f"{_metric_label(metric, unit)} per image")
    figure.tight_layout()
    return _save(figure, path)


def bland_altman_figure(table: pd.DataFrame, quantity: str, path: Path, *, unit: Optional[str] = None) -> Path:
    """Bland-Altman plot of predicted vs true ``quantity`` ("area", "volume" or "mean_intensity"), a panel per class.

    x: mean of predicted and true; y: predicted minus true; lines at the mean difference (bias) and at
    bias +- 1.96 SD (limits of agreement). Images where either value is undefined are left out and
    counted in the panel title. ``unit`` defaults to the table's area unit for area and to "image units"
    for mean intensity (pass "HU" for CT).
    """
    true_values, pred_values, unit = _quantity_columns(table, quantity, unit)
    class_order = list(dict.fromkeys(table["class"]))
    figure, axes = _class_panels(len(class_order))
    for axis, name in zip(axes, class_order):
        truth, pred, defined = _defined_values(table, name, true_values, pred_values)
        mean, difference = (truth + pred) / 2, pred - truth
        axis.scatter(mean, difference, s=14, alpha=0.7, color="#0b3c5d")
        if difference.size:
            bias = difference.mean()
            spread = 1.96 * difference.std(ddof=1) if difference.size > 1 else 0.0
            axis.axhline(bias, color="#D55E00", label=f"bias {bias:.3g}")
            for limit in (bias - spread, bias + spread):
                axis.axhline(limit, color="#555555", linestyle="--")
            axis.plot([], [], color="#555555", linestyle="--", label=f"limits of agreement ±{spread:.3g}")
            axis.legend(fontsize=8)
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_xlabel(f"mean of predicted and true ({unit})")
        axis.set_ylabel(f"predicted − true ({unit})")
        axis.set_title(_panel_title(name, defined))
    figure.suptitle(f"Bland-Altman: {QUANTITIES[quantity]} ({unit})")
    figure.tight_layout()
    return _save(figure, path)


def correlation_figure(table: pd.DataFrame, quantity: str, path: Path, *, unit: Optional[str] = None) -> Path:
    """Predicted against true ``quantity`` ("area", "volume" or "mean_intensity"), one panel per class.

    Each panel has the identity line and Pearson's r; undefined values are left out and counted.
    """
    true_values, pred_values, unit = _quantity_columns(table, quantity, unit)
    class_order = list(dict.fromkeys(table["class"]))
    figure, axes = _class_panels(len(class_order))
    label = f"{QUANTITIES[quantity]} ({unit})"
    for axis, name in zip(axes, class_order):
        truth, pred, defined = _defined_values(table, name, true_values, pred_values)
        axis.scatter(truth, pred, s=14, alpha=0.7, color="#0b3c5d")
        if truth.size:
            low, high = min(truth.min(), pred.min()), max(truth.max(), pred.max())
            axis.plot([low, high], [low, high], color="#555555", linestyle="--", label="identity")
            # Pearson's r is undefined for fewer than two points or a constant column.
            # np.ptp rather than std: the std of identical floats can come out a rounding error above 0.
            if truth.size > 1 and np.ptp(truth) > 0 and np.ptp(pred) > 0:
                axis.plot([], [], " ", label=f"Pearson r = {np.corrcoef(truth, pred)[0, 1]:.3f}")
            axis.legend(fontsize=8)
        axis.set_xlabel(f"true {label}")
        axis.set_ylabel(f"predicted {label}")
        axis.set_title(_panel_title(name, defined))
    figure.suptitle(f"Predicted vs true {QUANTITIES[quantity]}")
    figure.tight_layout()
    return _save(figure, path)


def training_curves_figure(history_csv_path: Path, path: Path) -> Path:
    """Loss and Dice per epoch from a Keras ``CSVLogger`` file (columns epoch, loss, ..., val_...).

    Epochs are numbered from 1, as Keras prints them (the CSV's ``epoch`` column counts from 0). The epoch the
    train stage keeps as best (highest validation mean foreground Dice; lowest validation loss when no Dice is
    logged) is marked with a dotted line.
    """
    # Keras' CSVLogger adds empty val_* columns when training had no validation data: drop them.
    history = pd.read_csv(history_csv_path).dropna(axis="columns", how="all")
    if history.empty or "loss" not in history.columns:
        raise ValueError(f"{history_csv_path}: no 'loss' column or no rows in the training log")
    epochs = history["epoch"] + 1 if "epoch" in history.columns else pd.Series(np.arange(1, len(history) + 1))
    dice_columns = [column for column in history.columns if "dice" in column.lower()]
    figure = Figure(figsize=(11 if dice_columns else 6, 4))
    axes = figure.subplots(1, 2 if dice_columns else 1, squeeze=False).ravel()
    panels = [(axes[0], [c for c in ("loss", "val_loss") if c in history.columns], "loss")]
    if dice_columns:
        panels.append((axes[1], dice_columns, "Dice"))
    # The epoch the train stage keeps as best.keras: the highest validation mean foreground Dice (else loss).
    objective = "val_mean_foreground_dice" if "val_mean_foreground_dice" in history else None
    if objective is not None:
        best_epoch, best_label = int(epochs.iloc[int(history[objective].to_numpy().argmax())]), "best validation Dice"
    elif "val_loss" in history:
        best_epoch, best_label = int(epochs.iloc[int(history["val_loss"].to_numpy().argmin())]), "lowest validation loss"
    else:
        best_epoch = None
    for axis, columns, ylabel in panels:
        for column in columns:
            axis.plot(epochs, history[column], marker="o", markersize=3,
                      label=column.replace("val_", "validation ").replace("_", " "))
        if best_epoch is not None:
            axis.axvline(best_epoch, color="#555555", linestyle=":",
                         label=f"{best_label} (epoch {best_epoch})")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle("Training curves")
    figure.tight_layout()
    return _save(figure, path)


DISTRIBUTION_METRICS = ("dice", "iou", "hd95", "assd", "nsd")


def metric_and_clinical_sections(table: pd.DataFrame, folder: Path, unit: str,
                                 intensity_unit: Optional[str] = None) -> dict[str, list]:
    """The report's "Metric distributions" and "Clinical measures" figures, as (path, caption) lists.

    Size plots (area in 2D, volume in 3D) are always drawn; mean-intensity plots only when the table has
    intensities (an image was known for the masks), in ``intensity_unit`` (e.g. "HU"; None: "image units").
    """
    sections = {"Metric distributions": [
        (distribution_figure(table, metric, folder / f"distribution_{metric}.png",
                             unit=unit if metric in ("hd", "hd95", "assd") else None), f"{metric} per class")
        for metric in DISTRIBUTION_METRICS]}
    clinical = []
    for quantity in QUANTITIES:
        if f"{quantity}_true" in table and table[f"{quantity}_true"].notna().any():
            words = QUANTITIES[quantity]
            quantity_unit = intensity_unit if quantity == "mean_intensity" else None
            clinical.append((bland_altman_figure(table, quantity, folder / f"bland_altman_{quantity}.png",
                                                 unit=quantity_unit),
                             f"Bland-Altman plot of {words}, predicted against true"))
            clinical.append((correlation_figure(table, quantity, folder / f"correlation_{quantity}.png",
                                                unit=quantity_unit),
                             f"Predicted against true {words}"))
    sections["Clinical measures"] = clinical
    return sections


def _save(figure: Figure, path: Path) -> Path:
    """Render to PNG in memory, then write it atomically, so a reader never sees half a file."""
    path = Path(path)
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def _as_2d_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a 2D image (row, column[, channel]), got shape {image.shape}")
    return image


def _window(image: np.ndarray, display_window: Optional[tuple[float, float]]) -> tuple[float, float]:
    if display_window is not None:
        low, high = (float(value) for value in display_window)
    else:
        finite = image[np.isfinite(image)]
        low, high = (float(v) for v in np.percentile(finite, [1, 99])) if finite.size else (0.0, 1.0)
    if high <= low:  # a constant image: widen so imshow has a range to map
        high = low + 1.0
    return low, high


def _overlay_codes(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.select([truth & pred, truth & ~pred, pred & ~truth], [1, 2, 3], default=0)


def _quantity_columns(table: pd.DataFrame, quantity: str, unit: Optional[str]) -> tuple[str, str, str]:
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {sorted(QUANTITIES)}, got {quantity!r}")
    if unit is None:
        if quantity in ("area", "volume"):
            stored = table.attrs.get("area_unit", "pixels")
            unit = {"cm2": "cm²", "cm3": "cm³"}.get(stored, stored)
        else:
            unit = "image units"
    return f"{quantity}_true", f"{quantity}_pred", unit


def _defined_values(table: pd.DataFrame, class_name: str, true_column: str, pred_column: str):
    """True and predicted values of one class where both are defined, and the mask of which were."""
    rows = table[table["class"] == class_name]
    truth, pred = rows[true_column].to_numpy(float), rows[pred_column].to_numpy(float)
    defined = ~(np.isnan(truth) | np.isnan(pred))
    return truth[defined], pred[defined], defined


def _class_panels(count: int) -> tuple[Figure, np.ndarray]:
    columns = min(3, max(1, count))
    rows = math.ceil(max(1, count) / columns)
    figure = Figure(figsize=(4.8 * columns, 4.2 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[count:]:
        axis.set_axis_off()
    return figure, axes


def _panel_title(name: str, defined: np.ndarray) -> str:
    left_out = int((~defined).sum())
    return f"{name} (n={int(defined.sum())}" + (f", {left_out} undefined left out)" if left_out else ")")


def _metric_label(metric: str, unit: Optional[str]) -> str:
    names = {"dice": "Dice", "iou": "IoU", "hd": "Hausdorff distance", "hd95": "HD95", "assd": "ASSD", "nsd": "NSD"}
    label = names.get(metric, metric)
    return f"{label} ({unit})" if unit else label


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.{digits}f}"


def _shorten(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def paired_metric_figure(values: pd.DataFrame, metric: str, path: Path, *, title: str,
                         unit: Optional[str] = None) -> Path:
    """Paired plot of one metric across runs: a line joins each image's values, runs side by side.

    Parameters
    ----------
    values : pandas.DataFrame
        One row per image (the index names it) and one column per run, in display order; rows with a
        missing value are drawn only between the runs that have one.
    metric : str
        Metric column the values come from (for the axis label), e.g. ``"dice"``.
    path : Path
    title : str
    unit : str or None
        Unit of the metric, if any.
    """
    if values.shape[1] < 2:
        raise ValueError("a paired plot needs at least two runs (columns)")
    runs = [str(column) for column in values.columns]
    positions = np.arange(len(runs))
    figure = Figure(figsize=(max(4.5, 1.8 * len(runs) + 2), 4.6))
    axis = figure.subplots()
    data = values.to_numpy(dtype=np.float64)
    for row in data:
        defined = ~np.isnan(row)
        axis.plot(positions[defined], row[defined], color="#7f8c99", alpha=0.45, linewidth=0.9, marker="o",
                  markersize=3, markerfacecolor="#0b3c5d", markeredgewidth=0)
    medians = [np.nanmedian(column) if np.isfinite(column).any() else np.nan for column in data.T]
    axis.plot(positions, medians, color="#D55E00", linewidth=2.2, marker="D", markersize=7, label="median",
              zorder=3)
    axis.set_xticks(positions)
    axis.set_xticklabels([_shorten(run, 28) for run in runs])
    axis.set_xlim(-0.4, len(runs) - 0.6)
    axis.set_ylabel(_metric_label(metric, unit))
    axis.set_title(f"{title} (n={len(values)} images)")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)
