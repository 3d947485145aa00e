"""Deep supervision (Lee et al. 2015, "Deeply-Supervised Nets"; on by default in nnU-Net).

With ``train.model.deep_supervision`` the decoder's coarser levels also predict the segmentation, each
through its own 1x1 convolution and softmax, and during training their losses against the labels at
their resolution join the main output's loss. The gradient then reaches the deep layers by a short path
too, which helps most where patches are small and data few (3D).

As in nnU-Net, the labels are brought to each level's resolution by nearest-neighbour down-sampling
(every 2**level-th voxel of the one-hot labels, so they stay exact), the losses are weighted 1, 1/2, 1/4 ...
from the full resolution down and normalised to sum to 1, and the lowest-resolution decoder level (the
one just after the bottleneck, a few voxels across) is left out.

The model is a Functional model of class :class:`DeepSupervisionModel` with the full-resolution output
first. It returns every output only when called with ``training=True`` (the train step); otherwise, so
in ``predict``, ``evaluate`` and validation, the full-resolution probabilities alone, like any other
segmenter model; the validation loss and the metrics are the main output's. :func:`inference_model`
gives the plain single-output model (the same layers and weights) where one is needed by shape, as
prediction does. The class is registered, so saved ``.keras`` files load in safe mode.
"""
from __future__ import annotations

import keras
from keras import ops


def supervised_levels(depth: int) -> list[int]:
    """The decoder levels (level k at 1/2**k of the input's resolution) that get an auxiliary output.

    All but the full resolution and the lowest level, except that a 2-level network keeps its lowest;
    a 1-level network has none (it is then a plain model).
    """
    return [1] if depth == 2 else list(range(1, depth - 1))


def level_weights(levels: list[int]) -> list[float]:
    """Loss weights of the full-resolution output then of each auxiliary level, halving per level, sum 1."""
    weights = [1.0] + [0.5**level for level in levels]
    return [weight / sum(weights) for weight in weights]


def downsample_labels(y_true, factor: int):
    """Every ``factor``-th pixel (voxel) of one-hot labels on each spatial axis: nearest neighbour, exact."""
    if factor == 1:
        return y_true
    spatial_dims = len(y_true.shape) - 2
    return y_true[(slice(None),) + (slice(None, None, factor),) * spatial_dims]


@keras.saving.register_keras_serializable(package="segmenter")
class DeepSupervisionModel(keras.Model):
    """A Functional model whose first output is the segmentation and the others the auxiliary outputs.

    Build it as any Functional model, ``DeepSupervisionModel(inputs, [main, *auxiliary], name=...)``,
    with the auxiliary outputs at 1/2, 1/4 ... of the main output's resolution, in that order.
    """

    def call(self, inputs, training=None, mask=None, **kwargs):
        outputs = super().call(inputs, training=training, mask=mask, **kwargs)
        return outputs if training else outputs[0]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y_pred, (list, tuple)):  # validation and evaluate: the main output only
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        main, *auxiliary = y_pred
        weights = level_weights(list(range(1, len(auxiliary) + 1)))
        total = ops.multiply(super().compute_loss(x, y, main, sample_weight, training), weights[0])
        full_size = main.shape[1]
        for weight, output in zip(weights[1:], auxiliary):
            labels = downsample_labels(y, full_size // output.shape[1])
            # The compiled loss itself (also its scaling across replicas), on the labels at this resolution.
            total = total + ops.multiply(self._compile_loss(labels, output), weight)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, (list, tuple)):
            y_pred = y_pred[0]
        return super().compute_metrics(x, y, y_pred, sample_weight)


def inference_model(model: keras.Model) -> keras.Model:
    """The single-output model of a deeply supervised one (the same layers and weights); others unchanged."""
    if isinstance(model, DeepSupervisionModel):
        return keras.Model(model.inputs, model.outputs[0], name=model.name)
    return model
