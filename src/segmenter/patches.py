"""3D training patches drawn from whole volumes, with nnU-Net's augmentations, as TensorFlow ops for tf.data.

:func:`make_patch_sampler` returns ``sample(image, labels, seed, foreground)``: it picks where the patch
lies in the volume, cuts it out (padding where the volume is smaller than the patch) while applying the
spatial augmentations in the same resampling, then the intensity augmentations and mirroring. It is made of
plain TensorFlow graph ops only, so it runs inside ``tf.data.Dataset.map(..., num_parallel_calls=AUTOTUNE)``.
This is written by hand because Keras 3's augmentation layers work on 2D images only, and MONAI and
batchgenerators (nnU-Net's own augmentation) are PyTorch / NumPy code that cannot run inside a tf.data graph.

How it follows nnU-Net (``nnunetv2`` data loader and ``get_training_transforms``):

* Foreground oversampling: a share ``foreground_fraction`` of the patches is centred on a foreground voxel
  (see :func:`foreground_flags`, which hands that share out exactly, round robin). Such a patch draws one
  class uniformly among the foreground classes the volume holds, then a voxel of that class uniformly, so a
  small structure is seen as often as a large one. The voxels come from the volume's class locations when
  given (:func:`segmenter.volumes.class_locations`, stored by preload as nnU-Net stores its
  ``class_locations``: no pass over the whole volume per patch), else from a search of the label map. The
  other patches (and forced ones of a volume without foreground) lie uniformly at random inside the volume.
  On an axis where the volume is smaller than the patch, the volume sits in the middle of the patch, padded
  on both sides (an odd voxel of padding goes before it, as with nnU-Net's ``-need_to_pad // 2``). Like
  nnU-Net the patch is kept inside the volume where the volume is large enough (the chosen voxel is then
  inside it, though not always central).
* Spatial augmentation and cropping are one resampling of the volume on the patch's voxel grid: rotation
  (each axis uniform in +-rotation_degrees, one event of probability rotation_probability), scaling (one
  factor from scale_range multiplies the sampled extent: above 1 zooms out; probability scale_probability)
  and an elastic displacement field (normal noise smoothed by a Gaussian of elastic_sigma voxels and scaled
  so that its largest component is elastic_magnitude voxels; probability elastic_probability), all about the
  patch centre. The image is interpolated trilinearly, the labels by nearest neighbour (so they keep exactly
  the volume's label values). Outside the volume the image is 0 (the mean of z-score normalised
  intensities, the usual background after normalisation) and the labels are 0 (background). With no spatial
  transform drawn the patch is the plain crop (a slice of the padded volume), bit for bit.
* Intensity augmentation of the image only, in nnU-Net's order, each with its own probability: Gaussian
  noise (standard deviation uniform in [0, noise_std]), Gaussian blur (sigma uniform in blur_sigma,
  separable, per channel), brightness (multiplicative), contrast (about each channel's mean, clipped to its
  previous range) and gamma (each channel rescaled to [0, 1] by its range, raised to gamma, scaled back).
* Mirroring last: each axis of ``mirror_axes`` reversed with probability 0.5, image and labels alike.
* With ``positions`` the patch gets three more channels after the intensity augmentation, before mirroring:
  where in the volume each of its voxels was taken from (:mod:`segmenter.positions`), for
  position-conditioned models. A resampled patch carries the (rotated, scaled, deformed) coordinates it
  was interpolated at.

Not taken from nnU-Net: its low-resolution simulation, the inverted-image gamma and its ``retain_stats``
(gamma keeps mean and standard deviation), the per-channel independent draws, and its 2D-only rotation for
strongly anisotropic spacings; every draw here is shared by the channels of a patch.

Reproducibility: every random draw is a ``tf.random.stateless_*`` op on a sub-seed split from ``seed``
(int64, shape [2]) with ``tf.random.experimental.stateless_split``; each decision has a fixed sub-seed
whatever the configuration, so the same (volume, seed, foreground) gives the same patch bit for bit, on
any thread, and switching one augmentation off leaves the draws of the others unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from segmenter.config import VolumeAugmentationConfig
from segmenter.positions import NUM_CHANNELS as NUM_POSITION_CHANNELS

# Fixed roles of the sub-seeds split from the per-patch seed (never reorder: it would change every patch).
_SEED_NAMES = (
    "class", "voxel", "start",
    "rotation_on", "rotation", "scale_on", "scale", "elastic_on", "elastic",
    "noise_on", "noise_std", "noise", "blur_on", "blur", "brightness_on", "brightness",
    "contrast_on", "contrast", "gamma_on", "gamma", "mirror",
)

PatchSampler = Callable[..., tuple[tf.Tensor, tf.Tensor]]


def foreground_flags(count: int, fraction: float) -> np.ndarray:
    """Which of ``count`` patches are centred on foreground: a bool array holding exactly the share ``fraction``.

    Patch ``i`` is foreground when ``floor((i + 1) * fraction) > floor(i * fraction)``, so the flags are
    spread evenly (round robin) and any prefix of ``n`` patches holds ``floor(n * fraction)`` of them.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"foreground fraction {fraction} is not within [0, 1]")
    index = np.arange(count, dtype=np.float64)
    # The tiny epsilon keeps products that are whole numbers in exact arithmetic (0.29 * 100) whole.
    return np.floor((index + 1) * fraction + 1e-9) > np.floor(index * fraction + 1e-9)


