"""Losses and hard Dice metrics against values worked out by hand on tiny label maps.

Convention: ``y_true`` is one-hot (batch, height, width, classes), ``y_pred`` softmax probabilities.
The overlap losses are batch losses: counts are summed over batch and pixels before the ratio.
"""
import math

import keras
import numpy as np
import pytest

from segmenter.losses import LOSSES, get_loss
from segmenter.metrics import DiceScore, MeanForegroundDice, get_metrics


def one_hot(labels, num_classes):
    """(batch, height, width) integer labels -> one-hot float32."""
    return np.eye(num_classes, dtype="float32")[np.asarray(labels)]


def two_class_probabilities(foreground):
    """(batch, height, width) foreground probabilities -> (..., 2) softmax-like output."""
    foreground = np.asarray(foreground, dtype="float32")
    return np.stack([1.0 - foreground, foreground], axis=-1)


def loss_value(name, y_true, y_pred, class_weights=None):
    num_classes = y_true.shape[-1]
    return float(get_loss(name, num_classes, class_weights)(y_true, y_pred))


# One image of 2x2 pixels. The truth has foreground at the two top pixels; the prediction gives
# foreground probabilities 0.8, 0.4 (top) and 0.2, 0.0 (bottom).
# Foreground: TP = 0.8 + 0.4 = 1.2, FP = 0.2, FN = 0.8.  Background: TP = 0.8 + 1.0 = 1.8, FP = 0.8, FN = 0.2.
PARTIAL_TRUTH = one_hot([[[1, 1], [0, 0]]], 2)
PARTIAL_PREDICTION = two_class_probabilities([[[0.8, 0.4], [0.2, 0.0]]])
FOREGROUND_DICE = 2 * 1.2 / (2 * 1.2 + 0.2 + 0.8)
BACKGROUND_DICE = 2 * 1.8 / (2 * 1.8 + 0.8 + 0.2)
PIXEL_CROSSENTROPY = [-math.log(0.8), -math.log(0.4), -math.log(0.8), 0.0]

PARTIAL_CASES = [
    ("dice", None, 1 - (FOREGROUND_DICE + BACKGROUND_DICE) / 2),
    ("dice", [0.0, 1.0], 1 - FOREGROUND_DICE),
    ("dice", [1.0, 3.0], 1 - (BACKGROUND_DICE + 3 * FOREGROUND_DICE) / 4),
    ("jaccard", None, 1 - (1.2 / (1.2 + 0.2 + 0.8) + 1.8 / (1.8 + 0.8 + 0.2)) / 2),
    # Tversky: alpha = 0.3 weighs false positives, beta = 0.7 false negatives.
    ("tversky", None, 1 - (1.2 / (1.2 + 0.3 * 0.2 + 0.7 * 0.8) + 1.8 / (1.8 + 0.3 * 0.8 + 0.7 * 0.2)) / 2),
    ("cross_entropy", None, np.mean(PIXEL_CROSSENTROPY)),
    # Class weights multiply each pixel's term by the weight of its true class (foreground: pixels 0, 1).
    ("cross_entropy", [1.0, 3.0], np.mean([3 * PIXEL_CROSSENTROPY[0], 3 * PIXEL_CROSSENTROPY[1], *PIXEL_CROSSENTROPY[2:]])),
    ("dice_ce", None, 1 - (FOREGROUND_DICE + BACKGROUND_DICE) / 2 + np.mean(PIXEL_CROSSENTROPY)),
    # Focal: alpha (1 - p)^gamma (-log p) with alpha = 0.25, gamma = 2, p the true class's probability.
    ("focal", None, np.mean([0.25 * (1 - p) ** 2 * -math.log(p) for p in (0.8, 0.4, 0.8, 1.0)])),
    # With class weights, alpha becomes the true class's weight: 2 for pixels 0 and 1, 1 for pixels 2 and 3.
    ("focal", [1.0, 2.0], np.mean([2 * (1 - p) ** 2 * -math.log(p) for p in (0.8, 0.4)] + [0.2**2 * -math.log(0.8), 0.0])),
]


