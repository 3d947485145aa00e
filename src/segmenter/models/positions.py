"""Position-conditioned convolutions: every level of an encoder-decoder is told where its voxels lie.

MedPatchNet's option, for 3D models trained on patches (``train.model.position_conditioning``). The model's
input holds the image channels and, last, the three position channels of :mod:`segmenter.positions` (each
voxel's place in its volume, from -1 to +1 per axis). :class:`SplitPositions` splits them off the image;
:func:`pyramid` average-pools them to the resolution of every level, which for coordinates that are linear
in the index is exactly the position of each coarse voxel's centre; and the encoder-decoder concatenates
the level's positions to the input of each of its blocks, so the convolutions of every scale see them
(CoordConv, Liu et al. 2018, applied at each level rather than once at the input, where a few layers of
convolution and normalisation would dilute them). Three channels more per block input: the cost is
small beside the blocks' tens of channels.

The split is a registered layer (not a Lambda, which safe-mode loading refuses); a saved model that holds
one takes positions, which is how predict, visualize and ``evaluate --follow`` know to feed them
(:func:`takes_positions`).
"""
from __future__ import annotations

import keras
from keras import layers

from segmenter.models import blocks
from segmenter.positions import NUM_CHANNELS

#: The name of the split layer in a position-conditioned model.
SPLIT_NAME = "positions"


@keras.saving.register_keras_serializable(package="segmenter")
class SplitPositions(layers.Layer):
    """(image channels, position channels) of an input whose last ``NUM_CHANNELS`` channels are positions."""

    def call(self, inputs):
        return inputs[..., :-NUM_CHANNELS], inputs[..., -NUM_CHANNELS:]

    def compute_output_shape(self, input_shape):
        *spatial, channels = input_shape
        return (*spatial, None if channels is None else channels - NUM_CHANNELS), (*spatial, NUM_CHANNELS)


def split(inputs) -> tuple:
    """(image, positions) tensors of a model input that ends with the position channels."""
    channels = inputs.shape[-1]
    if channels is None or channels <= NUM_CHANNELS:
        raise ValueError(f"a position-conditioned model needs the image channels and {NUM_CHANNELS} position "
                         f"channels, got an input of {channels} channels")
    image, positions = SplitPositions(name=SPLIT_NAME)(inputs)
    return image, positions


def pyramid(positions, levels: int) -> list:
    """The positions at full resolution and at each of ``levels`` halvings (index k: 2**k times coarser)."""
    scales = [positions]
    for level in range(1, levels + 1):
        pool = {2: layers.AveragePooling2D, 3: layers.AveragePooling3D}[blocks.spatial_dims(positions)]
        scales.append(pool(2, name=f"positions_{level}")(scales[-1]))
    return scales


def takes_positions(model) -> bool:
    """Whether ``model`` (a Keras model, or a fold ensemble of them) wants position channels after the image's."""
    first = getattr(model, "models", [model])[0]
    return any(isinstance(layer, SplitPositions) for layer in getattr(first, "layers", []))
