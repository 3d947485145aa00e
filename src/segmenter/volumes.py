"""A volume prepared for a 3D model, and a prediction taken back to the volume's own grid.

One function prepares a volume for preload (the training volumes) and for predict (the test set and new
volumes), so both see exactly the same preparation, in nnU-Net's order (Isensee et al. 2021,
``DefaultPreprocessor``): crop to the non-zero box (optional), normalise each channel, resample to the
plan's target spacing (by default images with cubic splines, label maps linearly on one-hot; thick-slice
volumes in-plane first, then by nearest slice: :func:`segmenter.preprocessing.resample.separate_axis`).
Predict undoes the steps in reverse on the class probabilities (linear resampling back, then the crop is
padded with background) and takes the argmax on the original grid.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from segmenter.config import NormalizationConfig
from segmenter.manifest import VolumePlan
from segmenter.preprocessing import normalization
from segmenter.preprocessing import resample

#: Spacing assumed for a volume whose file carries none (e.g. a NumPy array): 1 mm on every axis.
UNIT_SPACING = (1.0, 1.0, 1.0)

#: Spline order of each ``preload.image_interpolation``.
IMAGE_ORDERS = {"cubic": 3, "linear": 1}


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
    """Where a prepared volume came from: enough to take a prediction back to the original grid."""

    shape: tuple[int, ...]  # the original spatial shape
    box: Optional[tuple[slice, ...]]  # the non-zero box cropped out of it, or None
    cropped_shape: tuple[int, ...]
    resampled_shape: tuple[int, ...]


def spacing_or_unit(spacing: Optional[Sequence[float]]) -> tuple[float, ...]:
    return UNIT_SPACING if spacing is None else tuple(float(value) for value in spacing)


def prepare_volume(image: np.ndarray, spacing: Optional[Sequence[float]], plan: VolumePlan,
                   normalizations: Sequence[NormalizationConfig], labels: Optional[np.ndarray] = None,
                   num_classes: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray], VolumeGeometry]:
    """(normalised image (*resampled, C) float32, label map resampled alike or None, geometry)."""
    shape = tuple(image.shape[:-1])
    box = None
    if plan.crop_to_nonzero:
        box = resample.nonzero_box(image)
        image = resample.crop(image, box)
        if labels is not None:
            labels = resample.crop(labels, box)
    cropped_shape = tuple(image.shape[:-1])
    image = normalization.normalize_channels(image.astype(np.float32, copy=False), normalizations,
                                             plan.intensity_statistics)
    spacing = spacing_or_unit(spacing)
    new_shape = resample.resampled_shape(cropped_shape, spacing, plan.target_spacing)
    separate = resample.separate_axis(spacing, plan.target_spacing, plan.anisotropy_threshold)
    image = resample.resample_image(image, new_shape, order=IMAGE_ORDERS[plan.image_interpolation], separate=separate)
    if labels is not None:
        labels = resample.resample_labels(labels, new_shape, num_classes, method=plan.label_interpolation,
                                          separate=separate)
    return image, labels, VolumeGeometry(shape, box, cropped_shape, tuple(new_shape))


#: Voxels of a foreground class kept per training volume for centring patches on it: all of them up to
#: this many, else this many or a share MIN_LOCATION_SHARE of them, whichever is more (nnU-Net's numbers).
LOCATIONS_PER_CLASS = 10_000
MIN_LOCATION_SHARE = 0.01


def class_locations(labels: np.ndarray, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(locations int32 (M, 3), counts int32 (num_classes - 1,)): where each foreground class of a label map
    occurs, for the patch sampler (:mod:`segmenter.patches`), as nnU-Net stores its ``class_locations``.

    Class 1's voxel indices come first, then class 2's ...; ``counts[k - 1]`` of them are class ``k``'s, in C
    order. A class of more than ``LOCATIONS_PER_CLASS`` voxels keeps a uniform random subset (drawn with
    ``seed``), so the sampler picks from a fixed-size list instead of searching the whole volume per patch.
    """
    rng = np.random.default_rng(seed)
    parts, counts = [], []
    for label in range(1, num_classes):
        voxels = np.argwhere(labels == label).astype(np.int32)
        keep = max(min(len(voxels), LOCATIONS_PER_CLASS), int(np.ceil(len(voxels) * MIN_LOCATION_SHARE)))
        if keep < len(voxels):
            voxels = voxels[np.sort(rng.choice(len(voxels), keep, replace=False))]
        parts.append(voxels)
        counts.append(len(voxels))
    locations = np.concatenate(parts) if parts else np.zeros((0, labels.ndim), np.int32)
    return locations, np.array(counts, dtype=np.int32)


def _class_on_original_grid(probabilities: np.ndarray, k: int, geometry: VolumeGeometry) -> np.ndarray:
    """Class ``k``'s probabilities (float32) on the original grid; outside the crop, background is certain."""
    p = np.asarray(probabilities[..., k], dtype=np.float32)
    if p.shape != geometry.cropped_shape:
        p = resample.resample_probabilities(p[..., None], geometry.cropped_shape)[..., 0]
    if geometry.box is not None:
        p = resample.uncrop(p, geometry.box, geometry.shape, fill=1.0 if k == 0 else 0.0)
    return p


def probabilities_to_labels(probabilities: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """The uint8 label map on the original grid of class probabilities (*resampled, K) of a prepared volume.

    Class by class, keeping the running best: memory holds two volumes of the original grid (the best
    probability so far and its class), never all K classes in float32.
    """
    best, labels = None, None
    for k in range(probabilities.shape[-1]):
        p = _class_on_original_grid(probabilities, k, geometry)
        if best is None:
            best, labels = p, np.zeros(p.shape, np.uint8)
            continue
        better = p > best
        labels[better] = k
        np.maximum(best, p, out=best)
    return labels


def probabilities_on_original_grid(probabilities: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """All K class probabilities on the original grid, float32 (*shape, K): K volumes in memory."""
    return np.stack([_class_on_original_grid(probabilities, k, geometry) for k in range(probabilities.shape[-1])],
                    axis=-1)
