"""Preprocessing shared by preload and predict: intensity normalisation, resizing, the data split."""
from segmenter.preprocessing.normalization import NORMALIZATIONS, normalize
from segmenter.preprocessing.resize import resize_image, resize_mask, resized_spacing
from segmenter.preprocessing.split import split_train_test

__all__ = ["NORMALIZATIONS", "normalize", "resize_image", "resize_mask", "resized_spacing", "split_train_test"]
