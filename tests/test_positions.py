"""Position-conditioned models (``train.model.position_conditioning``): the patches' positions in their volume.

The training sampler (TensorFlow) and the sliding window (NumPy) write the same positions; they follow the
voxels through rotation, scaling and mirroring and are untouched by the intensity augmentations; the network
splits them off, uses them at every level and saves and loads in safe mode; the settings refuse 2D.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from segmenter import patches, positions
from segmenter.config import ModelConfig, VolumeAugmentationConfig
from segmenter.sliding_window import sliding_window_predict
from tests.test_patches import ALL_OFF

SHAPE = (14, 17, 11)
PATCH = (8, 8, 8)


def _sample(augmentation, image, labels, seed=3, foreground=False):
    sample = patches.make_patch_sampler(PATCH, augmentation, positions=True)
    image_patch, label_patch = sample(tf.constant(image), tf.constant(labels), tf.constant([seed, 1], tf.int64),
                                      tf.constant(foreground))
    return image_patch.numpy(), label_patch.numpy()


def _index_image() -> np.ndarray:
    """A volume whose three channels are each voxel's own index along the three axes."""
    return np.stack(np.indices(SHAPE), axis=-1).astype(np.float32)


@pytest.mark.parametrize("start", [(0, 0, 0), (3, 9, 3), (-2, 5, -4), (10, 12, 6)])
def test_the_sampler_and_the_sliding_window_write_the_same_positions(start):
    in_tf = patches._positions(patches._grid(tf.constant(start, tf.int32), PATCH), tf.constant(SHAPE)).numpy()
    in_numpy = positions.position_channels(start, PATCH, SHAPE)
    np.testing.assert_allclose(in_tf, in_numpy, atol=1e-6)
    assert in_numpy.shape == (*PATCH, positions.NUM_CHANNELS)
    # The volume's first voxel is -1 and its last +1 on every axis; an axis of one voxel does not divide by 0.
    whole = positions.position_channels((0, 0, 0), SHAPE, SHAPE)
    np.testing.assert_allclose(whole[0, 0, 0], [-1, -1, -1])
    np.testing.assert_allclose(whole[-1, -1, -1], [1, 1, 1])
    assert np.isfinite(positions.position_channels((0, -3, 0), (1, 8, 1), (1, 2, 1))).all()


@pytest.mark.parametrize("transform", [dict(rotation_probability=1.0), dict(scale_probability=1.0),
                                       dict(rotation_probability=1.0, scale_probability=1.0, mirror_axes=[0, 1, 2]),
                                       dict(elastic_probability=1.0, elastic_sigma=2.0)])
def test_positions_follow_the_voxels_through_the_spatial_transforms(transform):
    """The image holds each voxel's index: wherever a patch voxel was interpolated inside the volume, its position
    channels are the positions of the (transformed, fractional) index it was read at."""
    augmentation = VolumeAugmentationConfig(**{**ALL_OFF, **transform})
    scale = positions.scale(SHAPE)
    inside_counts = []
    for seed in range(4):
        image_patch, _ = _sample(augmentation, _index_image(), np.zeros(SHAPE, np.int32), seed=seed)
        assert image_patch.shape == (*PATCH, 3 + positions.NUM_CHANNELS)
        index, where = image_patch[..., :3], image_patch[..., 3:]
        source = (where + 1.0) / scale  # the index each voxel was read at
        # Away from the border (where trilinear interpolation meets the zeros outside) the image is exact.
        inside = np.all((source >= 0) & (source <= np.array(SHAPE) - 1), axis=-1)
        inside_counts.append(int(inside.sum()))
        np.testing.assert_allclose(index[inside], source[inside], atol=2e-3)
    assert min(inside_counts) > 100


