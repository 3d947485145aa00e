"""Intensity normalisations, one registry entry each, applied per image.

Every function takes a float array and the ``NormalizationConfig`` (those in ``NEEDS_STATISTICS`` the
dataset's statistics too) and returns float32. Per-image statistics (min-max, z-score) follow nnU-Net's
choice for MRI, whose intensities have no absolute scale; CT keeps its absolute Hounsfield scale through
a fixed window, or through ``nnunet_ct``.

``nnunet_ct`` is nnU-Net's ``CTNormalization``: it needs statistics of the whole training set, not of the
image, passed to :func:`normalize` as ``statistics``. They describe the intensities inside the foreground
(labels > 0) only: the organs and lesions to segment, not the air, table and tissue around them, so that
the clipping range and the scale fit what matters. :func:`foreground_intensity_sample` draws (seeded) up to
10,000 foreground voxels of one training case and :func:`foreground_intensity_statistics` pools the
samples of all cases into the mean, standard deviation and 0.5 / 99.5 percentiles. The image is clipped
to the percentiles, then z-scored with the mean and standard deviation: one fixed, dataset-wide mapping, so
Hounsfield units keep their meaning across images. The percentiles are fixed at 0.5 / 99.5 as in nnU-Net
(``settings.percentiles`` belongs to ``percentile_zscore``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

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


# The keys of the statistics nnunet_ct needs; named as in nnU-Net's dataset_fingerprint.json.
STATISTICS_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def _check_statistics(statistics, method: str) -> dict:
    if statistics is None:
        raise ValueError(f"normalization {method!r} needs the training set's foreground intensity statistics "
                         f"(keys {', '.join(STATISTICS_KEYS)}; see foreground_intensity_statistics), "
                         f"passed as normalize(image, settings, statistics=...); none were given")
    missing = [key for key in STATISTICS_KEYS if key not in statistics]
    if missing:
        raise ValueError(f"normalization {method!r}: the statistics lack {', '.join(missing)} "
                         f"(they have {', '.join(map(str, statistics)) or 'no keys'})")
    values = {key: float(statistics[key]) for key in STATISTICS_KEYS}
    if not all(np.isfinite(value) for value in values.values()):
        raise ValueError(f"normalization {method!r}: the statistics must be finite numbers, got {values}")
    if values["percentile_00_5"] > values["percentile_99_5"]:
        raise ValueError(f"normalization {method!r}: percentile_00_5 {values['percentile_00_5']:g} exceeds "
                         f"percentile_99_5 {values['percentile_99_5']:g}")
    return values


def _nnunet_ct(image: np.ndarray, settings, statistics=None) -> np.ndarray:
    values = _check_statistics(statistics, "nnunet_ct")
    clipped = np.clip(image, values["percentile_00_5"], values["percentile_99_5"])
    return (clipped - values["mean"]) / max(values["std"], _EPSILON)


NORMALIZATIONS: dict[str, Callable] = {
    "ct_window": _ct_window,
    "minmax": _minmax,
    "divide_255": _divide_255,
    "zscore": _zscore,
    "percentile_zscore": _percentile_zscore,
    "nnunet_ct": _nnunet_ct,
    "none": _none,
}

# Methods that take dataset statistics as a third argument (the others use the image alone).
NEEDS_STATISTICS = frozenset({"nnunet_ct"})


def normalize(image: np.ndarray, settings, statistics: Optional[dict] = None) -> np.ndarray:
    """Normalise one image (any shape) with the method named in ``settings.method``.

    ``statistics``: the dataset's foreground intensity statistics (:func:`foreground_intensity_statistics`)
    of this image's channel, required by the methods in ``NEEDS_STATISTICS`` (``nnunet_ct``; a ValueError
    says so when missing) and ignored by the others.
    """
    image = np.asarray(image, dtype=np.float32)
    if settings.method in NEEDS_STATISTICS:
        return NORMALIZATIONS[settings.method](image, settings, statistics).astype(np.float32)
    return NORMALIZATIONS[settings.method](image, settings).astype(np.float32)


def foreground_intensity_sample(image_channel: np.ndarray, labels: np.ndarray,
                                rng_or_seed: Union[int, np.random.Generator, None],
                                max_voxels: int = 10000) -> np.ndarray:
    """Intensities of up to ``max_voxels`` foreground voxels (``labels > 0``) of one channel of one case.

    All of them when the case has no more than ``max_voxels``, else ``max_voxels`` drawn without
    replacement with ``rng_or_seed`` (an int seed or a ``numpy.random.Generator``): the same seed gives the
    same sample. float32, 1D; empty when the case has no foreground. nnU-Net (``collect_foreground_intensities``)
    draws 10,000 voxels per case (with replacement, so that every case weighs the same); capping keeps the
    pooled statistics cheap whatever the volumes' size while every case with a large foreground still
    contributes equally.
    """
    image_channel, labels = np.asarray(image_channel), np.asarray(labels)
    if image_channel.shape != labels.shape:
        raise ValueError(f"image channel {image_channel.shape} and labels {labels.shape} differ in shape; "
                         f"give one channel (*spatial) and its label map")
    if max_voxels < 1:
        raise ValueError(f"max_voxels must be positive, got {max_voxels}")
    foreground = image_channel[labels > 0]
    if foreground.size > max_voxels:
        rng = np.random.default_rng(rng_or_seed)
        foreground = foreground[np.sort(rng.choice(foreground.size, size=max_voxels, replace=False))]
    return foreground.astype(np.float32)


def foreground_intensity_statistics(samples: Sequence[np.ndarray]) -> dict:
    """The ``nnunet_ct`` statistics of the pooled per-case samples of :func:`foreground_intensity_sample`.

    ``{"mean", "std", "percentile_00_5", "percentile_99_5"}`` as plain floats (JSON-ready), computed in
    float64 over the concatenation of ``samples`` (the standard deviation with ``ddof=0``, the percentiles
    linearly interpolated, as NumPy's and nnU-Net's defaults). A ValueError when no case has foreground.
    """
    pooled = np.concatenate([np.asarray(sample, dtype=np.float64).ravel() for sample in samples]) if len(samples) \
        else np.empty(0)
    if pooled.size == 0:
        raise ValueError("no foreground voxels in any case: the nnunet_ct statistics need labelled training "
                         "cases (labels > 0)")
    low, high = np.percentile(pooled, [0.5, 99.5])
    return {"mean": float(pooled.mean()), "std": float(pooled.std()),
            "percentile_00_5": float(low), "percentile_99_5": float(high)}


def normalize_channels(image: np.ndarray, normalizations, statistics=None) -> np.ndarray:
    """Each channel of ``image`` (*spatial, C) normalised on its own with its setting (and, for methods that
    need them, its dataset statistics: one dict or None per channel). float32, same shape."""
    statistics = statistics if statistics is not None else [None] * len(normalizations)
    return np.stack([normalize(image[..., channel], settings, statistics=stats)
                     for channel, (settings, stats) in enumerate(zip(normalizations, statistics))], axis=-1)
