"""Preprocessing shared by preload and predict: intensity normalisation, resizing, the data split."""
from segmenter.preprocessing.normalization import NORMALIZATIONS, normalize
from segmenter.preprocessing.resize import resize_image, resize_mask, resized_spacing
from segmenter.preprocessing.split import split_train_test


def prepare_image(image2d, settings, shape):
    """Resize a 2D slice to ``shape`` and normalise it; returns (resized raw intensities, normalised).

    Preload and predict both use this, so new images are prepared exactly as the training slices were.
    Resizing comes first: one resize serves both outputs, and the normalisation (a CT window, z-score)
    then sees the same pixels the model does.
    """
    raw = resize_image(image2d, shape)
    return raw, normalize(raw, settings)


__all__ = ["NORMALIZATIONS", "normalize", "prepare_image", "resize_image", "resize_mask", "resized_spacing",
           "split_train_test"]