@pytest.mark.parametrize("name, class_weights, expected", PARTIAL_CASES)
def test_loss_of_partial_overlap_matches_hand_computation(name, class_weights, expected):
    assert loss_value(name, PARTIAL_TRUTH, PARTIAL_PREDICTION, class_weights) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_prediction_has_zero_loss(name):
    truth = one_hot([[[0, 1, 2], [2, 1, 0]]], 3)
    assert loss_value(name, truth, truth) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky", "dice_ce"])
def test_class_absent_from_truth_and_prediction_has_zero_loss(name):
    # Class 2 appears nowhere; smoothing must score it as a perfect overlap, not 0/0 or a loss of 1.
    truth = one_hot([[[0, 1], [1, 0]]], 3)
    assert loss_value(name, truth, truth) == pytest.approx(0.0, abs=1e-5)
    assert not math.isnan(loss_value(name, np.zeros_like(truth), np.zeros_like(truth)))


# Disjoint hard masks on 2x2 pixels: truth foreground top-left, prediction foreground top-right.
# Foreground: TP 0, FP 1, FN 1.  Background: TP 2, FP 1, FN 1.
DISJOINT_TRUTH = one_hot([[[1, 0], [0, 0]]], 2)
DISJOINT_PREDICTION = one_hot([[[0, 1], [0, 0]]], 2)
DISJOINT_CASES = [
    ("dice", 1 - (0 + 4 / 6) / 2),
    ("jaccard", 1 - (0 + 2 / 4) / 2),
    ("tversky", 1 - (0 + 2 / (2 + 0.3 + 0.7)) / 2),
]


@pytest.mark.parametrize("name, expected", DISJOINT_CASES)
def test_disjoint_masks(name, expected):
    assert loss_value(name, DISJOINT_TRUTH, DISJOINT_PREDICTION) == pytest.approx(expected, rel=1e-4)
    assert loss_value(name, DISJOINT_TRUTH, DISJOINT_PREDICTION, [0.0, 1.0]) == pytest.approx(1.0, abs=1e-4)


def test_dice_is_computed_over_the_whole_batch():
    # Image 1: foreground pixel found. Image 2: no foreground, one false-positive pixel.
    # Batch Dice of the foreground: TP 1, FP 1, FN 0 -> 2/3; a per-image mean would give (1 + 0)/2.
    truth = one_hot([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], 2)
    prediction = one_hot([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], 2)
    assert loss_value("dice", truth, prediction, [0.0, 1.0]) == pytest.approx(1 - 2 / 3, rel=1e-4)


