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
) -> Path:
    """Four panels for one slice and class: image, true mask, predicted mask, agreement overlay.

    Parameters
    ----------
    image2d : ndarray, shape (row, column) or (row, column, channel), or None
        The slice; of several channels the first is shown. None (masks without their image, as when
        scoring two folders of masks) leaves out the image panel and draws the overlay on black.
    truth_label_map, pred_label_map : ndarray of int, shape (row, column)
        Class indices.
    class_id, class_name : int, str
        The class drawn and named.
    title : str
        Start of the figure title; the case's Dice and HD95 are appended.
    path : Path
        Where the PNG is written.
    display_window : (float, float) or None
        Intensity range mapped to black..white (e.g. a CT window in HU); None uses the 1st-99th
        percentile of the image.
    spacing : (float, float) or None
        Pixel spacing in mm, for HD95 in mm; None (or NaN) gives pixels.
    scores : dict or None
        The case's ``dice``, ``hd95`` and ``case`` as scored (a volume's, when a plane of it is drawn), shown
        in the title; None: those of the drawn slice.

    Returns
    -------
    path : Path
    """
    truth = np.asarray(truth_label_map) == class_id
    pred = np.asarray(pred_label_map) == class_id
    has_image = image2d is not None
    image = _as_2d_image(image2d) if has_image else np.zeros(truth.shape)
    if truth.shape != image.shape or pred.shape != image.shape:
        raise ValueError(f"image {image.shape} and masks {truth.shape}, {pred.shape} differ in shape")
    spacing = known_spacing(spacing)
    unit = "px" if spacing is None else "mm"
    # The tolerance does not matter here: only Dice and HD95 are shown.
    metrics = scores if scores is not None else segmentation_metrics(truth, pred, spacing, nsd_tolerance=1.0)
    low, high = _window(image, display_window) if has_image else (0.0, 1.0)
    # Pixels drawn with their physical shape (row mm / column mm), so anisotropic slices are not distorted.
    aspect = 1.0 if spacing is None else spacing[0] / spacing[1]

    figure = Figure(figsize=(13, 3.9) if has_image else (10, 3.9))
    axes = list(figure.subplots(1, 4 if has_image else 3))
    if has_image:
        axes[0].imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect)
        axes[0].set_title(f"Image (window {low:.4g} to {high:.4g})")
    true_axis, pred_axis, overlay_axis = axes[-3:]
    true_axis.imshow(truth, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    true_axis.set_title(f"True {class_name}")
    pred_axis.imshow(pred, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    pred_axis.set_title(f"Predicted {class_name}")
    overlay_axis.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect)
    overlay_axis.imshow(_overlay_codes(truth, pred), cmap=_OVERLAY_CMAP, vmin=0, vmax=3, aspect=aspect,
                        alpha=0.6 if has_image else 1.0, interpolation="nearest")
    overlay_axis.set_title("Overlay")
    figure.legend(handles=_OVERLAY_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False)
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(
        f"{title} | {class_name}: Dice {_fmt(metrics['dice'], 3)}, HD95 {_fmt(metrics['hd95'], 2)} {unit}"
        f" ({metrics['case'].replace('_', ' ')})"
    )
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(figure, path)


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

    Epochs are numbered from 1, as Keras prints them (the CSV's ``epoch`` column counts from 0). The epoch
    with the lowest validation loss, when logged, is marked with a dotted line.
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
    best_epoch = int(epochs.iloc[int(history["val_loss"].to_numpy().argmin())]) if "val_loss" in history else None
    for axis, columns, ylabel in panels:
        for column in columns:
            axis.plot(epochs, history[column], marker="o", markersize=3,
                      label=column.replace("val_", "validation ").replace("_", " "))
        if best_epoch is not None:
            axis.axvline(best_epoch, color="#555555", linestyle=":",
                         label=f"lowest validation loss (epoch {best_epoch})")
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