def _happens(seed: tf.Tensor, probability: float) -> tf.Tensor:
    """A bool scalar, True with ``probability``, drawn from ``seed``."""
    if probability >= 1.0:
        return tf.constant(True)
    return tf.random.stateless_uniform((), seed, dtype=tf.float32) < probability


def _uniform(seed: tf.Tensor, low: float, high: float, shape=()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def _gaussian_kernel(sigma, radius: int) -> tf.Tensor:
    """A normalised 1D Gaussian of ``2 * radius + 1`` taps (``sigma`` may be a tensor)."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(x / tf.cast(sigma, tf.float32)))
    return weights / tf.reduce_sum(weights)


def _smooth(volumes: tf.Tensor, kernels: list[tf.Tensor], radii: list[int]) -> tf.Tensor:
    """Separable filtering of ``volumes`` (N, D, H, W, 1) with one 1D kernel per axis, reflecting at the edges."""
    for axis, (kernel, radius) in enumerate(zip(kernels, radii)):
        if radius == 0:
            continue
        paddings = [[0, 0]] * 5
        paddings[axis + 1] = [radius, radius]
        padded = tf.pad(volumes, paddings, mode="REFLECT")
        shape = [1, 1, 1, 1, 1]
        shape[axis] = 2 * radius + 1
        volumes = tf.nn.conv3d(padded, tf.reshape(kernel, shape), strides=[1] * 5, padding="VALID")
    return volumes


def _radii(sigma: float, patch_size: tuple[int, int, int]) -> list[int]:
    """Kernel radii of 3 sigma, capped so that reflect padding fits each patch axis."""
    return [max(0, min(int(math.ceil(3.0 * sigma)), size - 1)) for size in patch_size]


def _rotation_matrix(angles: tf.Tensor) -> tf.Tensor:
    """The 3x3 rotation about array axes 0, 1 and 2 by ``angles`` (radians), applied in that order."""
    cos, sin = tf.unstack(tf.cos(angles)), tf.unstack(tf.sin(angles))
    one, zero = tf.constant(1.0), tf.constant(0.0)
    about0 = tf.stack([[one, zero, zero], [zero, cos[0], -sin[0]], [zero, sin[0], cos[0]]])
    about1 = tf.stack([[cos[1], zero, sin[1]], [zero, one, zero], [-sin[1], zero, cos[1]]])
    about2 = tf.stack([[cos[2], -sin[2], zero], [sin[2], cos[2], zero], [zero, zero, one]])
    return about2 @ about1 @ about0


def _trilinear(image: tf.Tensor, coords: tf.Tensor) -> tf.Tensor:
    """``image`` (D, H, W, C) at the (N, 3) voxel coordinates ``coords``, trilinear; 0 outside: (N, C)."""
    shape = tf.shape(image)[:3]
    # One voxel of zeros before and two after each axis, and coordinates clipped into [-1, size]: every
    # corner then lies in the padded volume and one outside the image reads a zero, with no per-corner
    # bounds checks (half the time of checking each corner, for the same values).
    padded = tf.pad(image, [[1, 2], [1, 2], [1, 2], [0, 0]])
    coords = tf.clip_by_value(coords, -1.0, tf.cast(shape, tf.float32))
    base = tf.floor(coords)
    frac = coords - base
    base = tf.cast(base, tf.int32) + 1  # in the padded volume
    weights = (1.0 - frac, frac)  # of the lower and the upper corner, per axis
    result = None
    for corner in range(8):
        offset = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
        weight = weights[offset[0]][:, 0] * weights[offset[1]][:, 1] * weights[offset[2]][:, 2]
        values = tf.gather_nd(padded, base + tf.constant(offset, tf.int32)) * weight[:, tf.newaxis]
        result = values if result is None else result + values
    return result


def _nearest(labels: tf.Tensor, coords: tf.Tensor) -> tf.Tensor:
    """``labels`` (D, H, W) at the (N, 3) voxel coordinates ``coords``, nearest voxel; 0 outside: (N,)."""
    shape = tf.shape(labels)
    index = tf.cast(tf.floor(coords + 0.5), tf.int32)
    inside = tf.reduce_all((index >= 0) & (index < shape), axis=-1)
    values = tf.gather_nd(labels, tf.clip_by_value(index, 0, shape - 1))
    return tf.where(inside, values, tf.zeros_like(values))


def _patch_start(labels: tf.Tensor, patch: tf.Tensor, seeds: dict, foreground: tf.Tensor,
                 locations: Optional[tf.Tensor] = None, counts: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The volume index (int32 [3]) of the patch's first voxel; negative or past the end means padding."""
    shape = tf.shape(labels)
    # Where the volume is at least as large as the patch, the patch stays inside it: start in [0, size -
    # patch]; where smaller, the volume sits in the middle of the patch (start fixed, negative).
    centred = tf.math.floordiv(shape - patch, 2)
    low = tf.where(shape >= patch, 0, centred)
    high = tf.where(shape >= patch, shape - patch, centred)

    if counts is None:
        counts = tf.math.bincount(tf.reshape(labels, [-1]), minlength=2)[1:]
    classes = tf.cast(tf.where(counts > 0)[:, 0] + 1, tf.int32)  # foreground classes present
    use_foreground = tf.logical_and(foreground, tf.size(classes) > 0)

    def on_foreground():
        number = tf.cast(tf.maximum(tf.size(classes), 1), tf.int64)
        chosen = tf.gather(classes, tf.random.stateless_uniform((), seeds["class"], 0, number, dtype=tf.int64))
        if locations is None:
            voxels = tf.cast(tf.where(tf.equal(labels, chosen)), tf.int32)  # (M, 3), in C order
        else:  # the chosen class's stored voxels, also in C order: the same draw picks the same voxel
            ends = tf.cumsum(tf.cast(counts, tf.int32))
            voxels = locations[ends[chosen - 1] - counts[chosen - 1]:ends[chosen - 1]]
        count = tf.maximum(tf.shape(voxels, out_type=tf.int64)[0], 1)
        voxel = voxels[tf.random.stateless_uniform((), seeds["voxel"], 0, count, dtype=tf.int64)]
        return tf.clip_by_value(voxel - patch // 2, low, high)

    def anywhere():
        fraction = tf.random.stateless_uniform([3], seeds["start"], dtype=tf.float64)
        span = tf.cast(high - low + 1, tf.float64)
        return tf.minimum(low + tf.cast(tf.floor(fraction * span), tf.int32), high)

    return tf.cond(use_foreground, on_foreground, anywhere)


def _crop(volume: tf.Tensor, start: tf.Tensor, patch: tf.Tensor) -> tf.Tensor:
    """The plain crop of ``volume`` (D, H, W[, C]) at ``start``, zero-padded where it leaves the volume."""
    shape = tf.shape(volume)[:3]
    begin = tf.clip_by_value(start, 0, shape)
    end = tf.clip_by_value(start + patch, 0, shape)
    rank = len(volume.shape)
    rest = rank - 3
    piece = tf.slice(volume, tf.concat([begin, tf.zeros([rest], tf.int32)], 0),
                     tf.concat([end - begin, -tf.ones([rest], tf.int32)], 0))
    before, after = begin - start, start + patch - end
    paddings = tf.concat([tf.stack([before, after], axis=1), tf.zeros([rest, 2], tf.int32)], 0)
    return tf.pad(piece, paddings)


def _positions(coords: tf.Tensor, volume_shape: tf.Tensor) -> tf.Tensor:
    """The position channels (:mod:`segmenter.positions`'s formula) of voxel coordinates ``coords`` (..., 3)
    in a volume of ``volume_shape`` (int32 [3])."""
    scale = 2.0 / tf.maximum(tf.cast(volume_shape, tf.float32) - 1.0, 1.0)
    return coords * scale - 1.0


def _grid(start: tf.Tensor, patch_size: tuple[int, int, int]) -> tf.Tensor:
    """float32 (*patch_size, 3): the volume coordinates of the voxels of the plain crop at ``start``."""
    axes = [tf.range(size, dtype=tf.float32) + tf.cast(start[axis], tf.float32) for axis, size in enumerate(patch_size)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def make_patch_sampler(patch_size: tuple[int, int, int], augmentation: Optional[VolumeAugmentationConfig],
                       positions: bool = False) -> PatchSampler:
    """Return ``sample(image, labels, seed, foreground, locations=None, counts=None) -> (image_patch, label_patch)``.

    ``image``: float32 (D, H, W, C) of any size (it may be smaller than the patch on any axis); ``labels``:
    int32 (D, H, W) label map, 0 the background, no negative values; ``seed``: int64 [2], the patch's
    stateless seed; ``foreground``: bool scalar, whether to centre the patch on a foreground voxel (see
    :func:`foreground_flags`); ``locations`` int32 (M, 3) and ``counts`` int32 (K - 1,): the volume's class
    locations (:func:`segmenter.volumes.class_locations`), or None to search the label map for the chosen
    class. The result is float32 (*patch_size, C) and int32 (*patch_size), with static
    shapes (C static when the image's channel dimension is) so that batching never retraces.
    ``augmentation`` None: no augmentation, only placing, cropping and padding the patch. ``positions``: the
    image patch has ``positions.NUM_CHANNELS`` more channels, the voxels' places in the volume (C + 3 in all).
    """
    patch_size = tuple(int(size) for size in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch size {patch_size}: give three positive sizes")
    aug = augmentation
    rotation = aug is not None and aug.rotation_probability > 0 and aug.rotation_degrees > 0
    scaling = aug is not None and aug.scale_probability > 0
    elastic = aug is not None and aug.elastic_probability > 0 and aug.elastic_magnitude > 0
    if elastic:
        elastic_radii = _radii(aug.elastic_sigma, patch_size)
    if aug is not None and aug.blur_probability > 0:
        blur_radii = _radii(max(aug.blur_sigma), patch_size)

    def resample(image, labels, start, seeds, rotate, scale, deform):
        """The patch's voxel grid, transformed about its centre, mapped into the volume and interpolated."""
        patch = tf.constant(patch_size, tf.int32)
        axes = [tf.range(size, dtype=tf.float32) - (size - 1) / 2.0 for size in patch_size]
        grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)  # (*patch, 3), about the patch centre
        coords = tf.reshape(grid, [-1, 3])
        matrix = tf.eye(3)
        if rotation:
            limit = aug.rotation_degrees * math.pi / 180.0
            angles = _uniform(seeds["rotation"], -limit, limit, [3])
            matrix = tf.where(rotate, _rotation_matrix(angles), matrix)
        if scaling:
            factor = _uniform(seeds["scale"], *aug.scale_range)
            matrix = matrix * tf.where(scale, factor, 1.0)
        coords = tf.linalg.matmul(coords, matrix, transpose_b=True)
        if elastic:
            def displacement():
                noise = tf.random.stateless_normal([3, *patch_size, 1], seeds["elastic"])
                kernels = [_gaussian_kernel(aug.elastic_sigma, radius) for radius in elastic_radii]
                field = _smooth(noise, kernels, elastic_radii)
                field = field * (aug.elastic_magnitude / (tf.reduce_max(tf.abs(field)) + 1e-12))
                return tf.reshape(tf.transpose(field[..., 0], [1, 2, 3, 0]), [-1, 3])

            coords = coords + tf.cond(deform, displacement, lambda: tf.zeros_like(coords))
        centre = tf.cast(start, tf.float32) + (tf.cast(patch, tf.float32) - 1.0) / 2.0
        coords = coords + centre
        image_patch = tf.reshape(_trilinear(image, coords), [*patch_size, tf.shape(image)[-1]])
        label_patch = tf.reshape(_nearest(labels, coords), patch_size)
        return image_patch, label_patch, tf.reshape(coords, [*patch_size, 3])

    def intensity(image, seeds):
        if aug.noise_probability > 0 and aug.noise_std > 0:
            def noisy():
                std = _uniform(seeds["noise_std"], 0.0, aug.noise_std)
                return image + std * tf.random.stateless_normal(tf.shape(image), seeds["noise"])

            image = tf.cond(_happens(seeds["noise_on"], aug.noise_probability), noisy, lambda: image)
        if aug.blur_probability > 0:
            def blurred():
                sigma = _uniform(seeds["blur"], *aug.blur_sigma)
                kernels = [_gaussian_kernel(sigma, radius) for radius in blur_radii]
                channels = tf.transpose(image, [3, 0, 1, 2])[..., tf.newaxis]  # channels as the batch
                return tf.transpose(_smooth(channels, kernels, blur_radii)[..., 0], [1, 2, 3, 0])

            image = tf.cond(_happens(seeds["blur_on"], aug.blur_probability), blurred, lambda: image)
        if aug.brightness_probability > 0:
            factor = _uniform(seeds["brightness"], *aug.brightness_range)
            image = tf.where(_happens(seeds["brightness_on"], aug.brightness_probability), image * factor, image)
        if aug.contrast_probability > 0:
            def contrasted():
                factor = _uniform(seeds["contrast"], *aug.contrast_range)
                mean = tf.reduce_mean(image, axis=[0, 1, 2], keepdims=True)
                low = tf.reduce_min(image, axis=[0, 1, 2], keepdims=True)
                high = tf.reduce_max(image, axis=[0, 1, 2], keepdims=True)
                return tf.clip_by_value((image - mean) * factor + mean, low, high)

            image = tf.cond(_happens(seeds["contrast_on"], aug.contrast_probability), contrasted, lambda: image)
        if aug.gamma_probability > 0:
            def gamma_corrected():
                gamma = _uniform(seeds["gamma"], *aug.gamma_range)
                low = tf.reduce_min(image, axis=[0, 1, 2], keepdims=True)
                spread = tf.reduce_max(image, axis=[0, 1, 2], keepdims=True) - low + 1e-7
                unit = tf.clip_by_value((image - low) / spread, 0.0, 1.0)
                return tf.pow(unit, gamma) * spread + low

            image = tf.cond(_happens(seeds["gamma_on"], aug.gamma_probability), gamma_corrected, lambda: image)
        return image

    def sample(image, labels, seed, foreground, locations=None, counts=None):
        image = tf.convert_to_tensor(image, tf.float32)
        labels = tf.convert_to_tensor(labels, tf.int32)
        seed = tf.cast(seed, tf.int64)
        foreground = tf.convert_to_tensor(foreground, tf.bool)
        if counts is not None:
            locations = tf.convert_to_tensor(locations, tf.int32)
            counts = tf.convert_to_tensor(counts, tf.int32)
        seeds = dict(zip(_SEED_NAMES, tf.unstack(tf.random.experimental.stateless_split(seed, len(_SEED_NAMES)))))
        patch = tf.constant(patch_size, tf.int32)
        start = _patch_start(labels, patch, seeds, foreground, locations, counts)

        def plain():
            # The grid is made only where the positions are used (a constant stands in for it otherwise).
            grid = _grid(start, patch_size) if positions else tf.zeros([*patch_size, 3])
            return _crop(image, start, patch), _crop(labels, start, patch), grid

        if rotation or scaling or elastic:
            false = tf.constant(False)
            rotate = _happens(seeds["rotation_on"], aug.rotation_probability) if rotation else false
            scale = _happens(seeds["scale_on"], aug.scale_probability) if scaling else false
            deform = _happens(seeds["elastic_on"], aug.elastic_probability) if elastic else false
            image_patch, label_patch, coords = tf.cond(
                rotate | scale | deform,
                lambda: resample(image, labels, start, seeds, rotate, scale, deform), plain)
        else:
            image_patch, label_patch, coords = plain()
        if aug is not None:
            image_patch = intensity(image_patch, seeds)
        if positions:
            image_patch = tf.concat([image_patch, _positions(coords, tf.shape(labels))], axis=-1)
        if aug is not None and aug.mirror_axes:
            flips = tf.random.stateless_uniform([3], seeds["mirror"]) < 0.5
            for axis in aug.mirror_axes:
                image_patch, label_patch = tf.cond(
                    flips[axis],
                    lambda: (tf.reverse(image_patch, [axis]), tf.reverse(label_patch, [axis])),
                    lambda: (image_patch, label_patch))
        channels = None if image.shape[-1] is None else image.shape[-1] + (NUM_POSITION_CHANNELS if positions else 0)
        image_patch = tf.ensure_shape(image_patch, (*patch_size, channels))
        label_patch = tf.ensure_shape(label_patch, patch_size)
        return image_patch, label_patch

    return sample
