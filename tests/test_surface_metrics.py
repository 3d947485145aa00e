"""Known-answer and oracle tests for segmenter.evaluation.surface.segmentation_metrics.

Cases with hand-derived answers are listed first (shifted squares and discs, anisotropic spacing, the four
empty-mask cases, hand-counted overlaps, NSD at a tolerance); then random shapes are compared with an
independent brute-force implementation that finds borders by neighbour comparison and distances with
``scipy.spatial.distance.cdist``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from segmenter.evaluation.surface import segmentation_metrics

SHAPE = (64, 64)
NSD_TOLERANCE = 1.0


def disc_mask(shape, centre, radius):
    rows, columns = np.indices(shape)
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def square_mask(shape, top_left, side):
    mask = np.zeros(shape, bool)
    mask[top_left[0] : top_left[0] + side, top_left[1] : top_left[1] + side] = True
    return mask


def sphere_mask(shape, centre, radius):
    planes, rows, columns = np.indices(shape)
    return (planes - centre[0]) ** 2 + (rows - centre[1]) ** 2 + (columns - centre[2]) ** 2 <= radius**2


def random_blob(rng, shape, smoothing=3.0, threshold=0.6):
    """A random smooth shape (possibly several components), never empty."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), smoothing)
    mask = field > np.quantile(field, threshold)
    return mask


# --- the oracle -----------------------------------------------------------------------------------------
def brute_force_border(mask):
    """Foreground pixels with a background face-neighbour, by comparing shifted copies (no erosion)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    has_background_neighbour = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            has_background_neighbour |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & has_background_neighbour


def brute_force_metrics(truth, pred, spacing, tolerance):
    spacing = np.ones(truth.ndim) if spacing is None else np.asarray(spacing, float)
    truth_points = np.argwhere(brute_force_border(truth)) * spacing
    pred_points = np.argwhere(brute_force_border(pred)) * spacing
    distances = cdist(pred_points, truth_points)
    pooled = np.concatenate([distances.min(axis=1), distances.min(axis=0)])
    intersection = np.logical_and(truth, pred).sum()
    return {
        "dice": 2 * intersection / (truth.sum() + pred.sum()),
        "iou": intersection / np.logical_or(truth, pred).sum(),
        "hd": pooled.max(),
        # MONAI's and DeepMind's definition: the larger of the two directed 95th percentiles.
        "hd95": max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95)),
        "hd95_pooled": np.percentile(pooled, 95),  # medpy's
        "assd": pooled.mean(),
        # The same tie rule as the implementation: a distance equal to the tolerance, up to rounding, is within.
        "nsd": np.mean(pooled <= tolerance * (1 + 1e-9)),
    }


def assert_metrics_match(expected: dict, metrics: dict) -> None:
    """Every oracle value equals segmenter's; the pooled HD95 is what ``hd95="pooled"`` gives."""
    for name, value in expected.items():
        if name != "hd95_pooled":
            assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name


# --- known answers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0, 1, 3, 5])
@pytest.mark.parametrize("axis", [0, 1])
def test_hausdorff_of_shifted_disc_equals_shift(shift, axis):
    truth = disc_mask(SHAPE, centre=(32, 32), radius=10)
    metrics = segmentation_metrics(truth, np.roll(truth, shift, axis=axis), spacing=(1.0, 1.0), nsd_tolerance=1.0)
    assert metrics["hd"] == pytest.approx(shift)
    assert metrics["case"] == "both_present"


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_hausdorff_of_shifted_square_equals_shift(shift):
    truth = square_mask(SHAPE, (20, 20), 16)
    metrics = segmentation_metrics(truth, np.roll(truth, shift, axis=1), spacing=None, nsd_tolerance=1.0)
    assert metrics["hd"] == pytest.approx(shift)
    # Overlap by hand: the shifted square shares 16 rows x (16 - shift) columns with the original.
    shared = 16 * (16 - shift)
    assert metrics["dice"] == pytest.approx(2 * shared / (2 * 256))
    assert metrics["iou"] == pytest.approx(shared / (2 * 256 - shared))


def test_identical_masks_score_perfectly():
    truth = disc_mask(SHAPE, (30, 34), 12)
    metrics = segmentation_metrics(truth, truth.copy(), spacing=(0.7, 0.7), nsd_tolerance=0.0)
    assert metrics == {"dice": 1.0, "iou": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "case": "both_present"}


