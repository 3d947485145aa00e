"""Where a patch lies in its volume, as input channels: the position channels of position-conditioned models.

With ``train.model.position_conditioning`` (3D only) a model's input holds, after the image channels,
``NUM_CHANNELS`` more: for every voxel its coordinate along each array axis of the prepared volume it was
cut from, mapped linearly so that the first voxel is -1 and the last +1::

    position = 2 * index / max(size - 1, 1) - 1

Voxels outside the volume (padding) get the same formula, so they read below -1 or above +1. A patch
sees the anatomy near it, not where it is; these channels tell the network, so that it can tell apart
look-alike tissue at different places of a large volume, say the left and right kidney of an abdominal CT
(MedPatchNet's position-conditioned convolutions; the network side is :mod:`segmenter.models.positions`).

One formula, two writers: the training patch sampler computes it in TensorFlow from the coordinates it
samples (``segmenter.patches``, so a rotated or scaled patch carries the positions it was resampled from),
and the sliding window computes it here in NumPy for each tile (``segmenter.sliding_window``). Both add
them after the intensity augmentation (they are not noised or scaled) and before mirroring (they flip with
the image, as the test-time mirroring flips them too). A test checks that the two agree.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: One channel per spatial axis of a volume.
NUM_CHANNELS = 3


def scale(size):
    """The factor that maps an index along an axis of ``size`` voxels to its position (before the -1)."""
    return 2.0 / np.maximum(np.asarray(size, dtype=np.float64) - 1.0, 1.0)


def position_channels(starts: Sequence[int], patch_size: Sequence[int], volume_shape: Sequence[int]) -> np.ndarray:
    """float32 (*patch_size, NUM_CHANNELS): the positions of the patch whose first voxel is at ``starts``
    (negative or past the end where the patch leaves the volume) in a volume of ``volume_shape``."""
    axes = [(np.arange(size) + start) * factor - 1.0
            for start, size, factor in zip(starts, patch_size, scale(volume_shape))]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)


def input_channels(num_channels: int, position_conditioning: bool) -> int:
    """The channels of a model's input: the image's, and the positions' when the model is conditioned on them."""
    return num_channels + (NUM_CHANNELS if position_conditioning else 0)
