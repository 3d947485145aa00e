"""Preprocessing shared by preload and predict: intensity normalisation, resizing, 3D resampling and planning,
the data split."""
from segmenter.preprocessing.normalization import (NORMALIZATIONS, foreground_intensity_sample,
                                                   foreground_intensity_statistics, normalize, normalize_channels)
from segmenter.preprocessing.planner import Plan3D, plan_3d
from segmenter.preprocessing.resample import (crop, cropped_affine, nonzero_box, resample_image, resample_labels,
                                              resample_probabilities, resampled_affine, resampled_shape, uncrop)
from segmenter.preprocessing.resize import resize_image, resize_mask, resized_spacing
from segmenter.preprocessing.split import split_train_test


def prepare_image(image2d, normalizations, shape):
    """Resize a 2D slice (rows, columns, channels) to ``shape`` and normalise each channel with its setting.

    Returns (resized raw intensities, normalised), both float32 (*shape, channels). Preload and predict both
    use this, so new images are prepared exactly as the training slices were. Resizing comes first: one
    resize serves both outputs, and the normalisation (a CT window, z-score) then sees the same pixels the
    model does. Each channel is normalised on its own (T2 and ADC have unrelated scales).
    """
    import numpy as np

    raw = np.stack([resize_image(image2d[..., channel], shape) for channel in range(image2d.shape[-1])], axis=-1)
    return raw, normalize_channels(raw, normalizations)


__all__ = ["NORMALIZATIONS", "Plan3D", "crop", "cropped_affine", "foreground_intensity_sample",
           "foreground_intensity_statistics", "nonzero_box", "normalize", "normalize_channels", "plan_3d", "prepare_image",
           "resample_image", "resample_labels", "resample_probabilities", "resampled_affine", "resampled_shape",
           "resize_image", "resize_mask", "resized_spacing", "split_train_test", "uncrop"]
