"""Tests for the metrics table, its summary, the figures and the self-contained HTML report.

Cases: a table with one row per image and foreground class, its units (mm/cm² with spacing, pixels
without), the cm² area of a known mask, mean intensity inside a mask, the empty-case counts in the
summary, the bootstrap interval around the mean, JSON safety; every figure written as a valid PNG; the
report embedding each figure once as a data URI with no external resource.
"""
from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from segmenter.evaluation import figures, report, tables
from segmenter.evaluation.tables import area_unit, distance_unit, metrics_table, summarize

CLASS_NAMES = ["background", "muscle", "fat"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def disc(shape, centre, radius):
    rows, columns = np.indices(shape)
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def make_cases(rng, count=6, shape=(40, 40), spacing=(0.8, 0.8)):
    """Label maps with muscle in every image and fat in some, predictions shifted by a random amount.

    Image 0 has no fat and none predicted (both_empty); image 1 has fat that is not predicted (missed);
    image 2 has no fat but fat predicted (false_positive); the rest have fat in both.
    """
    cases = []
    for index in range(count):
        truth = np.zeros(shape, np.uint8)
        truth[disc(shape, (20, 20), 9)] = 1
        if index not in (0, 2):
            truth[4:10, 4:14] = 2
        pred = np.roll(truth, int(rng.integers(0, 3)), axis=1)
        if index == 1:
            pred[pred == 2] = 0
        if index == 2:
            pred[30:36, 30:36] = 2
        intensity = rng.normal(40.0, 5.0, shape)
        cases.append((f"case{index:02d}", truth, pred, spacing, intensity))
    return cases


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return metrics_table(make_cases(rng), CLASS_NAMES, nsd_tolerance=1.0)


# --- the table -------------------------------------------------------------------------------------------
def test_table_has_one_row_per_image_and_foreground_class(table):
    assert list(table.columns) == list(tables.table_columns(2))
    assert len(table) == 6 * 2
    assert set(table["class"]) == {"muscle", "fat"}  # background is never scored
    assert table.groupby("image_id").size().eq(2).all()
    assert table.attrs == {"distance_unit": "mm", "area_unit": "cm2"}


def test_table_records_the_empty_cases(table):
    fat = table[table["class"] == "fat"].set_index("image_id")["case"]
    assert fat["case00"] == "both_empty"
    assert fat["case01"] == "missed"
    assert fat["case02"] == "false_positive"
    assert set(fat.iloc[3:]) == {"both_present"}


def test_area_in_cm2_and_mean_intensity_on_known_mask():
    truth = np.zeros((20, 20), np.uint8)
    truth[0:10, 0:5] = 1  # 50 pixels
    pred = np.zeros_like(truth)
    intensity = np.full(truth.shape, -50.0)
    intensity[0:10, 0:5] = 35.0
    row = metrics_table([("a", truth, pred, (0.5, 2.0), intensity)], ["background", "muscle"], 1.0).iloc[0]
    # 50 pixels * 0.5 mm * 2.0 mm = 50 mm² = 0.5 cm².
    assert row["area_true"] == pytest.approx(0.5)
    assert row["area_pred"] == 0.0
    assert row["mean_intensity_true"] == pytest.approx(35.0)
    assert math.isnan(row["mean_intensity_pred"])  # empty predicted mask


def test_unknown_spacing_gives_pixels_and_no_intensity_gives_nan():
    truth = np.zeros((10, 10), np.uint8)
    truth[2:5, 2:6] = 1
    nan_spacing = (float("nan"), float("nan"))
    result = metrics_table([("a", truth, truth, nan_spacing, None)], ["background", "muscle"], 1.0)
    assert result.attrs == {"distance_unit": "pixels", "area_unit": "pixels"}
    assert result.loc[0, "area_true"] == 12.0
    assert math.isnan(result.loc[0, "mean_intensity_true"])


def test_mixing_known_and_unknown_spacing_is_an_error():
    truth = np.ones((4, 4), np.uint8)
    cases = [("a", truth, truth, (1.0, 1.0), None), ("b", truth, truth, None, None)]
    with pytest.raises(ValueError, match="spacing"):
        metrics_table(cases, ["background", "muscle"], 1.0)


def test_labels_outside_the_classes_are_an_error():
    truth = np.full((4, 4), 3, np.uint8)
    with pytest.raises(ValueError, match="labels outside"):
        metrics_table([("a", truth, truth, None, None)], ["background", "muscle"], 1.0)


def test_units_helpers():
    assert distance_unit([(0.7, 0.7), (0.8, 0.8)]) == "mm"
    assert distance_unit([(0.7, 0.7), None]) == "pixels"
    assert distance_unit(np.full((3, 2), np.nan)) == "pixels"
    assert area_unit([(0.7, 0.7)]) == "cm2"
    assert area_unit([(2.0, 0.7, 0.7)]) == "cm3"
    assert area_unit([None]) == "pixels"


# --- the summary -----------------------------------------------------------------------------------------
def test_summary_shape_counts_and_units(table):
    summary = summarize(table, CLASS_NAMES, "mm", bootstrap_samples=200, seed=1)
    assert summary["n_images"] == 6
    assert summary["distance_unit"] == "mm"
    assert summary["area_unit"] == "cm2"
    assert set(summary["classes"]) == {"muscle", "fat"}
    fat = summary["classes"]["fat"]
    assert fat["cases"] == {"both_empty": 1, "false_positive": 1, "missed": 1, "both_present": 3}
    assert summary["classes"]["muscle"]["cases"]["both_present"] == 6
    for metric in ("dice", "iou", "hd", "hd95", "assd", "nsd"):
        for statistic in ("mean", "std", "median", "p2.5", "p97.5"):
            assert f"{metric}_{statistic}" in fat
    # Dice covers all six images; distances only the four where both masks agree on presence.
    fat_rows = table[table["class"] == "fat"]
    assert fat["dice_mean"] == pytest.approx(fat_rows["dice"].mean())
    assert fat["hd_mean"] == pytest.approx(fat_rows["hd"].dropna().mean())
    assert fat_rows["hd"].notna().sum() == 4


def test_bootstrap_interval_contains_the_mean_and_is_reproducible(table):
    first = summarize(table, CLASS_NAMES, "mm", bootstrap_samples=500, seed=3)
    second = summarize(table, CLASS_NAMES, "mm", bootstrap_samples=500, seed=3)
    for name, stats in first["classes"].items():
        low, high = stats["dice_mean_ci95"]
        assert low <= stats["dice_mean"] <= high
        assert stats["dice_mean_ci95"] == second["classes"][name]["dice_mean_ci95"]


def test_summary_is_json_safe_with_none_for_undefined_values():
    truth = np.zeros((10, 10), np.uint8)
    truth[2:6, 2:6] = 1
    empty = np.zeros_like(truth)
    # Only one image, and its prediction is empty: distances are undefined and std needs two values.
    one_missed = metrics_table([("a", truth, empty, None, None)], ["background", "muscle"], 1.0)
    summary = summarize(one_missed, ["background", "muscle"], "pixels", bootstrap_samples=50)
    muscle = summary["classes"]["muscle"]
    assert muscle["hd_mean"] is None and muscle["dice_std"] is None
    assert muscle["cases"]["missed"] == 1
    text = json.dumps(summary, allow_nan=False)  # raises on NaN
    assert json.loads(text) == summary


# --- figures ---------------------------------------------------------------------------------------------
def assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def write_history(path):
    epochs = np.arange(5)
    pd.DataFrame(
        {
            "epoch": epochs,
            "dice_coefficient": 0.5 + 0.08 * epochs,
            "loss": 1.0 - 0.15 * epochs,
            "val_dice_coefficient": 0.45 + 0.07 * epochs,
            "val_loss": [1.0, 0.8, 0.7, 0.72, 0.75],
        }
    ).to_csv(path, index=False)
    return path


@pytest.fixture
def figure_paths(tmp_path, table):
    rng = np.random.default_rng(5)
    cases = make_cases(rng)
    images = [case[4] for case in cases]
    truths = [case[1] for case in cases]
    preds = [case[2] for case in cases]
    ids = [case[0] for case in cases]
    chosen = figures.select_cases(table, "muscle")
    index = ids.index(chosen["worst"])
    return {
        "Training": [figures.training_curves_figure(write_history(tmp_path / "history.csv"), tmp_path / "curves.png")],
        "Examples": [
            figures.comparison_figure(
                images[index], truths[index], preds[index], 1, "muscle", f"worst {ids[index]}",
                tmp_path / "comparison.png", (-20.0, 100.0), spacing=(0.8, 0.8),
            ),
            figures.case_grid_figure(images, truths, preds, ids, tmp_path / "grid.png", None),
        ],
        "Distributions": [figures.distribution_figure(table, metric, tmp_path / f"{metric}.png") for metric in ("dice", "hd95")],
        "Clinical measures": [
            figures.bland_altman_figure(table, "area", tmp_path / "bland_altman_area.png"),
            (figures.correlation_figure(table, "mean_intensity", tmp_path / "correlation.png"), "Mean HU, predicted vs true"),
        ],
    }


def test_every_figure_is_a_png(figure_paths):
    for entries in figure_paths.values():
        for entry in entries:
            assert_png(entry[0] if isinstance(entry, tuple) else entry)


def test_select_cases_orders_by_dice(table):
    muscle = table[table["class"] == "muscle"]
    chosen = figures.select_cases(table, "muscle")
    assert muscle.set_index("image_id").loc[chosen["best"], "dice"] == muscle["dice"].max()
    assert muscle.set_index("image_id").loc[chosen["worst"], "dice"] == muscle["dice"].min()
    # For fat the both-empty image (Dice 1 on nothing) is not offered as the best case.
    assert figures.select_cases(table, "fat")["best"] != "case00"


def test_case_grid_is_capped(tmp_path):
    rng = np.random.default_rng(2)
    count = 60
    images = [rng.normal(size=(16, 16)) for _ in range(count)]
    masks = [(rng.random((16, 16)) > 0.5).astype(np.uint8) for _ in range(count)]
    ids = [f"c{i}" for i in range(count)]
    shown = figures.grid_indices(count, limit=12)
    assert len(shown) == 12 and shown[0] == 0 and shown[-1] == count - 1 and shown == sorted(set(shown))
    assert figures.grid_indices(5, limit=12) == [0, 1, 2, 3, 4]
    path = figures.case_grid_figure([images[i] for i in shown], [masks[i] for i in shown],
                                    [masks[i] for i in shown], [ids[i] for i in shown], tmp_path / "g.png", None,
                                    total=count)
    assert_png(path)


def test_training_curves_without_dice_columns(tmp_path):
    csv = tmp_path / "log.csv"
    pd.DataFrame({"epoch": [0, 1], "loss": [1.0, 0.5]}).to_csv(csv, index=False)
    assert_png(figures.training_curves_figure(csv, tmp_path / "curves.png"))


# --- the report ------------------------------------------------------------------------------------------
def test_report_is_self_contained_and_complete(tmp_path, table, figure_paths):
    summary = summarize(table, CLASS_NAMES, "mm", bootstrap_samples=100)
    tuning = pd.DataFrame({"trial": [0, 1], "base_filters": [16, 32], "val_loss": [0.41, 0.38]})
    config = {"experiment": "demo <&> test", "evaluate": {"nsd_tolerance": 1.0}, "url": "https://example.org"}
    path = report.write_report(
        tmp_path / "report" / "report.html",
        title="Evaluation <demo>",
        config=config,
        manifest_summary={"test slices": 6, "spacing (mm)": [0.8, 0.8]},
        summary=summary,
        table=table,
        figures=figure_paths,
        tuning_table=tuning,
        extra_tables={"Per-volume metrics": pd.DataFrame({"volume": ["v1"], "dice": [0.9]})},
    )
    page = path.read_text()
    figure_count = sum(len(entries) for entries in figure_paths.values())
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == figure_count == page.count("<img ")
    for encoded in images:
        assert base64.b64decode(encoded)[:8] == PNG_SIGNATURE
    # Nothing is fetched from elsewhere: every src and href is a data URI or an in-page anchor.
    for attribute in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attribute.startswith(("data:", "#"))
    assert not re.search(r'(?:src|href)\s*=\s*["\']?https?://', page)
    assert "<script" not in page
    # Text from the run is escaped; units are named; tables have rows.
    assert "Evaluation &lt;demo&gt;" in page and "<demo>" not in page
    assert "demo &lt;&amp;&gt; test" in page
    assert "HD95 (mm)" in page and "cm²" in page
    assert "<details>" in page
    for table_html in re.findall(r"<table>.*?</table>", page, flags=re.S):
        assert "<td" in table_html
    assert page.count("<tbody><tr>") >= 5  # summary, counts, tuning, extra table, per-image (+ data)
    assert "case05" in page and "base_filters" in page and "Per-volume metrics" in page
    assert "Mean HU, predicted vs true" in page


def test_report_rejects_a_non_png_figure(tmp_path, table):
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    summary = summarize(table, CLASS_NAMES, "mm", bootstrap_samples=10)
    with pytest.raises(ValueError, match="not a PNG"):
        report.write_report(
            tmp_path / "r.html", title="t", config={}, manifest_summary=None, summary=summary, table=table,
            figures={"Bad": [fake]}, tuning_table=None, extra_tables=None,
        )
