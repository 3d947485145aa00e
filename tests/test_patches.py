"""3D patch sampling and augmentation (segmenter.patches): placement, padding, exactness, determinism, tf.data."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from segmenter.config import VolumeAugmentationConfig
from segmenter.patches import foreground_flags, make_patch_sampler

SHAPE = (20, 24, 18)
PATCH = (8, 8, 8)
ALL_OFF = dict(mirror_axes=[], rotation_probability=0.0, scale_probability=0.0, elastic_probability=0.0,
               noise_probability=0.0, blur_probability=0.0, brightness_probability=0.0,
               contrast_probability=0.0, gamma_probability=0.0)
SPATIAL = {"mirror": dict(mirror_axes=[0, 1, 2]), "rotation": dict(rotation_probability=1.0),
           "scaling": dict(scale_probability=1.0), "elastic": dict(elastic_probability=1.0, elastic_sigma=2.0)}
INTENSITY = {"noise": dict(noise_probability=1.0), "blur": dict(blur_probability=1.0),
             "brightness": dict(brightness_probability=1.0), "contrast": dict(contrast_probability=1.0),
             "gamma": dict(gamma_probability=1.0)}


def _labels() -> np.ndarray:
    """Class 1: a 6x8x6 block (288 voxels); class 2: a 2x2x3 block (12 voxels), both well inside the volume."""
    labels = np.zeros(SHAPE, np.int32)
    labels[5:11, 5:13, 5:11] = 1
    labels[13:15, 15:17, 10:13] = 2
    return labels


def _image(labels: np.ndarray, channels: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(*labels.shape, channels)) + labels[..., None]).astype(np.float32)


_compiled: dict = {}


def _sampler(patch=PATCH, **changes):
    """A compiled sampler for the config ALL_OFF + changes (None: augmentation None), cached per config."""
    key = (patch, tuple(sorted((name, repr(value)) for name, value in changes.items())))
    if key not in _compiled:
        augmentation = None if changes.get("none") else VolumeAugmentationConfig(**{**ALL_OFF, **changes})
        sample = make_patch_sampler(patch, augmentation)
        _compiled[key] = tf.function(sample, input_signature=[
            tf.TensorSpec([None, None, None, None], tf.float32), tf.TensorSpec([None, None, None], tf.int32),
            tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.bool)])
    function = _compiled[key]

    def run(image, labels, seed, foreground=False):
        image_patch, label_patch = function(image, labels, tf.constant([seed, 7], tf.int64), tf.constant(foreground))
        return image_patch.numpy(), label_patch.numpy()

    return run


def _plain(**kwargs):
    return _sampler(none=True, **kwargs)


def _crop_positions(volume: np.ndarray, patch: np.ndarray) -> list[tuple[int, ...]]:
    """Every start at which ``patch`` is exactly the NumPy crop of ``volume``."""
    windows = np.lib.stride_tricks.sliding_window_view(volume, patch.shape)
    hits = np.all(windows == patch, axis=tuple(range(volume.ndim, 2 * volume.ndim)))
    return [tuple(int(i) for i in hit) for hit in np.argwhere(hits)]


def test_foreground_flags_hold_the_exact_share():
    flags = foreground_flags(9, 1.0 / 3.0)
    assert flags.dtype == bool and flags.tolist() == [False, False, True] * 3
    assert not foreground_flags(7, 0.0).any()
    assert foreground_flags(7, 1.0).all()
    for count, fraction in [(100, 0.29), (10, 0.7), (13, 0.5), (1, 0.5)]:
        assert foreground_flags(count, fraction).sum() == int(np.floor(count * fraction + 1e-9))
    with pytest.raises(ValueError):
        foreground_flags(3, 1.5)


def test_plain_patch_is_the_numpy_crop():
    labels = _labels()
    image = _image(labels)
    sample = _plain()
    starts = set()
    for seed in range(6):
        for foreground in (False, True):
            image_patch, label_patch = sample(image, labels, seed, foreground)
            assert image_patch.shape == (*PATCH, 2) and image_patch.dtype == np.float32
            assert label_patch.shape == PATCH and label_patch.dtype == np.int32
            positions = _crop_positions(image[..., 0], image_patch[..., 0])
            assert len(positions) == 1
            start = positions[0]
            crop = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
            np.testing.assert_array_equal(image_patch, image[crop])
            np.testing.assert_array_equal(label_patch, labels[crop])
            starts.add(start)
    assert len(starts) > 6


def test_foreground_patches_choose_classes_uniformly():
    labels = _labels()
    image = labels[..., None].astype(np.float32)
    sample = _plain()
    centre_classes = []
    for seed in range(60):
        _, label_patch = sample(image, labels, seed, True)
        assert (label_patch > 0).any()
        # Both blocks lie far enough inside that the chosen voxel is the patch's centre voxel.
        centre_classes.append(int(label_patch[tuple(p // 2 for p in PATCH)]))
    counts = np.bincount(centre_classes, minlength=3)
    assert counts[0] == 0
    assert 18 <= counts[1] <= 42 and 18 <= counts[2] <= 42, counts  # class 2 is 24 times smaller


def test_stored_class_locations_pick_the_patches_a_search_of_the_volume_picks():
    """With every voxel of a class stored (classes up to LOCATIONS_PER_CLASS voxels), the sampler's draw from the
    stored list picks the voxel its search of the label map would: the same patches, bit for bit."""
    from segmenter.volumes import class_locations

    labels = _labels()
    image = _image(labels)
    locations, counts = class_locations(labels, 3, seed=0)
    assert counts.tolist() == [288, 12] and locations.shape == (300, 3) and locations.dtype == np.int32
    sample = make_patch_sampler(PATCH, VolumeAugmentationConfig(**{**ALL_OFF, **SPATIAL["rotation"]}))
    for seed in range(10):
        arguments = (tf.constant(image), tf.constant(labels), tf.constant([seed, 3], tf.int64), tf.constant(True))
        searched = sample(*arguments)
        stored = sample(*arguments, locations, counts)
        for a, b in zip(searched, stored):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A class absent from the volume has no locations and is never chosen.
    only_one = np.where(labels == 2, 0, labels)
    locations, counts = class_locations(only_one, 3, seed=0)
    assert counts.tolist() == [288, 0]
    for seed in range(5):
        _, label_patch = sample(tf.constant(image), tf.constant(only_one), tf.constant([seed, 3], tf.int64),
                                tf.constant(True), locations, counts)
        assert (label_patch.numpy() == 1).any()


def test_class_locations_of_a_large_class_are_a_seeded_uniform_subset(monkeypatch):
    from segmenter import volumes

    monkeypatch.setattr(volumes, "LOCATIONS_PER_CLASS", 100)
    labels = np.zeros((40, 40, 40), np.int32)
    labels[:, :, :25] = 1  # 40,000 voxels: 1% of them (400) beats 100
    labels[5:10, 5:10, 30:34] = 2  # 100 voxels: all kept
    locations, counts = volumes.class_locations(labels, 3, seed=4)
    assert counts.tolist() == [400, 100]
    ones, twos = locations[:400], locations[400:]
    assert (labels[tuple(ones.T)] == 1).all() and (labels[tuple(twos.T)] == 2).all()
    assert len(np.unique(ones, axis=0)) == 400 and (np.lexsort(ones.T[::-1]) == np.arange(400)).all()  # C order
    # Spread over the whole class, not its first rows; the same seed gives the same subset.
    assert ones[:, 0].min() < 5 and ones[:, 0].max() > 35
    np.testing.assert_array_equal(volumes.class_locations(labels, 3, seed=4)[0], locations)


def test_random_patches_rarely_hold_a_tiny_blob_forced_ones_always():
    labels = np.zeros(SHAPE, np.int32)
    labels[2, 2, 2] = 1
    image = labels[..., None].astype(np.float32)
    sample = _plain()
    forced = [(sample(image, labels, seed, True)[1] > 0).any() for seed in range(40)]
    free = [(sample(image, labels, seed, False)[1] > 0).any() for seed in range(40)]
    assert all(forced)
    assert np.mean(free) < 0.2
    # No foreground at all: a forced patch falls back to a random one.
    empty = np.zeros(SHAPE, np.int32)
    image_patch, label_patch = sample(image, empty, 0, True)
    assert image_patch.shape == (*PATCH, 1) and not label_patch.any()


@pytest.mark.parametrize("shape, before", [((6, 8, 10), (1, 0, 0)), ((5, 8, 3), (2, 0, 4))])
def test_small_volume_is_centred_and_padded(shape, before):
    # An odd padding puts the extra voxel before the volume, as nnU-Net's -need_to_pad // 2 does.
    patch = (8, 8, 10)
    rng = np.random.default_rng(1)
    labels = rng.integers(1, 3, size=shape).astype(np.int32)
    image = rng.uniform(1.0, 2.0, size=(*shape, 1)).astype(np.float32)
    image_patch, label_patch = _plain(patch=patch)(image, labels, 3, True)
    assert image_patch.shape == (*patch, 1) and label_patch.shape == patch
    inside = tuple(slice(b, b + s) for b, s in zip(before, shape))
    np.testing.assert_array_equal(image_patch[inside], image)
    np.testing.assert_array_equal(label_patch[inside], labels)
    outside = np.ones(patch, bool)
    outside[inside] = False
    assert outside.sum() == np.prod(patch) - np.prod(shape)
    assert not image_patch[outside].any() and not label_patch[outside].any()


def _coordinate_image(shape) -> np.ndarray:
    """Channels: each voxel's index on axes 0, 1, 2, then ones. Trilinear interpolation of it is exact: a
    patch voxel's channels give the volume position it was sampled at, the ones channel 1 where that
    position is inside the volume."""
    grid = np.stack(np.meshgrid(*[np.arange(size) for size in shape], indexing="ij"), axis=-1)
    return np.concatenate([grid, np.ones((*shape, 1))], axis=-1).astype(np.float32)


@pytest.mark.parametrize("name", list(SPATIAL))
def test_spatial_transforms_keep_labels_exact_and_aligned(name):
    labels = _labels()
    image = _coordinate_image(SHAPE)
    sample, plain = _sampler(**SPATIAL[name]), _plain()
    changed = 0
    for seed in range(4):
        image_patch, label_patch = sample(image, labels, seed, True)
        assert label_patch.dtype == np.int32 and label_patch.shape == PATCH
        assert set(np.unique(label_patch)) <= {0, 1, 2}
        assert (label_patch > 0).any()
        # Where the sampled position is inside the volume, the label is the volume's label at the voxel
        # nearest that position (ties at half voxels, where float rounding may go either way, left out).
        inside = np.abs(image_patch[..., 3] - 1.0) < 1e-5
        position = image_patch[..., :3][inside]
        clear = np.all(np.abs(position - np.floor(position) - 0.5) > 1e-3, axis=-1)
        nearest = np.floor(position + 0.5).astype(int)
        expected = labels[nearest[:, 0], nearest[:, 1], nearest[:, 2]]
        np.testing.assert_array_equal(label_patch[inside][clear], expected[clear])
        assert inside.mean() > 0.5 and clear.mean() > 0.9
        if name == "mirror":  # a mirrored crop: every voxel inside, at whole-voxel positions
            assert inside.all() and clear.all()
        plain_image, plain_labels = plain(image, labels, seed, True)
        changed += not np.array_equal(label_patch, plain_labels) or not np.array_equal(image_patch, plain_image)
    assert changed >= 3


def test_mirroring_reverses_the_plain_crop():
    labels = _labels()
    image = _image(labels)
    image_patch, label_patch = _sampler(**SPATIAL["mirror"])(image, labels, 5, True)
    plain_image, plain_labels = _plain()(image, labels, 5, True)
    flipped = [axes for axes in ([], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2])
               if np.array_equal(np.flip(plain_labels, axes) if axes else plain_labels, label_patch)
               and np.array_equal(np.flip(plain_image, axes) if axes else plain_image, image_patch)]
    assert flipped


@pytest.mark.parametrize("name", list(INTENSITY))
def test_intensity_transforms_change_the_image_only(name):
    labels = _labels()
    image = _image(labels)
    sample, plain = _sampler(**INTENSITY[name]), _plain()
    for seed in range(3):
        image_patch, label_patch = sample(image, labels, seed, True)
        plain_image, plain_labels = plain(image, labels, seed, True)
        np.testing.assert_array_equal(label_patch, plain_labels)
        assert np.isfinite(image_patch).all()
        assert not np.array_equal(image_patch, plain_image)
        if name == "contrast":
            low, high = plain_image.min(axis=(0, 1, 2)), plain_image.max(axis=(0, 1, 2))
            assert (image_patch >= low - 1e-6).all() and (image_patch <= high + 1e-6).all()


def test_gamma_keeps_a_constant_patch_finite():
    labels = np.zeros(SHAPE, np.int32)
    image = np.full((*SHAPE, 1), -0.5, np.float32)
    image_patch, _ = _sampler(**INTENSITY["gamma"])(image, labels, 0, False)
    assert np.isfinite(image_patch).all()
    np.testing.assert_allclose(image_patch, -0.5, atol=1e-5)


def _everything():
    return dict(mirror_axes=[0, 1, 2], rotation_probability=1.0, scale_probability=1.0, elastic_probability=1.0,
                elastic_sigma=2.0, noise_probability=1.0, blur_probability=1.0, brightness_probability=1.0,
                contrast_probability=1.0, gamma_probability=1.0)


def test_same_seed_same_patch_different_seed_different_patch():
    labels = _labels()
    image = _image(labels)
    sample = _sampler(**_everything())
    first = sample(image, labels, 11, True)
    again = sample(image, labels, 11, True)
    other = sample(image, labels, 12, True)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_sampler_in_parallel_tf_data_map_has_static_shapes_and_repeats():
    rng = np.random.default_rng(2)
    shapes = [SHAPE, (6, 10, 9), (12, 8, 20), SHAPE, (9, 9, 9), (20, 12, 6)]
    volumes = []
    for shape in shapes:
        labels = np.zeros(shape, np.int32)
        labels[tuple(slice(s // 3, s // 3 + 2) for s in shape)] = rng.integers(1, 3)
        volumes.append((rng.normal(size=(*shape, 1)).astype(np.float32), labels))
    flags = foreground_flags(len(volumes), 0.5)
    augmentation = VolumeAugmentationConfig(**{**ALL_OFF, **_everything()})
    sample = make_patch_sampler(PATCH, augmentation)

    def generate():
        yield from volumes

    dataset = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec([None, None, None, 1], tf.float32), tf.TensorSpec([None, None, None], tf.int32)))
    seeds = tf.data.Dataset.range(len(volumes)).map(lambda i: tf.stack([tf.constant(5, tf.int64), i]))
    dataset = tf.data.Dataset.zip(dataset, seeds, tf.data.Dataset.from_tensor_slices(flags)).map(
        lambda volume, seed, foreground: sample(volume[0], volume[1], seed, foreground),
        num_parallel_calls=tf.data.AUTOTUNE).batch(3, drop_remainder=True)
    for spec in dataset.element_spec:
        assert spec.shape.is_fully_defined()
    assert dataset.element_spec[0].shape == (3, *PATCH, 1) and dataset.element_spec[1].dtype == tf.int32
    batches = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    assert len(batches) == 2
    again = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    for (images, labels), (images_again, labels_again) in zip(batches, again):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)
    for index, (image, labels) in enumerate(volumes):  # the same patches as a direct (eager) call
        seed = tf.constant([5, index], tf.int64)
        image_patch, label_patch = sample(image, labels, seed, tf.constant(bool(flags[index])))
        batch_images, batch_labels = batches[index // 3]
        np.testing.assert_allclose(batch_images[index % 3], image_patch.numpy(), atol=1e-5)
        np.testing.assert_array_equal(batch_labels[index % 3], label_patch.numpy())


def test_trilinear_interpolation_matches_scipy_with_zeros_outside():
    from scipy import ndimage

    from segmenter.patches import _trilinear

    rng = np.random.default_rng(3)
    image = rng.normal(size=(6, 7, 5, 2)).astype(np.float32)
    # Inside, on the borders, half a voxel and far outside, and on exact voxel centres.
    coords = np.concatenate([rng.uniform(-2.5, 8.5, (400, 3)), [[0, 0, 0], [5, 6, 4], [-0.5, 3, 2], [5.5, 1, 1],
                                                                 [-1, 2, 2], [6, 2, 2], [-9.3, 1, 1], [40, 50, 60]]])
    coords = coords.astype(np.float32)
    result = _trilinear(tf.constant(image), tf.constant(coords)).numpy()
    expected = np.stack([ndimage.map_coordinates(image[..., c], coords.T, order=1, mode="grid-constant", cval=0.0)
                         for c in range(2)], axis=-1)
    np.testing.assert_allclose(result, expected, atol=1e-5)
