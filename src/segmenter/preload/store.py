"""Writing the preloaded dataset: training samples into shards, test cases as files at their own geometry.

Training samples are appended, by the worker that prepared them, to its own raw scratch files, one per
array; only their records go back to the stage. After all cases are done the samples are copied one at a
time into shards in the layout :mod:`segmenter.dataset` reads (``np.load`` reads them), so memory holds one
sample at a time however large the dataset is.

Test cases are written whole by the worker that read them (nothing large crosses between processes):
``test/images/<case>[_0000]<suffix>`` (raw intensities, one file per channel in nnU-Net's naming) and
``test/labels/<case><suffix>`` (class indices). Volumes and images with an affine are NIfTI with their
affine; other 2D images are NPY (their spacing, if any, comes from ``preload.pixel_spacing``). The
predict stage segments ``test/images`` exactly as ``predict --input`` segments a user's folder, and
evaluate scores ``test/labels`` against the predictions as ``evaluate --truth --pred`` does.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from segmenter import layout
from segmenter.io.nifti import write_nifti, write_nifti_image
from segmenter.preload.prepare import LoadedCase, labels_present, training_volume

#: The folder of the scratch files in the stage's temporary folder, one subfolder per process.
SCRATCH_FOLDER = "scratch"

#: At most this many shards are written at once (see write_shards).
SHARD_WRITERS = 4

#: The scratch arrays of one training sample, with their data types.
SCRATCH_FIELDS = {"image": np.float32, "hu_image": np.float32, "mask": np.uint8}


def _scratch_shapes(image_size: tuple[int, int], num_channels: int) -> dict[str, tuple]:
    return {"image": (*image_size, num_channels), "hu_image": tuple(image_size), "mask": tuple(image_size)}


def _scratch_nbytes(shapes: dict[str, tuple]) -> dict[str, int]:
    return {name: int(np.prod(shapes[name])) * np.dtype(dtype).itemsize for name, dtype in SCRATCH_FIELDS.items()}


class ScratchSamples:
    """One process's finished samples, appended to one raw file per array (see SCRATCH_FIELDS) in its own
    folder under the stage's scratch folder (:class:`ScratchFolders` reads them back).

    Three files instead of one per sample: no per-file overhead, and a sample is read back with one
    ``os.pread`` per array, without mapping the files into memory. Each worker process writes its own files,
    so a sample's arrays never cross between processes: sending them back through the pool's pipe cost the
    stage's process 1.2 ms of CPU per 512 x 512 slice more (receiving and unpickling them, writing them out),
    time the workers need on a small machine.
    """

    def __init__(self, folder: Path, image_size: tuple[int, int], num_channels: int):
        self.shapes = _scratch_shapes(image_size, num_channels)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files = {name: open(folder / f"{name}.raw", "wb") for name in SCRATCH_FIELDS}
        self.count = 0

    def append(self, sample: dict) -> None:
        """Move the sample's arrays to the scratch files; the sample keeps where they are, as ``scratch``."""
        for name, dtype in SCRATCH_FIELDS.items():
            array = np.ascontiguousarray(sample.pop(name), dtype=dtype)
            if array.shape != self.shapes[name]:
                raise AssertionError(f"scratch {name} of shape {array.shape}, expected {self.shapes[name]}")
            self.files[name].write(array.data)
        sample["scratch"] = (self.folder.name, self.count)
        self.count += 1

    def flush(self) -> None:
        """Hand what was appended to the operating system, where the stage's process reads it (a worker is
        ended without a chance to flush its files)."""
        for handle in self.files.values():
            handle.flush()

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


