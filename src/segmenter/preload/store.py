"""Writing the preloaded dataset: training samples into shards, test cases as files at their own geometry.

Training samples are appended, as the workers finish them, to one raw scratch file per array; after all
cases are done they are copied one at a time into shards in the layout :mod:`segmenter.dataset` reads
(``np.load`` reads them), so memory holds one sample at a time however large the dataset is.

Test cases are written whole by the worker that read them (nothing large crosses between processes):
``test/images/<case>[_0000]<suffix>`` (raw intensities, one file per channel in nnU-Net's naming) and
``test/labels/<case><suffix>`` (class indices). Volumes and images with an affine are NIfTI with their
affine; other 2D images are NPY (their spacing, if any, comes from ``preload.pixel_spacing``). The
predict stage segments ``test/images`` exactly as ``predict --input`` segments a user's folder, and
evaluate scores ``test/labels`` against the predictions as ``evaluate --truth --pred`` does.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from segmenter import layout
from segmenter.io.nifti import write_nifti, write_nifti_image
from segmenter.preload.prepare import LoadedCase, labels_present, training_volume

#: The scratch arrays of one training sample, with their data types.
SCRATCH_FIELDS = {"image": np.float32, "hu_image": np.float32, "mask": np.uint8}


class ScratchSamples:
    """Finished samples appended to one raw file per array (see SCRATCH_FIELDS), read back sample by sample.

    Three files instead of one per sample: no per-file overhead, and a sample is read back with one
    ``os.pread`` per array, without mapping the files into memory.
    """

    def __init__(self, folder: Path, image_size: tuple[int, int], num_channels: int):
        self.shapes = {"image": (*image_size, num_channels), "hu_image": tuple(image_size), "mask": tuple(image_size)}
        self.nbytes = {name: int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
                       for name, dtype in SCRATCH_FIELDS.items()}
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files = {name: open(folder / f"{name}.raw", "w+b") for name in SCRATCH_FIELDS}
        self.count = 0

    def append(self, sample: dict) -> int:
        """Move the sample's arrays to the scratch files; return the sample's row there."""
        for name, dtype in SCRATCH_FIELDS.items():
            array = np.ascontiguousarray(sample.pop(name), dtype=dtype)
            if array.shape != self.shapes[name]:
                raise AssertionError(f"scratch {name} of shape {array.shape}, expected {self.shapes[name]}")
            self.files[name].write(array.tobytes())
        self.count += 1
        return self.count - 1

    def finish_writing(self) -> None:
        for handle in self.files.values():
            handle.flush()

    def read(self, name: str, row: int) -> bytes:
        return os.pread(self.files[name].fileno(), self.nbytes[name], row * self.nbytes[name])

    def remove(self) -> None:
        for name, handle in self.files.items():
            handle.close()
            (self.folder / f"{name}.raw").unlink(missing_ok=True)
        self.folder.rmdir()


def _write_npy_member(archive: zipfile.ZipFile, name: str, dtype, shape: tuple, chunks) -> None:
    """Write ``<name>.npy`` into ``archive`` from the byte chunks of its rows, as np.savez would lay it out."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(chunk)


def _write_shard(path: Path, samples: list[dict], scratch: ScratchSamples) -> None:
    """One shard in the layout of segmenter.dataset, holding one sample in memory at a time."""
    count = len(samples)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for member, field in (("images", "image"), ("masks", "mask"), ("hu_images", "hu_image")):
            _write_npy_member(archive, member, SCRATCH_FIELDS[field], (count, *scratch.shapes[field]),
                              (scratch.read(field, sample["row"]) for sample in samples))
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


def write_shards(folder: Path, split: str, samples: list[dict], scratch: ScratchSamples, shard_size: int) -> list[str]:
    """Write ``samples`` (records with their scratch ``row``) into shards of ``shard_size``; their file names."""
    count = max(1, -(-len(samples) // shard_size))
    names = []
    for number in range(count):
        name = layout.shard_name(split, number, count)
        _write_shard(folder / name, samples[number * shard_size:(number + 1) * shard_size], scratch)
        names.append(name)
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
    uint8); returns its sample record."""
    image, labels = training_volume(loaded, config, plan)
    path = Path(preloaded_dir) / layout.train_volume_name(loaded.case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # the stage's temporary folder: it becomes the dataset only when complete
        np.savez(handle, image=image.astype(np.float32, copy=False), labels=labels.astype(np.uint8, copy=False))
    return {"id": loaded.case_id, "case": loaded.case_id, "slice_index": -1,
            "labels": sorted(labels_present(labels)), "original_shape": list(labels.shape),
            "spacing": [float(v) for v in plan.target_spacing]}
