"""Preload: original dataset -> validated, normalised, resized, split slices in ``preloaded_dataset/<experiment>/``.

The work per image/mask pair (read, validate, remap labels, cut volumes into slices, normalise, resize)
runs in worker processes, which also compute the sha256 of every source file for the manifest: of each pair
as they process it, or of all of them first when an earlier manifest exists (the up-to-date check). The main
process appends each finished slice to three raw scratch files (images, intensities, masks) at once and keeps
only its small record, so memory does not grow with the number of slices. After the seeded split the slices
are copied one at a time from the scratch files into shards (``train.npz``, or ``train-00000.npz``, ... for
large splits) inside a temporary folder that replaces the output folder only when everything succeeded.
When slices were resized, the workers meanwhile read the test pairs a second time and write the test slices
at their original size into ``test-native/`` for the evaluate stage (see :mod:`segmenter.dataset`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from segmenter import io
from segmenter.artifacts import atomic_directory, read_json, sha256_of_file, write_json_atomic
from segmenter.config import Config
from segmenter.dataset import NATIVE_TEST_DIR, write_native_slice
from segmenter.errors import InputError
from segmenter.preprocessing import prepare_image, resize_mask, resized_spacing, split_train_test

# Bumped whenever what preload writes changes, so an older preloaded dataset is redone, not reused.
MANIFEST_VERSION = 4

# Source labels up to this value are remapped through a lookup table (see remap_labels).
_MAX_TABLE_LABEL = 65535
# Sources larger than this in total are hashed by the worker processes in parallel; below it starting the
# workers (about a second each, they are spawned) costs more than it saves.
_PARALLEL_HASH_BYTES = 256 * 2**20
# The scratch arrays of one finished slice, with their data types; shapes follow preload.image_size.
_SCRATCH_FIELDS = {"image": np.float32, "hu_image": np.float32, "mask": np.uint8}


@dataclasses.dataclass(frozen=True)
class CasePair:
    """One image and its mask (a 2D slice, or a volume to be cut into slices)."""

    case_id: str
    image_path: Path
    mask_path: Path
    group_id: str


@dataclasses.dataclass
class PreloadResult:
    output_dir: Path
    num_train: int
    num_test: int
    skipped: list
    up_to_date: bool = False

    def __str__(self) -> str:
        if self.up_to_date:
            return f"{self.output_dir} is up to date (use --overwrite to redo it)"
        return f"{self.output_dir}: {self.num_train} train and {self.num_test} test slices, {len(self.skipped)} skipped"


# ----------------------------------------------------------------------------------------------------
# Finding the pairs
# ----------------------------------------------------------------------------------------------------
def _group_id(case_id: str, group_pattern: Optional[str]) -> str:
    if group_pattern:
        match = re.search(group_pattern, case_id)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return case_id


def find_pairs(config: Config, log=print) -> list[CasePair]:
    """Pair images with masks by id (or take the config's explicit pairs) and report what did not match."""
    settings = config.preload
    root = Path(settings.input_dir)
    if not root.is_dir():
        raise InputError(root, "input folder not found")
    if settings.pairs:
        pairs = []
        for image_name, mask_name in settings.pairs:
            image_path, mask_path = root / image_name, root / mask_name
            for path in (image_path, mask_path):
                if not path.exists():
                    raise InputError(path, "listed in preload.pairs but not found")
            case_id = io.case_id(image_path)
            pairs.append(CasePair(case_id, image_path, mask_path, _group_id(case_id, settings.group_pattern)))
        return pairs

    images = io.list_cases(root / settings.images_subdir, "image")
    masks = io.list_cases(root / settings.masks_subdir, "mask")
    matched = sorted(set(images) & set(masks))
    images_only = sorted(set(images) - set(masks))
    masks_only = sorted(set(masks) - set(images))
    log(f"Matched {len(matched)} image/mask pairs; {len(images_only)} images without masks, "
        f"{len(masks_only)} masks without images.")
    if images_only:
        log(f"  images without masks: {', '.join(images_only[:20])}{' ...' if len(images_only) > 20 else ''}")
    if masks_only:
        log(f"  masks without images: {', '.join(masks_only[:20])}{' ...' if len(masks_only) > 20 else ''}")
    if not matched:
        raise InputError(root, f"no image in {settings.images_subdir}/ has a mask of the same name in {settings.masks_subdir}/")
    return [CasePair(cid, images[cid], masks[cid], _group_id(cid, settings.group_pattern)) for cid in matched]


# ----------------------------------------------------------------------------------------------------
# The work on one pair (runs in a worker process)
# ----------------------------------------------------------------------------------------------------
def remap_labels(mask: np.ndarray, label_map: dict, unmapped: str, num_classes: int, path: Path) -> np.ndarray:
    """Apply ``label_map`` (source label -> class index) and check every label is a configured class."""
    small_labels = 0 <= int(mask.min()) and int(mask.max()) <= _MAX_TABLE_LABEL
    # A histogram finds the labels several times faster than np.unique.
    values = np.flatnonzero(np.bincount(mask.ravel())) if small_labels else np.unique(mask)
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


def _labels_present(mask: np.ndarray) -> set[int]:
    """The labels of a remapped (uint8) mask; a histogram is several times faster than np.unique."""
    return set(np.flatnonzero(np.bincount(mask.ravel(), minlength=1)).tolist())


def _slices_of(image, mask, axis: int):
    """Yield (slice_index, image2d, mask2d, spacing2d) for a 2D pair or each slice of a 3D pair."""
    spacing = image.spacing
    if image.array.ndim == 2:
        yield -1, image.array, mask.array, (tuple(spacing) if spacing is not None else None)
        return
    in_plane = [a for a in range(3) if a != axis]
    spacing2d = tuple(spacing[a] for a in in_plane) if spacing is not None else None
    for index in range(image.array.shape[axis]):
        yield index, np.take(image.array, index, axis=axis), np.take(mask.array, index, axis=axis), spacing2d


def _read_pair(pair: CasePair, config: Config) -> tuple[io.LoadedImage, io.LoadedImage]:
    """The pair's image and its mask remapped to class indices, on the image's grid, with the spacing known."""
    settings = config.preload
    image = io.read_image(pair.image_path)
    mask = io.read_mask(pair.mask_path, reference=image)
    # read_mask(reference=image) has already checked the shapes, or mapped the mask onto the image grid.
    if image.spacing is None and settings.pixel_spacing is not None and image.array.ndim == 2:
        image = dataclasses.replace(image, spacing=tuple(settings.pixel_spacing))
    labels = remap_labels(mask.array, settings.label_map, settings.unmapped_labels, config.num_classes, pair.mask_path)
    return image, dataclasses.replace(mask, array=labels)


def _slice_id(pair: CasePair, slice_index: int) -> str:
    return pair.case_id if slice_index < 0 else f"{pair.case_id}_s{slice_index:04d}"


def process_pair(pair: CasePair, config: Config) -> list[dict]:
    """Read, validate and preprocess one pair; return one record per kept slice (arrays included)."""
    settings = config.preload
    image, mask = _read_pair(pair, config)
    records = []
    shape = tuple(settings.image_size)
    for slice_index, image2d, mask2d, spacing in _slices_of(image, mask, settings.slice_axis):
        # The filters and the manifest's labels describe the stored (resized) mask: shrinking can lose a
        # structure of a few pixels, and a slice kept for it would then be all background.
        resized_mask = resize_mask(mask2d, shape)
        present = _labels_present(resized_mask)
        if settings.require_labels and not set(settings.require_labels) <= present:
            continue
        if not settings.keep_empty_slices and present == {0}:
            continue
        raw, normalised = prepare_image(np.asarray(image2d, dtype=np.float32), settings.normalization, shape)
        records.append({
            "id": _slice_id(pair, slice_index),
            "volume_id": pair.group_id,
            "slice_index": slice_index,
            "source_image": str(pair.image_path),
            "source_mask": str(pair.mask_path),
            "original_shape": list(image2d.shape),
            "spacing": list(resized_spacing(spacing, image2d.shape, shape)) if spacing else None,
            "original_spacing": [float(value) for value in spacing] if spacing else None,
            "labels": sorted(int(v) for v in present),
            "image": normalised[..., np.newaxis],
            "hu_image": raw,
            "mask": resized_mask,
        })
    return records


def native_slices(pair: CasePair, slice_ids: frozenset, config: Config) -> list[tuple]:
    """(id, mask, intensity, spacing) of the pair's slices in ``slice_ids``, on their original grid.

    Run after the split, for the test slices only: evaluate scores them at the resolution they were
    annotated at, not at preload.image_size.
    """
    image, mask = _read_pair(pair, config)
    return [(_slice_id(pair, index), mask2d, image2d, spacing)
            for index, image2d, mask2d, spacing in _slices_of(image, mask, config.preload.slice_axis)
            if _slice_id(pair, index) in slice_ids]


def _native_job(job: tuple[CasePair, frozenset, Path], config: Optional[Config] = None):
    """Write the pair's test slices into ``test-native/``; (slices written, None) or (0, one-line error).

    The worker writes the files itself: nothing large crosses between processes, and the main process
    writes the shards meanwhile.
    """
    pair, slice_ids, folder = job
    try:
        slices = native_slices(pair, slice_ids, config or _worker_config)
        for slice_id, mask2d, image2d, spacing in slices:
            write_native_slice(folder / f"{slice_id}.npz", mask2d, image2d, spacing)
    except InputError as error:  # InputError does not survive pickling between processes: send its text
        return 0, str(error)
    except Exception as error:  # a reader's or the disk's failure still gives one line naming the file
        return 0, str(InputError(pair.image_path, f"{type(error).__name__}: {error}"))
    return len(slices), None


# Set in each worker process by _init_worker, so the config crosses the process boundary once, not per job.
_worker_config: Optional[Config] = None


def _init_worker(config_json: str) -> None:
    global _worker_config
    _worker_config = Config.model_validate_json(config_json)


@dataclasses.dataclass
class _PairOutcome:
    """What a worker sends back for one pair; errors cross processes as one-line text."""

    pair: CasePair
    records: Optional[list] = None
    error: Optional[str] = None  # the pair is invalid (skipped with --skip-invalid)
    digests: Optional[dict] = None  # path -> sha256 of the pair's sources, when asked for
    digest_error: Optional[str] = None  # a source could not be hashed: always fatal, as in _hash_sources


def _pair_job(pair: CasePair, config: Optional[Config] = None, with_digests: bool = False) -> _PairOutcome:
    """Process one pair; with ``with_digests`` also hash its sources while they are in the page cache."""
    if with_digests:
        try:
            digests = {str(path): source_digest(path) for path in (pair.image_path, pair.mask_path)}
        except InputError as error:
            return _PairOutcome(pair, digest_error=str(error))
    else:
        digests = None
    try:
        return _PairOutcome(pair, records=process_pair(pair, config or _worker_config), digests=digests)
    except InputError as error:
        return _PairOutcome(pair, error=str(error), digests=digests)
    except Exception as error:  # An unexpected failure in a reader still names the file.
        return _PairOutcome(pair, error=str(InputError(pair.image_path, f"{type(error).__name__}: {error}")),
                            digests=digests)


# ----------------------------------------------------------------------------------------------------
# Up-to-date check
# ----------------------------------------------------------------------------------------------------
def source_digest(path: Path) -> str:
    """sha256 of a file, or of a DICOM series folder (its files' digests, in name order)."""
    path = Path(path)
    try:
        if path.is_dir():
            digest = hashlib.sha256()
            for child in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
                digest.update(sha256_of_file(child).encode())
            return digest.hexdigest()
        return sha256_of_file(path)
    except OSError as error:
        raise InputError(path, f"cannot read: {error.strerror or error}") from None


def _digest_job(path: str):
    """(digest, None) or (None, one-line error), for a worker process."""
    try:
        return source_digest(Path(path)), None
    except InputError as error:
        return None, str(error)


def _fingerprint(config: Config, source_hashes: dict) -> str:
    settings = config.preload.model_dump(mode="json", exclude={"workers", "skip_invalid"})
    payload = {"version": MANIFEST_VERSION, "preload": settings, "classes": config.classes, "seed": config.seed,
               "sources": sorted(source_hashes.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _source_paths(pairs: list[CasePair]) -> list[str]:
    return sorted({str(p) for pair in pairs for p in (pair.image_path, pair.mask_path)})


def _total_bytes(paths: list[str]) -> int:
    total = 0
    for path in map(Path, paths):
        try:
            total += sum(child.stat().st_size for child in path.iterdir()) if path.is_dir() else path.stat().st_size
        except OSError:
            pass  # source_digest names the file
    return total


def _hash_sources(pairs: list[CasePair], workers: Optional["_Workers"] = None) -> dict:
    """path -> sha256 of every source, hashed by the worker processes when they are worth starting."""
    paths = _source_paths(pairs)
    if workers is not None and workers.parallel and _total_bytes(paths) > _PARALLEL_HASH_BYTES:
        results = workers.map(_digest_job, paths, ordered=True, chunksize=8)
    else:
        results = map(_digest_job, paths)
    hashes = {}
    for path, (digest, error) in zip(paths, results):
        if error:
            raise InputError(None, error)
        hashes[path] = digest
    return hashes


# ----------------------------------------------------------------------------------------------------
# Worker processes, scratch files and shards
# ----------------------------------------------------------------------------------------------------
class _Workers:
    """A process pool started on first use and shared by all the work (hashing, preprocessing, the re-read of
    the test split at its original size); or none at all.

    ``processes`` 0 runs everything in this process (``parallel`` is False).
    """

    def __init__(self, config: Config, processes: int):
        self.config = config
        self.processes = processes
        self.parallel = processes > 0
        self._pool = None

    def _started(self):
        if self._pool is None:
            # "spawn" because a forked child of a process that has TensorFlow loaded (tests, notebooks) can hang.
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.processes, initializer=_init_worker,
                                      initargs=(self.config.model_dump_json(),))
        return self._pool

    def map(self, function, items, ordered: bool, chunksize: int):
        pool = self._started()
        return (pool.imap if ordered else pool.imap_unordered)(function, items, chunksize=chunksize)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _run_pairs(pairs: list[CasePair], config: Config, workers: _Workers, with_digests: bool):
    """Yield a _PairOutcome per pair, in the order they finish."""
    # disable=None: a bar on a terminal, none in logs and pipes.
    progress = dict(total=len(pairs), unit="file", desc="preload", mininterval=1.0, disable=None)
    # Worker processes have the config already (_init_worker); in this process it is passed along.
    job = functools.partial(_pair_job, config=None if workers.parallel else config, with_digests=with_digests)
    outcomes = workers.map(job, pairs, ordered=False, chunksize=4) if workers.parallel else map(job, pairs)
    yield from tqdm(outcomes, **progress)


class _ScratchSlices:
    """Finished slices appended to one raw file per array (see _SCRATCH_FIELDS), read back slice by slice.

    Three files instead of one per slice: no per-file overhead, and a slice is read back with one
    ``os.pread`` per array, without mapping the files into memory.
    """

    def __init__(self, folder: Path, image_size: tuple[int, int]):
        self.shapes = {"image": (*image_size, 1), "hu_image": tuple(image_size), "mask": tuple(image_size)}
        self.nbytes = {name: int(np.prod(self.shapes[name])) * np.dtype(dtype).itemsize
                       for name, dtype in _SCRATCH_FIELDS.items()}
        self.files = {name: open(folder / f"{name}.raw", "w+b") for name in _SCRATCH_FIELDS}
        self.count = 0

    def append(self, record: dict) -> int:
        """Move the record's arrays to the scratch files; return the slice's row there."""
        for name, dtype in _SCRATCH_FIELDS.items():
            array = np.ascontiguousarray(record.pop(name), dtype=dtype)
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

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _write_npy_member(archive: zipfile.ZipFile, name: str, dtype, shape: tuple, chunks) -> None:
    """Write ``<name>.npy`` into ``archive`` from the byte chunks of its rows, as np.savez would lay it out."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(chunk)


def _write_shard(path: Path, records: list[dict], scratch: _ScratchSlices) -> None:
    """One shard in the layout of segmenter.dataset (np.load reads it), holding one slice in memory at a time."""
    count = len(records)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for member, field in (("images", "image"), ("masks", "mask"), ("hu_images", "hu_image")):
            _write_npy_member(archive, member, _SCRATCH_FIELDS[field], (count, *scratch.shapes[field]),
                              (scratch.read(field, record["row"]) for record in records))
        nan2 = [np.nan, np.nan]
        small = {
            "ids": np.array([r["id"] for r in records], dtype=str),
            "volume_ids": np.array([r["volume_id"] for r in records], dtype=str),
            "slice_index": np.array([r["slice_index"] for r in records], dtype=np.int32),
            "spacing": np.array([r["spacing"] or nan2 for r in records], dtype=np.float32).reshape(-1, 2),
        }
        for name, array in small.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _write_shards(folder: Path, split: str, records: list[dict], scratch: _ScratchSlices, shard_size: int) -> list[str]:
    num_shards = max(1, -(-len(records) // shard_size))
    names = []
    for shard_number in range(num_shards):
        name = f"{split}.npz" if num_shards == 1 else f"{split}-{shard_number:05d}.npz"
        _write_shard(folder / name, records[shard_number * shard_size:(shard_number + 1) * shard_size], scratch)
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------
def preload(config: Config, overwrite: bool = False, skip_invalid: Optional[bool] = None, log=print) -> PreloadResult:
    """Run the preload stage for ``config``; see the module docstring."""
    skip_invalid = config.preload.skip_invalid if skip_invalid is None else skip_invalid
    output_dir = config.preloaded_dir
    pairs = find_pairs(config, log=log)
    processes = config.preload.workers if config.preload.workers > 1 and len(pairs) > 1 else 0
    with contextlib.closing(_Workers(config, processes)) as workers:
        manifest_path = output_dir / "manifest.json"
        # The up-to-date check needs every source's digest before any work; without it (a first run, or
        # --overwrite) the workers hash each pair's files as they process it, saving a pass over the data.
        hash_first = manifest_path.is_file() and not overwrite
        if hash_first:
            source_hashes = _hash_sources(pairs, workers)
            old = read_json(manifest_path)
            shards = [output_dir / name for split in old.get("splits", {}).values() for name in split["shards"]]
            native = old.get("splits", {}).get("test", {}).get("native")
            if old.get("fingerprint") == _fingerprint(config, source_hashes) and all(p.is_file() for p in shards) \
                    and (native is None or (output_dir / native).is_dir()):
                return PreloadResult(output_dir, old["splits"]["train"]["num_slices"],
                                     old["splits"]["test"]["num_slices"], old.get("skipped", []), up_to_date=True)

        with atomic_directory(output_dir) as tmp_dir, _stopped_on_error(workers):
            (tmp_dir / "scratch").mkdir()
            with contextlib.closing(_ScratchSlices(tmp_dir / "scratch", config.preload.image_size)) as scratch:
                records, skipped, digests = [], [], {}
                for outcome in _run_pairs(pairs, config, workers, with_digests=not hash_first):
                    pair, error = outcome.pair, outcome.error
                    if outcome.digest_error:
                        raise InputError(None, outcome.digest_error)
                    digests.update(outcome.digests or {})
                    if error:
                        if not skip_invalid:
                            raise InputError(None, error)
                        skipped.append({"case_id": pair.case_id, "image": str(pair.image_path),
                                        "mask": str(pair.mask_path), "error": error})
                        continue
                    for record in outcome.records:
                        record["row"] = scratch.append(record)  # keeps only the small record in memory
                        records.append(record)
                scratch.finish_writing()
                skipped.sort(key=lambda entry: entry["case_id"])  # workers finish in any order
                if not hash_first:
                    source_hashes = dict(sorted(digests.items()))
                manifest = _split_and_write(config, records, skipped, scratch, tmp_dir,
                                            _fingerprint(config, source_hashes), source_hashes, log,
                                            pairs, workers)
            for path in (tmp_dir / "scratch").iterdir():
                path.unlink()
            (tmp_dir / "scratch").rmdir()
            write_json_atomic(manifest, tmp_dir / "manifest.json")
    return PreloadResult(output_dir, manifest["splits"]["train"]["num_slices"], manifest["splits"]["test"]["num_slices"],
                         skipped)


@contextlib.contextmanager
def _stopped_on_error(workers: _Workers):
    """Stop the workers before the temporary folder is removed, so none is still writing into it."""
    try:
        yield
    except BaseException:
        workers.close()
        raise


def _split_groups(config: Config, records: list[dict], log) -> tuple[list[str], str]:
    """The group of each slice for the split, and "volume" or "slice" saying what a group is.

    Slices are grouped by patient or volume, so that no volume is in both train and test. The one exception
    is a dataset of a single volume without a group_pattern (one CT series): grouping by volume would leave
    nothing to test on, so each slice is its own group, and the log says that test figures are optimistic.
    """
    groups = [r["volume_id"] for r in records]
    if len(set(groups)) > 1:
        return groups, "volume"
    if config.preload.group_pattern is None and len(records) > 1:
        log(f"All {len(records)} slices come from one volume ({groups[0]}): each slice is its own group in the "
            "train/test split; neighbouring slices are alike, so test figures will be optimistic.")
        return [r["id"] for r in records], "slice"
    what = (f"preload.group_pattern {config.preload.group_pattern!r} puts all {len(records)} slices in one group"
            if config.preload.group_pattern is not None else "only one slice is left")
    raise InputError(config.preload.input_dir, f"cannot split into train and test: {what} ({groups[0]})")


def _start_native_test(folder: Path, test_records: list[dict], pairs: list[CasePair], config: Config,
                       workers: _Workers):
    """Start writing ``test-native/`` (see segmenter.dataset): the test slices read again at their original size.

    A second read of the test pairs (a fifth of the data by default) costs less than carrying every
    slice's original-size arrays through the scratch files until the split is known. With worker
    processes it runs while this process writes the shards; :func:`_finish_native_test` waits for it.
    """
    folder.mkdir()
    wanted: dict[str, set] = collections.defaultdict(set)
    for record in test_records:
        wanted[record["source_image"]].add(record["id"])
    jobs = [(pair, frozenset(wanted[str(pair.image_path)]), folder) for pair in pairs
            if str(pair.image_path) in wanted]
    if workers.parallel:
        return workers.map(_native_job, jobs, ordered=False, chunksize=4)  # runs in the background
    return map(functools.partial(_native_job, config=config), jobs)


def _finish_native_test(outcomes, expected: int, config: Config) -> None:
    written = 0
    for count, error in outcomes:
        if error:
            raise InputError(None, f"{error} (while reading the test slices again at their original size)")
        written += count
    if written != expected:
        raise InputError(config.preload.input_dir, f"{expected - written} test slices changed while preload ran "
                                                   "(read again at their original size, they were gone)")


def _split_and_write(config: Config, records: list[dict], skipped: list[dict], scratch: _ScratchSlices,
                     folder: Path, fingerprint: str, source_hashes: dict, log, pairs: list[CasePair],
                     workers: _Workers) -> dict:
    """Split the records, write the shards of each split into ``folder`` and return the manifest.

    When preload resized any test slice, the test split is also kept at its original size
    (``test-native/``) for the evaluate stage.
    """
    if skipped:
        log(f"Skipped {len(skipped)} invalid pairs (--skip-invalid):")
        for entry in skipped:
            log(f"  {entry['error']}")
    if not records:
        raise InputError(config.preload.input_dir, "no slices left after validation and the label filter")
    ids = [r["id"] for r in records]
    duplicates = sorted(slice_id for slice_id, count in collections.Counter(ids).items() if count > 1)
    if duplicates:
        sources = sorted({r["source_image"] for r in records if r["id"] == duplicates[0]})
        raise InputError(config.preload.input_dir, f"duplicate slice id {duplicates[0]!r} "
                                                   f"(from {', '.join(sources)})")
    groups, grouping = _split_groups(config, records, log)
    train_idx, test_idx = split_train_test(
        ids, groups, [len(r["labels"]) > 1 or r["labels"] != [0] for r in records],
        config.preload.test_fraction, config.seed)
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "experiment": config.experiment,
        "classes": config.classes,
        "image_size": list(config.preload.image_size),
        "channels": 1,
        "preprocessing": config.preload.model_dump(mode="json"),
        "sources": source_hashes,
        "skipped": skipped,
        "split_groups": grouping,
        "splits": {},
        "config": config.to_jsonable(),
    }
    test_records = [records[i] for i in test_idx]
    resized = any(tuple(r["original_shape"]) != tuple(config.preload.image_size) for r in test_records)
    if resized:
        # The workers re-read the test slices while this process writes the shards (disk-bound). Keeping them
        # alive beside scikit-learn, which the split has loaded here, costs about 100 MB at any dataset size;
        # re-reading in this process instead cost 10-15% of the speed at 5,000 slices.
        native_outcomes = _start_native_test(folder / NATIVE_TEST_DIR, test_records, pairs, config, workers)
    else:
        workers.close()  # their memory is not needed while the shards are written
    for split, indices in (("train", train_idx), ("test", test_idx)):
        split_records = sorted((records[i] for i in indices), key=lambda r: r["id"])
        shards = _write_shards(folder, split, split_records, scratch, config.preload.shard_size)
        label_counts = {}
        for record in split_records:
            for label in record["labels"]:
                label_counts[str(label)] = label_counts.get(str(label), 0) + 1
        manifest["splits"][split] = {
            "num_slices": len(split_records),
            "shards": shards,
            "slices_with_label": label_counts,
            "slices": [{k: v for k, v in r.items() if k != "row"} for r in split_records],
        }
    if resized:
        _finish_native_test(native_outcomes, len(test_records), config)
        workers.close()
    manifest["splits"]["test"]["native"] = NATIVE_TEST_DIR if resized else None
    return manifest
