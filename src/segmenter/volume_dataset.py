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
from segmenter.volumes import class_locations

#: Training volumes up to this size in all are kept in memory; above it they are read per patch.
IN_MEMORY_BYTES = 2 * 1024**3


def _class_locations(data, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A training volume's class locations: as preload stored them in its file (``data``), else found now."""
    if "locations" in data:
        return data["locations"].astype(np.int32), data["location_counts"].astype(np.int32)
    return class_locations(labels, num_classes, seed=0)


class VolumeSource:
    """The training volumes (those at ``indices``): ``get(index)`` gives (image (D, H, W, C) float32, labels int32,
    class locations int32 (M, 3), their counts per foreground class int32 (K - 1,)) as tensors, inside a tf.data
    map (see :func:`segmenter.volumes.class_locations`)."""

    def __init__(self, preloaded_dir: Path, indices: Optional[Sequence[int]] = None):
        manifest = read_manifest(preloaded_dir)
        files = [Path(preloaded_dir) / name for name in manifest.train.shards]
        shapes = [sample.original_shape for sample in manifest.train.samples]
        if indices is not None:
            files = [files[i] for i in indices]
            shapes = [shapes[i] for i in indices]
        self.files, self.shapes = files, [tuple(int(v) for v in shape) for shape in shapes]
        self.num_channels, self.num_classes = len(manifest.channels), len(manifest.classes)
        voxels = sum(int(np.prod(shape)) for shape in self.shapes)
        # float32 channels and int32 labels, held once in NumPy while the tensors are made: twice that at peak.
        self.in_memory = 2 * voxels * 4 * (self.num_channels + 1) <= IN_MEMORY_BYTES
        if self.in_memory:
            images, labels, locations = [], [], []
            for path in self.files:
                with np.load(path) as data:
                    images.append(data["image"])
                    labels.append(data["labels"])
                    locations.append(_class_locations(data, labels[-1], self.num_classes))
            self._hold(images, labels, locations)

    @classmethod
    def from_arrays(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    num_classes: Optional[int] = None) -> "VolumeSource":
        """A source of volumes already in memory (float32 (D, H, W, C) images, integer label maps; the classes
        are 0 .. the largest label unless ``num_classes`` says more)."""
        source = cls.__new__(cls)
        source.files, source.shapes = [None] * len(images), [tuple(label.shape) for label in labels]
        source.num_channels, source.in_memory = images[0].shape[-1], True
        source.num_classes = num_classes or int(max(label.max() for label in labels)) + 1
        source._hold(images, labels, [class_locations(label, source.num_classes, seed=0) for label in labels])
        return source

    def _hold(self, images, labels, locations) -> None:
        """Keep the volumes as one flat tensor each for images, labels and class locations, with every volume's
        offsets, shape and counts of locations per class."""
        self._images = tf.constant(np.concatenate([image.reshape(-1, self.num_channels) for image in images]))
        self._labels = tf.constant(np.concatenate([label.reshape(-1) for label in labels]).astype(np.int32))
        self._offsets = tf.constant(np.cumsum([0] + [int(np.prod(s)) for s in self.shapes]), tf.int64)
        self._shapes = tf.constant(np.array(self.shapes, dtype=np.int64))
        self._locations = tf.constant(np.concatenate([voxels for voxels, _ in locations]).reshape(-1, 3))
        self._location_offsets = tf.constant(np.cumsum([0] + [len(voxels) for voxels, _ in locations]), tf.int64)
        self._location_counts = tf.constant(np.stack([counts for _, counts in locations]).reshape(len(locations), -1))

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index):
        if self.in_memory:
            start, stop = self._offsets[index], self._offsets[index + 1]
            shape = self._shapes[index]
            image = tf.reshape(self._images[start:stop], tf.concat([shape, [self.num_channels]], axis=0))
            first, last = self._location_offsets[index], self._location_offsets[index + 1]
            return (image, tf.reshape(self._labels[start:stop], shape), self._locations[first:last],
                    self._location_counts[index])
        files, num_classes = [str(path) for path in self.files], self.num_classes

        def load(i):
            with np.load(files[int(i)]) as data:
                labels = data["labels"].astype(np.int32)
                return (data["image"].astype(np.float32), labels, *_class_locations(data, labels, num_classes))

        image, labels, locations, counts = tf.numpy_function(load, [index], (tf.float32, tf.int32, tf.int32, tf.int32))
        image.set_shape([None, None, None, self.num_channels])
        labels.set_shape([None, None, None])
        locations.set_shape([None, 3])
        counts.set_shape([self.num_classes - 1])
        return image, labels, locations, counts


