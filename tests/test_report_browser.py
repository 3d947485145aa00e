"""The HTML report as a browser shows it: rendered in headless Chromium, every figure decodes and no table
is empty. Chromium is required (``make test`` installs it); a missing Chromium fails these tests.

Cases: a report made through the evaluation API from small synthetic masks displays completely, and so
does a comparison report; the checker itself catches a broken image and an empty table; a screenshot is
a PNG of the requested size.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segmenter.evaluation import browser, figures, report
from segmenter.evaluation.compare import compare_runs
from segmenter.evaluation.folders import evaluate_folders
from segmenter.evaluation.tables import metrics_table, summarize

CLASS_NAMES = ["background", "muscle"]


def test_chromium_is_installed():
    assert browser.find_chromium(), "install Chromium: apt-get install chromium (make test does)"


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    """A report of 5 synthetic 32 x 32 cases with two figures, written through the evaluation API."""
    folder = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    rows, columns = np.indices((32, 32))
    cases = []
    for index in range(5):
        truth = ((rows - 16) ** 2 + (columns - 16) ** 2 <= 64).astype(np.uint8)
        pred = np.roll(truth, int(rng.integers(0, 3)), axis=1)
        cases.append((f"case{index}", truth, pred, (0.8, 0.8), rng.normal(40, 5, truth.shape)))
    table = metrics_table(cases, CLASS_NAMES, nsd_tolerance=1.0)
    summary = summarize(table, CLASS_NAMES, "mm", bootstrap_samples=50)
    entries = {
        "Examples": [figures.comparison_figure(cases[1][4], cases[1][1], cases[1][2], 1, "muscle", "case1",
                                               folder / "comparison.png", spacing=(0.8, 0.8))],
        "Distributions": [(figures.distribution_figure(table, "dice", folder / "dice.png"), "Dice per image")],
    }
    return report.write_report(folder / "report.html", title="Synthetic report", config={"nsd_tolerance": 1.0},
                               manifest_summary={"test slices": 5}, summary=summary, table=table, figures=entries)


def test_every_image_loads_and_no_table_is_empty(synthetic_report):
    check = browser.check_report(synthetic_report)
    assert len(check.images) == 2 and check.broken_images == []
    assert len(check.tables) >= 4 and check.empty_tables == []  # results, counts, per-image, data
    assert check.ok and check.title == "Synthetic report"


def test_folder_and_comparison_reports_display(tmp_path):
    truth, pred, other = tmp_path / "truth", tmp_path / "pred", tmp_path / "other"
    for folder in (truth, pred, other):
        folder.mkdir()
    rows, columns = np.indices((24, 24))
    for index in range(3):
        mask = ((rows - 12) ** 2 + (columns - 12) ** 2 <= 36).astype(np.uint8) * 255  # 8-bit binary masks
        Image.fromarray(mask).save(truth / f"s{index}.png")
        Image.fromarray(np.roll(mask, index, axis=0)).save(pred / f"s{index}.png")
        Image.fromarray(np.roll(mask, index + 1, axis=0)).save(other / f"s{index}.png")
    first = evaluate_folders(truth, pred, tmp_path / "run_a", bootstrap_samples=20)
    assert "255 was read as class 1" in str(first)
    evaluate_folders(truth, other, tmp_path / "run_b", bootstrap_samples=20)
    comparison = compare_runs([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "comparison")
    for page in (first.output_dir / "report.html", comparison.output_dir / "report.html"):
        check = browser.check_report(page)
        assert check.ok, f"{page}: {check}; broken {check.broken_images}, empty {check.empty_tables}"


def test_the_checker_catches_a_broken_image_and_an_empty_table(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>b</title></head><body><section><h2>Figures</h2>'
                    '<img src="data:image/png;base64,AAAA" alt="broken figure"></section>'
                    '<section><h2>Numbers</h2><table><thead><tr><th>x</th></tr></thead><tbody></tbody></table>'
                    '</section></body></html>')
    check = browser.check_report(page)
    assert check.broken_images == ["broken figure"]
    assert check.empty_tables == ["Numbers"]
    assert not check.ok


def test_screenshot_is_a_png_of_the_window_size(synthetic_report, tmp_path):
    path = browser.screenshot(synthetic_report, tmp_path / "shot.png", window_size=(800, 600))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 600)
        # Something is drawn: the page is not one flat colour.
        assert len(image.convert("L").getcolors(maxcolors=4096) or range(4097)) > 10
