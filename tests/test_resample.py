"""3D geometry: resampling to a spacing (images, labels, probabilities), the affines that go with it, and the
crop to the non-zero box."""
import json

import numpy as np
import pytest

from segmenter.preprocessing.resample import (box_from_json, box_to_json, crop, cropped_affine, nonzero_box,
                                              resample_image, resample_labels, resample_probabilities,
                                              resampled_affine, resampled_shape, separate_axis, uncrop)


def _affine(seed=0):
    """A rotated, anisotropically scaled, shifted voxel-to-mm affine."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = rng.normal(scale=50, size=3)
    return affine


def _mm(affine, index):
    return (affine @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


def _ball(shape, centre, radius):
    grid = np.indices(shape, dtype=float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_resampled_shape_keeps_the_extent():
    assert resampled_shape((100, 80, 30), (0.5, 0.5, 2.0), (1.0, 1.0, 1.0)) == (50, 40, 60)
    assert resampled_shape((36, 50, 35), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (36, 50, 35)
    assert resampled_shape((3, 3, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)  # at least one voxel
    with pytest.raises(ValueError):
        resampled_shape((3, 3), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        resampled_shape((3, 3, 3), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0))


def test_equal_shapes_are_left_alone():
    image = np.random.default_rng(0).normal(size=(6, 7, 5, 2)).astype(np.float32)
    assert resample_image(image, (6, 7, 5)) is image
    as_float = resample_image(image.astype(np.float64), (6, 7, 5))
    assert as_float.dtype == np.float32 and np.array_equal(as_float, image)
    labels = (image[..., 0] > 0).astype(np.uint8)
    assert np.array_equal(resample_labels(labels, (6, 7, 5), 2), labels)
    new_shape = resampled_shape(image.shape[:3], (1.5, 1.5, 3.0), (1.5, 1.5, 3.0))
    assert resample_image(image, new_shape) is image


def test_image_round_trip_shapes_and_channels():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(20, 24, 10, 2)).astype(np.float32)
    image[..., 1] = 2 * image[..., 0] + 3
    up = resample_image(image, (30, 36, 15))
    assert up.shape == (30, 36, 15, 2) and up.dtype == np.float32
    np.testing.assert_allclose(up[..., 1], 2 * up[..., 0] + 3, atol=1e-4)  # channels alike, independently
    assert resample_image(up, (20, 24, 10)).shape == (20, 24, 10, 2)
    assert resample_image(image[..., 0], (30, 36, 15)).shape == (30, 36, 15)  # no channel axis
    with pytest.raises(ValueError):
        resample_image(image, (30, 36))


def test_constant_image_stays_constant_up_to_the_edges():
    image = np.full((9, 10, 7, 1), 5.0, dtype=np.float32)
    for new_shape in [(17, 21, 5), (4, 4, 4)]:
        for order in (1, 3):
            np.testing.assert_allclose(resample_image(image, new_shape, order=order), 5.0, rtol=1e-5)


def test_smooth_image_survives_a_round_trip():
    grid = np.indices((24, 24, 16), dtype=np.float32)
    image = (np.sin(grid[0] / 5) + np.cos(grid[1] / 6) + grid[2] / 10)[..., None]
    back = resample_image(resample_image(image, (36, 30, 24)), (24, 24, 16))
    np.testing.assert_allclose(back[2:-2, 2:-2, 2:-2], image[2:-2, 2:-2, 2:-2], atol=2e-3)


def test_affine_matches_the_resampled_grid():
    """A linear ramp in mm, resampled linearly, reads the mm coordinate the new affine gives each voxel."""
    affine, old_shape, new_shape = _affine(), (13, 11, 9), (20, 7, 14)
    index = np.indices(old_shape, dtype=float)
    ramp = sum(affine[0, axis] * index[axis] for axis in range(3)) + affine[0, 3]  # the mm x coordinate
    resampled = resample_image(ramp[..., None], new_shape, order=1)[..., 0]
    new_affine = resampled_affine(affine, old_shape, new_shape)
    new_index = np.indices(new_shape, dtype=float)
    expected = sum(new_affine[0, axis] * new_index[axis] for axis in range(3)) + new_affine[0, 3]
    # Away from the faces (where the border is extended, not extrapolated) the values agree.
    scale = np.array(old_shape) / np.array(new_shape)
    old_position = [(new_index[axis] + 0.5) * scale[axis] - 0.5 for axis in range(3)]
    inside = np.all([(p >= 0) & (p <= n - 1) for p, n in zip(old_position, old_shape)], axis=0)
    assert inside.sum() > 100
    np.testing.assert_allclose(resampled[inside], expected[inside], atol=1e-3)


def test_resampled_affine_keeps_corner_and_centre_and_round_trips():
    affine, old_shape, new_shape = _affine(1), (37, 11, 8), (50, 16, 3)
    new_affine = resampled_affine(affine, old_shape, new_shape)
    old, new = np.array(old_shape, dtype=float), np.array(new_shape, dtype=float)
    np.testing.assert_allclose(_mm(new_affine, [-0.5] * 3), _mm(affine, [-0.5] * 3), atol=1e-9)  # outer corner
    np.testing.assert_allclose(_mm(new_affine, new - 0.5), _mm(affine, old - 0.5), atol=1e-9)  # far corner
    np.testing.assert_allclose(_mm(new_affine, (new - 1) / 2), _mm(affine, (old - 1) / 2), atol=1e-9)  # centre
    # Voxel size scales by old / new.
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0),
                               np.linalg.norm(affine[:3, :3], axis=0) * old / new)
    np.testing.assert_allclose(resampled_affine(new_affine, new_shape, old_shape), affine, atol=1e-9)
    assert resampled_affine(None, old_shape, new_shape) is None


def test_label_resampling_keeps_the_label_set():
    shape = (24, 20, 12)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[_ball(shape, (8, 8, 6), 5)] = 1
    labels[_ball(shape, (16, 12, 6), 4)] = 3  # class 2 absent
    for method in ("linear", "nearest"):
        for new_shape in [(17, 31, 9), (48, 40, 24), (6, 5, 3)]:
            out = resample_labels(labels, new_shape, num_classes=4, method=method)
            assert out.shape == new_shape and out.dtype == np.uint8
            assert set(np.unique(out)) <= {0, 1, 3}
        out = resample_labels(labels, (36, 30, 18), num_classes=4, method=method)
        assert set(np.unique(out)) == {0, 1, 3}


def test_nearest_label_upsampling_by_two_replicates_voxels():
    labels = np.random.default_rng(2).integers(0, 3, size=(5, 6, 4)).astype(np.uint8)
    repeated = labels.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(resample_labels(labels, (10, 12, 8), 3, method="nearest"), repeated)
    # Linear smooths instead: a voxel takes the class with the most weight among its 8 old neighbours, on
    # random labels often not the nearest one's (whose weight is 0.75**3 < 0.5), but always one of theirs.
    linear = resample_labels(labels, (10, 12, 8), 3)
    padded = np.pad(labels, 1, mode="edge")
    for index in np.ndindex(linear.shape):
        low = [(i - 1) // 2 for i in index]  # new voxel i lies at old i / 2 - 0.25: between these two
        neighbours = padded[tuple(slice(l + 1, l + 3) for l in low)]
        assert linear[index] in neighbours


def test_linear_label_round_trip_keeps_a_ball():
    shape = (40, 40, 20)
    labels = _ball(shape, (20, 20, 10), 8).astype(np.uint8)
    back = resample_labels(resample_labels(labels, (27, 27, 31), 2), shape, 2)
    dice = 2 * np.sum((back == 1) & (labels == 1)) / (np.sum(back == 1) + np.sum(labels == 1))
    assert dice > 0.95


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="outside"):
        resample_labels(np.array([[[0, 4]]], dtype=np.uint8), (2, 2, 2), num_classes=3)
    with pytest.raises(ValueError):
        resample_labels(np.zeros((2, 2, 2), dtype=np.uint8), (3, 3, 3), num_classes=2, method="cubic")


def test_probabilities_stay_a_distribution():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 9, 6, 3))
    probabilities = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    out = resample_probabilities(probabilities, (13, 5, 11))
    assert out.shape == (13, 5, 11, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        resample_probabilities(probabilities[..., 0], (13, 5, 11))


def test_crop_and_uncrop_to_the_nonzero_box():
    image = np.zeros((12, 10, 8, 2), dtype=np.float32)
    image[3:7, 2:9, 5, 0] = 1.0
    image[8, 4, 1, 1] = -2.0  # any channel counts
    box = nonzero_box(image)
    assert box == (slice(3, 9), slice(2, 9), slice(1, 6))
    cropped = crop(image, box)
    assert cropped.shape == (6, 7, 5, 2)
    assert np.array_equal(uncrop(cropped, box, image.shape[:3]), image)
    assert np.array_equal(uncrop(cropped, box, image.shape), image)  # the full shape with channels
    labels = (image[..., 0] > 0).astype(np.uint8)
    restored = uncrop(crop(labels, box), box, labels.shape)
    assert restored.dtype == np.uint8 and np.array_equal(restored, labels)
    filled = uncrop(crop(labels, box), box, labels.shape, fill=7)
    assert np.all(filled[:3] == 7) and np.array_equal(filled[box], labels[box])
    assert nonzero_box(labels, channels_last=False) == (slice(3, 7), slice(2, 9), slice(5, 6))
    with pytest.raises(ValueError):
        uncrop(cropped, box, (5, 5, 5))


def test_empty_volume_keeps_the_whole_box():
    assert nonzero_box(np.zeros((4, 5, 6, 1))) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_cropped_affine_and_box_json():
    affine, box = _affine(2), (slice(3, 9), slice(2, 9), slice(1, 6))
    cropped = cropped_affine(affine, box)
    np.testing.assert_allclose(_mm(cropped, [0, 0, 0]), _mm(affine, [3, 2, 1]))
    np.testing.assert_allclose(_mm(cropped, [4, 1, 2]), _mm(affine, [7, 3, 3]))
    assert cropped_affine(None, box) is None
    assert box_from_json(json.loads(json.dumps(box_to_json(box)))) == box


@pytest.mark.parametrize("spacing, target, threshold, expected", [
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 3.0, None),
    ((0.8, 0.8, 5.0), (0.8, 0.8, 5.0), 3.0, 2),  # thick slices along the last axis
    ((4.0, 0.7, 0.7), (1.0, 1.0, 1.0), 3.0, 0),  # the volume's own anisotropy decides first
    ((1.0, 1.0, 1.0), (1.0, 1.0, 3.5), 3.0, 2),  # else the target's
    ((0.8, 0.8, 2.0), (0.8, 0.8, 2.0), 3.0, None),  # 2.5 times: below the threshold
    ((4.0, 4.0, 1.0), (4.0, 4.0, 1.0), 3.0, None),  # two coarse axes: no single slice direction
    ((0.8, 0.8, 5.0), (0.8, 0.8, 5.0), None, None),  # switched off
])
def test_the_thick_slice_axis_is_chosen_as_nnunet_chooses_it(spacing, target, threshold, expected):
    assert separate_axis(spacing, target, threshold) == expected


def test_thick_slices_are_resampled_in_plane_then_by_nearest_slice():
    """Along the separate axis every new slice is a copy of an in-plane-resampled old slice (nothing is mixed
    across slices), and the in-plane resampling is the one all axes would get."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 10, 4)).astype(np.float32)
    labels = (image > 0.3).astype(np.uint8) + (image > 1.2).astype(np.uint8)
    new_shape = (18, 15, 10)
    in_plane = resample_image(image, (18, 15, 4))
    separate = resample_image(image, new_shape, separate=2)
    assert separate.shape == new_shape
    # Each new slice equals one of the in-plane resampled old slices, in order (nearest, grid-mode).
    sources = [int(np.argmin([np.abs(separate[..., k] - in_plane[..., j]).max() for j in range(4)])) for k in range(10)]
    assert sources == sorted(sources) and set(sources) == {0, 1, 2, 3}
    for k, j in enumerate(sources):
        np.testing.assert_array_equal(separate[..., k], in_plane[..., j])
    assert not np.allclose(resample_image(image, new_shape), separate)  # unlike splines across the slices
    label_planes = resample_labels(labels, (18, 15, 4), 3)
    separate_labels = resample_labels(labels, new_shape, 3, separate=2)
    for k, j in enumerate(sources):
        np.testing.assert_array_equal(separate_labels[..., k], label_planes[..., j])
    # The channels of an image are resampled alike; an axis whose size stays is not touched by the rule.
    two = resample_image(np.stack([image, -image], axis=-1), new_shape, separate=2)
    np.testing.assert_array_equal(two[..., 1], -separate)
    np.testing.assert_array_equal(resample_image(image, (18, 15, 4), separate=2), in_plane)