@pytest.mark.parametrize("shift", [1, 3])
def test_anisotropic_spacing_scales_distances_along_its_axis(shift):
    truth = disc_mask(SHAPE, (32, 32), 10)
    along_rows = np.roll(truth, shift, axis=0)
    along_columns = np.roll(truth, shift, axis=1)
    # Rows are 2 mm apart and columns 1 mm: a shift along rows doubles every distance, along columns not.
    assert segmentation_metrics(truth, along_rows, (2.0, 1.0), 1.0)["hd"] == pytest.approx(2 * shift)
    assert segmentation_metrics(truth, along_columns, (2.0, 1.0), 1.0)["hd"] == pytest.approx(shift)
    isotropic = segmentation_metrics(truth, along_rows, None, 1.0)
    anisotropic = segmentation_metrics(truth, along_rows, (2.0, 1.0), 1.0)
    assert anisotropic["dice"] == isotropic["dice"]  # overlap does not depend on spacing


def test_shifted_sphere_in_3d_with_anisotropic_spacing():
    truth = sphere_mask((24, 40, 40), (12, 20, 20), 8)
    pred = np.roll(truth, 2, axis=0)
    metrics = segmentation_metrics(truth, pred, spacing=(2.5, 0.8, 0.8), nsd_tolerance=1.0)
    assert metrics["hd"] == pytest.approx(2 * 2.5)
    assert metrics["case"] == "both_present"


def test_dice_and_iou_on_hand_counted_overlap():
    truth = np.zeros((6, 6), bool)
    pred = np.zeros((6, 6), bool)
    truth[0:2, 0:3] = True  # 6 pixels
    pred[1:3, 1:3] = True  # 4 pixels, 2 of them shared: (1, 1) and (1, 2)
    metrics = segmentation_metrics(truth, pred, None, 1.0)
    assert metrics["dice"] == pytest.approx(2 * 2 / (6 + 4))
    assert metrics["iou"] == pytest.approx(2 / 8)


def test_nsd_is_one_when_shift_within_tolerance():
    truth = disc_mask(SHAPE, (32, 32), 10)
    metrics = segmentation_metrics(truth, np.roll(truth, 1, axis=1), None, nsd_tolerance=1.0)
    assert metrics["nsd"] == pytest.approx(1.0)


def test_nsd_below_one_when_shift_exceeds_tolerance():
    truth = disc_mask(SHAPE, (32, 32), 10)
    metrics = segmentation_metrics(truth, np.roll(truth, 3, axis=1), None, nsd_tolerance=1.0)
    assert 0.0 < metrics["nsd"] < 1.0
    # Widening the tolerance to the shift brings every border pixel within it.
    assert segmentation_metrics(truth, np.roll(truth, 3, axis=1), None, nsd_tolerance=3.0)["nsd"] == 1.0


def test_nsd_tolerance_is_in_spacing_units():
    truth = disc_mask(SHAPE, (32, 32), 10)
    pred = np.roll(truth, 1, axis=0)
    # A one-row shift is 2 mm at 2 mm rows: outside a 1 mm tolerance, inside a 2 mm one.
    assert segmentation_metrics(truth, pred, (2.0, 1.0), nsd_tolerance=1.0)["nsd"] < 1.0
    assert segmentation_metrics(truth, pred, (2.0, 1.0), nsd_tolerance=2.0)["nsd"] == 1.0


# --- empty masks -----------------------------------------------------------------------------------------
EMPTY = np.zeros(SHAPE, bool)
DISC = disc_mask(SHAPE, (32, 32), 6)
EMPTY_CASES = [
    # truth, pred, case, dice/iou/nsd, distances
    (EMPTY, EMPTY, "both_empty", 1.0, 0.0),
    (EMPTY, DISC, "false_positive", 0.0, math.nan),
    (DISC, EMPTY, "missed", 0.0, math.nan),
]


@pytest.mark.parametrize("truth, pred, case, overlap, distance", EMPTY_CASES, ids=[c[2] for c in EMPTY_CASES])
def test_empty_mask_conventions(truth, pred, case, overlap, distance):
    metrics = segmentation_metrics(truth, pred, (0.8, 0.8), nsd_tolerance=1.0)
    assert metrics["case"] == case
    for name in ("dice", "iou", "nsd"):
        assert metrics[name] == overlap
    for name in ("hd", "hd95", "assd"):
        assert metrics[name] == pytest.approx(distance, nan_ok=True)


def test_disjoint_masks_are_both_present_with_zero_dice_and_finite_distances():
    truth = square_mask(SHAPE, (5, 5), 4)
    pred = square_mask(SHAPE, (5, 25), 4)
    metrics = segmentation_metrics(truth, pred, None, 1.0)
    assert metrics["case"] == "both_present"
    assert metrics["dice"] == 0.0
    # Squares span columns 5-8 and 25-28: the farthest border column of one (28) is 20 from the nearest
    # border column of the other (8), and symmetrically (5 to 25).
    assert metrics["hd"] == pytest.approx(20.0)


def test_masks_touching_the_array_edge_have_a_border_there():
    truth = np.zeros((10, 10), bool)
    truth[:, :5] = True  # fills the left half, touching three edges
    pred = truth.copy()
    pred[:, 5] = True
    metrics = segmentation_metrics(truth, pred, None, 1.0)
    assert metrics["hd"] == pytest.approx(1.0)


