"""Per-image metric tables and their per-class summary.

``metrics_table`` turns (truth, prediction) label maps into one row per image and foreground class;
``summarize`` reduces that table to the JSON-safe numbers a report or a paper quotes. Background
(class 0) is never scored: it is the complement of the other classes and would inflate every mean.

Units
-----
Distances (hd, hd95, assd, and the nsd tolerance) are in millimetres when every image has a known pixel
spacing and in pixels otherwise; a run never mixes the two, because a mean over mm and pixels means
nothing. Sizes are areas in cm² for 2D label maps with a known spacing (pixel count * row_mm * column_mm /
100; columns ``area_true``, ``area_pred``), volumes in cm³ = ml for 3D label maps (voxel count * product of
the spacing / 1000; columns ``volume_true``, ``volume_pred``), else pixel counts. One table holds 2D or 3D
label maps, not both.
The units are also stored in ``table.attrs["distance_unit"]`` and ``table.attrs["area_unit"]``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from segmenter.evaluation.surface import CASES, METRIC_NAMES, segmentation_metrics

#: The size of each mask: its area for 2D label maps, its volume for 3D ones (units in table.attrs["area_unit"]).
SIZE_QUANTITY = {2: "area", 3: "volume"}


def table_columns(ndim: int) -> tuple[str, ...]:
    """The columns of a metrics table of ``ndim``-dimensional label maps."""
    size = SIZE_QUANTITY[ndim]
    return ("image_id", "class", *METRIC_NAMES, "case", f"{size}_true", f"{size}_pred",
            "mean_intensity_true", "mean_intensity_pred")

STATISTICS = ("mean", "std", "median", "p2.5", "p97.5")


def known_spacing(spacing: Optional[Sequence[float]]) -> Optional[tuple[float, ...]]:
    """The spacing as a tuple of floats, or None when it is missing or holds NaN (unknown).

    SliceSet stores an unknown spacing as NaN, so NaN means "not known", not an error.

    Raises
    ------
    ValueError
        If a known spacing value is not positive.
    """
    if spacing is None:
        return None
    values = tuple(float(value) for value in np.ravel(spacing))
    if not values or any(math.isnan(value) for value in values):
        return None
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"pixel spacing must be positive, got {values}")
    return values


def distance_unit(spacings: Iterable[Optional[Sequence[float]]]) -> str:
    """``"mm"`` when every spacing is known, else ``"pixels"``.

    One unknown spacing puts the whole set in pixels: pass ``spacing=None`` for every case to
    ``metrics_table`` in that case.

    Examples
    --------
    >>> distance_unit([(0.8, 0.8), (0.7, 0.7)])
    'mm'
    >>> distance_unit([(0.8, 0.8), (float("nan"), float("nan"))])
    'pixels'
    """
    spacings = list(spacings)
    if spacings and all(known_spacing(spacing) is not None for spacing in spacings):
        return "mm"
    return "pixels"


def area_unit(spacings: Iterable[Optional[Sequence[float]]]) -> str:
    """``"cm2"`` for known 2D spacings, ``"cm3"`` for known 3D spacings, else ``"pixels"``.

    Examples
    --------
    >>> area_unit([(0.8, 0.8)])
    'cm2'
    >>> area_unit([None])
    'pixels'
    """
    spacings = list(spacings)
    if distance_unit(spacings) == "pixels":
        return "pixels"
    return "cm3" if len(known_spacing(spacings[0])) == 3 else "cm2"


def metrics_table(
    cases: Iterable[tuple[str, np.ndarray, np.ndarray, Optional[Sequence[float]], Optional[np.ndarray]]],
    class_names: Sequence[str],
    nsd_tolerance: float,
    hd95: str = "max_directed",
) -> pd.DataFrame:
    """Score every image and foreground class: one row per (image, class).

    Parameters
    ----------
    cases : iterable of (image_id, truth_label_map, pred_label_map, spacing, intensity_image)
        Label maps hold class indices, shape (row, column) or (plane, row, column). ``spacing`` is the
        pixel size in mm per axis, or None / NaN when unknown. ``intensity_image`` (same shape, e.g. HU
        before normalisation) gives the mean intensity inside each mask, or is None. Consumed lazily, so
        a generator over shards keeps one shard in memory.
    class_names : sequence of str
        All class names, background first (as in the config's ``classes``); rows are made for classes
        1 .. len(class_names) - 1.
    nsd_tolerance : float
        Tolerance of the normalised surface Dice, in mm (pixels when spacings are unknown).
    hd95 : {"max_directed", "pooled"}
        Definition of HD95 (see :mod:`segmenter.evaluation.surface`).

    Returns
    -------
    table : pandas.DataFrame
        Columns ``image_id, class, dice, iou, hd, hd95, assd, nsd, case``, the sizes (``area_true,
        area_pred`` for 2D, ``volume_true, volume_pred`` for 3D), ``mean_intensity_true, mean_intensity_pred``. Units (see module docstring) are in
        ``table.attrs["distance_unit"]`` and ``table.attrs["area_unit"]``.

    Raises
    ------
    ValueError
        If shapes disagree, a label lies outside the classes, known and unknown spacings or 2D and 3D label
        maps are mixed.
    """
    if len(class_names) < 2:
        raise ValueError("class_names needs the background and at least one foreground class")
    num_classes = len(class_names)
    rows = []
    unit: Optional[str] = None
    area_label: Optional[str] = None
    ndim: Optional[int] = None
    for image_id, truth, pred, spacing, intensity in cases:
        truth = np.asarray(truth)
        pred = np.asarray(pred)
        if ndim is None:
            ndim = truth.ndim
        elif truth.ndim != ndim:
            raise ValueError(f"{image_id}: a {truth.ndim}D label map among {ndim}D ones; score 2D and 3D apart")
        if truth.shape != pred.shape:
            raise ValueError(f"{image_id}: truth {truth.shape} and prediction {pred.shape} differ in shape")
        for name, labels in (("truth", truth), ("prediction", pred)):
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"{image_id}: {name} has labels outside 0..{num_classes - 1}")
        if intensity is not None:
            intensity = np.asarray(intensity, dtype=np.float64)
            if intensity.shape != truth.shape:
                raise ValueError(f"{image_id}: intensity image {intensity.shape} differs from masks {truth.shape}")
        spacing = known_spacing(spacing)
        this_unit = "pixels" if spacing is None else "mm"
        if unit is None:
            unit = this_unit
        elif unit != this_unit:
            raise ValueError(
                f"{image_id}: spacing known for some images and not others; a table cannot mix mm and "
                "pixels, so pass spacing=None for every image (see distance_unit)"
            )
        if spacing is None:
            pixel_area, area_label = 1.0, "pixels"
        else:
            # mm² -> cm² is / 100 and mm³ -> cm³ is / 1000.
            pixel_area = float(np.prod(spacing)) / (100.0 if truth.ndim == 2 else 1000.0)
            area_label = "cm2" if truth.ndim == 2 else "cm3"
        for class_id in range(1, num_classes):
            true_mask = truth == class_id
            pred_mask = pred == class_id
            metrics = segmentation_metrics(true_mask, pred_mask, spacing, nsd_tolerance, hd95)
            rows.append(
                {
                    "image_id": str(image_id),
                    "class": class_names[class_id],
                    **metrics,
                    f"{SIZE_QUANTITY[ndim]}_true": float(true_mask.sum()) * pixel_area,
                    f"{SIZE_QUANTITY[ndim]}_pred": float(pred_mask.sum()) * pixel_area,
                    "mean_intensity_true": _mean_inside(intensity, true_mask),
                    "mean_intensity_pred": _mean_inside(intensity, pred_mask),
                }
            )
    table = pd.DataFrame(rows, columns=list(table_columns(ndim or 2)))
    table.attrs["distance_unit"] = unit or "pixels"
    table.attrs["area_unit"] = area_label or "pixels"
    return table


def summarize(
    table: pd.DataFrame,
    class_names: Sequence[str],
    distance_unit: str,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Per-class statistics of a metrics table, JSON-safe (None where a value is undefined).

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`metrics_table`.
    class_names : sequence of str
        All class names, background first, as given to :func:`metrics_table`.
    distance_unit : {"mm", "pixels"}
        Unit of the distance columns, stored in the result.
    bootstrap_samples : int
        Resamples (with replacement, over images) for the 95% confidence interval of the mean Dice;
        0 skips it.
    seed : int
        Seed of the bootstrap's own random generator, so the interval is reproducible.

    Returns
    -------
    summary : dict
        ``{"n_images", "distance_unit", "area_unit", "classes": {name: {...}}}``. For each metric of
        dice, iou, hd, hd95, assd, nsd: ``<metric>_mean``, ``_std`` (sample, ddof=1), ``_median``,
        ``_p2.5``, ``_p97.5`` (percentiles over images); ``dice_mean_ci95`` = [lo, hi] (percentile
        bootstrap); ``cases`` = counts of both_empty, false_positive, missed, both_present.

    Notes
    -----
    Dice, IoU and NSD are defined for every image (empty-mask conventions in
    :mod:`segmenter.evaluation.surface`), so their statistics cover all images. The distance metrics
    are undefined (NaN) when exactly one mask is empty; their statistics cover the remaining images,
    and ``cases["false_positive"] + cases["missed"]`` says how many were left out.
    """
    if distance_unit not in ("mm", "pixels"):
        raise ValueError(f"distance_unit must be 'mm' or 'pixels', got {distance_unit!r}")
    area = table.attrs.get("area_unit") or ("cm2" if distance_unit == "mm" else "pixels")
    rng = np.random.default_rng(seed)
    classes = {}
    for name in class_names[1:]:
        rows = table[table["class"] == name]
        stats: dict[str, Any] = {}
        for metric in METRIC_NAMES:
            values = rows[metric].to_numpy(dtype=np.float64)
            values = values[~np.isnan(values)]
            stats.update({f"{metric}_{statistic}": value for statistic, value in _statistics(values).items()})
            if metric == "dice":
                stats["dice_mean_ci95"] = _bootstrap_mean_ci(values, bootstrap_samples, rng)
        counts = rows["case"].value_counts()
        stats["cases"] = {case: int(counts.get(case, 0)) for case in CASES}
        classes[str(name)] = stats
    return {
        "n_images": int(table["image_id"].nunique()),
        "distance_unit": distance_unit,
        "area_unit": area,
        "classes": classes,
    }


def _mean_inside(intensity: Optional[np.ndarray], mask: np.ndarray) -> float:
    if intensity is None or not mask.any():
        return float("nan")
    return float(intensity[mask].mean())


def _statistics(values: np.ndarray) -> dict[str, Optional[float]]:
    if values.size == 0:
        return {statistic: None for statistic in STATISTICS}
    low, median, high = np.percentile(values, [2.5, 50, 97.5])
    return {
        "mean": _json_float(values.mean()),
        "std": _json_float(values.std(ddof=1)) if values.size > 1 else None,
        "median": _json_float(median),
        "p2.5": _json_float(low),
        "p97.5": _json_float(high),
    }


def _bootstrap_mean_ci(values: np.ndarray, samples: int, rng: np.random.Generator) -> Optional[list[float]]:
    if values.size == 0 or samples <= 0:
        return None
    # Resample in chunks so that memory stays bounded for large test sets (samples x images indices).
    chunk = max(1, 2_000_000 // values.size)
    means = np.concatenate(
        [values[rng.integers(0, values.size, size=(min(chunk, samples - start), values.size))].mean(axis=1)
         for start in range(0, samples, chunk)]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return [_json_float(low), _json_float(high)]


def _json_float(value: float) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def summary_lines(summary: dict) -> list[str]:
    """One printed line per class: mean Dice, HD95 and ASSD with the distance unit."""
    unit = summary.get("distance_unit", "")

    def shown(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return [f"  {name}: Dice {shown(stats.get('dice_mean'))}, HD95 {shown(stats.get('hd95_mean'))} {unit}, "
            f"ASSD {shown(stats.get('assd_mean'))} {unit}" for name, stats in summary["classes"].items()]

