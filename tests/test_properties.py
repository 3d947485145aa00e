"""Property-based tests (hypothesis): the readers, label remapping and the surface metrics on random input.

- The readers (:func:`segmenter.io.read_image`, :func:`segmenter.io.read_mask`) on random bytes written to
  PNG, NPY, CSV and NIfTI files, and on valid files of random arrays of random shapes and dtypes, either
  succeed or raise InputError: never another exception (a traceback for the user).
- Preload's :func:`segmenter.preload.prepare.remap_labels` on random label arrays and label maps returns
  class indices in range, or raises InputError.
- :func:`segmenter.evaluation.surface.segmentation_metrics` on random 2D and 3D masks and spacings gives
  Dice, IoU and NSD in [0, 1], distances >= 0 (NaN exactly when one mask is empty), and the same Dice,
  IoU, Hausdorff distance and ASSD with truth and prediction swapped.

The example counts keep the whole file to a few seconds (``deadline=None``: the first calls import lazily).
"""
from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segmenter.errors import InputError
from segmenter.evaluation.surface import segmentation_metrics
from segmenter.io import read_image, read_mask
from segmenter.preload.prepare import remap_labels

SUFFIXES = (".png", ".npy", ".csv", ".nii.gz")
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_both(path: Path) -> None:
    """Read ``path`` as an image and as a mask; only success or InputError are allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # format libraries warn about odd headers; that is not a failure
        for reader in (read_image, read_mask):
            try:
                loaded = reader(path)
            except InputError as error:
                assert "\n" not in str(error)  # one line for the user
                continue
            assert loaded.array.ndim in (2, 3)
            assert np.isfinite(loaded.array).all()


# ----------------------------------------------------------------------------------------------------
# Readers on random bytes
# ----------------------------------------------------------------------------------------------------
@FEW
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=600), prefix=st.booleans(),
       gzipped=st.booleans())
def test_readers_on_random_bytes_raise_only_input_error(tmp_path_factory, suffix, data, prefix, gzipped):
    magic = {".png": b"\x89PNG\r\n\x1a\n", ".npy": b"\x93NUMPY\x01\x00", ".csv": b"1,2\n", ".nii.gz": b""}[suffix]
    content = (magic if prefix else b"") + data
    if suffix == ".nii.gz" and gzipped:
        content = gzip.compress(content)  # a valid gzip stream of garbage reaches the NIfTI parser
    path = tmp_path_factory.mktemp("bytes") / f"case{suffix}"
    path.write_bytes(content)
    _read_both(path)


@FEW
@example(text="1e40")  # finite as float64, infinite as float32: found by this test
@given(text=st.text(alphabet=st.sampled_from(list("0123456789-.,e \t\nnaif+")), max_size=300))
def test_csv_reader_on_random_numeric_text_raises_only_input_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("csv") / "case.csv"
    path.write_text(text)
    _read_both(path)


# ----------------------------------------------------------------------------------------------------
# Readers on valid files of random arrays
# ----------------------------------------------------------------------------------------------------
DTYPES = st.sampled_from(["uint8", "uint16", "int16", "int32", "int64", "float32", "float64", "bool"])
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)


def _write(array: np.ndarray, path: Path) -> bool:
    """Write ``array`` in the format of ``path``; False when the format cannot hold it (then nothing to test)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".csv":
        if array.ndim > 2:
            return False
        np.savetxt(path, np.atleast_2d(array), delimiter=",", fmt="%.17g")
    elif suffix == ".png":
        from PIL import Image

        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            return False
        if array.dtype not in (np.uint8, np.bool_):
            return False
        Image.fromarray(np.squeeze(array.astype(np.uint8), axis=2) if array.ndim == 3 and array.shape[2] == 1
                        else array.astype(np.uint8)).save(path)
    else:
        import nibabel as nib

        if array.dtype == np.bool_ or array.dtype == np.int64:
            array = array.astype(np.int32)
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return True


@FEW
@example(suffix=".npy", array=np.array([[3.4028236e38]]))  # beyond float32: found by this test
@given(suffix=st.sampled_from(SUFFIXES), array=hnp.arrays(DTYPES, SHAPES, elements=None))
def test_readers_on_random_arrays_succeed_or_raise_input_error(tmp_path_factory, suffix, array):
    path = tmp_path_factory.mktemp("arrays") / f"case{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _write(array, path):
            return
    _read_both(path)


