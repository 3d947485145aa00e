"""Intensity normalisations, one registry entry each, applied per image.

Every function takes a float array and the ``NormalizationConfig`` and returns float32. Per-image
statistics (min-max, z-score) follow nnU-Net's choice for MRI, whose intensities have no absolute
scale; CT keeps its absolute Hounsfield scale through a fixed window.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# Guards against division by zero on constant images (e.g. an all-air slice).
_EPSILON = 1e-8


def _ct_window(image: np.ndarray, settings) -> np.ndarray:
    low, high = settings.window
    return (np.clip(image, low, high) - low) / (high - low)


def _minmax(image: np.ndarray, settings) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return (image - low) / max(high - low, _EPSILON)


def _divide_255(image: np.ndarray, settings) -> np.ndarray:
    return image / 255.0


def _zscore(image: np.ndarray, settings) -> np.ndarray:
    return (image - image.mean()) / max(float(image.std()), _EPSILON)


def _percentile_zscore(image: np.ndarray, settings) -> np.ndarray:
    low, high = np.percentile(image, settings.percentiles)
    return _zscore(np.clip(image, low, high), settings)


def _none(image: np.ndarray, settings) -> np.ndarray:
    return image


NORMALIZATIONS: dict[str, Callable] = {
    "ct_window": _ct_window,
    "minmax": _minmax,
    "divide_255": _divide_255,
    "zscore": _zscore,
    "percentile_zscore": _percentile_zscore,
    "none": _none,
}


def normalize(image: np.ndarray, settings) -> np.ndarray:
    """Normalise one image (any shape) with the method named in ``settings.method``."""
    return NORMALIZATIONS[settings.method](np.asarray(image, dtype=np.float32), settings).astype(np.float32)