def test_preparing_a_thick_slice_volume_follows_the_plan():
    """prepare_volume takes the interpolation settings and the threshold from the plan; a plan written before
    they existed (no threshold) prepares volumes as before."""
    from segmenter.config import NormalizationConfig
    from segmenter.manifest import VolumePlan
    from segmenter.volumes import prepare_volume

    rng = np.random.default_rng(1)
    image = rng.normal(size=(16, 16, 5, 1)).astype(np.float32)
    settings = dict(target_spacing=[1.0, 1.0, 2.5], median_shape=[16, 16, 10], patch_size=[16, 16, 8],
                    batch_size=2, depth=2, estimated_mb=1.0, crop_to_nonzero=False, intensity_statistics=[None])
    none = [NormalizationConfig(method="none")]
    old_plan = VolumePlan(**settings)
    prepared, _, _ = prepare_volume(image, (1.0, 1.0, 5.0), old_plan, none)
    np.testing.assert_allclose(prepared, resample_image(image, (16, 16, 10)))
    thick = VolumePlan(**settings, anisotropy_threshold=3.0, image_interpolation="linear")
    prepared, _, _ = prepare_volume(image, (1.0, 1.0, 5.0), thick, none)
    np.testing.assert_allclose(prepared, resample_image(image, (16, 16, 10), order=1, separate=2))
