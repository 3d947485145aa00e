"""tf.data input pipelines over the preloaded training samples: one-hot masks, joint augmentation, batching, prefetch.

``model.fit`` is always given a ``tf.data.Dataset``: fed NumPy arrays directly, Keras ran at half speed
on 2 CPU cores with one core idle. A split of one shard is held in memory as a tensor; a split of many
shards is streamed shard by shard so memory stays bounded by the shard size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf
import keras

from segmenter.dataset import SliceSet, load_shard, shard_paths
from segmenter.manifest import read_manifest

AUTOTUNE = tf.data.AUTOTUNE


def _geometric_layers(augmentation, seed: int) -> Optional[keras.Sequential]:
    """Rotation and zoom applied to image and label map together (nearest, so no new labels appear)."""
    layers = []
    if augmentation.rotation_degrees > 0:
        layers.append(keras.layers.RandomRotation(augmentation.rotation_degrees / 360.0, fill_mode="constant",
                                                  interpolation="nearest", seed=seed))
    if augmentation.zoom > 0:
        layers.append(keras.layers.RandomZoom(augmentation.zoom, fill_mode="constant", interpolation="nearest",
                                              seed=seed + 1))
    return keras.Sequential(layers) if layers else None


def make_augmenter(augmentation, seed: int):
    """Return a function (image, mask) -> (image, mask) applying the configured random augmentations."""
    geometric = _geometric_layers(augmentation, seed)

    def augment(image, mask):
        # Image and label map are stacked so every geometric transform moves them together.
        stacked = tf.concat([image, tf.cast(mask[..., tf.newaxis], image.dtype)], axis=-1)
        if augmentation.flip_horizontal:
            stacked = tf.cond(tf.random.uniform(()) < 0.5, lambda: tf.reverse(stacked, axis=[1]), lambda: stacked)
        if augmentation.flip_vertical:
            stacked = tf.cond(tf.random.uniform(()) < 0.5, lambda: tf.reverse(stacked, axis=[0]), lambda: stacked)
        if geometric is not None:
            stacked = geometric(stacked, training=True)
        image, mask = stacked[..., :-1], tf.cast(tf.round(stacked[..., -1]), tf.int32)
        if augmentation.intensity > 0:
            # Contrast and brightness jitter in units of the image's own spread, as nnU-Net does for MRI.
            strength = augmentation.intensity
            scale = tf.random.uniform((), 1.0 - strength, 1.0 + strength)
            shift = tf.random.uniform((), -strength, strength) * tf.math.reduce_std(image)
            mean = tf.reduce_mean(image)
            image = (image - mean) * scale + mean + shift
        return image, mask

    return augment


def _samples_dataset(preloaded_dir: Path, subset: Optional[np.ndarray]) -> tuple[tf.data.Dataset, int]:
    paths = shard_paths(preloaded_dir)
    if len(paths) == 1 or subset is not None:
        slices = SliceSet.concatenate([load_shard(path) for path in paths])
        if subset is not None:
            slices = slices.subset(subset)
        dataset = tf.data.Dataset.from_tensor_slices((slices.images, slices.masks.astype(np.int32)))
        return dataset, len(slices)

    first = load_shard(paths[0])
    image_spec = tf.TensorSpec(first.images.shape[1:], tf.float32)
    mask_spec = tf.TensorSpec(first.masks.shape[1:], tf.int32)

    def generate():
        for path in paths:
            shard = load_shard(path)
            for image, mask in zip(shard.images, shard.masks):
                yield image, mask.astype(np.int32)

    count = read_manifest(preloaded_dir).train.num_samples
    return tf.data.Dataset.from_generator(generate, output_signature=(image_spec, mask_spec)), count


def make_dataset(
    preloaded_dir: Path,
    num_classes: int,
    batch_size: int,
    *,
    augmentation=None,
    shuffle: bool = False,
    seed: int = 0,
    subset: Optional[np.ndarray] = None,
) -> tuple[tf.data.Dataset, int]:
    """A batched dataset of (image, one-hot mask) training samples and the number of samples in it.

    ``subset`` selects samples by index (the tune stage's validation split).
    """
    dataset, count = _samples_dataset(Path(preloaded_dir), subset)
    return batch_for_training(dataset, count, num_classes, batch_size, augmentation=augmentation, shuffle=shuffle,
                              seed=seed), count


def batch_for_training(dataset: tf.data.Dataset, count: int, num_classes: int, batch_size: int, *,
                       augmentation=None, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """(image, label map) pairs -> shuffled, augmented batches of (image, one-hot mask), prefetched."""
    if shuffle:
        dataset = dataset.shuffle(min(count, 2048), seed=seed, reshuffle_each_iteration=True)
    if augmentation is not None:
        dataset = dataset.map(make_augmenter(augmentation, seed), num_parallel_calls=AUTOTUNE)
    dataset = dataset.map(lambda image, mask: (image, tf.one_hot(mask, num_classes, dtype=tf.float32)),
                          num_parallel_calls=AUTOTUNE)
    return dataset.batch(batch_size).prefetch(AUTOTUNE)
