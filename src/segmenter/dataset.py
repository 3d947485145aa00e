"""The preloaded dataset: slices with their masks and provenance, stored as NumPy ``.npz`` shards.

Layout of ``preloaded_dataset/<experiment>/``::

    manifest.json     splits -> shard files and per-slice records, preprocessing, resolved config
    train.npz         (or train-00000.npz, train-00001.npz, ... when a split exceeds one shard)
    test.npz
    test-native/      the test split at its original resolution, <id>.npz per slice (only when preload resized it)

Every shard holds parallel arrays, one entry per slice (row, column order as in scikit-image):

    images       float32 (N, H, W, C)  normalised intensities
    masks        uint8   (N, H, W)     class indices 0..num_classes-1
    ids          str     (N,)          unique slice id: the file stem, or "<volume>_s<index:04d>" for volumes
    volume_ids   str     (N,)          the patient or volume a slice belongs to (its own id for 2D files)
    slice_index  int32   (N,)          index along the slicing axis, -1 for 2D files
    spacing      float32 (N, 2)        pixel spacing in mm (row, column) after resizing; NaN when unknown
    hu_images    float32 (N, H, W)     intensities before normalisation (HU for CT), resized like images

``test-native/<id>.npz`` keeps, for each test slice, what evaluate scores against when the slices were
resized: the mask and the intensities on the slice's original grid (nnU-Net, too, keeps its ground truth
at the original spacing and scores there). One file per slice, since slices may differ in shape::

    mask         uint8             (H0, W0)  class indices on the original grid
    intensity    int16 or float32  (H0, W0)  intensities before normalisation (int16 when integral)
    spacing      float64 (2,)                 original pixel spacing in mm; NaN when unknown

Volumes (3D patch-based work) reuse the same ids, ``volume_ids`` and ``spacing`` vocabulary.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from segmenter.artifacts import read_json

NATIVE_TEST_DIR = "test-native"
ARRAY_FIELDS = ("images", "masks", "ids", "volume_ids", "slice_index", "spacing", "hu_images")


@dataclasses.dataclass
class SliceSet:
    """A batch of preloaded slices and their provenance (see module docstring for shapes)."""

    images: np.ndarray
    masks: Optional[np.ndarray]
    ids: np.ndarray
    volume_ids: np.ndarray
    slice_index: np.ndarray
    spacing: np.ndarray
    # Intensities before normalisation (e.g. Hounsfield units), resized like ``images``; evaluate uses
    # them for clinical measures (mean HU inside the mask) and for display windows.
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


def save_shard(slices: SliceSet, path: Path) -> None:
    # Not compressed: shards are read often and NumPy reads uncompressed members without a copy in zlib.
    with open(path, "wb") as handle:
        np.savez(handle, **slices.to_arrays())


def load_shard(path: Path) -> SliceSet:
    with np.load(path, allow_pickle=False) as data:
        fields = {name: (data[name] if name in data.files else None) for name in ARRAY_FIELDS}
    return SliceSet(**fields)


def read_manifest(preloaded_dir: Path) -> dict:
    path = Path(preloaded_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preloaded dataset here; run the preload stage first")
    return read_json(path)


def shard_paths(preloaded_dir: Path, split: str) -> list[Path]:
    manifest = read_manifest(preloaded_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{preloaded_dir}: manifest has no split {split!r}")
    return [Path(preloaded_dir) / name for name in manifest["splits"][split]["shards"]]


def iter_split(preloaded_dir: Path, split: str) -> Iterator[SliceSet]:
    """Yield a split shard by shard, so memory holds one shard at a time."""
    for path in shard_paths(preloaded_dir, split):
        yield load_shard(path)


def load_split(preloaded_dir: Path, split: str) -> SliceSet:
    """Load a whole split into memory."""
    return SliceSet.concatenate(list(iter_split(preloaded_dir, split)))


@dataclasses.dataclass
class NativeSlice:
    """One test slice on its original grid (see the module docstring)."""

    mask: np.ndarray
    intensity: np.ndarray
    spacing: np.ndarray


def write_native_slice(path: Path, mask: np.ndarray, intensity: np.ndarray, spacing) -> None:
    """Write one slice of ``test-native/`` (see the module docstring); uncompressed, as the shards."""
    with open(path, "wb") as handle:
        np.savez(handle, mask=np.ascontiguousarray(mask, dtype=np.uint8), intensity=_compact_intensity(intensity),
                 spacing=np.array(spacing if spacing is not None else [np.nan, np.nan], dtype=np.float64))


def _compact_intensity(intensity: np.ndarray) -> np.ndarray:
    """int16 for integral intensities that fit (CT in HU: half the bytes of float32, exactly), else float32."""
    array = np.asarray(intensity)
    # Readers hand over float32 even for integer files (PNG, CSV, DICOM after the rescale), so check values.
    if array.size and -32768 <= array.min() and array.max() <= 32767 and np.array_equal(array, np.rint(array)):
        return array.astype(np.int16)
    return array.astype(np.float32)


class NativeTestSlices:
    """Read access by slice id to ``test-native/``, one slice at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __getitem__(self, slice_id: str) -> NativeSlice:
        path = self.folder / f"{slice_id}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: test slice {slice_id!r} missing; run the preload stage again")
        with np.load(path, allow_pickle=False) as data:
            return NativeSlice(data["mask"], data["intensity"], data["spacing"])


def open_native_test(preloaded_dir: Path, manifest: Optional[dict] = None) -> Optional[NativeTestSlices]:
    """The test split on its original grid, or None when preload did not resize it (nothing to keep).

    ``manifest``: the dataset's manifest if the caller has read it already (else it is read here).
    """
    manifest = read_manifest(preloaded_dir) if manifest is None else manifest
    name = manifest["splits"]["test"].get("native")
    return NativeTestSlices(Path(preloaded_dir) / name) if name else None
