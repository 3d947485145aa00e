"""Put a label map onto an image's voxel grid through the two affines.

For every image voxel index ``v`` the label map's voxel index is ``inv(A_mask) @ A_image @ v``. When that
mapping is a signed axis permutation plus a whole-voxel shift (same voxel size, axes flipped, swapped or
cropped, as for a NIfTI label map of a DICOM series) the labels are copied by exact index arithmetic;
otherwise each image voxel takes the label of the nearest label-map voxel. In both cases every image voxel
must fall inside the label map's grid (within half a voxel), or InputError is raised: a label map that
does not cover its image is almost always the wrong file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from segmenter.errors import InputError

# Mappings within this many voxels of a signed permutation and whole-voxel shift are taken as exact.
_EXACT_TOLERANCE = 1e-3


def _as_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape) + (1,) * (3 - len(shape))


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def map_labels_to_grid(
    labels: np.ndarray, labels_affine: np.ndarray, image_shape: tuple[int, ...], image_affine: np.ndarray,
    path: Path,
) -> np.ndarray:
    """Labels resampled (nearest neighbour) onto an image grid of shape ``image_shape``.

    Parameters
    ----------
    labels : np.ndarray
        2D or 3D label map in its own voxel order.
    labels_affine, image_affine : np.ndarray
        4x4 voxel index -> world mm for each grid (the same world frame, RAS+ in segmenter).
    image_shape : tuple of int
        Shape of the image array (2D or 3D); the result has this shape.
    path : Path
        The label file, named in errors.
    """
    if labels.ndim > 3 or len(image_shape) > 3:
        raise InputError(path, f"cannot map a {labels.ndim}D label map onto a {len(image_shape)}D image")
    labels_3d = labels.reshape(_as_3d(labels.shape))
    target_shape = _as_3d(image_shape)
    try:
        voxel_map = np.linalg.inv(labels_affine) @ image_affine
    except np.linalg.LinAlgError:
        raise InputError(path, "label map affine is singular") from None
    linear, shift = voxel_map[:3, :3], voxel_map[:3, 3]

    permutation = np.abs(linear).argmax(axis=0)  # label axis fed by each image axis
    signed_unit = np.zeros((3, 3))
    signed_unit[permutation, np.arange(3)] = np.sign(linear[permutation, np.arange(3)])
    is_exact = (
        len(set(permutation.tolist())) == 3
        and np.allclose(linear, signed_unit, atol=_EXACT_TOLERANCE)
        and np.allclose(shift, np.round(shift), atol=_EXACT_TOLERANCE)
    )
    if is_exact:
        result = _map_exact(labels_3d, permutation, signed_unit, np.round(shift).astype(int), target_shape, path)
    else:
        result = _map_nearest(labels_3d, linear, shift, target_shape, path)
    return result.reshape(tuple(image_shape))


def _map_exact(labels: np.ndarray, permutation: np.ndarray, signed_unit: np.ndarray, shift: np.ndarray,
               target_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """Copy by index: label axis ``permutation[a]`` = sign * image index along axis ``a`` + shift."""
    index_arrays = [None, None, None]
    for image_axis, label_axis in enumerate(permutation):
        sign = int(signed_unit[label_axis, image_axis])
        indices = sign * np.arange(target_shape[image_axis]) + shift[label_axis]
        if indices.min() < 0 or indices.max() >= labels.shape[label_axis]:
            raise InputError(
                path,
                f"label map grid {_shape_text(labels.shape)} does not cover the image grid "
                f"{_shape_text(target_shape)} (image axis {image_axis} maps to label voxels "
                f"{indices.min()}..{indices.max()} of axis {label_axis})",
            )
        index_arrays[label_axis] = indices
    picked = labels[np.ix_(*index_arrays)]  # axes in label order
    return picked.transpose(permutation)  # image axis a <- label axis permutation[a]


def _map_nearest(labels: np.ndarray, linear: np.ndarray, shift: np.ndarray, target_shape: tuple[int, ...],
                 path: Path) -> np.ndarray:
    """Nearest-neighbour lookup of every image voxel centre in the label grid."""
    grid = np.indices(target_shape, dtype=np.float64).reshape(3, -1)
    coordinates = linear @ grid + shift[:, None]
    upper = np.array(labels.shape, dtype=np.float64)[:, None] - 0.5
    outside = np.any((coordinates < -0.5) | (coordinates > upper), axis=0)
    if outside.any():
        raise InputError(
            path,
            f"label map grid {_shape_text(labels.shape)} does not cover the image grid "
            f"{_shape_text(target_shape)}: {outside.mean():.1%} of image voxels lie outside it",
        )
    nearest = np.clip(np.rint(coordinates).astype(np.int64), 0, np.array(labels.shape)[:, None] - 1)
    return labels[nearest[0], nearest[1], nearest[2]].reshape(target_shape)
