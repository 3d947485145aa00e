"""``segmenter evaluate --truth/--pred`` (two folders of masks) and ``--compare`` (two or more runs).

Cases: PNG folders scored in pixels, with unmatched files on both sides reported and the rest scored;
--spacing turning pixels into mm; NIfTI volumes measured in mm from their headers (a box shifted by one
voxel along an axis of known spacing has a Hausdorff distance of that spacing); a single-plane NIfTI
scored as 2D; no matching name as a one-line error with exit status 1 and no output folder; an --out
that would replace the input refused. Compare: a clearly better run (every image better by a distinct
amount) gives the exact Wilcoxon p-value 2 / 2**n and the better mean in the table; three runs are
tested pairwise with Holm's adjustment; a folder that is no run is a one-line error.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segmenter.artifacts import write_json_atomic
from segmenter.evaluation import compare
from segmenter.evaluation.tables import metrics_table, summarize
from tests.conftest import run_cli

CLASSES = "background,muscle,fat"


def label_map(shape=(40, 40), shift=0):
    """Muscle: a disc; fat: a rectangle; both moved ``shift`` pixels along the columns."""
    rows, columns = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    labels[(rows - 22) ** 2 + (columns - 20) ** 2 <= 81] = 1
    labels[3:8, 4:14] = 2
    return np.roll(labels, shift, axis=1)


@pytest.fixture
def png_folders(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    for index in range(4):
        Image.fromarray(label_map()).save(truth / f"case{index}.png")
        Image.fromarray(label_map(shift=index % 2)).save(pred / f"case{index}.png")
    Image.fromarray(label_map()).save(truth / "only_truth.png")
    Image.fromarray(label_map()).save(pred / "only_pred.png")
    return truth, pred


def test_png_folders_in_pixels_with_unmatched_files_reported(png_folders, tmp_path):
    truth, pred = png_folders
    out = tmp_path / "out"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out), "--classes", CLASSES)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(out / "report.html")
    assert "only_truth.png" in result.stdout and "only_pred.png" in result.stdout
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 4 * 2 and set(metrics["class"]) == {"muscle", "fat"}
    assert set(metrics.image_id) == {"case0", "case1", "case2", "case3"}
    # Unshifted cases are perfect; a one-pixel shift gives a Hausdorff distance of one pixel.
    muscle = metrics[metrics["class"] == "muscle"].set_index("image_id")
    assert muscle.loc["case0", "dice"] == 1.0 and muscle.loc["case1", "hd"] == pytest.approx(1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_unit"] == "pixels" and summary["n_images"] == 4
    pairs = json.loads((out / "pairs.json").read_text())
    assert [p.endswith("only_truth.png") for p in pairs["truth_without_prediction"]] == [True]
    assert [p.endswith("only_pred.png") for p in pairs["prediction_without_truth"]] == [True]
    assert len(list((out / "figures").glob("compare_*_median.png"))) == 2
    assert (out / "figures" / "distribution_dice.png").is_file()
    page = (out / "report.html").read_text()
    assert "Unmatched files" in page and "only_pred.png" in page
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())  # no temporary folder left


def test_default_classes_and_spacing_option_give_mm(png_folders, tmp_path):
    truth, pred = png_folders
    out = tmp_path / "out_mm"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out),
                     "--spacing", "0.5,0.8", "--nsd-tolerance", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_unit"] == "mm" and summary["area_unit"] == "cm2"
    assert set(summary["classes"]) == {"class_1", "class_2"}  # from the largest label found
    metrics = pd.read_csv(out / "metrics.csv").set_index(["image_id", "class"])
    # One column of shift at 0.8 mm per column.
    assert metrics.loc[("case1", "class_1"), "hd"] == pytest.approx(0.8)


def write_nifti(path, array, zooms):
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*zooms, 1.0])), str(path))


def test_nifti_spacing_from_the_header(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    volume = np.zeros((20, 20, 6), np.uint8)
    volume[5:15, 5:15, 1:5] = 1
    for index in range(3):
        write_nifti(truth / f"vol{index}.nii.gz", volume, (0.7, 0.7, 2.5))
        write_nifti(pred / f"vol{index}.nii.gz", np.roll(volume, 1, axis=2), (0.7, 0.7, 2.5))
    out = tmp_path / "out"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_unit"] == "mm" and summary["area_unit"] == "cm3"
    metrics = pd.read_csv(out / "metrics.csv")
    # Shifted by one plane of 2.5 mm: the largest surface distance is 2.5 mm.
    assert metrics["hd"].to_numpy() == pytest.approx([2.5] * 3)
    assert metrics["volume_true"].to_numpy() == pytest.approx([10 * 10 * 4 * 0.7 * 0.7 * 2.5 / 1000] * 3)


def test_single_plane_nifti_is_scored_as_2d(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    write_nifti(truth / "slice.nii", label_map()[..., None] == 1, (0.6, 0.9, 3.0))
    write_nifti(pred / "slice.nii", label_map(shift=2)[..., None] == 1, (0.6, 0.9, 3.0))
    out = tmp_path / "out"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out))
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(out / "metrics.csv").iloc[0]
    assert row["hd"] == pytest.approx(2 * 0.9)  # two columns of 0.9 mm
    assert json.loads((out / "summary.json").read_text())["area_unit"] == "cm2"


def test_no_matching_names_is_one_line_error(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    np.save(truth / "a.npy", label_map())
    np.save(pred / "b.npy", label_map())
    out = tmp_path / "out"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "a.npy" in result.stderr and "b.npy" in result.stderr
    assert not out.exists()


def test_output_folder_may_not_replace_an_input(png_folders):
    truth, pred = png_folders
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(truth.parent))
    assert result.returncode == 1 and "would replace" in result.stderr
    assert (truth / "case0.png").is_file()


def test_images_give_mean_intensity_and_figures_drawn_on_them(png_folders, tmp_path):
    truth, pred = png_folders
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for case in ("case0", "case1", "case2", "case3", "only_truth"):
        np.save(images / f"{case}.npy", rng.normal(40, 30, (40, 40)).astype(np.float32))
    out = tmp_path / "out_hu"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out), "--classes", CLASSES,
                     "--images", str(images), "--window=-100,150")
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(out / "metrics.csv").set_index(["image_id", "class"])
    image = np.load(images / "case1.npy")
    for class_id, name in ((1, "muscle"), (2, "fat")):
        assert metrics.loc[("case1", name), "mean_intensity_true"] == pytest.approx(image[label_map() == class_id].mean())
        assert metrics.loc[("case1", name), "mean_intensity_pred"] == pytest.approx(
            image[label_map(shift=1) == class_id].mean())
    assert (out / "figures" / "bland_altman_mean_intensity.png").is_file()
    assert (out / "figures" / "correlation_mean_intensity.png").is_file()
    settings = json.loads((out / "config.resolved.json").read_text())
    assert settings["display_window"] == [-100.0, 150.0] and settings["images_dir"] == str(images.resolve())


def test_a_pair_without_its_image_is_one_line_error(png_folders, tmp_path):
    truth, pred = png_folders
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "case0.npy", np.zeros((40, 40), np.float32))
    out = tmp_path / "out"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out), "--images", str(images))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "case1.png" in result.stderr and "no image of this name" in result.stderr
    assert not out.exists()


def test_volumes_are_turned_to_radiological_display_orientation():
    """A RAS volume is shown anterior up and patient-right on the left; spacing follows the axes."""
    from segmenter.evaluation.folders import _in_display_orientation
    from segmenter.io import LoadedImage

    array = np.zeros((4, 5, 3), np.uint8)
    array[0, 0, 0] = 1  # most patient-left (x), most posterior (y), most inferior (z) in RAS+
    ras = LoadedImage(array, (0.5, 0.8, 3.0), np.diag([0.5, 0.8, 3.0, 1.0]), None)
    truth, pred, image = _in_display_orientation(ras, ras, None)
    assert image is None and truth.array.shape == (5, 4, 3) and truth.spacing == (0.8, 0.5, 3.0)
    assert truth.array[-1, -1, 0] == 1  # bottom row (posterior), last column (patient left), first plane


def test_a_single_axial_plane_is_turned_and_a_sagittal_one_kept():
    from segmenter.evaluation.folders import _in_display_orientation
    from segmenter.io import LoadedImage

    axial = np.zeros((4, 5, 1), np.uint8)
    axial[0, 0, 0] = 1
    truth, _, _ = _in_display_orientation(*[LoadedImage(axial, (0.5, 0.8, 3.0), np.diag([0.5, 0.8, 3.0, 1.0]), None)] * 2,
                                          None)
    assert truth.array.shape == (5, 4) and truth.array[-1, -1] == 1 and truth.spacing == (0.8, 0.5)
    sagittal = np.zeros((1, 5, 4), np.uint8)
    sagittal[0, 0, 0] = 1
    truth, _, _ = _in_display_orientation(*[LoadedImage(sagittal, (3.0, 0.8, 0.5), np.diag([3.0, 0.8, 0.5, 1.0]),
                                                        None)] * 2, None)
    assert truth.array.shape == (5, 4) and truth.array[0, 0] == 1 and truth.spacing == (0.8, 0.5)


def test_scores_do_not_depend_on_how_a_volume_is_stored(tmp_path):
    """The prediction stored transposed and flipped, with the affine saying so, scores as the same grid."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    volume = np.zeros((20, 16, 6), np.uint8)
    volume[4:12, 3:9, 1:4] = 1
    affine = np.diag([0.7, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), truth / "v.nii.gz")
    # Axes swapped and the new first axis flipped: voxel (i, j, k) of the truth is (15 - j, i, k) here.
    turned = np.flip(np.transpose(volume, (1, 0, 2)), axis=0)
    to_truth_index = np.array([[0, 1, 0, 0], [-1, 0, 0, 15], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(turned), affine @ to_truth_index), pred / "v.nii.gz")
    out = tmp_path / "out"
    result = run_cli("evaluate", "--truth", str(truth), "--pred", str(pred), "--out", str(out))
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(out / "metrics.csv").iloc[0]
    assert row["dice"] == 1.0 and row["hd"] == 0.0
    assert row["volume_true"] == pytest.approx(8 * 6 * 3 * 0.7 * 0.9 * 2.5 / 1000)


