"""Read and prepare one case: a pure function of its files and the config, run in a worker process.

A case is read once: its channels (channels last), its label map remapped to class indices on the image's
grid, its properties (:class:`segmenter.manifest.CaseRecord`). A training case gives its training samples
(2D slices at ``preload.image_size``, normalised per channel; the filters apply here); a test case is
written whole, at its original geometry, for predict and evaluate (see :mod:`segmenter.preload.store`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from scipy import ndimage

from segmenter import io
from segmenter.config import Config
from segmenter.errors import InputError
from segmenter.io.writers import output_suffix
from segmenter.manifest import CaseRecord
from segmenter.preload.discovery import CaseFiles
from segmenter.preprocessing import prepare_image, resize_mask, resized_spacing

# Source labels up to this value are remapped through a lookup table (see remap_labels).
_MAX_TABLE_LABEL = 65535
# Label maps whose lowest and highest labels differ by at most this are scanned once per label, not histogrammed.
_FEW_LABELS = 8


@dataclasses.dataclass
class LoadedCase:
    """A case in memory: raw intensities with channels last, class indices, geometry."""

    case_id: str
    image: np.ndarray  # (*spatial, channels) float32, before normalisation
    mask: np.ndarray  # (*spatial) uint8 class indices
    spacing: Optional[tuple[float, ...]]
    affine: Optional[np.ndarray]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.mask.shape


def _distinct_labels(mask: np.ndarray, low: int, high: int) -> np.ndarray:
    """The sorted distinct values of an integer ``mask`` whose minimum is ``low`` and maximum ``high``."""
    if high - low <= _FEW_LABELS:
        # The minimum and maximum are present; one comparison pass per value between is cheaper than a histogram.
        return np.array([value for value in range(low, high + 1)
                         if value in (low, high) or (mask == value).any()])
    if 0 <= low and high <= _MAX_TABLE_LABEL:
        return np.flatnonzero(np.bincount(mask.ravel()))  # several times faster than np.unique
    return np.unique(mask)


def remap_labels(mask: np.ndarray, label_map: dict, unmapped: str, num_classes: int, path: Path) -> np.ndarray:
    """Apply ``label_map`` (source label -> class index) and check every label is a configured class."""
    low, high = int(mask.min()), int(mask.max())
    small_labels = 0 <= low and high <= _MAX_TABLE_LABEL
    values = _distinct_labels(mask, low, high)
    lookup = {int(v): int(v) for v in values}
    lookup.update({int(k): int(v) for k, v in label_map.items() if int(k) in lookup})
    if unmapped == "background":
        lookup = {value: (label_map[value] if value in label_map else 0) for value in lookup}
    outside = sorted(source for source, target in lookup.items() if not 0 <= target < num_classes)
    if outside:
        raise InputError(path, f"mask has labels {outside} outside the configured classes 0..{num_classes - 1} "
                               "(map them with preload.label_map)")
    if all(source == target for source, target in lookup.items()):
        return mask.astype(np.uint8)  # Nothing to remap (the labels are checked class indices above).
    if small_labels:
        # One pass through a lookup table instead of one comparison pass per label.
        table = np.zeros(int(values[-1]) + 1, dtype=np.uint8)
        for source, target in lookup.items():
            table[source] = target
        return table[mask]
    remapped = np.zeros(mask.shape, dtype=np.uint8)
    for source, target in lookup.items():
        if target:
            remapped[mask == source] = target
    return remapped


def labels_present(mask: np.ndarray) -> set[int]:
    """The labels of a remapped (uint8) mask."""
    return set(_distinct_labels(mask, int(mask.min()), int(mask.max())).tolist())


def read_case(case: CaseFiles, config: Config) -> LoadedCase:
    """The case's channels and its label map remapped to class indices, on the image's grid."""
    settings = config.preload
    image = io.read_channels(list(case.image_paths))
    spatial = image.array if len(case.image_paths) == 1 else image.array[..., 0]
    if spatial.ndim not in (2, 3):
        raise InputError(case.image_paths[0], f"expected a 2D image or 3D volume, got shape {spatial.shape}")
    reference = io.LoadedImage(spatial, image.spacing, image.affine, image.source)
    mask = io.read_mask(case.mask_path, reference=reference)  # on the image grid, or InputError
    spacing = image.spacing
    if spacing is None and settings.pixel_spacing is not None and spatial.ndim == 2:
        spacing = tuple(settings.pixel_spacing)
    labels = remap_labels(mask.array, settings.label_map, settings.unmapped_labels, config.num_classes,
                          case.mask_path)
    channels = np.asarray(image.array, dtype=np.float32).reshape(*spatial.shape, len(case.image_paths))
    return LoadedCase(case.case_id, channels, labels, spacing, image.affine)


def case_record(case: CaseFiles, loaded: LoadedCase, slab: Optional[tuple[int, int]] = None) -> CaseRecord:
    """The manifest's record of a case: provenance, geometry, the labels present and where each class lies."""
    mask = loaded.mask
    highest = int(mask.max())
    if highest <= _FEW_LABELS:
        # Few classes: one comparison pass each gives a class's voxel count, and its box through the
        # selection's projections on the axes; much cheaper than a histogram and a pass over the foreground.
        class_voxels, boxes = {}, {}
        other_axes = [tuple(other for other in range(mask.ndim) if other != axis) for axis in range(mask.ndim)]
        for label in range(1, highest + 1):
            selected = mask == label
            count = np.count_nonzero(selected)
            if count:
                class_voxels[label] = count
                boxes[label] = [_extent(selected.any(axis=axes)) for axes in other_axes]
        present = ([0] if mask.size > sum(class_voxels.values()) else []) + list(class_voxels)
    else:
        counts = np.bincount(mask.ravel())
        present = np.flatnonzero(counts).tolist()
        class_voxels = {label: int(counts[label]) for label in present if label}
        # One pass for the boxes of all classes.
        objects = ndimage.find_objects(mask)
        boxes = {label: [[box.start, box.stop - 1] for box in objects[label - 1]] for label in class_voxels}
    return CaseRecord(
        id=loaded.case_id, group=case.group_id, images=[str(path) for path in case.image_paths],
        mask=str(case.mask_path), shape=list(loaded.spatial_shape),
        spacing=None if loaded.spacing is None else [float(value) for value in loaded.spacing],
        affine=None if loaded.affine is None else np.asarray(loaded.affine, dtype=float).tolist(),
        labels=present, class_voxels=class_voxels, class_boxes=boxes, slab=None if slab is None else list(slab),
        output_suffix=output_suffix(case.image_paths[0], loaded.mask.ndim),
    )


