"""Normalisations, resizing and the seeded, stratified, grouped split."""
import numpy as np
import pytest

from segmenter.config import NormalizationConfig
from segmenter.preprocessing import normalize, resize_image, resize_mask, resized_spacing, split_train_test


def test_ct_window_clips_and_scales():
    image = np.array([[-1000.0, -200.0], [50.0, 1000.0]])
    out = normalize(image, NormalizationConfig(method="ct_window", window=(-200, 300)))
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.5, 1.0]])
    assert out.dtype == np.float32


@pytest.mark.parametrize("method, check", [
    ("minmax", lambda x: (x.min(), x.max()) == (0.0, 1.0)),
    ("divide_255", lambda x: np.isclose(x.max(), 200 / 255)),
    ("zscore", lambda x: abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4),
    ("percentile_zscore", lambda x: abs(x.mean()) < 1e-5),
    ("none", lambda x: x.max() == 200),
])
def test_normalizations(method, check):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 201, size=(16, 16)).astype(float)
    image[0, 0], image[0, 1] = 0, 200
    assert check(normalize(image, NormalizationConfig(method=method)))


def test_constant_image_does_not_divide_by_zero():
    out = normalize(np.full((4, 4), 7.0), NormalizationConfig(method="zscore"))
    assert np.isfinite(out).all()


def test_resize_mask_keeps_labels_and_spacing_scales():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, size=(64, 48)).astype(np.uint8)
    resized = resize_mask(mask, (32, 32))
    assert set(np.unique(resized)) <= {0, 1, 2}
    assert resized.dtype == np.uint8
    assert resized_spacing((1.0, 0.5), (64, 48), (32, 32)) == (2.0, 0.75)
    assert resize_image(mask.astype(float), (32, 32)).shape == (32, 32)


def test_split_is_seeded_grouped_stratified_and_order_independent():
    ids = [f"p{p}_s{s}" for p in range(10) for s in range(4)]
    groups = [i.split("_")[0] for i in ids]
    foreground = [int(i[1]) % 2 == 0 for i in ids]
    train, test = split_train_test(ids, groups, foreground, 0.2, seed=7)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(ids)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in test})
    assert 0 < sum(foreground[i] for i in test) < len(test)
    # The same inputs in another order give the same split by id.
    order = np.random.default_rng(3).permutation(len(ids))
    train2, test2 = split_train_test([ids[i] for i in order], [groups[i] for i in order],
                                     [foreground[i] for i in order], 0.2, seed=7)
    assert sorted(ids[order[i]] for i in test2) == sorted(ids[i] for i in test)
    _, test3 = split_train_test(ids, groups, foreground, 0.2, seed=8)
    assert sorted(test3) != sorted(test) or len(test) == len(ids)