class ScratchFolders:
    """The stage's scratch folder: the :class:`ScratchSamples` folders of the processes that prepared
    samples, read back sample by sample by the shards' writer."""

    def __init__(self, root: Path, image_size: tuple[int, int], num_channels: int):
        self.root = root
        self.shapes = _scratch_shapes(image_size, num_channels)
        self.nbytes = _scratch_nbytes(self.shapes)
        self._files: dict[tuple[str, str], object] = {}

    def read(self, name: str, sample: dict) -> bytes:
        """The bytes of array ``name`` of ``sample`` (a record with its ``scratch`` place); thread-safe."""
        folder, row = sample["scratch"]
        handle = self._files.get((folder, name))
        if handle is None:
            opened = open(self.root / folder / f"{name}.raw", "rb")
            handle = self._files.setdefault((folder, name), opened)
            if handle is not opened:  # another thread opened it meanwhile
                opened.close()
        return os.pread(handle.fileno(), self.nbytes[name], row * self.nbytes[name])

    def remove(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _write_npy_member(archive: zipfile.ZipFile, name: str, dtype, shape: tuple, chunks) -> None:
    """Write ``<name>.npy`` into ``archive`` from the byte chunks of its rows, as np.savez would lay it out."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(chunk)


def _write_shard(path: Path, samples: list[dict], scratch: ScratchFolders) -> None:
    """One shard in the layout of segmenter.dataset, holding one sample in memory at a time."""
    count = len(samples)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for member, field in (("images", "image"), ("masks", "mask"), ("hu_images", "hu_image")):
            _write_npy_member(archive, member, SCRATCH_FIELDS[field], (count, *scratch.shapes[field]),
                              (scratch.read(field, sample) for sample in samples))
        nan2 = [np.nan, np.nan]
        small = {
            "ids": np.array([s["id"] for s in samples], dtype=str),
            "case_ids": np.array([s["case"] for s in samples], dtype=str),
            "slice_index": np.array([s["slice_index"] for s in samples], dtype=np.int32),
            "spacing": np.array([s["spacing"] or nan2 for s in samples], dtype=np.float32).reshape(-1, 2),
        }
        for name, array in small.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def write_shards(folder: Path, split: str, samples: list[dict], scratch: ScratchFolders, shard_size: int) -> list[str]:
    """Write ``samples`` (records with their ``scratch`` place) into shards of ``shard_size``; their file names.

    Several shards are written at once, one per thread (as many as cores, up to SHARD_WRITERS): the work
    is reading, writing and checksumming, which release the GIL, and is mostly the kernel's (copying pages).
    Two threads on two cores write 4,000 samples of 256 x 256 in 1.05 s instead of 1.65 (medians).
    """
    count = max(1, -(-len(samples) // shard_size))
    names = [layout.shard_name(split, number, count) for number in range(count)]
    parts = [samples[number * shard_size:(number + 1) * shard_size] for number in range(count)]
    executor = concurrent.futures.ThreadPoolExecutor(max(1, min(count, os.cpu_count() or 1, SHARD_WRITERS)))
    try:
        for _ in executor.map(_write_shard, [folder / name for name in names], parts, itertools.repeat(scratch)):
            pass
    finally:
        executor.shutdown(cancel_futures=True)  # after an error, or Ctrl-C, start no other shard
    return names


def _compact(intensity: np.ndarray) -> np.ndarray:
    """int16 for integral intensities that fit (CT in HU: half the bytes of float32, exactly), else float32."""
    array = np.asarray(intensity)
    # Readers hand over float32 even for integer files (PNG, CSV, DICOM after the rescale), so check values.
    if array.size and -32768 <= array.min() and array.max() <= 32767 and np.array_equal(array, np.rint(array)):
        return array.astype(np.int16)
    return array.astype(np.float32)


def test_case_affine(loaded: LoadedCase):
    """The affine a test case is stored with: its own; for a volume without one, its spacing on the diagonal."""
    if loaded.affine is not None or loaded.mask.ndim == 2:
        return loaded.affine
    return np.diag([*(loaded.spacing or (1.0, 1.0, 1.0)), 1.0])


def write_test_case(loaded: LoadedCase, preloaded_dir: Path) -> None:
    """Write a test case's channels and label map at its own geometry (see the module docstring)."""
    images_dir, labels_dir = layout.test_images_dir(preloaded_dir), layout.test_labels_dir(preloaded_dir)
    affine = test_case_affine(loaded)
    num_channels = loaded.image.shape[-1]
    for channel in range(num_channels):
        stem = layout.channel_file_stem(loaded.case_id, channel, num_channels)
        intensity = loaded.image[..., channel]
        if affine is None:
            with open(images_dir / f"{stem}.npy", "wb") as handle:
                np.save(handle, _compact(intensity), allow_pickle=False)
        else:
            write_nifti_image(intensity, images_dir / f"{stem}.nii.gz", affine)
    if affine is None:
        with open(labels_dir / f"{loaded.case_id}.npy", "wb") as handle:
            np.save(handle, loaded.mask, allow_pickle=False)
    else:
        write_nifti(loaded.mask, labels_dir / f"{loaded.case_id}.nii.gz", affine)


def write_training_volume(loaded: LoadedCase, config, plan, preloaded_dir: Path) -> dict:
    """Prepare a 3D training case and write it as ``train/<case>.npz`` (image float32 (*spatial, C), labels
    uint8, and where each foreground class occurs for the patch sampler: ``locations`` int32 (M, 3) and
    ``location_counts`` per class, :func:`segmenter.volumes.class_locations`); returns its sample record."""
    from segmenter.volumes import class_locations  # 3D only: 2D workers start without SciPy's ndimage

    image, labels = training_volume(loaded, config, plan)
    locations, counts = class_locations(labels, config.num_classes, seed=config.seed)
    path = Path(preloaded_dir) / layout.train_volume_name(loaded.case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # the stage's temporary folder: it becomes the dataset only when complete
        np.savez(handle, image=image.astype(np.float32, copy=False), labels=labels.astype(np.uint8, copy=False),
                 locations=locations, location_counts=counts)
    return {"id": loaded.case_id, "case": loaded.case_id, "slice_index": -1,
            "labels": sorted(labels_present(labels)), "original_shape": list(labels.shape),
            "spacing": [float(v) for v in plan.target_spacing]}
