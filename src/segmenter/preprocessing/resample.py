"""Volume geometry for the 3D pipeline: resampling to a target spacing, cropping to the non-zero box, and
the voxel-to-mm affines that go with both. NumPy and SciPy only.

Conventions. Images are ``(*spatial, channels)`` float arrays, label maps ``(*spatial)`` integer arrays;
a trailing channel axis is optional for images (it is recognised by the number of spatial axes the caller
names). ``spacing`` is mm per array axis. ``affine`` is the ``(n + 1) x (n + 1)`` matrix (4 x 4 in 3D) taking
a voxel index ``(i, j, k, 1)`` to its centre's position in mm; every function that transforms the grid has an
``*_affine`` partner, and ``None`` affines stay ``None``.

The choices follow nnU-Net (Isensee et al. 2021, ``preprocessing/resampling`` and ``cropping``):

* Images are resampled with third-order splines (``order=3``): smooth, sharper than linear interpolation.
* Segmentations are resampled one class at a time: each class's one-hot mask is interpolated linearly
  (``order=1``) and every voxel takes the class with the largest interpolated value. Nearest-neighbour
  resampling of label maps makes staircases and can drop thin structures; interpolating the masks keeps
  boundaries smooth and never invents a label (only classes present can win). nnU-Net thresholds each mask
  at 0.5, later classes overwriting earlier ones; the argmax used here is the same where one class
  dominates and gives every voxel a label where none reaches 0.5.
* Volumes are cropped to the bounding box of their non-zero voxels first (MRI background, the zero padding
  of skull-stripped brains): less to resample and to sample patches from, and the statistics of a
  normalisation do not see the padding. For CT (air is -1000, not 0) the box is usually the whole volume.
  nnU-Net fills holes in the non-zero mask first, which does not change its bounding box.

The grid. All resampling uses ``scipy.ndimage.zoom(..., grid_mode=True)``: a volume is a grid of voxels
with extent, old and new grids cover the same physical box (the outer faces of the corner voxels stay where
they are), and new voxel ``j``'s centre lies at old index ``(j + 0.5) * old / new - 0.5`` per axis.
:func:`resampled_affine` is that map. ``mode="nearest"`` extends the border voxels outwards for the
interpolation near the faces; a zero (``"grid-constant"``) border would darken the outermost voxels.

Strongly anisotropic volumes (one axis's spacing more than ``anisotropy_threshold`` times the finest, 3 by
default: thick slices) are resampled as nnU-Net does (``get_do_separate_z``, ``order_z=0``): in-plane
with the usual interpolation, slice by slice, then along the coarse axis with nearest neighbours. Splines
across slices 3-10 mm apart invent intensities and smear structures between slices that may not
continue; whole slices repeated or dropped do not. :func:`separate_axis` decides, from the volume's
spacing first and the target's second, as nnU-Net does; :func:`resample_image` and
:func:`resample_labels` take its answer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "box_from_json",
    "box_to_json",
    "crop",
    "cropped_affine",
    "nonzero_box",
    "resample_image",
    "resample_labels",
    "resample_probabilities",
    "resampled_affine",
    "resampled_shape",
    "separate_axis",
    "uncrop",
]

Box = tuple[slice, ...]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """The grid size after resampling ``shape`` from ``spacing`` to ``target_spacing`` (mm per axis).

    ``round(shape * spacing / target)`` per axis, at least 1: the physical extent is kept as closely as
    whole voxels allow.
    """
    if not len(shape) == len(spacing) == len(target_spacing):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target_spacing "
                         f"{tuple(target_spacing)} must have one entry per spatial axis")
    if any(float(s) <= 0 for s in spacing) or any(float(t) <= 0 for t in target_spacing):
        raise ValueError(f"spacings must be positive, got {tuple(spacing)} and {tuple(target_spacing)}")
    return tuple(max(1, int(np.round(int(n) * float(s) / float(t))))
                 for n, s, t in zip(shape, spacing, target_spacing))


def separate_axis(spacing: Sequence[float], target_spacing: Sequence[float],
                  anisotropy_threshold: Optional[float]) -> Optional[int]:
    """The axis to resample on its own with nearest neighbours, or None to interpolate all axes alike.

    As nnU-Net: the volume's spacing is anisotropic when its largest value is more than
    ``anisotropy_threshold`` times its smallest; then its coarsest axis is the one, else the target
    spacing's when that is anisotropic. No axis when two axes tie for the coarsest (nnU-Net's rule: no single
    slice direction), or when ``anisotropy_threshold`` is None.
    """
    if anisotropy_threshold is None:
        return None
    for candidate in (spacing, target_spacing):
        values = np.asarray(candidate, dtype=np.float64)
        if values.max() / values.min() > anisotropy_threshold:
            coarsest = np.flatnonzero(values == values.max())
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def _check_shape(new_shape: Sequence[int]) -> tuple[int, ...]:
    new_shape = tuple(int(n) for n in new_shape)
    if any(n < 1 for n in new_shape):
        raise ValueError(f"new_shape must be positive, got {new_shape}")
    return new_shape


def _zoom(array: np.ndarray, new_shape: tuple[int, ...], order: int, separate: Optional[int] = None) -> np.ndarray:
    """``array`` (exactly ``len(new_shape)`` axes) zoomed onto ``new_shape`` on the grid-mode grid; with
    ``separate``, that axis afterwards and on its own, with nearest neighbours."""
    if separate is not None and new_shape[separate] != array.shape[separate]:
        in_plane = tuple(array.shape[axis] if axis == separate else size for axis, size in enumerate(new_shape))
        return _zoom(_zoom(array, in_plane, order), new_shape, order=0)
    if tuple(array.shape) == new_shape:
        return array
    # zoom derives the output shape as round(shape * factor) and, with grid_mode, the coordinate map from
    # the two shapes, so the factor need not be exact: new / old rounds back to new_shape.
    factors = [new / old for new, old in zip(new_shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape == new_shape, (out.shape, new_shape)
    return out


def _split_channels(array: np.ndarray, new_shape: tuple[int, ...], what: str) -> bool:
    """Whether ``array`` has a trailing channel axis beyond the spatial axes of ``new_shape``."""
    if array.ndim == len(new_shape) + 1:
        return True
    if array.ndim == len(new_shape):
        return False
    raise ValueError(f"{what} of shape {array.shape} does not match new_shape {new_shape}: give "
                     f"(*spatial) or (*spatial, channels) with {len(new_shape)} spatial axes")


def resample_image(image: np.ndarray, new_shape: Sequence[int], order: int = 3,
                   separate: Optional[int] = None) -> np.ndarray:
    """``image`` (``(*spatial, channels)`` or ``(*spatial)``) resampled onto ``new_shape``, float32.

    Each channel is interpolated on its own with splines of ``order`` (3, as nnU-Net, by default; 1 is
    linear and cheaper); along the axis ``separate`` (:func:`separate_axis`) with nearest neighbours, after
    the others. When the shape does not change the image is returned as float32 without
    interpolation (the array itself if it already is float32). Cubic splines can overshoot slightly at
    sharp edges; intensities are not clipped (nnU-Net does not either), the normalisation follows.
    """
    new_shape = _check_shape(new_shape)
    image = np.asarray(image)
    channels = _split_channels(image, new_shape, "image")
    if tuple(image.shape[:len(new_shape)]) == new_shape:
        return image.astype(np.float32, copy=False)
    image = image.astype(np.float32, copy=False)
    if not channels:
        return _zoom(image, new_shape, order, separate).astype(np.float32, copy=False)
    out = np.empty(new_shape + image.shape[-1:], dtype=np.float32)
    for channel in range(image.shape[-1]):
        out[..., channel] = _zoom(image[..., channel], new_shape, order, separate)
    return out


def resample_labels(labels: np.ndarray, new_shape: Sequence[int], num_classes: int,
                    method: str = "linear", separate: Optional[int] = None) -> np.ndarray:
    """A label map ``(*spatial)`` resampled onto ``new_shape``, uint8; only labels present in the input appear.

    ``method="linear"`` (nnU-Net's way): the one-hot mask of every class present is interpolated linearly
    and each voxel takes the class with the largest value (ties go to the lower label). ``"nearest"``:
    nearest-neighbour interpolation of the labels themselves (order 0); faster, blockier. Along the axis
    ``separate`` (:func:`separate_axis`) the labels are taken from the nearest slice, after the others.
    Labels must lie in ``0 .. num_classes - 1``.
    """
    new_shape = _check_shape(new_shape)
    labels = np.asarray(labels)
    if labels.ndim != len(new_shape):
        raise ValueError(f"labels of shape {labels.shape} do not match new_shape {new_shape}: a label map has "
                         f"the {len(new_shape)} spatial axes alone")
    if method not in ("linear", "nearest"):
        raise ValueError(f"method must be 'linear' or 'nearest', got {method!r}")
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256 (uint8 labels), got {num_classes}")
    present = np.unique(labels)
    if present.size and (present[0] < 0 or present[-1] >= num_classes):
        raise ValueError(f"labels {present.tolist()} lie outside 0..{num_classes - 1} ({num_classes} classes)")
    labels = labels.astype(np.uint8, copy=False)
    if labels.shape == new_shape:
        return labels
    if method == "nearest" or present.size <= 1:
        return _zoom(labels, new_shape, order=0)
    # Nearest slices along the separate axis, after the in-plane resampling of the one-hot masks.
    in_plane = new_shape if separate is None else tuple(
        labels.shape[axis] if axis == separate else size for axis, size in enumerate(new_shape))
    # The argmax is kept running class by class: one float32 volume per class at a time, not K of them.
    # Linear interpolation is a partition of unity, so the winning value is at least 1 / (classes present)
    # and an absent class (everywhere 0) could never win: only present classes are interpolated.
    best_value = np.full(in_plane, -1.0, dtype=np.float32)
    best_label = np.zeros(in_plane, dtype=np.uint8)
    for label in present:
        value = _zoom((labels == label).astype(np.float32), in_plane, order=1)
        better = value > best_value
        best_value[better] = value[better]
        best_label[better] = label
    return _zoom(best_label, new_shape, order=0)


def resample_probabilities(probabilities: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Class probabilities ``(*spatial, K)`` resampled onto ``new_shape``, float32, linearly per class.

    Used to bring a prediction back to a case's original grid before the argmax (as nnU-Net does with its
    softmax outputs). Linear interpolation keeps the values in [0, 1] and their sum over classes at 1.
    """
    new_shape = _check_shape(new_shape)
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != len(new_shape) + 1:
        raise ValueError(f"probabilities of shape {probabilities.shape} must be (*spatial, classes) with "
                         f"{len(new_shape)} spatial axes, to match new_shape {new_shape}")
    return resample_image(probabilities, new_shape, order=1)


def _check_affine(affine, ndim: int) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"affine must be {ndim + 1}x{ndim + 1} for {ndim} spatial axes, got shape {affine.shape}")
    return affine