def _extent(projection: np.ndarray) -> list[int]:
    """[first, last] index where a boolean projection is true (it has a true element)."""
    indices = np.flatnonzero(projection)
    return [int(indices[0]), int(indices[-1])]


def cut_slab(loaded: LoadedCase, slab: tuple[int, int], axis: int) -> LoadedCase:
    """The sub-volume [first, stop) along ``axis``, with its affine moved to the slab's first voxel."""
    if loaded.mask.ndim != 3:
        raise InputError(None, f"case {loaded.case_id} is a single 2D image: nothing to split into train and test")
    first, stop = slab
    index = [slice(None)] * 3
    index[axis] = slice(first, stop)
    affine = None
    if loaded.affine is not None:
        shift = np.eye(4)
        shift[axis, 3] = first
        affine = np.asarray(loaded.affine) @ shift
    return LoadedCase(f"{loaded.case_id}_slab{first:04d}-{stop - 1:04d}", loaded.image[tuple(index)],
                      loaded.mask[tuple(index)], loaded.spacing, affine)


def slices_of(loaded: LoadedCase, axis: int, skip: Optional[tuple[int, int]] = None) -> Iterator[tuple]:
    """(slice_index, image2d (H, W, C), mask2d, spacing2d) of a 2D case, or of each slice of a 3D case.

    ``skip``: [first, stop) of slices left out (a single volume's test slab).
    """
    if loaded.mask.ndim == 2:
        yield -1, loaded.image, loaded.mask, loaded.spacing
        return
    in_plane = [a for a in range(3) if a != axis]
    spacing2d = tuple(loaded.spacing[a] for a in in_plane) if loaded.spacing is not None else None
    for index in range(loaded.mask.shape[axis]):
        if skip is not None and skip[0] <= index < skip[1]:
            continue
        yield index, np.take(loaded.image, index, axis=axis), np.take(loaded.mask, index, axis=axis), spacing2d