@FEW
@given(array=hnp.arrays(st.sampled_from(["uint8", "int16", "int32"]),
                        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
                        elements=st.integers(0, 5)))
def test_an_integer_npy_mask_reads_back_unchanged(tmp_path_factory, array):
    path = tmp_path_factory.mktemp("mask") / "case.npy"
    np.save(path, array)
    mask = read_mask(path)
    assert mask.array.dtype == np.int32
    np.testing.assert_array_equal(mask.array, array)


# ----------------------------------------------------------------------------------------------------
# remap_labels
# ----------------------------------------------------------------------------------------------------
@st.composite
def label_arrays(draw):
    """Integer label arrays of any integer dtype, values around and beyond the lookup table's 65535."""
    dtype = np.dtype(draw(st.sampled_from(["uint8", "uint16", "int16", "int32", "int64"])))
    info = np.iinfo(dtype)
    values = st.integers(max(-3, info.min), min(70000, info.max))
    return draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5), elements=values))


@settings(max_examples=150, deadline=None)
@given(mask=label_arrays(),
       label_map=st.dictionaries(st.integers(-3, 70000), st.integers(-2, 6), max_size=4),
       unmapped=st.sampled_from(["error", "background"]),
       num_classes=st.integers(2, 5))
def test_remap_labels_returns_classes_in_range_or_raises_input_error(mask, label_map, unmapped, num_classes):
    try:
        remapped = remap_labels(mask, label_map, unmapped, num_classes, Path("mask.npy"))
    except InputError as error:
        assert "mask.npy" in str(error) and "\n" not in str(error)
        return
    assert remapped.shape == mask.shape
    assert remapped.dtype == np.uint8
    assert ((remapped >= 0) & (remapped < num_classes)).all()
    # Every voxel went where the map (or, unmapped, its own value / background) says.
    for value in np.unique(mask).tolist():
        expected = label_map.get(value, 0 if unmapped == "background" else value)
        assert (remapped[mask == value] == expected).all()


# ----------------------------------------------------------------------------------------------------
# Surface metrics
# ----------------------------------------------------------------------------------------------------
@st.composite
def mask_pairs(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 9 if ndim == 2 else 6), min_size=ndim, max_size=ndim)))
    density = st.floats(0.0, 1.0)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    truth = rng.random(shape) < draw(density)
    pred = rng.random(shape) < draw(density)
    spacing = draw(st.one_of(st.none(), st.lists(st.floats(0.05, 20.0), min_size=ndim, max_size=ndim)))
    tolerance = draw(st.floats(0.0, 10.0))
    return truth, pred, spacing, tolerance


@settings(max_examples=150, deadline=None)
@given(pair=mask_pairs(), hd95=st.sampled_from(["max_directed", "pooled"]))
def test_surface_metrics_are_in_range_and_symmetric(pair, hd95):
    truth, pred, spacing, tolerance = pair
    forward = segmentation_metrics(truth, pred, spacing, tolerance, hd95=hd95)
    backward = segmentation_metrics(pred, truth, spacing, tolerance, hd95=hd95)
    for key in ("dice", "iou", "nsd"):
        assert 0.0 <= forward[key] <= 1.0, (key, forward)
    one_empty = truth.any() != pred.any()
    for key in ("hd", "hd95", "assd"):
        value = forward[key]
        assert math.isnan(value) == one_empty, (key, forward)
        assert one_empty or value >= 0.0
    if not one_empty:
        assert forward["hd95"] <= forward["hd"] + 1e-9
    # Dice, IoU, Hausdorff and ASSD do not depend on which mask is the truth.
    for key in ("dice", "iou", "hd", "assd", "nsd"):
        a, b = forward[key], backward[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-9), key
    # Dice and IoU are two forms of one overlap: IoU = Dice / (2 - Dice).
    assert forward["iou"] == pytest.approx(forward["dice"] / (2 - forward["dice"]), abs=1e-9)
    if np.array_equal(truth.astype(bool), pred.astype(bool)):
        assert forward["dice"] == 1.0 and (not truth.any() or forward["hd"] == 0.0)