def resampled_affine(affine: Optional[np.ndarray], old_shape: Sequence[int],
                     new_shape: Sequence[int]) -> Optional[np.ndarray]:
    """The affine of the grid that :func:`resample_image` makes from ``old_shape`` (None stays None).

    New voxel ``j`` lies at old index ``(j + 0.5) * old / new - 0.5`` on each axis, so the volume's outer
    corner (index -0.5) and its centre stay where they are in mm, and the voxel size scales by ``old / new``.
    """
    if affine is None:
        return None
    old_shape, new_shape = tuple(int(n) for n in old_shape), _check_shape(new_shape)
    if len(old_shape) != len(new_shape):
        raise ValueError(f"old_shape {old_shape} and new_shape {new_shape} differ in their number of axes")
    affine = _check_affine(affine, len(new_shape))
    scale = np.array(old_shape, dtype=np.float64) / np.array(new_shape, dtype=np.float64)
    out = affine.copy()
    out[:-1, :-1] = affine[:-1, :-1] * scale  # column i: the step of axis i, times the zoom
    out[:-1, -1] = affine[:-1, -1] + affine[:-1, :-1] @ (0.5 * scale - 0.5)
    return out


def nonzero_box(image: np.ndarray, channels_last: bool = True) -> Box:
    """The smallest box (one slice per spatial axis) holding every voxel where any channel is non-zero.

    ``image`` is ``(*spatial, channels)``, or ``(*spatial)`` with ``channels_last=False``. A volume without
    non-zero voxels gives the whole volume. Slices have explicit integer starts and stops.
    """
    image = np.asarray(image)
    mask = np.any(image != 0, axis=-1) if channels_last else image != 0
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        where = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(where[0]), int(where[-1]) + 1))
    return tuple(box)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array`` cut to ``box`` (a view); trailing axes beyond the box, such as channels, are kept whole."""
    return np.asarray(array)[tuple(box)]


def _concrete(box: Box, shape: Sequence[int]) -> list[tuple[int, int]]:
    bounds = []
    for part, size in zip(box, shape):
        start, stop, step = part.indices(int(size))
        if step != 1:
            raise ValueError(f"box slices must have step 1, got {part}")
        bounds.append((start, max(start, stop)))
    return bounds


def uncrop(array: np.ndarray, box: Box, full_shape: Sequence[int], fill=0) -> np.ndarray:
    """The inverse of :func:`crop`: ``array`` placed at ``box`` in a new array of ``full_shape``, ``fill``
    elsewhere, with ``array``'s dtype.

    ``full_shape`` gives the spatial axes (the box's), or all axes; trailing axes such as channels are taken
    from ``array``.
    """
    array = np.asarray(array)
    box = tuple(box)
    full_shape = tuple(int(n) for n in full_shape)
    if len(full_shape) == len(box):
        full_shape += array.shape[len(box):]
    if len(full_shape) != array.ndim or full_shape[len(box):] != array.shape[len(box):]:
        raise ValueError(f"cannot place an array of shape {array.shape} into full_shape {full_shape}")
    bounds = _concrete(box, full_shape)
    if tuple(stop - start for start, stop in bounds) != array.shape[:len(box)]:
        raise ValueError(f"box {box} does not fit an array of shape {array.shape} inside {full_shape}")
    out = np.full(full_shape, fill, dtype=array.dtype)
    out[tuple(slice(start, stop) for start, stop in bounds)] = array
    return out


def cropped_affine(affine: Optional[np.ndarray], box: Box) -> Optional[np.ndarray]:
    """The affine of a volume cropped to ``box``: voxel 0 of the crop is voxel ``box.start`` of the original
    (None stays None)."""
    if affine is None:
        return None
    affine = _check_affine(affine, len(box))
    starts = np.array([part.start or 0 for part in box], dtype=np.float64)
    if np.any(starts < 0):
        raise ValueError(f"box {box} has negative starts; give concrete starts (nonzero_box does)")
    out = affine.copy()
    out[:-1, -1] = affine[:-1, -1] + affine[:-1, :-1] @ starts
    return out


def box_to_json(box: Box) -> list[list[int]]:
    """``box`` as ``[[start, stop], ...]`` for a JSON manifest (concrete slices, as :func:`nonzero_box` gives)."""
    if any(part.start is None or part.stop is None or part.step not in (None, 1) for part in box):
        raise ValueError(f"box {box} needs explicit starts and stops and step 1")
    return [[int(part.start), int(part.stop)] for part in box]


def box_from_json(bounds: Sequence[Sequence[int]]) -> Box:
    """The inverse of :func:`box_to_json`."""
    return tuple(slice(int(start), int(stop)) for start, stop in bounds)
