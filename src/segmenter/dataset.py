"""The training samples of a preloaded dataset: 2D slices with their masks, stored as NumPy ``.npz`` shards.

The manifest (:mod:`segmenter.manifest`) lists the shards (``train.npz``, or ``train-00000.npz``, ... when
the split exceeds ``preload.shard_size``). Every shard holds parallel arrays, one entry per sample (row,
column order as in scikit-image)::

    images       float32 (N, H, W, C)  normalised intensities, one channel per preload.channels
    masks        uint8   (N, H, W)     class indices 0..num_classes-1
    ids          str     (N,)          unique sample id: the case id, or "<case>_s<index:04d>" for slices of volumes
    case_ids     str     (N,)          the case a sample was cut from
    slice_index  int32   (N,)          index along the slicing axis, -1 for 2D cases
    spacing      float32 (N, 2)        pixel spacing in mm (row, column) after resizing; NaN when unknown
    hu_images    float32 (N, H, W)     the first channel's intensities before normalisation (HU for CT), resized

The test split is not here: it holds whole cases at their original geometry (see :mod:`segmenter.layout`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from segmenter.manifest import read_manifest

ARRAY_FIELDS = ("images", "masks", "ids", "case_ids", "slice_index", "spacing", "hu_images")


@dataclasses.dataclass
class SliceSet:
    """A batch of training samples and their provenance (see module docstring for shapes)."""

    images: np.ndarray
    masks: Optional[np.ndarray]
    ids: np.ndarray
    case_ids: np.ndarray
    slice_index: np.ndarray
    spacing: np.ndarray
    # The first channel before normalisation (e.g. Hounsfield units), resized like ``images``: the search
    # of CT windows (tune) recomputes images from it.
    hu_images: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for name in ARRAY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        return arrays

    @classmethod
    def concatenate(cls, parts: list["SliceSet"]) -> "SliceSet":
        if not parts:
            raise ValueError("no slices to concatenate")
        fields = {}
        for name in ARRAY_FIELDS:
            values = [getattr(part, name) for part in parts]
            fields[name] = None if any(v is None for v in values) else np.concatenate(values)
        return cls(**fields)

    def subset(self, indices) -> "SliceSet":
        indices = np.asarray(indices)
        return SliceSet(
            **{name: (None if getattr(self, name) is None else getattr(self, name)[indices]) for name in ARRAY_FIELDS}
        )


def load_shard(path: Path) -> SliceSet:
    with np.load(path, allow_pickle=False) as data:
        fields = {name: (data[name] if name in data.files else None) for name in ARRAY_FIELDS}
    return SliceSet(**fields)


def shard_paths(preloaded_dir: Path) -> list[Path]:
    return [Path(preloaded_dir) / name for name in read_manifest(preloaded_dir).train.shards]


def load_training_samples(preloaded_dir: Path) -> SliceSet:
    """Load every training sample into memory."""
    return SliceSet.concatenate([load_shard(path) for path in shard_paths(preloaded_dir)])
