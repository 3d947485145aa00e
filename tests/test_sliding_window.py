"""Sliding-window prediction: tiling, Gaussian weights, blending, padding, mirroring."""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from segmenter.sliding_window import (
    compute_steps,
    gaussian_importance_map,
    iter_patch_slices,
    memory_bytes,
    sliding_window_predict,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def per_voxel_model(num_classes: int, channels: int, seed: int = 0):
    """A 1x1x1 'network': softmax of a fixed linear map of each voxel's channels."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(channels, num_classes)).astype(np.float32) * 3
    bias = rng.normal(size=num_classes).astype(np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        return softmax(batch @ weights + bias)

    return predict


def box_filter_model(num_classes: int):
    """Flip-equivariant but not per-voxel: a 3x3x3 mean (zero outside) of channel 0, then class scores."""
    scales = np.linspace(-2.0, 2.0, num_classes, dtype=np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        smooth = ndimage.uniform_filter(batch[..., 0], size=(1, 3, 3, 3), mode="constant", cval=0.0)
        return softmax(smooth[..., None] * scales)

    return predict


# --- Gaussian importance map -------------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [(64, 64, 64), (7, 12, 9), (32, 48), (1, 5, 4)])
def test_gaussian_shape_symmetry_and_max(patch):
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == np.float32
    assert g.max() == 1.0
    assert (g > 0).all()
    for axis in range(len(patch)):
        np.testing.assert_array_equal(g, np.flip(g, axis))
    # The maximum sits at the centre voxel(s).
    centre = tuple(slice((n - 1) // 2, n // 2 + 1) for n in patch)
    assert (g[centre] == g.max()).all()
    # sigma = patch / 8 around the geometric centre (n - 1) / 2.
    if patch[0] == 64:
        profile = g[:, 31, 31] / g[31, 31, 31]
        x = np.arange(64) - 31.5
        np.testing.assert_allclose(profile, np.exp(-0.5 * (x / 8) ** 2) / np.exp(-0.5 * (0.5 / 8) ** 2), rtol=1e-5)


def test_gaussian_sigma_is_a_fraction_of_the_patch():
    g = gaussian_importance_map((65,), sigma_scale=1 / 8)
    sigma = 65 / 8
    np.testing.assert_allclose(g, np.exp(-0.5 * ((np.arange(65) - 32) / sigma) ** 2), rtol=1e-6)


def test_gaussian_zeros_replaced_by_smallest_positive_value():
    g = gaussian_importance_map((64, 64, 64), sigma_scale=1 / 64, dtype=np.float16)
    assert g.dtype == np.float16
    positive = g[g > 0]
    assert g.size == positive.size  # no zero left
    assert g.min() == positive.min() > 0
    assert g.max() == 1


# --- Steps -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image,patch,overlap,expected", [
    (128, 64, 0.5, [0, 32, 64]),
    (100, 64, 0.5, [0, 18, 36]),  # nnU-Net: ceil(36 / 32) + 1 = 3 steps spread evenly
    (64, 64, 0.5, [0]),
    (65, 64, 0.5, [0, 1]),
    (128, 64, 0.0, [0, 64]),
    (129, 64, 0.0, [0, 32, 65]),
])
def test_steps_known_values(image, patch, overlap, expected):
    assert compute_steps([image], [patch], overlap) == [expected]


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("image,patch", [((128, 97, 64), (64, 48, 64)), ((5, 200, 31), (5, 17, 8)),
                                          ((300,), (96,))])
def test_steps_cover_the_volume_and_end_at_the_border(image, patch, overlap):
    steps = compute_steps(image, patch, overlap)
    for size, p, axis_steps in zip(image, patch, steps):
        assert axis_steps[0] == 0
        assert axis_steps[-1] + p == size
        gaps = np.diff(axis_steps)
        assert (gaps > 0).all()
        # Never a step longer than the target (so the overlap is at least the requested one, up to rounding).
        assert (gaps <= int(np.ceil(p * (1 - overlap)))).all()
    covered = np.zeros(image, dtype=int)
    for sl in iter_patch_slices(image, patch, overlap):
        covered[sl] += 1
    assert covered.min() >= 1


def test_steps_reject_bad_input():
    with pytest.raises(ValueError):
        compute_steps([10], [20], 0.5)
    with pytest.raises(ValueError):
        compute_steps([10], [5], 1.0)
    with pytest.raises(ValueError):
        compute_steps([10, 10], [5], 0.5)


# --- Blending ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap", [0.0, 0.3, 0.5, 0.75])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_voxel_model_equals_whole_volume_everywhere(overlap, batch_size):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(23, 30, 17, 2)).astype(np.float32)
    model = per_voxel_model(num_classes=4, channels=2)
    expected = model(volume[None])[0]
    labels, probs = sliding_window_predict(model, volume, (8, 12, 8), num_classes=4, overlap=overlap,
                                           batch_size=batch_size, accumulate="float32", return_probabilities=True)
    assert labels.shape == volume.shape[:3] and labels.dtype == np.uint8
    assert probs.shape == volume.shape[:3] + (4,) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(labels, expected.argmax(-1))


def test_float16_accumulator_is_close_and_labels_agree_away_from_ties():
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(40, 40, 40, 1)).astype(np.float32)
    model = per_voxel_model(num_classes=3, channels=1)
    expected = model(volume[None])[0]
    labels, probs = sliding_window_predict(model, volume, (16, 16, 16), num_classes=3, overlap=0.5,
                                           return_probabilities=True)
    assert probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)
    top2 = np.sort(expected, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-2
    np.testing.assert_array_equal(labels[clear], expected.argmax(-1)[clear])


def test_fully_convolutional_keras_model_equals_whole_volume_where_one_patch_covers_it():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, None, 1))
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv3D(3, 1, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    volume = np.random.default_rng(3).normal(size=(12, 10, 8, 1)).astype(np.float32)
    expected = np.asarray(model(volume[None], training=False))[0]

    def predict(batch):
        return np.asarray(model(batch, training=False))

    labels, probs = sliding_window_predict(predict, volume, (12, 10, 8), num_classes=3, overlap=0.5,
                                           accumulate="float32", return_probabilities=True)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(labels, expected.argmax(-1))
    # And a 1x1x1 Keras net agrees everywhere with any overlap (here: predict_on_batch, patches smaller).
    pointwise = keras.Sequential([keras.Input((None, None, None, 1)), keras.layers.Conv3D(3, 1, activation="softmax")])
    expected = np.asarray(pointwise(volume[None], training=False))[0]
    probs = sliding_window_predict(pointwise.predict_on_batch, volume, (6, 6, 6), num_classes=3, overlap=0.4,
                                   accumulate="float32", return_probabilities=True)[1]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_voxel_covered_by_one_patch_gets_that_patch_prediction_and_overlaps_are_gaussian_weighted():
    # Channel 0 holds the z index, so each patch "knows" where it starts; it predicts a constant.
    depth = 96
    volume = np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None, None, None], (depth, 8, 8, 1)).copy()

    def predict(batch):
        a = 0.1 + batch[:, :1, :1, :1, 0] / 200.0  # start 0 -> 0.1, start 32 -> 0.26
        a = np.broadcast_to(a, batch.shape[:-1])
        return np.stack([a, 1 - a], axis=-1).astype(np.float32)

    assert compute_steps((depth, 8, 8), (64, 8, 8), 0.5) == [[0, 32], [0], [0]]
    for accumulate, tol in (("float32", 0.0), ("float16", 0.0)):
        _, probs = sliding_window_predict(predict, volume, (64, 8, 8), num_classes=2, overlap=0.5,
                                          accumulate=accumulate, return_probabilities=True)
        dtype = probs.dtype
        # Voxels 0..31 are covered by the first patch only, 64..95 by the second only: exact.
        np.testing.assert_array_equal(probs[:32, ..., 0], np.full((32, 8, 8), 0.1, dtype=np.float32).astype(dtype))
        np.testing.assert_array_equal(probs[64:, ..., 0], np.full((32, 8, 8), 0.26, dtype=np.float32).astype(dtype))
        # 32..63: the Gaussian-weighted mean of both patches.
        g = gaussian_importance_map((64, 8, 8))[:, 0, 0].astype(np.float64)
        w0, w1 = g[32:64], g[0:32]
        blended = (w0 * 0.1 + w1 * 0.26) / (w0 + w1)
        atol = 1e-6 if accumulate == "float32" else 5e-4
        np.testing.assert_allclose(probs[32:64, 0, 0, 0].astype(np.float64), blended, atol=atol)


# --- Padding -----------------------------------------------------------------------------------------------

def test_volume_smaller_than_patch_is_zero_padded_and_cropped():
    rng = np.random.default_rng(4)
    volume = rng.normal(size=(5, 20, 7, 1)).astype(np.float32) + 10.0  # no zeros inside the volume
    model = per_voxel_model(num_classes=3, channels=1)
    seen = []

    def predict(batch):
        seen.append(batch.copy())
        return model(batch)

    labels, probs = sliding_window_predict(predict, volume, (8, 8, 8), num_classes=3, overlap=0.5,
                                           accumulate="float32", return_probabilities=True)
    assert labels.shape == (5, 20, 7) and probs.shape == (5, 20, 7, 3)
    np.testing.assert_allclose(probs, model(volume[None])[0], atol=1e-6)
    assert all(b.shape[1:] == (8, 8, 8, 1) and b.dtype == np.float32 for b in seen)
    # Padding is zeros: 3 of 8 planes on axis 0 (1 before, 2 after), 1 of 8 on axis 2 (0 before, 1 after).
    first = seen[0][0, ..., 0]
    assert (first[0] == 0).all() and (first[6:] == 0).all() and (first[1:6, :, :7] != 0).all()
    assert (first[:, :, 7] == 0).all()


def test_two_dimensional_images_and_channelless_volumes():
    rng = np.random.default_rng(5)
    image = rng.normal(size=(30, 21)).astype(np.float32)
    model = per_voxel_model(num_classes=2, channels=1)
    labels, probs = sliding_window_predict(model, image, (16, 16), num_classes=2, accumulate="float32",
                                           return_probabilities=True)
    np.testing.assert_allclose(probs, model(image[None, ..., None])[0], atol=1e-6)
    assert labels.shape == (30, 21)


# --- Mirroring ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mirror_axes", [(0,), (1, 2), (0, 1, 2)])
def test_mirroring_a_mirror_equivariant_function_changes_nothing(mirror_axes):
    rng = np.random.default_rng(6)
    volume = rng.normal(size=(20, 18, 16, 1)).astype(np.float32)
    model = box_filter_model(num_classes=3)
    calls = []

    def predict(batch):
        calls.append(batch.shape[0])
        return model(batch)

    plain = sliding_window_predict(model, volume, (12, 12, 12), num_classes=3, accumulate="float32",
                                   return_probabilities=True)[1]
    mirrored = sliding_window_predict(predict, volume, (12, 12, 12), num_classes=3, accumulate="float32",
                                      mirror_axes=mirror_axes, return_probabilities=True)[1]
    np.testing.assert_allclose(mirrored, plain, atol=1e-6)
    patches = len(list(iter_patch_slices((20, 18, 16), (12, 12, 12), 0.5)))
    assert sum(calls) == patches * 2 ** len(mirror_axes)


def test_mirroring_averages_all_flip_combinations_un_flipped():
    # A position-dependent (not equivariant) model on one patch: the result is the explicit TTA average.
    volume = np.random.default_rng(7).normal(size=(6, 5, 4, 1)).astype(np.float32)
    ramp = np.linspace(0, 3, 6, dtype=np.float32)[:, None, None]

    def predict(batch):
        return softmax(np.stack([batch[..., 0] + ramp, -batch[..., 0]], axis=-1))

    axes = (0, 2)
    expected = np.zeros((6, 5, 4, 2), dtype=np.float64)
    combos = [c for r in range(3) for c in itertools.combinations(axes, r)]
    for combo in combos:
        flipped = np.flip(volume, combo)
        expected += np.flip(predict(flipped[None])[0], combo)
    expected /= len(combos)
    probs = sliding_window_predict(predict, volume, (6, 5, 4), num_classes=2, mirror_axes=axes,
                                   accumulate="float32", return_probabilities=True)[1]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


# --- Errors, memory, dependencies --------------------------------------------------------------------------

def test_bad_arguments_and_bad_model_output():
    volume = np.zeros((8, 8, 8, 1), dtype=np.float32)
    model = per_voxel_model(num_classes=2, channels=1)
    with pytest.raises(ValueError, match="accumulate"):
        sliding_window_predict(model, volume, (4, 4, 4), num_classes=2, accumulate="int8")
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_predict(model, volume, (4, 4, 4), num_classes=300)
    with pytest.raises(ValueError, match="expected"):
        sliding_window_predict(model, volume, (4, 4, 4), num_classes=3)
    with pytest.raises(ValueError, match="mirror axis"):
        sliding_window_predict(model, volume, (4, 4, 4), num_classes=2, mirror_axes=(3,))
    with pytest.raises(ValueError, match="does not match"):
        sliding_window_predict(model, volume, (4, 4), num_classes=2)


def test_memory_formula():
    shape, patch = (300, 512, 512, 1), (64, 128, 128)
    f16 = memory_bytes(shape, patch, num_classes=4)
    f32 = memory_bytes(shape, patch, num_classes=4, accumulate="float32")
    voxels = 300 * 512 * 512
    assert f32 - f16 == voxels * 4 * 2
    patch_voxels = 64 * 128 * 128
    # accumulator K*2 + weights 4 + labels 1 + float32 input copy C*4, per voxel; 2 patches of (C + 2K) float32
    # and 4 float32 patch-sized temporaries.
    assert f16 == voxels * (4 * 2 + 4 + 1 + 4) + 2 * patch_voxels * (1 + 8) * 4 + 4 * patch_voxels * 4
    assert memory_bytes(shape, patch, num_classes=4, input_copy=False) == f16 - voxels * 4
    # A volume smaller than the patch counts at its padded size.
    assert memory_bytes((10, 10, 10, 1), (16, 16, 16), num_classes=2) == memory_bytes((16, 16, 16, 1), (16, 16, 16),
                                                                                      num_classes=2)


def test_module_does_not_import_tensorflow():
    code = "import sys, segmenter.sliding_window; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
