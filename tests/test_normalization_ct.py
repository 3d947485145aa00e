"""nnU-Net's CT normalisation: dataset-wide foreground statistics, sampled per case, then clip and z-score."""
import json

import numpy as np
import pytest

from segmenter.config import NormalizationConfig
from segmenter.preprocessing import foreground_intensity_sample, foreground_intensity_statistics, normalize

CT = NormalizationConfig(method="nnunet_ct")
STATISTICS = {"mean": 10.0, "std": 5.0, "percentile_00_5": 0.0, "percentile_99_5": 40.0}


def test_nnunet_ct_clips_then_zscores():
    image = np.array([[-100.0, 0.0, 10.0], [20.0, 40.0, 100.0]])
    out = normalize(image, CT, statistics=STATISTICS)
    # clipped to [0, 40]: [0, 0, 10, 20, 40, 40]; minus 10, over 5
    np.testing.assert_allclose(out, [[-2.0, -2.0, 0.0], [2.0, 6.0, 6.0]])
    assert out.dtype == np.float32 and out.shape == image.shape


def test_nnunet_ct_needs_statistics():
    with pytest.raises(ValueError, match="statistics"):
        normalize(np.zeros((2, 2)), CT)
    with pytest.raises(ValueError, match="percentile_99_5"):
        normalize(np.zeros((2, 2)), CT, statistics={"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0})


def test_zero_std_does_not_divide_by_zero():
    out = normalize(np.full((3, 3), 7.0), CT, statistics={**STATISTICS, "std": 0.0, "mean": 7.0})
    assert np.isfinite(out).all() and np.all(out == 0)


def test_other_methods_ignore_statistics():
    image = np.random.default_rng(0).normal(size=(8, 8)) * 100
    for method in ("minmax", "zscore", "ct_window", "percentile_zscore", "none"):
        settings = NormalizationConfig(method=method)
        np.testing.assert_array_equal(normalize(image, settings, statistics=STATISTICS), normalize(image, settings))


def test_foreground_sample_is_seeded_and_from_the_foreground():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(30, 30, 20)).astype(np.float32) * 100
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[5:25, 5:25, 3:17] = 2  # 5600 foreground voxels
    image[labels > 0] = 1000 + rng.permutation(5600)  # distinct, all well above the background's
    first = foreground_intensity_sample(image, labels, 7, max_voxels=1000)
    assert first.shape == (1000,) and first.dtype == np.float32
    assert np.array_equal(first, foreground_intensity_sample(image, labels, 7, max_voxels=1000))
    assert np.array_equal(first, foreground_intensity_sample(image, labels, np.random.default_rng(7), max_voxels=1000))
    assert not np.array_equal(first, foreground_intensity_sample(image, labels, 8, max_voxels=1000))
    assert first.min() > 500 and len(np.unique(first)) == 1000  # drawn without replacement
    everything = foreground_intensity_sample(image, labels, 7)  # fewer than 10,000: all of them
    np.testing.assert_array_equal(np.sort(everything), np.sort(image[labels > 0]))
    assert foreground_intensity_sample(image, np.zeros_like(labels), 7).size == 0
    with pytest.raises(ValueError):
        foreground_intensity_sample(image[..., None], labels, 7)


def test_statistics_pool_the_cases():
    samples = [np.array([1.0, 2.0, 3.0]), np.array([], dtype=np.float32), np.arange(4.0, 201.0)]
    statistics = foreground_intensity_statistics(samples)
    pooled = np.arange(1.0, 201.0)
    assert statistics == pytest.approx({"mean": pooled.mean(), "std": pooled.std(),
                                        "percentile_00_5": np.percentile(pooled, 0.5),
                                        "percentile_99_5": np.percentile(pooled, 99.5)})
    assert json.loads(json.dumps(statistics)) == statistics  # plain floats, ready for a manifest
    with pytest.raises(ValueError, match="foreground"):
        foreground_intensity_statistics([np.array([])])


def test_statistics_then_normalisation_end_to_end():
    rng = np.random.default_rng(2)
    cases = []
    for _ in range(3):
        image = rng.normal(-500, 300, size=(16, 16, 8)).astype(np.float32)
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[4:12, 4:12, 2:6] = 1
        image[labels > 0] = rng.normal(60, 20, size=int(labels.sum()))
        cases.append((image, labels))
    statistics = foreground_intensity_statistics(
        [foreground_intensity_sample(image, labels, seed) for seed, (image, labels) in enumerate(cases)])
    assert 40 < statistics["mean"] < 80 and 10 < statistics["std"] < 30
    out = normalize(cases[0][0], CT, statistics=statistics)
    foreground = out[cases[0][1] > 0]
    assert abs(foreground.mean()) < 0.3 and 0.7 < foreground.std() < 1.3
    low = (statistics["percentile_00_5"] - statistics["mean"]) / statistics["std"]
    assert out.min() == pytest.approx(low, abs=1e-5)  # the air is clipped to the lower percentile