# --- comparing runs --------------------------------------------------------------------------------------
def write_run(folder, dice_shrink):
    """An evaluation output of 10 images whose predictions shrink the truth by ``dice_shrink[i]`` rows."""
    cases = []
    for index, shrink in enumerate(dice_shrink):
        truth = np.zeros((30, 30), np.uint8)
        truth[5:25, 5:25] = 1
        pred = truth.copy()
        pred[5:5 + shrink, 5:25] = 0
        cases.append((f"img{index}", truth, pred, None, None))
    table = metrics_table(cases, ["background", "muscle"], 1.0)
    folder.mkdir(parents=True)
    table.to_csv(folder / "metrics.csv", index=False)
    write_json_atomic(summarize(table, ["background", "muscle"], "pixels", 20), folder / "summary.json")
    return folder


def test_compare_two_runs_finds_the_better_one(tmp_path):
    worse = write_run(tmp_path / "experiments" / "worse" / "evaluate", [2 + index for index in range(10)])
    better = write_run(tmp_path / "better", [0] * 10)
    out = tmp_path / "comparison"
    result = run_cli("evaluate", "--compare", str(worse), str(better), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out / "report.html")
    document = json.loads((out / "comparison.json").read_text())
    assert [run["name"] for run in document["runs"]] == ["worse", "better"]
    (test,) = document["tests"]
    # Every image is better in the second run, each by a different amount: the exact two-sided p = 2 / 2**10.
    assert test["n"] == 10 and test["second_better"] == 10
    assert test["p_value"] == pytest.approx(2 / 2**10)
    assert test["median_difference"] > 0
    means = pd.read_csv(out / "comparison.csv").set_index(["class", "metric"])
    assert means.loc[("muscle", "dice"), "better"] == 1.0
    assert means.loc[("muscle", "dice"), "worse"] < 0.8
    assert (out / "figures" / "paired_dice_muscle.png").is_file()
    page = (out / "report.html").read_text()
    assert "Wilcoxon" in page and "worse" in page and "better" in page


def test_compare_three_runs_pairwise_with_holm(tmp_path):
    runs = [write_run(tmp_path / name, shrinks) for name, shrinks in
            (("a", [3] * 10), ("b", [1 + index % 3 for index in range(10)]), ("c", [0] * 10))]
    result = compare.compare_runs(runs, tmp_path / "out")
    tests = result.tests
    assert list(zip(tests["first"], tests["second"])) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert (tests["p_value_holm"] >= tests["p_value"]).all()
    assert "a − b" not in str(result) and "b − a" in str(result)


def test_compare_rejects_a_folder_that_is_no_run(tmp_path):
    run = write_run(tmp_path / "run", [1] * 10)
    (tmp_path / "empty").mkdir()
    result = run_cli("evaluate", "--compare", str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "no metrics.csv" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