def sample_id(case_id: str, slice_index: int) -> str:
    return case_id if slice_index < 0 else f"{case_id}_s{slice_index:04d}"


def training_samples(loaded: LoadedCase, config: Config, skip: Optional[tuple[int, int]] = None) -> list[dict]:
    """The case's training samples that pass the filters: a record each, arrays included.

    ``keep_empty_slices`` and ``require_labels`` filter training samples only; they look at the stored
    (resized) mask, since shrinking can lose a structure of a few pixels and a slice kept for it would then
    be all background.
    """
    settings = config.preload
    shape = tuple(settings.image_size)
    normalizations = settings.channel_normalizations()
    samples = []
    for slice_index, image2d, mask2d, spacing in slices_of(loaded, settings.slice_axis, skip):
        resized_mask = resize_mask(mask2d, shape)
        present = labels_present(resized_mask)
        if settings.require_labels and not set(settings.require_labels) <= present:
            continue
        if not settings.keep_empty_slices and present == {0}:
            continue
        raw, normalised = prepare_image(image2d, normalizations, shape)
        samples.append({
            "id": sample_id(loaded.case_id, slice_index),
            "case": loaded.case_id,
            "slice_index": slice_index,
            "labels": sorted(int(v) for v in present),
            "original_shape": list(mask2d.shape),
            "spacing": list(resized_spacing(spacing, mask2d.shape, shape)) if spacing else None,
            "image": normalised,
            "hu_image": raw[..., 0],
            "mask": resized_mask,
        })
    return samples


# ----------------------------------------------------------------------------------------------------
# 3D (preload.spatial_dims 3): what the plan needs of each training case, and its prepared volume
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaseSurvey:
    """What planning a 3D dataset needs of one training case."""

    case_id: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]  # after the crop to the non-zero box, when that is on
    #: Per channel: up to 10,000 foreground intensities (for nnunet_ct normalisation), else None.
    foreground_samples: list[Optional[np.ndarray]]


def check_volume(loaded: LoadedCase) -> None:
    if loaded.mask.ndim != 3:
        raise InputError(None, f"case {loaded.case_id} is a 2D image of shape {loaded.mask.shape}; "
                               "preload.spatial_dims 3 needs volumes")


def survey_case(loaded: LoadedCase, config: Config) -> CaseSurvey:
    """Spacing, (cropped) shape and foreground intensity samples of a 3D training case."""
    from segmenter.preprocessing import normalization, resample
    from segmenter.volumes import spacing_or_unit

    check_volume(loaded)
    shape = loaded.mask.shape
    if config.preload.crop_to_nonzero:
        shape = tuple(s.stop - s.start for s in resample.nonzero_box(loaded.image))
    samples = []
    for channel, settings in enumerate(config.preload.channel_normalizations()):
        if settings.method != "nnunet_ct":
            samples.append(None)
            continue
        # Seeded per case and channel, so the statistics do not depend on which worker ran the case.
        key = f"{config.seed}/{loaded.case_id}/{channel}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
        samples.append(normalization.foreground_intensity_sample(loaded.image[..., channel], loaded.mask, seed))
    return CaseSurvey(loaded.case_id, spacing_or_unit(loaded.spacing), tuple(int(v) for v in shape), samples)


def training_volume(loaded: LoadedCase, config: Config, plan) -> tuple[np.ndarray, np.ndarray]:
    """A 3D training case prepared as predict prepares a volume: (image (*resampled, C), label map)."""
    from segmenter.volumes import prepare_volume

    check_volume(loaded)
    image, labels, _ = prepare_volume(loaded.image, loaded.spacing, plan, config.preload.channel_normalizations(),
                                      labels=loaded.mask, num_classes=config.num_classes)
    return image, labels
