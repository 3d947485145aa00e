"""Hard Dice metrics for training and tuning, as stateful Keras metrics.

Both metrics take the argmax of ``y_true`` (one-hot) and of ``y_pred`` (probabilities), count true
positives, false positives and false negatives over every pixel seen in the epoch, and report
2TP / (2TP + FP + FN) from the totals. Accumulating counts, rather than averaging per-batch scores,
makes the epoch's value independent of how the data was batched. A class absent from both truth and
prediction scores 1.0: nothing was there and nothing was found.

``mean_foreground_dice`` (background excluded) is the model-selection objective of the tune stage,
``kt.Objective("val_mean_foreground_dice", "max")``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import ops


def hard_confusion(y_true, y_pred, num_classes: int, sample_weight=None):
    """Counts of true positives, false positives and false negatives per class, each of shape (num_classes,).

    ``y_true`` and ``y_pred`` are (..., num_classes) scores; each pixel counts for its argmax class.
    ``sample_weight``, if given, is one weight per image or per pixel.
    """
    true_one_hot = ops.one_hot(ops.argmax(y_true, axis=-1), num_classes, dtype="float32")
    pred_one_hot = ops.one_hot(ops.argmax(y_pred, axis=-1), num_classes, dtype="float32")
    if sample_weight is not None:
        weight = ops.cast(sample_weight, "float32")
        # One weight per image (or per row) is broadcast over the remaining pixel axes.
        while len(weight.shape) < len(true_one_hot.shape):
            weight = ops.expand_dims(weight, axis=-1)
        true_one_hot = true_one_hot * weight
        pred_one_hot = pred_one_hot * weight
    axes = tuple(range(len(true_one_hot.shape) - 1))
    true_positives = ops.sum(true_one_hot * pred_one_hot, axis=axes)
    false_positives = ops.sum(pred_one_hot, axis=axes) - true_positives
    false_negatives = ops.sum(true_one_hot, axis=axes) - true_positives
    return true_positives, false_positives, false_negatives


def dice_from_counts(true_positives, false_positives, false_negatives):
    """2TP / (2TP + FP + FN), and 1.0 where the denominator is 0 (class absent from truth and prediction)."""
    denominator = 2.0 * true_positives + false_positives + false_negatives
    safe_denominator = ops.where(denominator > 0, denominator, ops.ones_like(denominator))
    return ops.where(denominator > 0, 2.0 * true_positives / safe_denominator, ops.ones_like(denominator))


class _HardDice(keras.metrics.Metric):
    """Accumulates per-class counts for ``class_ids``; subclasses say how to report them."""

    def __init__(self, class_ids: Sequence[int], name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_ids = [int(class_id) for class_id in class_ids]
        shape = (len(self.class_ids),)
        self.true_positives = self.add_variable(shape=shape, initializer="zeros", name="true_positives")
        self.false_positives = self.add_variable(shape=shape, initializer="zeros", name="false_positives")
        self.false_negatives = self.add_variable(shape=shape, initializer="zeros", name="false_negatives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        # The number of classes is the last axis of the predictions, known when the graph is built.
        counts = hard_confusion(y_true, y_pred, y_pred.shape[-1], sample_weight)
        for variable, count in zip((self.true_positives, self.false_positives, self.false_negatives), counts):
            selected = ops.take(count, self.class_ids, axis=0)
            variable.assign_add(ops.cast(selected, variable.dtype))

    def per_class_dice(self):
        return dice_from_counts(self.true_positives, self.false_positives, self.false_negatives)

    def reset_state(self):
        for variable in (self.true_positives, self.false_positives, self.false_negatives):
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))


@keras.saving.register_keras_serializable(package="segmenter")
class DiceScore(_HardDice):
    """Hard Dice of one class over all pixels seen since the last reset."""

    def __init__(self, class_id: int, name: Optional[str] = None, **kwargs):
        super().__init__([class_id], name=name or f"dice_{class_id}", **kwargs)
        self.class_id = int(class_id)

    def result(self):
        return self.per_class_dice()[0]

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}


@keras.saving.register_keras_serializable(package="segmenter")
class MeanForegroundDice(_HardDice):
    """Mean of the hard Dice of classes 1 .. num_classes - 1; class 0, the background, is left out."""

    def __init__(self, num_classes: int, name: str = "mean_foreground_dice", **kwargs):
        if num_classes < 2:
            raise ValueError(f"MeanForegroundDice needs at least 2 classes (background and one more), got {num_classes}")
        super().__init__(range(1, num_classes), name=name, **kwargs)
        self.num_classes = int(num_classes)

    def result(self):
        return ops.mean(self.per_class_dice())

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def get_metrics(class_names: Sequence[str]) -> list[keras.metrics.Metric]:
    """The training metrics: mean foreground Dice, then ``dice_<name>`` for each foreground class.

    ``class_names[0]`` is the background.
    """
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 class names (background first), got {list(class_names)}")
    foreground = [DiceScore(class_id, name=f"dice_{class_names[class_id]}") for class_id in range(1, len(class_names))]
    return [MeanForegroundDice(len(class_names)), *foreground]
