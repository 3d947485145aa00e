"""tf.data input pipelines of 3D patches drawn from the preloaded training volumes (``preload.spatial_dims`` 3).

Each epoch draws ``patches_per_epoch`` patches: the volumes in a seeded random order (every volume once
per round), a patch from each, a share ``foreground_fraction`` of them centred on foreground and every patch
augmented (:mod:`segmenter.patches`). An epoch depends on (seed, epoch) alone, through stateless random
ops, so runs repeat exactly and a resumed run continues where it stopped, as in the 2D pipeline
(:mod:`segmenter.data_pipeline`). Patches have one fixed shape, so batching never retraces.

The volumes are held in memory as one flat tensor when they fit in ``IN_MEMORY_BYTES``; larger datasets are
read from their files (``train/<case>.npz``) as each patch needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from segmenter.data_pipeline import AUTOTUNE, _epoch_seed
from segmenter.manifest import read_manifest
from segmenter.patches import foreground_flags, make_patch_sampler

#: Training volumes up to this size in all are kept in memory; above it they are read per patch.
IN_MEMORY_BYTES = 2 * 1024**3


class VolumeSource:
    """The training volumes (those at ``indices``): ``get(index)`` gives (image (D, H, W, C) float32, labels int32)
    as tensors, inside a tf.data map."""

    def __init__(self, preloaded_dir: Path, indices: Optional[Sequence[int]] = None):
        manifest = read_manifest(preloaded_dir)
        files = [Path(preloaded_dir) / name for name in manifest.train.shards]
        shapes = [sample.original_shape for sample in manifest.train.samples]
        if indices is not None:
            files = [files[i] for i in indices]
            shapes = [shapes[i] for i in indices]
        self.files, self.shapes = files, [tuple(int(v) for v in shape) for shape in shapes]
        self.num_channels = len(manifest.channels)
        voxels = sum(int(np.prod(shape)) for shape in self.shapes)
        # float32 channels and int32 labels, held once in NumPy while the tensors are made: twice that at peak.
        self.in_memory = 2 * voxels * 4 * (self.num_channels + 1) <= IN_MEMORY_BYTES
        if self.in_memory:
            images, labels = [], []
            for path in self.files:
                with np.load(path) as data:
                    images.append(data["image"])
                    labels.append(data["labels"])
            self._hold(images, labels)

    @classmethod
    def from_arrays(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> "VolumeSource":
        """A source of volumes already in memory (float32 (D, H, W, C) images, integer label maps)."""
        source = cls.__new__(cls)
        source.files, source.shapes = [None] * len(images), [tuple(label.shape) for label in labels]
        source.num_channels, source.in_memory = images[0].shape[-1], True
        source._hold(images, labels)
        return source

    def _hold(self, images, labels) -> None:
        """Keep the volumes as one flat tensor each for images and labels, with every volume's offset and shape."""
        self._images = tf.constant(np.concatenate([image.reshape(-1, self.num_channels) for image in images]))
        self._labels = tf.constant(np.concatenate([label.reshape(-1) for label in labels]).astype(np.int32))
        self._offsets = tf.constant(np.cumsum([0] + [int(np.prod(s)) for s in self.shapes]), tf.int64)
        self._shapes = tf.constant(np.array(self.shapes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index):
        if self.in_memory:
            start, stop = self._offsets[index], self._offsets[index + 1]
            shape = self._shapes[index]
            image = tf.reshape(self._images[start:stop], tf.concat([shape, [self.num_channels]], axis=0))
            return image, tf.reshape(self._labels[start:stop], shape)
        files = [str(path) for path in self.files]

        def load(i):
            with np.load(files[int(i)]) as data:
                return data["image"].astype(np.float32), data["labels"].astype(np.int32)

        image, labels = tf.numpy_function(load, [index], (tf.float32, tf.int32))
        image.set_shape([None, None, None, self.num_channels])
        labels.set_shape([None, None, None])
        return image, labels


def _epoch_order(num_volumes: int, count: int, epoch_seed) -> tf.Tensor:
    """``count`` volume indices: seeded random permutations of all volumes, one after another."""
    rounds = -(-count // num_volumes)
    keys = tf.random.stateless_uniform([rounds, num_volumes], seed=tf.stack([epoch_seed, tf.constant(-1, tf.int64)]))
    return tf.reshape(tf.argsort(keys, axis=1), [-1])[:count]


def patches_of_epoch(source: VolumeSource, count: int, patch_size: Sequence[int], num_classes: int,
                     batch_size: int, *, augmentation=None, foreground_fraction: float = 1.0 / 3.0, seed: int = 0,
                     epoch=0) -> tf.data.Dataset:
    """Batches of (patch (B, *patch_size, C), one-hot labels (B, *patch_size, K)) of one epoch."""
    epoch_seed = _epoch_seed(seed, epoch)
    order = _epoch_order(len(source), count, epoch_seed)
    flags = tf.constant(foreground_flags(count, foreground_fraction))
    sample = make_patch_sampler(tuple(patch_size), augmentation)

    def patch(i):
        image, labels = source.get(order[i])
        return sample(image, labels, tf.stack([epoch_seed, i]), flags[i])

    return (tf.data.Dataset.range(count)
            .map(patch, num_parallel_calls=AUTOTUNE)
            .map(lambda image, labels: (image, tf.one_hot(labels, num_classes, dtype=tf.float32)),
                 num_parallel_calls=AUTOTUNE)
            .batch(batch_size))


def training_patches(source: VolumeSource, count: int, patch_size: Sequence[int], num_classes: int,
                     batch_size: int, *, first_epoch: int, epochs: int, augmentation=None,
                     foreground_fraction: float = 1.0 / 3.0, seed: int = 0) -> tf.data.Dataset:
    """The batches of epochs ``first_epoch`` .. ``epochs - 1``, for ``model.fit`` with
    ``steps_per_epoch = ceil(count / batch_size)`` and ``initial_epoch = first_epoch``."""
    return tf.data.Dataset.range(first_epoch, epochs).flat_map(
        lambda epoch: patches_of_epoch(source, count, patch_size, num_classes, batch_size,
                                       augmentation=augmentation, foreground_fraction=foreground_fraction,
                                       seed=seed, epoch=epoch)).prefetch(AUTOTUNE)


def validation_patches(source: VolumeSource, patch_size: Sequence[int], num_classes: int, batch_size: int, *,
                       per_volume: int = 2, foreground_fraction: float = 0.5, seed: int = 0) -> tf.data.Dataset:
    """The same patches every epoch (no augmentation, half of them on foreground), computed once and cached."""
    count = per_volume * len(source)
    return patches_of_epoch(source, count, patch_size, num_classes, batch_size, augmentation=None,
                            foreground_fraction=foreground_fraction, seed=seed + 1, epoch=0).cache()


def patch_datasets(preloaded_dir: Path, patch_size: Sequence[int], num_classes: int, train, train_indices,
                   validation_indices, *, seed: int, first_epoch: int, epochs: int):
    """What the train and tune stages fit on: (training batches of epochs ``first_epoch`` .. ``epochs - 1``,
    patches per epoch, batches of the fixed validation patches or None, training volumes, validation volumes
    or None), with the settings of ``train`` (a resolved TrainConfig: batch size set)."""
    source = VolumeSource(preloaded_dir, train_indices)
    count = train.patches_per_epoch or len(source)
    dataset = training_patches(source, count, patch_size, num_classes, train.batch_size, first_epoch=first_epoch,
                               epochs=epochs, augmentation=train.augmentation.volume,
                               foreground_fraction=train.foreground_fraction, seed=seed)
    held_out = validation = None
    if validation_indices is not None:
        held_out = VolumeSource(preloaded_dir, validation_indices)
        validation = validation_patches(held_out, patch_size, num_classes, train.batch_size, seed=seed)
    return dataset, count, validation, source, held_out