def _epoch_order(num_volumes: int, count: int, epoch_seed) -> tf.Tensor:
    """``count`` volume indices: seeded random permutations of all volumes, one after another."""
    rounds = -(-count // num_volumes)
    keys = tf.random.stateless_uniform([rounds, num_volumes], seed=tf.stack([epoch_seed, tf.constant(-1, tf.int64)]))
    return tf.reshape(tf.argsort(keys, axis=1), [-1])[:count]


def patches_of_epoch(source: VolumeSource, count: int, patch_size: Sequence[int], num_classes: int,
                     batch_size: int, *, augmentation=None, foreground_fraction: float = 1.0 / 3.0, seed: int = 0,
                     epoch=0, positions: bool = False) -> tf.data.Dataset:
    """Batches of (patch (B, *patch_size, C), one-hot labels (B, *patch_size, K)) of one epoch; with
    ``positions`` the patches have 3 more channels, where their voxels lie in their volume (C + 3)."""
    epoch_seed = _epoch_seed(seed, epoch)
    order = _epoch_order(len(source), count, epoch_seed)
    flags = tf.constant(foreground_flags(count, foreground_fraction))
    sample = make_patch_sampler(tuple(patch_size), augmentation, positions=positions)

    def patch(i):
        image, labels, locations, counts = source.get(order[i])
        return sample(image, labels, tf.stack([epoch_seed, i]), flags[i], locations, counts)

    return (tf.data.Dataset.range(count)
            .map(patch, num_parallel_calls=AUTOTUNE)
            .map(lambda image, labels: (image, tf.one_hot(labels, num_classes, dtype=tf.float32)),
                 num_parallel_calls=AUTOTUNE)
            .batch(batch_size))


def training_patches(source: VolumeSource, count: int, patch_size: Sequence[int], num_classes: int,
                     batch_size: int, *, first_epoch: int, epochs: int, augmentation=None,
                     foreground_fraction: float = 1.0 / 3.0, seed: int = 0, positions: bool = False) -> tf.data.Dataset:
    """The batches of epochs ``first_epoch`` .. ``epochs - 1``, for ``model.fit`` with
    ``steps_per_epoch = ceil(count / batch_size)`` and ``initial_epoch = first_epoch``."""
    return tf.data.Dataset.range(first_epoch, epochs).flat_map(
        lambda epoch: patches_of_epoch(source, count, patch_size, num_classes, batch_size,
                                       augmentation=augmentation, foreground_fraction=foreground_fraction,
                                       seed=seed, epoch=epoch, positions=positions)).prefetch(AUTOTUNE)


def validation_patches(source: VolumeSource, patch_size: Sequence[int], num_classes: int, batch_size: int, *,
                       per_volume: int = 2, foreground_fraction: float = 0.5, seed: int = 0,
                       positions: bool = False) -> tf.data.Dataset:
    """The same patches every epoch (no augmentation, half of them on foreground), computed once and cached."""
    count = per_volume * len(source)
    return patches_of_epoch(source, count, patch_size, num_classes, batch_size, augmentation=None,
                            foreground_fraction=foreground_fraction, seed=seed + 1, epoch=0,
                            positions=positions).cache()


def patch_datasets(preloaded_dir: Path, patch_size: Sequence[int], num_classes: int, train, train_indices,
                   validation_indices, *, seed: int, first_epoch: int, epochs: int):
    """What the train and tune stages fit on: (training batches of epochs ``first_epoch`` .. ``epochs - 1``,
    patches per epoch, batches of the fixed validation patches or None, training volumes, validation volumes
    or None), with the settings of ``train`` (a resolved TrainConfig: batch size set). A position-conditioned
    model (``train.model.position_conditioning``) gets the patches' positions as 3 more channels."""
    source = VolumeSource(preloaded_dir, train_indices)
    count = train.patches_per_epoch or len(source)
    positions = train.model.position_conditioning
    dataset = training_patches(source, count, patch_size, num_classes, train.batch_size, first_epoch=first_epoch,
                               epochs=epochs, augmentation=train.augmentation.volume,
                               foreground_fraction=train.foreground_fraction, seed=seed, positions=positions)
    held_out = validation = None
    if validation_indices is not None:
        held_out = VolumeSource(preloaded_dir, validation_indices)
        validation = validation_patches(held_out, patch_size, num_classes, train.batch_size, seed=seed,
                                        positions=positions)
    return dataset, count, validation, source, held_out