def test_positions_are_not_changed_by_the_intensity_augmentations():
    image, labels = _index_image()[..., :1], np.zeros(SHAPE, np.int32)
    plain, _ = _sample(None, image, labels)
    intensity = dict(noise_probability=1.0, blur_probability=1.0, brightness_probability=1.0,
                     contrast_probability=1.0, gamma_probability=1.0)
    augmented, _ = _sample(VolumeAugmentationConfig(**{**ALL_OFF, **intensity}), image, labels)
    assert not np.allclose(augmented[..., 0], plain[..., 0])  # the image was changed ...
    np.testing.assert_array_equal(augmented[..., 1:], plain[..., 1:])  # ... its positions were not


@pytest.mark.parametrize("mirror_axes", [(), (0, 1, 2)])
def test_the_sliding_window_gives_each_tile_its_positions(mirror_axes):
    """A 'model' that segments the right half of the volume from its position channel alone: the whole volume
    comes out right, through padding (the first axis is smaller than the patch), overlap and mirroring."""
    shape = (5, 21, 19)
    volume = np.random.default_rng(0).normal(size=(*shape, 2)).astype(np.float32)
    seen_channels = []

    def right_half(batch):
        seen_channels.append(batch.shape[-1])
        right = (batch[..., -1] > 0).astype(np.float32)
        return np.stack([1.0 - right, right], axis=-1)

    labels = sliding_window_predict(right_half, volume, PATCH, num_classes=2, mirror_axes=mirror_axes,
                                    position_channels=True)
    expected = np.broadcast_to(np.arange(shape[2]) > (shape[2] - 1) / 2, shape)
    np.testing.assert_array_equal(labels, expected)
    assert set(seen_channels) == {2 + positions.NUM_CHANNELS}
    sliding_window_predict(right_half, volume, PATCH, num_classes=2)
    assert seen_channels[-1] == 2  # without the option, the volume's channels only


def _small_model(input_channels: int, **settings):
    from segmenter import models

    model_settings = ModelConfig(architecture="medpatchnet", depth=2, base_filters=4, position_conditioning=True,
                                 **settings)
    return models.build_model(model_settings, (*PATCH, input_channels), 3)


def test_a_position_conditioned_network_uses_the_positions_and_saves_in_safe_mode(tmp_path):
    import keras

    from segmenter import models

    model = _small_model(1 + positions.NUM_CHANNELS, normalization="batch")
    assert models.takes_positions(model) and model.input_shape[-1] == 4
    # Every level's blocks see the positions: the split feeds a pooled copy to each resolution.
    assert {"encoder_0_positions", "encoder_1_positions", "bottleneck_positions"} <= {l.name for l in model.layers}
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, *PATCH, 1)).astype(np.float32)
    here = np.stack([positions.position_channels((0, 0, 0), PATCH, (16, 16, 16)),
                     positions.position_channels((8, 8, 8), PATCH, (16, 16, 16))])
    there = here[::-1].copy()
    first = model.predict_on_batch(np.concatenate([image, here], axis=-1))
    moved = model.predict_on_batch(np.concatenate([image, there], axis=-1))
    assert np.abs(first - moved).max() > 1e-4  # the same pixels at another place give another output

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    assert models.takes_positions(loaded)
    np.testing.assert_allclose(loaded.predict_on_batch(np.concatenate([image, here], -1)), first, atol=1e-5)
    folded = models.fold_batch_normalization(loaded)  # what predict does with a batch-norm model
    assert models.takes_positions(folded)
    np.testing.assert_allclose(folded.predict_on_batch(np.concatenate([image, here], -1)), first, atol=1e-4)
    assert not models.takes_positions(models.build_model(ModelConfig(architecture="unet", depth=2, base_filters=4),
                                                         (*PATCH, 1), 3))


def test_position_conditioning_is_refused_where_it_cannot_work():
    from segmenter.config import Config

    with pytest.raises(ValueError, match="needs the image channels and 3 position channels"):
        _small_model(positions.NUM_CHANNELS)
    with pytest.raises(ValueError, match="position_conditioning is for unet"):
        ModelConfig(architecture="deeplabv3plus", position_conditioning=True)
    with pytest.raises(ValueError, match="position_conditioning needs preload.spatial_dims 3"):
        Config.model_validate({"experiment": "x", "classes": ["background", "a"],
                               "train": {"model": {"position_conditioning": True}}})
