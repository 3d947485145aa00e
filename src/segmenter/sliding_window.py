"""Sliding-window prediction over whole volumes (or images), framework-light.

Pure NumPy around a ``predict_batch`` callable, so it works with a Keras model
(``model.predict_on_batch`` or a wrapped ``model(x, training=False)``), a TensorFlow SavedModel
signature, an ONNX session or a plain NumPy function. Nothing here imports TensorFlow.

The tiling follows nnU-Net (Isensee et al., nnU-Net v2 ``sliding_window_prediction.py``):

* The volume is padded with zeros where it is smaller than the patch; the padding is cropped off again.
* Tile starts per axis: ``compute_steps(image_size, patch_size, overlap)`` - the target step is
  ``patch * (1 - overlap)``, the number of steps ``ceil((image - patch) / target_step) + 1`` and the
  actual steps are spread evenly (rounded) so that the first tile starts at 0 and the last tile ends
  exactly at the border.
* Every patch prediction is weighted by a Gaussian importance map (``sigma = sigma_scale * patch size``
  per axis, normalised to a maximum of 1, zeros replaced by the smallest positive value), so that
  voxels near a patch's centre count more than voxels near its border.
* Optional mirroring test-time augmentation: every combination of flips over ``mirror_axes`` is
  predicted, flipped back and averaged before the Gaussian weighting.
* ``position_channels`` (position-conditioned models): each tile gets one more channel per spatial axis,
  where its voxels lie in the unpadded volume (:mod:`segmenter.positions`), computed per tile, never for
  the whole volume.

Memory. For a (padded) volume of ``V = D*H*W`` voxels, ``C`` input channels and ``K`` classes the
persistent buffers are::

    accumulator   V * K * b      b = 2 bytes (accumulate="float16", default) or 4 ("float32")
    weight map    V * 4          float32 sum of the Gaussian weights per voxel
    input         V * C * 4      only when the volume is padded or is not float32 already (a float32 copy)
    labels        V * 1          uint8 output (argmax computed slab by slab, no int64 (D,H,W) temporary)

plus per batch ``batch_size * P * (C + 2K) * 4`` bytes for the patches and predictions (``P`` voxels per
patch) and a few float32 patch-sized temporaries. :func:`memory_bytes` returns the total. For a
512x512x300 CT with K = 4 the accumulator takes 630 MB in float16 (1.26 GB in float32), the weight map
315 MB.

The accumulator holds the running *weighted mean* (not the weighted sum): for each patch
``W += w`` and ``acc += (p - acc) * w / W``. The mean always lies in [0, 1], so float16 neither
overflows nor underflows, even where the Gaussian weights are tiny (patch corners: ``exp(-24)`` for
sigma = 1/8 in 3D, far below float16's smallest number), and a voxel covered by a single patch gets
that patch's prediction exactly (up to the accumulator's rounding: 2**-11 relative in float16).

The Gaussian is evaluated analytically around the patch's geometric centre ``(n - 1) / 2`` (nnU-Net
filters a delta at voxel ``n // 2``, which is off-centre by half a voxel for even sizes, and truncates
at 4 sigma), so the map is exactly symmetric under flips of the patch.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from segmenter.positions import position_channels as tile_positions

__all__ = [
    "compute_steps",
    "gaussian_importance_map",
    "iter_patch_slices",
    "memory_bytes",
    "sliding_window_predict",
]

PredictBatch = Callable[[np.ndarray], np.ndarray]

_ACCUMULATORS = {"float16": np.float16, "float32": np.float32}


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5) -> list[list[int]]:
    """Start index of every tile per axis (nnU-Net's ``compute_steps_for_sliding_window``).

    ``image_size`` must be at least ``patch_size`` on every axis (pad first). The first tile starts at 0,
    the last one ends at ``image_size``; neighbouring tiles overlap by at least ``overlap`` of the patch.
    """
    if len(image_size) != len(patch_size):
        raise ValueError(f"image_size {tuple(image_size)} and patch_size {tuple(patch_size)} differ in length")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    step_fraction = 1.0 - overlap
    steps = []
    for image, patch in zip(image_size, patch_size):
        image, patch = int(image), int(patch)
        if patch < 1:
            raise ValueError(f"patch_size must be positive, got {tuple(patch_size)}")
        if image < patch:
            raise ValueError(f"image_size {tuple(image_size)} is smaller than patch_size {tuple(patch_size)}; "
                             "pad first")
        target_step = patch * step_fraction
        num_steps = int(math.ceil((image - patch) / target_step)) + 1
        max_start = image - patch
        if num_steps > 1:
            actual_step = max_start / (num_steps - 1)
            steps.append([int(np.round(actual_step * i)) for i in range(num_steps)])
        else:
            steps.append([0])
    return steps


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                            dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Gaussian weights of shape ``patch_size``: maximum 1 at the centre, no zeros.

    ``sigma = sigma_scale * patch size`` per axis, centred at ``(n - 1) / 2`` (exactly symmetric).
    Values that are zero in ``dtype`` (underflow far from the centre) are replaced by the smallest
    positive value, as nnU-Net does, so that every voxel of a patch keeps a positive weight.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    gaussian = np.ones((), dtype=np.float64)
    for n in patch_size:
        n = int(n)
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = sigma_scale * n
        profile = np.exp(-0.5 * (x / sigma) ** 2)
        gaussian = np.multiply.outer(gaussian, profile)
    gaussian = (gaussian / gaussian.max()).astype(dtype)
    zero = gaussian == 0
    if zero.any():
        gaussian[zero] = gaussian[~zero].min()
    return gaussian


def iter_patch_slices(image_size: Sequence[int], patch_size: Sequence[int],
                      overlap: float = 0.5) -> Iterator[tuple[slice, ...]]:
    """Spatial slices of every tile, in C order of the tile grid."""
    steps = compute_steps(image_size, patch_size, overlap)
    for starts in itertools.product(*steps):
        yield tuple(slice(s, s + int(p)) for s, p in zip(starts, patch_size))


def memory_bytes(volume_shape: Sequence[int], patch_size: Sequence[int], *, num_classes: int,
                 batch_size: int = 2, accumulate: str = "float16", input_copy: bool = True) -> int:
    """Peak bytes of the buffers :func:`sliding_window_predict` allocates (see the module docstring).

    ``volume_shape`` is ``(*spatial, C)``; the spatial size is taken after padding to the patch size.
    Excludes the model's own memory and the returned probabilities' float32 copy (none is made).
    """
    spatial = [max(int(s), int(p)) for s, p in zip(volume_shape[:-1], patch_size)]
    channels = int(volume_shape[-1])
    voxels = int(np.prod(spatial))
    patch_voxels = int(np.prod([int(p) for p in patch_size]))
    acc_bytes = np.dtype(_ACCUMULATORS[accumulate]).itemsize
    total = voxels * (num_classes * acc_bytes + 4 + 1)
    if input_copy:
        total += voxels * channels * 4
    total += batch_size * patch_voxels * (channels + 2 * num_classes) * 4 + 4 * patch_voxels * 4
    return total


def _mirror_combinations(mirror_axes: Sequence[int], spatial_ndim: int) -> list[tuple[int, ...]]:
    axes = []
    for axis in mirror_axes:
        axis = int(axis)
        if not -spatial_ndim <= axis < spatial_ndim:
            raise ValueError(f"mirror axis {axis} out of range for {spatial_ndim} spatial axes")
        axis %= spatial_ndim
        if axis not in axes:
            axes.append(axis)
    combos: list[tuple[int, ...]] = []
    for r in range(len(axes) + 1):
        combos.extend(itertools.combinations(axes, r))
    return combos


def _predict_with_mirroring(predict_batch: PredictBatch, batch: np.ndarray,
                            combos: list[tuple[int, ...]], num_classes: int) -> np.ndarray:
    """Average of the predictions over all flip combinations (spatial axes; batch axis is 0)."""
    total = None
    for combo in combos:
        batch_axes = tuple(a + 1 for a in combo)
        inputs = np.ascontiguousarray(np.flip(batch, batch_axes)) if combo else batch
        pred = np.asarray(predict_batch(inputs), dtype=np.float32)
        expected = batch.shape[:-1] + (num_classes,)
        if pred.shape != expected:
            raise ValueError(f"predict_batch returned shape {pred.shape}, expected {expected}")
        if combo:
            pred = np.flip(pred, batch_axes)
        if total is None:
            total = pred.copy() if len(combos) > 1 else pred
        else:
            total += pred
    assert total is not None
    if len(combos) > 1:
        total /= len(combos)
    return total


def sliding_window_predict(predict_batch: PredictBatch, volume: np.ndarray, patch_size: Sequence[int], *,
                           num_classes: int, overlap: float = 0.5, sigma_scale: float = 1.0 / 8,
                           batch_size: int = 2, mirror_axes: Sequence[int] = (),
                           accumulate: str = "float16", return_probabilities: bool = False,
                           position_channels: bool = False, progress: Callable[[int, int], None] | None = None):
    """Predict a whole volume patch by patch and blend the patches with Gaussian weights.

    Args:
        predict_batch: callable taking float32 ``(N, *patch_size, C)`` and returning softmax
            probabilities ``(N, *patch_size, K)`` (NumPy or anything ``np.asarray`` converts).
        volume: ``(*spatial, C)`` channels-last array (e.g. ``(D, H, W, C)``); ``(*spatial,)`` is taken
            as one channel.
        patch_size: spatial patch size, one entry per spatial axis.
        num_classes: K, the number of output channels (at most 256 for the uint8 label map).
        overlap: fraction of the patch shared by neighbouring tiles, in [0, 1).
        sigma_scale: Gaussian sigma as a fraction of the patch size per axis.
        batch_size: patches per ``predict_batch`` call (the last call may hold fewer).
        mirror_axes: spatial axes (0 = D, 1 = H, 2 = W) for mirroring test-time augmentation; all
            ``2 ** len(mirror_axes)`` flip combinations are predicted and averaged.
        accumulate: "float16" (default) or "float32", the dtype of the (``*spatial``, K) accumulator.
        return_probabilities: also return the blended probabilities, shape ``(*spatial, K)``, in the
            accumulator's dtype (not copied to float32, to keep memory bounded).
        position_channels: give ``predict_batch`` one more channel per spatial axis after the volume's C,
            the tile's voxel positions in the volume (:mod:`segmenter.positions`).
        progress: optional ``progress(done_patches, total_patches)`` callback after each batch.

    Returns:
        The uint8 label map ``(*spatial)`` (argmax over classes), or ``(labels, probabilities)``.
    """
    if accumulate not in _ACCUMULATORS:
        raise ValueError(f"accumulate must be one of {sorted(_ACCUMULATORS)}, got {accumulate!r}")
    if not 1 <= int(num_classes) <= 256:
        raise ValueError(f"num_classes must be in 1..256 for a uint8 label map, got {num_classes}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num_classes, batch_size = int(num_classes), int(batch_size)
    patch_size = tuple(int(p) for p in patch_size)
    spatial_ndim = len(patch_size)
    volume = np.asarray(volume)
    if volume.ndim == spatial_ndim:
        volume = volume[..., None]
    if volume.ndim != spatial_ndim + 1:
        raise ValueError(f"volume of shape {volume.shape} does not match a {spatial_ndim}-D patch_size "
                         f"{patch_size} with a trailing channel axis")
    original_shape = volume.shape[:-1]
    combos = _mirror_combinations(mirror_axes, spatial_ndim)

    # Pad (constant 0) where the volume is smaller than the patch; split the padding evenly on both sides.
    pad = []
    for size, patch in zip(original_shape, patch_size):
        missing = max(patch - size, 0)
        pad.append((missing // 2, missing - missing // 2))
    padded = any(before or after for before, after in pad)
    if padded:
        volume = np.pad(volume.astype(np.float32, copy=False), pad + [(0, 0)], mode="constant", constant_values=0)
    else:
        volume = volume.astype(np.float32, copy=False)
    shape = volume.shape[:-1]

    gaussian = gaussian_importance_map(patch_size, sigma_scale, np.float32)
    acc_dtype = _ACCUMULATORS[accumulate]
    accumulator = np.zeros(shape + (num_classes,), dtype=acc_dtype)
    weights = np.zeros(shape, dtype=np.float32)

    slices = list(iter_patch_slices(shape, patch_size, overlap))
    total = len(slices)
    ratio = np.empty(patch_size, dtype=np.float32)
    delta = np.empty(patch_size + (num_classes,), dtype=np.float32)
    channels = volume.shape[-1]
    extra = spatial_ndim if position_channels else 0
    batch_buffer = np.empty((min(batch_size, total),) + patch_size + (channels + extra,), dtype=np.float32)
    for start in range(0, total, batch_size):
        batch_slices = slices[start:start + batch_size]
        n = len(batch_slices)
        for i, sl in enumerate(batch_slices):
            batch_buffer[i, ..., :channels] = volume[sl]
            if position_channels:  # the tile's start in the unpadded volume: before it where padding was added
                starts = [s.start - before for s, (before, _) in zip(sl, pad)]
                batch_buffer[i, ..., channels:] = tile_positions(starts, patch_size, original_shape)
        batch = batch_buffer[:n]
        predictions = _predict_with_mirroring(predict_batch, batch, combos, num_classes)
        for i, sl in enumerate(batch_slices):
            w_view = weights[sl]
            np.add(w_view, gaussian, out=w_view)
            np.divide(gaussian, w_view, out=ratio)  # w / W_new: 1 where this patch is the first to cover a voxel
            acc_view = accumulator[sl]
            # acc += (p - acc) * ratio, computed in float32, stored in the accumulator's dtype.
            np.subtract(predictions[i], acc_view, out=delta)
            np.multiply(delta, ratio[..., None], out=delta)
            np.add(acc_view, delta, out=acc_view, casting="same_kind")
        if progress is not None:
            progress(min(start + n, total), total)

    if padded:
        crop = tuple(slice(before, before + size) for (before, _), size in zip(pad, original_shape))
        accumulator = np.ascontiguousarray(accumulator[crop])
    del weights

    labels = np.empty(original_shape, dtype=np.uint8)
    # Argmax slab by slab along the first axis: np.argmax's int64 output would take 8 bytes per voxel.
    slab = max(1, int(2 ** 22 // max(1, int(np.prod(original_shape[1:])) * num_classes)))
    for s in range(0, original_shape[0], slab):
        labels[s:s + slab] = np.argmax(accumulator[s:s + slab], axis=-1)
    if return_probabilities:
        return labels, accumulator
    return labels