# --- invalid input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "truth, pred, spacing, tolerance",
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), None, 1.0),  # shapes differ
        (np.zeros(4), np.zeros(4), None, 1.0),  # 1D
        (np.zeros((4, 4)), np.zeros((4, 4)), (1.0,), 1.0),  # spacing length
        (np.zeros((4, 4)), np.zeros((4, 4)), (1.0, 0.0), 1.0),  # zero spacing
        (np.zeros((4, 4)), np.zeros((4, 4)), (1.0, float("nan")), 1.0),  # unknown spacing must be None
        (np.zeros((4, 4)), np.zeros((4, 4)), None, -1.0),  # negative tolerance
    ],
)
def test_invalid_input_raises_value_error(truth, pred, spacing, tolerance):
    with pytest.raises(ValueError):
        segmentation_metrics(truth, pred, spacing, tolerance)


# --- against the brute-force oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [None, (1.0, 1.0), (2.0, 0.7), (0.5, 1.3)])
def test_random_2d_shapes_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    truth = random_blob(rng, (48, 40))
    pred = random_blob(rng, (48, 40), threshold=rng.uniform(0.5, 0.8))
    tolerance = float(rng.uniform(0.5, 4.0))
    expected = brute_force_metrics(truth, pred, spacing, tolerance)
    metrics = segmentation_metrics(truth, pred, spacing, tolerance)
    assert_metrics_match(expected, metrics)


@pytest.mark.parametrize("seed", range(3))
def test_random_3d_shapes_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    truth = random_blob(rng, (12, 20, 18), smoothing=2.0)
    # A perturbed copy: realistic predictions overlap their truth.
    pred = ndimage.binary_dilation(truth, iterations=int(rng.integers(0, 2))) ^ (rng.random(truth.shape) < 0.02)
    spacing = (3.0, 0.9, 0.75)
    expected = brute_force_metrics(truth, pred, spacing, 2.0)
    metrics = segmentation_metrics(truth, pred, spacing, 2.0)
    assert_metrics_match(expected, metrics)


def test_small_shape_far_from_origin_matches_brute_force():
    """The internal crop to the masks' bounding box must not change any value."""
    rng = np.random.default_rng(7)
    truth = np.zeros((128, 128), bool)
    pred = np.zeros((128, 128), bool)
    truth[90:110, 100:120] = random_blob(rng, (20, 20), smoothing=2.0)
    pred[95:115, 97:117] = random_blob(rng, (20, 20), smoothing=2.0)
    expected = brute_force_metrics(truth, pred, (0.6, 0.9), 1.5)
    metrics = segmentation_metrics(truth, pred, (0.6, 0.9), 1.5)
    assert_metrics_match(expected, metrics)


@pytest.mark.parametrize("seed", range(12))
def test_hd95_definitions_on_anisotropic_3d_pairs(seed):
    """12 random anisotropic 3D pairs: the default HD95 is the larger directed 95th percentile (MONAI,
    DeepMind's surface-distance), ``hd95="pooled"`` medpy's; the first is never the smaller."""
    rng = np.random.default_rng(100 + seed)
    truth = random_blob(rng, (20, 24, 16))
    pred = random_blob(rng, (20, 24, 16), threshold=rng.uniform(0.5, 0.8))
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    expected = brute_force_metrics(truth, pred, spacing, 2.0)
    default = segmentation_metrics(truth, pred, spacing, 2.0)
    pooled = segmentation_metrics(truth, pred, spacing, 2.0, hd95="pooled")
    assert default["hd95"] == pytest.approx(expected["hd95"], rel=1e-9)
    assert pooled["hd95"] == pytest.approx(expected["hd95_pooled"], rel=1e-9)
    assert default["hd95"] >= pooled["hd95"] - 1e-9
    assert {k: v for k, v in default.items() if k != "hd95"} == {k: v for k, v in pooled.items() if k != "hd95"}


def test_hd95_of_an_asymmetric_error_takes_the_worse_direction():
    """A square truth and the same square with a long spur: truth -> prediction distances are all 0, the spur's
    are up to its length, so the directed 95th percentiles differ and the default takes the larger."""
    truth = square_mask((64, 64), (10, 10), 20)
    pred = truth.copy()
    pred[28, 30:60] = True  # a one-pixel-wide spur of 30 pixels
    default = segmentation_metrics(truth, pred, (1.0, 1.0), 1.0)
    pooled = segmentation_metrics(truth, pred, (1.0, 1.0), 1.0, hd95="pooled")
    assert default["hd95"] > pooled["hd95"]
    with pytest.raises(ValueError, match="hd95"):
        segmentation_metrics(truth, pred, (1.0, 1.0), 1.0, hd95="medpy")
