"""PNG and NPY files: plain arrays without spacing or orientation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segmenter.errors import InputError
from segmenter.io.image import LoadedImage

# ITU-R 601-2 luma weights, the ones Pillow's convert("L") uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def read_png(path: Path) -> LoadedImage:
    """Read a PNG as a 2D grey array (rows, cols) in its stored integer type; no spacing, no affine.

    8-bit and 16-bit grey are returned as stored (uint8, uint16); a 1-bit image as 0/1. Colour images are
    converted to grey: when the red, green and blue channels are equal (a grey or label image saved as
    colour) the common channel is kept exactly; otherwise the ITU-R 601-2 luma
    0.299 R + 0.587 G + 0.114 B is returned as float64. Palette images are expanded to colour first and
    alpha channels are dropped.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(path, f"cannot read PNG file: {error}") from error
    if array.ndim == 3:
        array = _grey_from_channels(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return LoadedImage(array, None, None, path)


def _grey_from_channels(array: np.ndarray) -> np.ndarray:
    """(rows, cols, channels) -> (rows, cols): drop alpha, keep equal channels, else luma."""
    channels = array.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        return array[..., 0]
    colour = array[..., :3]
    if np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2]):
        return colour[..., 0]
    return colour.astype(np.float64) @ _LUMA_WEIGHTS


def write_png(array: np.ndarray, path: Path) -> None:
    """Write a 2D non-negative integer array as 8-bit grey PNG when it fits, else 16-bit."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise InputError(path, f"a PNG holds a 2D label map, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise InputError(path, f"PNG labels must lie in 0..65535, got {array.min()}..{array.max()}")
    dtype = np.uint8 if not array.size or array.max() <= np.iinfo(np.uint8).max else np.uint16
    Image.fromarray(np.ascontiguousarray(array.astype(dtype))).save(path, format="PNG")


def read_npy(path: Path) -> LoadedImage:
    """Read a ``.npy`` array (pickles refused); it must be 2D or 3D and numeric. No spacing, no affine."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(path, f"cannot read NPY file: {error}") from error
    if not isinstance(array, np.ndarray):
        raise InputError(path, "is not a single NumPy array")
    return LoadedImage(array, None, None, path)


def write_npy(array: np.ndarray, path: Path) -> None:
    """Write an integer label map as int32 ``.npy`` (``path`` is written as given, no suffix added)."""
    with open(path, "wb") as handle:
        np.save(handle, np.asarray(array).astype(np.int32), allow_pickle=False)