def test_tversky_penalises_missed_pixels_more_than_extra_ones():
    # Both cases have one true positive; one misses a pixel (FN 1), the other adds one (FP 1).
    # Dice scores both 2/3; Tversky scores 1/(1 + 0.7) and 1/(1 + 0.3).
    missed = one_hot([[[1, 1], [0, 0]]], 2), one_hot([[[1, 0], [0, 0]]], 2)
    extra = one_hot([[[1, 0], [0, 0]]], 2), one_hot([[[1, 1], [0, 0]]], 2)
    weights = [0.0, 1.0]
    assert loss_value("dice", *missed, weights) == pytest.approx(1 - 2 / 3, rel=1e-4)
    assert loss_value("dice", *extra, weights) == pytest.approx(1 - 2 / 3, rel=1e-4)
    assert loss_value("tversky", *missed, weights) == pytest.approx(1 - 1 / 1.7, rel=1e-4)
    assert loss_value("tversky", *extra, weights) == pytest.approx(1 - 1 / 1.3, rel=1e-4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_survives_serialization(name):
    loss = get_loss(name, 2, [1.0, 2.0])
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert float(restored(PARTIAL_TRUTH, PARTIAL_PREDICTION)) == pytest.approx(float(loss(PARTIAL_TRUTH, PARTIAL_PREDICTION)))


def test_get_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("dise", 2)
    with pytest.raises(ValueError, match="one per class"):
        get_loss("dice", 3, [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        get_loss("dice", 2, [-1.0, 1.0])


# Hard Dice metrics on a 2x3 map with 3 classes.
# Truth [[1, 1, 0], [0, 2, 2]], prediction [[1, 0, 0], [2, 2, 2]]:
# class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 2, FP 1, FN 0 -> 4/5.
METRIC_TRUTH = one_hot([[[1, 1, 0], [0, 2, 2]]], 3)
METRIC_PREDICTION = one_hot([[[1, 0, 0], [2, 2, 2]]], 3)
METRIC_CASES = [
    ("perfect", METRIC_TRUTH, METRIC_TRUTH, 1.0, 1.0, 1.0),
    ("partial", METRIC_TRUTH, METRIC_PREDICTION, 2 / 3, 4 / 5, (2 / 3 + 4 / 5) / 2),
    # Class 2 absent from truth and prediction scores 1; class 1 is swapped with background: 0.
    ("disjoint", one_hot([[[1, 0], [0, 0]]], 3), one_hot([[[0, 1], [0, 0]]], 3), 0.0, 1.0, 0.5),
    ("all background", one_hot([[[0, 0], [0, 0]]], 3), one_hot([[[0, 0], [0, 0]]], 3), 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("case, truth, prediction, dice_1, dice_2, mean_foreground", METRIC_CASES)
def test_hard_dice_metrics(case, truth, prediction, dice_1, dice_2, mean_foreground):
    # Soft probabilities with the same argmax must give the same hard Dice.
    rng = np.random.default_rng(0)
    soft_prediction = prediction * 0.6 + rng.uniform(0, 0.2, prediction.shape).astype("float32")
    for metric, expected in [
        (DiceScore(1, name="dice_1"), dice_1),
        (DiceScore(2, name="dice_2"), dice_2),
        (MeanForegroundDice(3), mean_foreground),
    ]:
        metric.update_state(truth, soft_prediction)
        assert float(metric.result()) == pytest.approx(expected, rel=1e-5), (case, metric.name)


def test_metric_accumulates_counts_over_batches_and_resets():
    # Batch A: TP 1. Batch B: FP 1, FN 2. Pooled Dice 2*1 / (2*1 + 1 + 2) = 0.4, not the batch mean 0.5.
    metric = DiceScore(1, name="dice_1")
    metric.update_state(one_hot([[[1, 0]]], 2), one_hot([[[1, 0]]], 2))
    metric.update_state(one_hot([[[1, 1, 0]]], 2), one_hot([[[0, 0, 1]]], 2))
    assert float(metric.result()) == pytest.approx(0.4)
    metric.reset_state()
    metric.update_state(one_hot([[[1, 0]]], 2), one_hot([[[0, 1]]], 2))
    assert float(metric.result()) == pytest.approx(0.0)


def test_metric_sample_weight_drops_an_image():
    truth = one_hot([[[1, 1]], [[1, 1]]], 2)
    prediction = one_hot([[[1, 1]], [[0, 0]]], 2)
    metric = MeanForegroundDice(2)
    metric.update_state(truth, prediction, sample_weight=np.array([1.0, 0.0], "float32"))
    assert float(metric.result()) == pytest.approx(1.0)


def test_get_metrics_names_and_serialization():
    metrics = get_metrics(["background", "vertebra", "disc"])
    assert [metric.name for metric in metrics] == ["mean_foreground_dice", "dice_vertebra", "dice_disc"]
    assert [metric.class_id for metric in metrics[1:]] == [1, 2]
    for metric in metrics:
        restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
        assert type(restored) is type(metric) and restored.name == metric.name
        restored.update_state(METRIC_TRUTH, METRIC_PREDICTION)
        metric.update_state(METRIC_TRUTH, METRIC_PREDICTION)
        assert float(restored.result()) == pytest.approx(float(metric.result()))
    with pytest.raises(ValueError):
        get_metrics(["background"])
