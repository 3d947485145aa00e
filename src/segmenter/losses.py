"""Segmentation losses, chosen by name with ``get_loss(name, num_classes, class_weights)``.

Convention for every loss: ``y_true`` is one-hot float32 of shape (batch, height, width, num_classes)
and ``y_pred`` holds softmax probabilities of the same shape.

The overlap losses (Dice, Jaccard, Tversky) are "batch" losses, as nnU-Net's batch Dice: each class's
soft true positives, false positives and false negatives are summed over the whole batch and all pixels
before the ratio is taken, and the per-class losses are then averaged with the class weights. With the
small batches a 2D U-Net trains with, a structure is often absent from one image; a per-image Dice
would then score that image 0 or 1 from a handful of stray probabilities and make the gradient noisy.
A small smoothing term makes a class absent from both truth and prediction score a perfect overlap
(loss 0) instead of 0/0. The batch-level ratio means that ``sample_weight`` cannot weight images of
an overlap loss; it only scales the batch's loss.

Cross-entropy and focal loss are Keras's built-ins, except that class weights for plain cross-entropy
need the small ``WeightedCategoricalCrossentropy`` below (Keras's ``class_weight`` argument to ``fit``
does not apply to per-pixel targets).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import keras
from keras import ops

# Keeps 0/0 defined: a class absent from truth and prediction gets an overlap of 1.
DEFAULT_SMOOTH = 1e-5


def soft_confusion(y_true, y_pred):
    """Soft true positives, false positives and false negatives per class, summed over batch and pixels.

    Returns three tensors of shape (num_classes,).
    """
    axes = tuple(range(len(y_pred.shape) - 1))
    true_positives = ops.sum(y_true * y_pred, axis=axes)
    false_positives = ops.sum(y_pred, axis=axes) - true_positives
    false_negatives = ops.sum(y_true, axis=axes) - true_positives
    return true_positives, false_positives, false_negatives


def weighted_class_mean(values, class_weights: Optional[Sequence[float]]):
    """Mean of per-class ``values`` (shape (num_classes,)), weighted by ``class_weights`` when given."""
    if class_weights is None:
        return ops.mean(values)
    weights = ops.convert_to_tensor(class_weights, dtype=values.dtype)
    return ops.sum(weights * values) / ops.sum(weights)


def pixel_crossentropy(y_true, y_pred, class_weights: Optional[Sequence[float]] = None):
    """Per-pixel categorical cross-entropy -sum_c w_c y_c log p_c, shape (batch, height, width)."""
    y_pred = ops.clip(y_pred, keras.config.epsilon(), 1.0)
    terms = -y_true * ops.log(y_pred)
    if class_weights is not None:
        terms = terms * ops.convert_to_tensor(class_weights, dtype=y_pred.dtype)
    return ops.sum(terms, axis=-1)


class _OverlapLoss(keras.losses.Loss):
    """1 minus a per-class overlap index, averaged over classes with optional weights."""

    def __init__(self, class_weights: Optional[Sequence[float]] = None, smooth: float = DEFAULT_SMOOTH, **kwargs):
        super().__init__(**kwargs)
        self.class_weights = None if class_weights is None else [float(weight) for weight in class_weights]
        self.smooth = float(smooth)

    def overlap(self, true_positives, false_positives, false_negatives):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        per_class = self.overlap(*soft_confusion(y_true, y_pred))
        # Shape (1,), not a scalar: Keras passes scalars through its reduction unscaled, so under a
        # tf.distribute strategy the replicas' losses (and gradients) would be summed, not averaged.
        return ops.reshape(1.0 - weighted_class_mean(per_class, self.class_weights), (1,))

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="segmenter")
class SoftDiceLoss(_OverlapLoss):
    """1 - soft Dice, 2TP / (2TP + FP + FN) per class over the batch."""

    def __init__(self, class_weights=None, smooth=DEFAULT_SMOOTH, name="dice", **kwargs):
        super().__init__(class_weights=class_weights, smooth=smooth, name=name, **kwargs)

    def overlap(self, true_positives, false_positives, false_negatives):
        return (2.0 * true_positives + self.smooth) / (
            2.0 * true_positives + false_positives + false_negatives + self.smooth
        )


@keras.saving.register_keras_serializable(package="segmenter")
class SoftJaccardLoss(_OverlapLoss):
    """1 - soft Jaccard (intersection over union), TP / (TP + FP + FN) per class over the batch."""

    def __init__(self, class_weights=None, smooth=DEFAULT_SMOOTH, name="jaccard", **kwargs):
        super().__init__(class_weights=class_weights, smooth=smooth, name=name, **kwargs)

    def overlap(self, true_positives, false_positives, false_negatives):
        return (true_positives + self.smooth) / (true_positives + false_positives + false_negatives + self.smooth)


@keras.saving.register_keras_serializable(package="segmenter")
class TverskyLoss(_OverlapLoss):
    """1 - Tversky index TP / (TP + alpha FP + beta FN) per class over the batch (Salehi et al. 2017).

    With beta > alpha, missed pixels cost more than extra ones, which favours recall of small structures;
    alpha = beta = 0.5 is the Dice loss and alpha = beta = 1 the Jaccard loss.
    """

    def __init__(self, alpha=0.3, beta=0.7, class_weights=None, smooth=DEFAULT_SMOOTH, name="tversky", **kwargs):
        super().__init__(class_weights=class_weights, smooth=smooth, name=name, **kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def overlap(self, true_positives, false_positives, false_negatives):
        return (true_positives + self.smooth) / (
            true_positives + self.alpha * false_positives + self.beta * false_negatives + self.smooth
        )

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="segmenter")
class WeightedCategoricalCrossentropy(keras.losses.Loss):
    """Per-pixel cross-entropy with one weight per class, averaged over pixels (not normalised by weights)."""

    def __init__(self, class_weights, name="cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(weight) for weight in class_weights]

    def call(self, y_true, y_pred):
        return pixel_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred, self.class_weights)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights}


@keras.saving.register_keras_serializable(package="segmenter")
class DiceCrossEntropyLoss(SoftDiceLoss):
    """Soft Dice loss plus mean per-pixel cross-entropy, nnU-Net's default loss.

    Dice handles the imbalance between a small structure and the background; cross-entropy gives smooth,
    well-scaled gradients early in training when the Dice overlap is still near zero.
    """

    def __init__(self, class_weights=None, smooth=DEFAULT_SMOOTH, name="dice_ce", **kwargs):
        super().__init__(class_weights=class_weights, smooth=smooth, name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        crossentropy = ops.mean(pixel_crossentropy(y_true, y_pred, self.class_weights))
        return super().call(y_true, y_pred) + crossentropy


def _dice(class_weights):
    return SoftDiceLoss(class_weights=class_weights)


def _jaccard(class_weights):
    return SoftJaccardLoss(class_weights=class_weights)


def _tversky(class_weights):
    return TverskyLoss(alpha=0.3, beta=0.7, class_weights=class_weights)


def _dice_ce(class_weights):
    return DiceCrossEntropyLoss(class_weights=class_weights)


def _cross_entropy(class_weights):
    if class_weights is None:
        return keras.losses.CategoricalCrossentropy(name="cross_entropy")
    return WeightedCategoricalCrossentropy(class_weights)


def _focal(class_weights):
    # Focal loss's alpha is its per-class weight; Keras's default 0.25 applies to every class otherwise.
    alpha = 0.25 if class_weights is None else [float(weight) for weight in class_weights]
    return keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=2.0, name="focal")


# Each entry makes the loss from the class weights (None or one float per class).
LOSSES: dict[str, Callable[[Optional[list[float]]], keras.losses.Loss]] = {
    "dice": _dice,
    "jaccard": _jaccard,
    "tversky": _tversky,
    "dice_ce": _dice_ce,
    "cross_entropy": _cross_entropy,
    "focal": _focal,
}


def get_loss(name: str, num_classes: int, class_weights: Optional[Sequence[float]] = None) -> keras.losses.Loss:
    """The loss ``name`` (a key of ``LOSSES``) for ``num_classes`` classes, with optional class weights."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if class_weights is not None:
        class_weights = [float(weight) for weight in class_weights]
        if len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} values, expected one per class ({num_classes})")
        if any(weight < 0 for weight in class_weights) or sum(class_weights) <= 0:
            raise ValueError(f"class_weights must be non-negative with a positive sum, got {class_weights}")
    return LOSSES[name](class_weights)
