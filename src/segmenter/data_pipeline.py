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

from segmenter.dataset import SliceSet, load_shard, shard_paths
from segmenter.manifest import read_manifest

AUTOTUNE = tf.data.AUTOTUNE


def _geometric_transform(augmentation, seed, height: int, width: int):
    """A random rotation and zoom about the centre as ImageProjectiveTransformV3's 8 numbers, or None.

    Drawn with stateless random ops from ``seed`` (shape [2]), so the same seed gives the same transform.
    """
    if augmentation.rotation_degrees <= 0 and augmentation.zoom <= 0:
        return None
    angle_seed, zoom_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    limit = augmentation.rotation_degrees * np.pi / 180.0
    angle = tf.random.stateless_uniform((), angle_seed, -limit, limit) if limit > 0 else tf.constant(0.0)
    zoom = augmentation.zoom
    # Output pixel (x, y) samples the input at scale * R(angle) (x - c) + c: scale > 1 zooms out.
    scale = tf.random.stateless_uniform((), zoom_seed, 1.0 - zoom, 1.0 + zoom) if zoom > 0 else tf.constant(1.0)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a0, a1 = scale * tf.cos(angle), -scale * tf.sin(angle)
    b0, b1 = scale * tf.sin(angle), scale * tf.cos(angle)
    return tf.stack([a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, 0.0, 0.0])


def make_augmenter(augmentation, seed: int = 0):
    """Return a function (image, mask, element_seed) -> (image, mask) applying the configured augmentations.

    Every random draw is stateless, from ``element_seed`` (an int64 tensor of shape [2]): the same seed
    gives the same augmented sample, whatever thread or process computes it. ``seed`` is unused (kept for
    callers that pass it); see :func:`element_seeds` for how the per-sample seeds are made.
    """

    def augment(image, mask, element_seed):
        seeds = tf.unstack(tf.random.experimental.stateless_split(element_seed, 6))
        # Image and label map are stacked so every geometric transform moves them together.
        stacked = tf.concat([image, tf.cast(mask[..., tf.newaxis], image.dtype)], axis=-1)
        if augmentation.flip_horizontal:
            stacked = tf.cond(tf.random.stateless_uniform((), seeds[0]) < 0.5,
                              lambda: tf.reverse(stacked, axis=[1]), lambda: stacked)
        if augmentation.flip_vertical:
            stacked = tf.cond(tf.random.stateless_uniform((), seeds[1]) < 0.5,
                              lambda: tf.reverse(stacked, axis=[0]), lambda: stacked)
        shape = tf.shape(stacked)
        transform = _geometric_transform(augmentation, seeds[2], tf.cast(shape[0], tf.float32),
                                         tf.cast(shape[1], tf.float32))
        if transform is not None:
            # Nearest-neighbour sampling for image and mask alike (no new labels), zeros outside.
            stacked = tf.raw_ops.ImageProjectiveTransformV3(
                images=stacked[tf.newaxis], transforms=transform[tf.newaxis], output_shape=shape[:2],
                fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")[0]
        image, mask = stacked[..., :-1], tf.cast(tf.round(stacked[..., -1]), tf.int32)
        if augmentation.intensity > 0:
            # Contrast and brightness jitter in units of the image's own spread, as nnU-Net does for MRI.
            strength = augmentation.intensity
            scale = tf.random.stateless_uniform((), seeds[3], 1.0 - strength, 1.0 + strength)
            shift = tf.random.stateless_uniform((), seeds[4], -strength, strength) * tf.math.reduce_std(image)
            mean = tf.reduce_mean(image)
            image = (image - mean) * scale + mean + shift
        return image, mask

    return augment


def _epoch_seed(seed: int, epoch) -> tf.Tensor:
    """One int64 number per (config seed, epoch): the shuffle seed and first half of the element seeds."""
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def _shuffled(dataset: tf.data.Dataset, buffer_size: int, seed) -> tf.data.Dataset:
    """``dataset`` shuffled once, in an order set by the int64 tensor ``seed`` alone, whatever the global seed.

    TensorFlow pairs an op's seed with the global one and compares the pair to (0, 0) in Python: with a
    tensor seed and ``tf.random.set_seed(0)`` (``seed: 0`` in a config) that comparison fails while tracing.
    So the shuffle is always traced (inside ``flat_map``) in a graph whose global seed is cleared: the same
    order in eager and graph code, for every config seed.
    """
    def shuffle(op_seed):
        graph = tf.compat.v1.get_default_graph()
        global_seed, graph.seed = graph.seed, None
        try:
            return dataset.shuffle(buffer_size, seed=op_seed, reshuffle_each_iteration=False)
        finally:
            graph.seed = global_seed

    return tf.data.Dataset.from_tensors(tf.cast(seed, tf.int64)).flat_map(shuffle)


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
                       augmentation=None, shuffle: bool = False, seed: int = 0, epoch=None) -> tf.data.Dataset:
    """(image, label map) pairs -> shuffled, augmented batches of (image, one-hot mask), prefetched.

    ``epoch`` None: one dataset for every epoch; each pass (iteration) reshuffles and draws new
    augmentations, reproducibly for a given ``seed`` within a process. ``epoch`` given (an int or a scalar
    tensor): the batches of that epoch alone, a function of (seed, epoch) only; see :func:`epochs_dataset`.
    """
    if epoch is None:
        if shuffle:
            dataset = dataset.shuffle(min(count, 2048), seed=seed, reshuffle_each_iteration=True)
        if augmentation is not None:
            # Per-element stateless seeds from a seeded random stream that changes with every pass.
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            dataset = tf.data.Dataset.zip(dataset, seeds).map(
                lambda pair, element_seed: make_augmenter(augmentation)(*pair, element_seed),
                num_parallel_calls=AUTOTUNE)
    else:
        epoch_seed = _epoch_seed(seed, epoch)
        if shuffle:
            dataset = _shuffled(dataset, min(count, 2048), epoch_seed)
        if augmentation is not None:
            augment = make_augmenter(augmentation)
            dataset = dataset.enumerate().map(
                lambda index, pair: augment(*pair, tf.stack([epoch_seed, tf.cast(index, tf.int64)])),
                num_parallel_calls=AUTOTUNE)
    dataset = dataset.map(lambda image, mask: (image, tf.one_hot(mask, num_classes, dtype=tf.float32)),
                          num_parallel_calls=AUTOTUNE)
    return dataset.batch(batch_size).prefetch(AUTOTUNE) if epoch is None else dataset.batch(batch_size)


def epochs_dataset(dataset: tf.data.Dataset, count: int, num_classes: int, batch_size: int, *, first_epoch: int,
                   epochs: int, augmentation=None, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """The batches of epochs ``first_epoch`` .. ``epochs - 1`` one after another, for ``model.fit`` with
    ``steps_per_epoch = ceil(count / batch_size)`` and ``initial_epoch = first_epoch``.

    Each epoch's order and augmentations depend only on (seed, epoch), so a run resumed at epoch k sees
    exactly the batches an uninterrupted run sees from epoch k on.
    """
    return tf.data.Dataset.range(first_epoch, epochs).flat_map(
        lambda epoch: batch_for_training(dataset, count, num_classes, batch_size, augmentation=augmentation,
                                         shuffle=shuffle, seed=seed, epoch=epoch)).prefetch(AUTOTUNE)


def samples_dataset(preloaded_dir: Path, subset: Optional[np.ndarray] = None) -> tuple[tf.data.Dataset, int]:
    """Unbatched (image, label map) training samples (those at ``subset``'s indices) and their number."""
    return _samples_dataset(Path(preloaded_dir), subset)
